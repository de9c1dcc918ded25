//! Pruning that compensates: OBSPA (structured Optimal Brain Surgeon at group level) and FLAP's
//! bias compensation.
//!
//! Every dense consumer of a group (Conv with `group = 1` seen through im2col, Gemm, MatMul with
//! a constant 2-D weight) has a layer-wise objective ‖WX − ŴX‖² whose Hessian is H = E[x xᵀ] of
//! its input columns. When the consumer has a bias, the input is augmented with a constant 1, so
//! the bias takes part in the least-squares fit and is compensated too.
//!
//! - Scoring: removing the column block Q of one channel costs ½ Σ_rows w_Q [(H⁻¹)_QQ]⁻¹ w_Qᵀ.
//! - Compensation: once every group's channels are chosen, each consumer loses the union Q of its
//!   removed columns at once and the others become Ŵ = W − W_Q [(H⁻¹)_QQ]⁻¹ (H⁻¹)_Q,:, the exact
//!   least-squares optimum of the kept columns on the damped H (no order of removal matters).
//! - Sequential refit ([`refit`]): the same least squares, measured on what the pruned and
//!   compensated prefix feeds each layer ([`CrossMoments`]), level by level in topological order
//!   (the CLI runs the model; `--refit`).
//!
//! Producers' rows are simply deleted by the rewrite; the consumers absorb the change. The pass
//! writes the compensated weights into the graph before the rewrite slices them, and the verifier
//! applies the same [`Compensation`]s to the original before masking, so the masking check still
//! holds exactly.

use super::MaskedSlice;
use faer::linalg::solvers::{DenseSolveCore, Solve};
use faer::{Mat, Side};
use prunec_ir::{Graph, Group, OpId, Role, Tensor, ValueId, constant_tensor};
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

/// Input statistics of one dense consumer, over its (im2col) input columns.
#[derive(Clone, Debug, PartialEq)]
pub struct Hessian {
    /// Number of input columns (C·kh·kw for a convolution).
    pub columns: usize,
    /// E[x xᵀ], row-major `columns × columns`; empty when `rows` holds the samples instead.
    pub second: Vec<f64>,
    /// The diagonal of E[x xᵀ].
    pub diagonal: Vec<f64>,
    /// E\[x\].
    pub mean: Vec<f64>,
    /// Rows (samples × positions) the statistics were measured on; 0 when analytic.
    pub samples: u64,
    /// The measured rows themselves (row-major `samples × columns`) when there are fewer than
    /// half as many as columns: H is then low-rank plus damping, and its inverse comes from the
    /// Woodbury identity at O(rows · columns²) instead of O(columns³).
    pub rows: Option<Vec<f64>>,
}

/// Where OBSPA's Hessians come from (`--hessian`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HessianSource {
    /// Activations of the calibration inputs (`--inputs FILE.npz`).
    Calib,
    /// Activations of seeded synthetic inputs of the model's input shapes: needs no data.
    Noise,
    /// Analytic second moments from the BatchNormalization feeding the layer (no execution).
    Bn,
    /// H = I: no compensation, the baseline.
    Identity,
}

impl HessianSource {
    /// Every source with its command-line name.
    pub const ALL: &[(&str, HessianSource)] = &[
        ("calib", HessianSource::Calib),
        ("noise", HessianSource::Noise),
        ("bn", HessianSource::Bn),
        ("identity", HessianSource::Identity),
    ];

    /// Whether the model must run (in tract) to measure the Hessians.
    pub fn runs_model(self) -> bool {
        matches!(self, HessianSource::Calib | HessianSource::Noise)
    }
}

/// How a consumer's weight reads as a `rows × columns` matrix (columns = input features).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenseView {
    /// Output features.
    pub rows: usize,
    /// Input features (input channels × kernel positions).
    pub columns: usize,
    /// Columns per index of the weight's input axis (the kernel size of a convolution).
    pub per_index: usize,
    /// The weight stores columns first (`[K, N]`: MatMul, Gemm without transB).
    pub transposed: bool,
    /// The weight's input axis.
    pub axis: usize,
}

impl DenseView {
    /// Offset of element (row, column) in the weight's row-major data.
    pub fn offset(&self, row: usize, column: usize) -> usize {
        if self.transposed { column * self.rows + row } else { row * self.columns + column }
    }

    /// The columns of some indices of the input axis.
    pub fn columns_of(&self, indices: impl IntoIterator<Item = usize>) -> Vec<usize> {
        indices.into_iter().flat_map(|i| i * self.per_index..(i + 1) * self.per_index).collect()
    }
}

/// The dense view of `op`'s constant weight (input 1), for the ops OBSPA compensates.
pub fn dense_view(graph: &Graph, op: OpId) -> Option<DenseView> {
    let o = graph.op(op);
    if !(o.domain.is_empty() || o.domain == "ai.onnx") {
        return None;
    }
    let w = constant_tensor(graph, graph.op_input(op, 1)?)?;
    if !w.dtype().is_float() {
        return None;
    }
    let dims: Vec<usize> = w.dims().iter().map(|&d| d as usize).collect();
    match (o.op_type.as_str(), dims.as_slice()) {
        ("Conv", [out, cin, kernel @ ..]) if o.attr_int("group").unwrap_or(1) == 1 && !kernel.is_empty() => {
            let per_index: usize = kernel.iter().product();
            Some(DenseView { rows: *out, columns: cin * per_index, per_index, transposed: false, axis: 1 })
        }
        ("Gemm", [a, b]) if o.attr_int("transA").unwrap_or(0) == 0 => Some(if o.attr_int("transB").unwrap_or(0) == 1 {
            DenseView { rows: *a, columns: *b, per_index: 1, transposed: false, axis: 1 }
        } else {
            DenseView { rows: *b, columns: *a, per_index: 1, transposed: true, axis: 0 }
        }),
        ("MatMul", [k, n]) => Some(DenseView { rows: *n, columns: *k, per_index: 1, transposed: true, axis: 0 }),
        _ => None,
    }
}

/// Accumulates E[x xᵀ] and E\[x\] of a consumer's input columns from one activation batch.
///
/// `activation` is the op's input 0 (row-major, `shape`). Convolutions are unfolded (im2col,
/// with pads, strides and dilations); when there are more than `max_rows` positions, an evenly
/// spaced subset is used, so the cost stays O(max_rows · columns²).
pub fn input_hessian(graph: &Graph, op: OpId, activation: &[f32], shape: &[usize], max_rows: usize) -> Option<Hessian> {
    let (d, count, row) = input_rows(graph, op, activation, shape, max_rows)?;
    accumulate(d, count, &row)
}

/// Fills one row of input columns (`columns` long) by index.
type RowReader<'a> = Box<dyn Fn(usize, &mut [f64]) + Sync + 'a>;

/// The rows a dense consumer's weight multiplies, read from its input activation: columns,
/// row count (at most `max_rows`, evenly spaced) and a reader. Equal shapes give the same rows.
fn input_rows<'a>(
    graph: &Graph,
    op: OpId,
    activation: &'a [f32],
    shape: &[usize],
    max_rows: usize,
) -> Option<(usize, usize, RowReader<'a>)> {
    let view = dense_view(graph, op)?;
    let d = view.columns;
    let spaced = |count: usize| {
        let step = count.div_ceil(max_rows.max(1)).max(1);
        (step, count.div_ceil(step))
    };
    if graph.op(op).op_type == "Conv" {
        let kernel: Vec<usize> = constant_tensor(graph, graph.op_input(op, 1)?)?.dims()[2..].iter().map(|&k| k as usize).collect();
        let unfold = Im2col::new(graph.op(op), shape, &kernel)?;
        if unfold.channels * view.per_index != d || activation.len() != shape.iter().product::<usize>() {
            return None;
        }
        let (step, picked) = spaced(unfold.positions());
        return Some((d, picked, Box::new(move |row, out| unfold.column(activation, row * step, out))));
    }
    let count = activation.len() / d.max(1);
    if shape.last() != Some(&d) || count * d != activation.len() {
        return None;
    }
    let (step, picked) = spaced(count);
    let read = move |row: usize, out: &mut [f64]| {
        let start = row * step * d;
        for (o, &x) in out.iter_mut().zip(&activation[start..start + d]) {
            *o = x as f64;
        }
    };
    Some((d, picked, Box::new(read)))
}

/// A dense layer's input in the original model (x) paired with its input in the pruned model
/// so far (x̃: the compensated and masked original), row by row: what refitting the layer to
/// the original's outputs from the pruned prefix needs.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossMoments {
    /// E[x̃ x̃ᵀ] and E[x̃]; on fewer rows than half the columns, the rows x̃ themselves instead
    /// of E[x̃ x̃ᵀ] (see [`Hessian::rows`]).
    pub current: Hessian,
    /// E[(W x) x̃ᵀ], row-major `rows × columns`: the original outputs against the new inputs;
    /// empty when the rows are kept.
    pub output_cross: Vec<f64>,
    /// E[W x].
    pub output_mean: Vec<f64>,
    /// The outputs W x of each kept row (row-major `samples × rows`), with `current.rows`.
    pub output_rows: Option<Vec<f64>>,
}

/// Measures [`CrossMoments`] of `op` from its input activation in the original (`original`) and
/// in the pruned model so far (`current`), both of `shape`, on the same rows.
pub fn cross_moments(graph: &Graph, op: OpId, original: &[f32], current: &[f32], shape: &[usize], max_rows: usize) -> Option<CrossMoments> {
    let view = dense_view(graph, op)?;
    let weight = constant_tensor(graph, graph.op_input(op, 1)?)?.to_f64_vec()?;
    let w = Mat::<f64>::from_fn(view.rows, view.columns, |r, c| weight[view.offset(r, c)]);
    let (d, count, row_x) = input_rows(graph, op, original, shape, max_rows)?;
    let (_, count_c, row_c) = input_rows(graph, op, current, shape, max_rows)?;
    if d == 0 || count == 0 || count != count_c {
        return None;
    }
    const BLOCK: usize = 2048;
    // Few rows: keep them, and the refit solves through the Woodbury identity.
    let low_rank = 2 * count < d;
    let (mut second, mut cross) = if low_rank {
        (Mat::<f64>::zeros(0, 0), Mat::<f64>::zeros(0, 0))
    } else {
        (Mat::<f64>::zeros(d, d), Mat::<f64>::zeros(view.rows, d))
    };
    let (mut rows, mut output_rows) = (Vec::new(), Vec::new());
    let (mut sum, mut squares, mut output_sum) = (vec![0.0; d], vec![0.0; d], vec![0.0; view.rows]);
    let mut buf = vec![0.0; d];
    let mut start = 0;
    while start < count {
        let n = BLOCK.min(count - start);
        let mut x = Mat::<f64>::zeros(n, d);
        let mut xc = Mat::<f64>::zeros(n, d);
        for r in 0..n {
            row_x(start + r, &mut buf);
            for (j, &v) in buf.iter().enumerate() {
                x[(r, j)] = v;
            }
            row_c(start + r, &mut buf);
            for (j, &v) in buf.iter().enumerate() {
                xc[(r, j)] = v;
                sum[j] += v;
                squares[j] += v * v;
            }
            if low_rank {
                rows.extend_from_slice(&buf);
            }
        }
        let y = &x * w.transpose();
        for r in 0..n {
            for (o, s) in output_sum.iter_mut().enumerate() {
                *s += y[(r, o)];
            }
        }
        if low_rank {
            output_rows.extend((0..n).flat_map(|r| (0..view.rows).map(move |o| (r, o))).map(|(r, o)| y[(r, o)]));
        } else {
            second += xc.transpose() * &xc;
            cross += y.transpose() * &xc;
        }
        start += n;
    }
    let scale = 1.0 / count as f64;
    let flat = |m: &Mat<f64>| (0..m.nrows() * m.ncols()).map(|k| m[(k / m.ncols(), k % m.ncols())] * scale).collect::<Vec<f64>>();
    let current = Hessian {
        columns: d,
        second: flat(&second),
        diagonal: squares.into_iter().map(|s| s * scale).collect(),
        mean: sum.into_iter().map(|s| s * scale).collect(),
        samples: count as u64,
        rows: low_rank.then_some(rows),
    };
    Some(CrossMoments {
        current,
        output_cross: flat(&cross),
        output_mean: output_sum.into_iter().map(|s| s * scale).collect(),
        output_rows: low_rank.then_some(output_rows),
    })
}

/// Compensations refit sequentially on the pruned prefix ([`refit`], level by level of layers),
/// with the layers left as they were and why.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Refit {
    /// One per refit layer: consumers of removed channels and layers downstream of them.
    pub compensations: Vec<Compensation>,
    /// Layers left as they were, and why.
    pub notes: Vec<String>,
    /// Levels of layers refit, one piece of the pruned model run for each.
    pub levels: usize,
}

/// Refits dense layers to the original model's outputs from what the pruned model feeds them:
/// for each layer of `moments`, the kept columns (and bias) minimise
/// E‖W x + b − Ŵ_K x̃_K − b̂‖² + λ‖[Ŵ_K b̂] − [W_K b]‖², that is
/// [Ŵ_K b̂] = (E[y z̃ᵀ] + λ[W_K b]) (E[z̃ z̃ᵀ] + λI)⁻¹ with y = W x + b and z̃ = [x̃_K; 1].
///
/// Where x̃ = x this is exactly the one-shot OBS update on the damped H (same λ, same handling of
/// dead columns), and a layer that lost nothing keeps its weights; where the pruned prefix has
/// changed x̃, the layer also absorbs that change. `graph` is the original (uncompensated) one.
pub fn refit(
    graph: &Graph,
    masked: &[MaskedSlice],
    moments: &BTreeMap<String, CrossMoments>,
    damping: f64,
) -> (Vec<Compensation>, Vec<String>) {
    let ops: BTreeMap<&str, OpId> = graph.op_ids().map(|op| (graph.op(op).name.as_str(), op)).collect();
    let results: Vec<Result<Compensation, String>> = moments
        .par_iter()
        .filter_map(|(node, m)| {
            let op = *ops.get(node.as_str())?;
            let view = dense_view(graph, op)?;
            let w = graph.op_input(op, 1)?;
            let weight_name = graph.value(w).name.as_str();
            let skip = |why: &str| Some(Err(format!("`{node}`: {why}")));
            if m.current.columns != view.columns || m.output_mean.len() != view.rows {
                return None;
            }
            let original = match compensable_weight(graph, w)? {
                Ok(t) => t,
                Err(why) => return skip(why),
            };
            let removed: BTreeSet<usize> = view
                .columns_of(
                    masked
                        .iter()
                        .filter(|s| s.node == *node && s.weight == weight_name && s.axis == view.axis)
                        .flat_map(|s| s.indices.iter().copied()),
                )
                .into_iter()
                .collect();
            let kept: Vec<usize> = (0..view.columns).filter(|c| !removed.contains(c)).collect();
            let weight = original.to_f64_vec()?;
            let bias = bias_of(graph, op, view.rows);
            let Some((new_weight, new_bias)) = refit_layer(&view, &weight, bias.as_ref().map(|b| b.1.as_slice()), &kept, m, damping) else {
                return skip("its refit could not be factored");
            };
            let bias = new_bias.zip(bias).map(|(values, (slot, _))| (slot, values));
            Some(Ok(Compensation::new(node, weight_name, &original.dims(), Some(new_weight), bias)))
        })
        .collect();
    done_and_notes(results)
}

/// Compensations made, and the notes of the layers left as they were.
fn done_and_notes(results: Vec<Result<Compensation, String>>) -> (Vec<Compensation>, Vec<String>) {
    let mut done = Vec::new();
    let mut notes = Vec::new();
    for r in results {
        match r {
            Ok(c) => done.push(c),
            Err(note) => notes.push(note),
        }
    }
    (done, notes)
}

/// One layer of [`refit`]: the full-shape weight (removed columns as they were) and the bias.
fn refit_layer(
    view: &DenseView,
    weight: &[f64],
    bias: Option<&[f64]>,
    kept: &[usize],
    m: &CrossMoments,
    damping: f64,
) -> Option<(Vec<f64>, Option<Vec<f64>>)> {
    let (d, h) = (view.columns, &m.current);
    let mean_diag = h.diagonal.iter().sum::<f64>() / d.max(1) as f64;
    let lambda = damping * if mean_diag > 0.0 { mean_diag } else { 1.0 };
    let k = kept.len();
    let n = k + bias.is_some() as usize;
    // What damping adds to each diagonal entry: a dead column's gets a unit diagonal too, which
    // pulls its weight toward the old one, as in OBS.
    let added = |i: usize| if i < k && h.diagonal[kept[i]] <= 0.0 { 1.0 + lambda } else { lambda };
    let b = |r: usize| bias.map_or(0.0, |b| b[r]);
    let low_rank = h.rows.as_ref().zip(m.output_rows.as_ref());
    // Tᵀ, one column per output row: the right-hand sides of A Ŵᵀ = Tᵀ, with E[(W x) z̃ᵀ] from
    // the moments here, or from the rows below when they are kept.
    let mut t = Mat::<f64>::from_fn(n, view.rows, |i, r| {
        let measured = |dense: &[f64], at: usize| if low_rank.is_some() { 0.0 } else { dense[at] };
        if i < k {
            let c = kept[i];
            measured(&m.output_cross, r * d + c) + b(r) * h.mean[c] + added(i) * weight[view.offset(r, c)]
        } else {
            measured(&m.output_mean, r) + b(r) * (1.0 + lambda)
        }
    });
    let solved = if let Some((rows, outputs)) = low_rank {
        if lambda <= 0.0 {
            // Fewer rows than columns and no damping: A is singular.
            return None;
        }
        // A = UᵀU/N + D for the N rows U = [x̃_K 1]:
        // A⁻¹ = D⁻¹ − D⁻¹Uᵀ(N·I + U D⁻¹ Uᵀ)⁻¹ U D⁻¹, at O(N·n·(N + rows)).
        let samples = h.samples as usize;
        let u = Mat::<f64>::from_fn(samples, n, |s, i| if i < k { rows[s * d + kept[i]] } else { 1.0 });
        let y = Mat::<f64>::from_fn(samples, view.rows, |s, r| outputs[s * view.rows + r]);
        t += (u.transpose() * &y) * faer::Scale(1.0 / samples as f64);
        let inv_d: Vec<f64> = (0..n).map(|i| 1.0 / added(i)).collect();
        let p = Mat::<f64>::from_fn(n, view.rows, |i, r| inv_d[i] * t[(i, r)]);
        let u_scaled = Mat::<f64>::from_fn(samples, n, |s, i| u[(s, i)] * inv_d[i]);
        let mut core = &u_scaled * u.transpose();
        for s in 0..samples {
            core[(s, s)] += samples as f64;
        }
        let correction = core.llt(Side::Lower).ok()?.solve(&(&u * &p));
        &p - u_scaled.transpose() * &correction
    } else {
        let a = Mat::<f64>::from_fn(n, n, |i, j| {
            let value = match (i < k, j < k) {
                (true, true) => h.second[kept[i] * d + kept[j]],
                (true, false) => h.mean[kept[i]],
                (false, true) => h.mean[kept[j]],
                (false, false) => 1.0,
            };
            if i == j { value + added(i) } else { value }
        });
        if n > SINGLE_PRECISION_ABOVE && damping > 0.0 {
            // As for the one-shot inverse: damping bounds the condition number, single
            // precision resolves it, and the largest factorisations take half the time.
            let single = Mat::<f32>::from_fn(n, n, |i, j| a[(i, j)] as f32);
            let rhs = Mat::<f32>::from_fn(n, view.rows, |i, r| t[(i, r)] as f32);
            let x = single.llt(Side::Lower).ok()?.solve(&rhs);
            Mat::<f64>::from_fn(n, view.rows, |i, r| x[(i, r)] as f64)
        } else {
            a.llt(Side::Lower).ok()?.solve(&t)
        }
    };
    let mut new_weight = weight.to_vec();
    for r in 0..view.rows {
        for (i, &c) in kept.iter().enumerate() {
            new_weight[view.offset(r, c)] = solved[(i, r)];
        }
    }
    let new_bias = bias.map(|_| (0..view.rows).map(|r| solved[(k, r)]).collect());
    Some((new_weight, new_bias))
}

/// Sums x xᵀ over `count` rows produced by `row`, in blocks (faer's product does the work).
fn accumulate(d: usize, count: usize, row: &(dyn Fn(usize, &mut [f64]) + Sync)) -> Option<Hessian> {
    if d == 0 || count == 0 {
        return None;
    }
    const BLOCK: usize = 2048;
    let mut second = Mat::<f64>::zeros(d, d);
    let mut sum = vec![0.0; d];
    let mut buf = vec![0.0; d];
    let low_rank = 2 * count < d;
    let mut rows = Vec::with_capacity(if low_rank { count * d } else { 0 });
    let mut start = 0;
    while start < count {
        let n = BLOCK.min(count - start);
        let mut x = Mat::<f64>::zeros(n, d);
        for r in 0..n {
            row(start + r, &mut buf);
            for (j, &v) in buf.iter().enumerate() {
                x[(r, j)] = v;
                sum[j] += v;
            }
            if low_rank {
                rows.extend_from_slice(&buf);
            }
        }
        second += x.transpose() * &x;
        start += n;
    }
    let scale = 1.0 / count as f64;
    let diagonal = (0..d).map(|i| second[(i, i)] * scale).collect();
    let flat = if low_rank { Vec::new() } else { (0..d * d).map(|k| second[(k / d, k % d)] * scale).collect() };
    let mean = sum.into_iter().map(|s| s * scale).collect();
    Some(Hessian { columns: d, second: flat, diagonal, mean, samples: count as u64, rows: low_rank.then_some(rows) })
}

/// The geometry of a convolution's unfolding: which input element each column of each output
/// position reads (zero where it falls in the padding).
struct Im2col {
    channels: usize,
    input: Vec<usize>,
    output: Vec<usize>,
    kernel: Vec<usize>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    pads_begin: Vec<i64>,
    batch: usize,
}

impl Im2col {
    fn new(op: &prunec_ir::Op, shape: &[usize], kernel: &[usize]) -> Option<Im2col> {
        let spatial = kernel.len();
        if shape.len() != spatial + 2 {
            return None;
        }
        let ints = |name: &str, default: usize| -> Vec<usize> {
            op.attr_ints(name).map(|v| v.iter().map(|&x| x.max(0) as usize).collect()).unwrap_or_else(|| vec![default; spatial])
        };
        let strides = ints("strides", 1);
        let dilations = ints("dilations", 1);
        let input = shape[2..].to_vec();
        let pads = op.attr_ints("pads").map(<[i64]>::to_vec).unwrap_or_else(|| vec![0; 2 * spatial]);
        let auto = op.attr_string("auto_pad").map(|s| String::from_utf8_lossy(s).into_owned());
        let mut pads_begin = Vec::with_capacity(spatial);
        let mut output = Vec::with_capacity(spatial);
        for i in 0..spatial {
            let extent = (kernel[i] - 1) * dilations[i] + 1;
            let (begin, end) = match auto.as_deref() {
                Some("SAME_UPPER") | Some("SAME_LOWER") => {
                    let out = input[i].div_ceil(strides[i]);
                    let total = ((out - 1) * strides[i] + extent).saturating_sub(input[i]) as i64;
                    if auto.as_deref() == Some("SAME_UPPER") { (total / 2, total - total / 2) } else { (total - total / 2, total / 2) }
                }
                Some("VALID") => (0, 0),
                _ => (*pads.get(i)?, *pads.get(i + spatial)?),
            };
            let padded = input[i] as i64 + begin + end;
            if padded < extent as i64 || strides[i] == 0 {
                return None;
            }
            output.push(((padded - extent as i64) / strides[i] as i64 + 1) as usize);
            pads_begin.push(begin);
        }
        Some(Im2col { channels: shape[1], input, output, kernel: kernel.to_vec(), strides, dilations, pads_begin, batch: shape[0] })
    }

    fn positions(&self) -> usize {
        self.batch * self.output.iter().product::<usize>()
    }

    /// Fills `out` (C·prod(kernel) columns, channel-major as the weight) for one position.
    fn column(&self, x: &[f32], position: usize, out: &mut [f64]) {
        let spatial = self.kernel.len();
        let per_sample: usize = self.output.iter().product();
        let (n, mut rest) = (position / per_sample, position % per_sample);
        let mut at = vec![0usize; spatial];
        for i in (0..spatial).rev() {
            at[i] = rest % self.output[i];
            rest /= self.output[i];
        }
        let kernel_size: usize = self.kernel.iter().product();
        let plane: usize = self.input.iter().product();
        let mut k = vec![0usize; spatial];
        for kk in 0..kernel_size {
            let mut r = kk;
            for i in (0..spatial).rev() {
                k[i] = r % self.kernel[i];
                r /= self.kernel[i];
            }
            let mut offset = Some(0usize);
            for i in 0..spatial {
                let p = (at[i] * self.strides[i] + k[i] * self.dilations[i]) as i64 - self.pads_begin[i];
                offset = match offset {
                    Some(o) if p >= 0 && (p as usize) < self.input[i] => Some(o * self.input[i] + p as usize),
                    _ => None,
                };
            }
            for c in 0..self.channels {
                out[c * kernel_size + kk] = match offset {
                    Some(o) => x[(n * self.channels + c) * plane + o] as f64,
                    None => 0.0,
                };
            }
        }
    }
}

/// A consumer's weight (and bias) after compensation, in the original shapes: the rewrite
/// slices the removed columns away, and the verifier zeroes them in the masked reference.
#[derive(Clone, Debug, PartialEq)]
pub struct Compensation {
    /// The consumer.
    pub node: String,
    /// The weight it reads (input 1).
    pub weight: String,
    /// The compensated weight (`None`: it stays, as FLAP only moves the bias).
    pub tensor: Option<Tensor>,
    /// The compensated bias, where the consumer has one.
    pub bias: Option<BiasUpdate>,
}

/// A new bias for a consumer.
#[derive(Clone, Debug, PartialEq)]
pub struct BiasUpdate {
    /// Where the bias is read.
    pub slot: BiasSlot,
    /// Its values, one per output feature.
    pub values: Vec<f32>,
}

/// Where a consumer's bias lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BiasSlot {
    /// An input of the consumer itself (Conv's B, Gemm's C).
    Input(usize),
    /// The constant input `slot` of the Add (by node name) that follows a MatMul.
    Add(String, usize),
    /// The running mean of the BatchNormalization (by node name) right after a Conv or Gemm
    /// without a bias: a bias b before it is the same as a mean of −b.
    BatchNormMean(String),
}

/// Finds the bias of a dense consumer: its values and where it is read. `None` when the consumer
/// has no bias a compensation may rewrite (absent, shared with another reader, not 1-D).
fn bias_of(graph: &Graph, op: OpId, rows: usize) -> Option<(BiasSlot, Vec<f64>)> {
    let o = graph.op(op);
    let values = |v: ValueId| -> Option<Vec<f64>> {
        let t = constant_tensor(graph, v)?;
        let one_d = t.numel() as usize == rows && t.dims().iter().filter(|&&d| d != 1).count() <= 1;
        (t.dtype() == prunec_ir::DType::F32 && one_d && rewritable(graph, v)).then(|| t.to_f64_vec()).flatten()
    };
    let unit = |name: &str| o.attr_float(name).unwrap_or(1.0) == 1.0;
    let input_or_norm = |slot: usize| match graph.op_input(op, slot) {
        Some(b) => Some((BiasSlot::Input(slot), values(b)?)),
        None => {
            let out = graph.op_output(op, 0)?;
            let [(bn, prunec_ir::Edge::Input(0))] = graph.consumers(out)[..] else { return None };
            if graph.op(bn).op_type != "BatchNormalization" || graph.is_output(out) {
                return None;
            }
            let mean = values(graph.op_input(bn, 3)?)?;
            Some((BiasSlot::BatchNormMean(graph.op(bn).name.clone()), mean.into_iter().map(|m| -m).collect()))
        }
    };
    match o.op_type.as_str() {
        "Conv" => input_or_norm(2),
        "Gemm" if unit("alpha") && unit("beta") => input_or_norm(2),
        "MatMul" => {
            let out = graph.op_output(op, 0)?;
            let [(add, _)] = graph.consumers(out)[..] else { return None };
            if graph.op(add).op_type != "Add" || graph.is_output(out) {
                return None;
            }
            let slot = (0..2).find(|&s| graph.op_input(add, s) != Some(out))?;
            Some((BiasSlot::Add(graph.op(add).name.clone(), slot), values(graph.op_input(add, slot)?)?))
        }
        _ => None,
    }
}

/// The f32 weight `w` of a consumer, when a compensation may rewrite it in place; else the
/// note of why the consumer stays as it was. `None` when `w` is not a constant at all.
fn compensable_weight(graph: &Graph, w: ValueId) -> Option<Result<&Tensor, &'static str>> {
    if !rewritable(graph, w) {
        return Some(Err("its weight is shared with another reader; left uncompensated"));
    }
    let t = constant_tensor(graph, w)?;
    Some(if t.dtype() == prunec_ir::DType::F32 { Ok(t) } else { Err("its weight is not f32; left uncompensated") })
}

impl Compensation {
    /// A compensation of `node` from the new values (f64, rounded to the stored f32).
    fn new(node: &str, weight: &str, dims: &[u64], new_weight: Option<Vec<f64>>, new_bias: Option<(BiasSlot, Vec<f64>)>) -> Compensation {
        let to_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        Compensation {
            node: node.to_string(),
            weight: weight.to_string(),
            tensor: new_weight.map(|w| Tensor::from_f32(weight, dims, &to_f32(w))),
            bias: new_bias.map(|(slot, b)| BiasUpdate { slot, values: to_f32(b) }),
        }
    }
}

/// Whether a constant can be replaced where it is without touching another reader: a private
/// initializer or a `Constant` node's output, read by one op only.
fn rewritable(graph: &Graph, v: ValueId) -> bool {
    let single = graph.consumers(v).len() == 1 && !graph.is_output(v);
    let constant_node = graph.producer(v).is_some_and(|(op, _)| graph.op(op).op_type == "Constant");
    single && (graph.is_private_initializer(v) || constant_node)
}

/// Layers with more input columns than this are inverted in single precision (when damped).
const SINGLE_PRECISION_ABOVE: usize = 1024;

/// H + λI with λ = `damping` × mean diagonal, augmented with the bias row and column when
/// `with_bias`, then inverted. Dead columns (zero diagonal) get a unit diagonal.
fn damped_inverse(h: &Hessian, damping: f64, with_bias: bool) -> Option<Mat<f64>> {
    let d = h.columns;
    let n = d + with_bias as usize;
    let mean_diag = h.diagonal.iter().sum::<f64>() / d.max(1) as f64;
    let lambda = damping * if mean_diag > 0.0 { mean_diag } else { 1.0 };
    if let Some(rows) = h.rows.as_ref().filter(|_| lambda > 0.0) {
        return Some(woodbury_inverse(rows, h.samples as usize, d, with_bias, lambda));
    }
    if h.second.len() != d * d {
        // Fewer rows than columns and no damping: H is singular, nothing to invert.
        return None;
    }
    let m = Mat::<f64>::from_fn(n, n, |i, j| {
        let value = match (i < d, j < d) {
            (true, true) => h.second[i * d + j],
            (true, false) => h.mean[i],
            (false, true) => h.mean[j],
            (false, false) => 1.0,
        };
        if i != j {
            value
        } else if i < d && h.diagonal[i] <= 0.0 {
            1.0 + lambda
        } else {
            value + lambda
        }
    });
    if n > SINGLE_PRECISION_ABOVE && damping > 0.0 {
        // Damping bounds the condition number by about max diag / λ, which single precision
        // resolves, and halves the cost of the largest factorisations (a 4608-column conv).
        let single = Mat::<f32>::from_fn(n, n, |i, j| m[(i, j)] as f32);
        let inverse = single.llt(Side::Lower).ok()?.inverse();
        return Some(Mat::from_fn(n, n, |i, j| inverse[(i, j)] as f64));
    }
    let llt = m.llt(Side::Lower).ok()?;
    Some(llt.inverse())
}

/// (AᵀA/N + λI)⁻¹ = (I − Aᵀ(NλI + AAᵀ)⁻¹A)/λ for the N sample rows A (with a column of ones
/// when `with_bias`): the damped inverse of a Hessian measured on fewer rows than columns.
/// Dead columns need no special case here: λ alone keeps them invertible.
fn woodbury_inverse(rows: &[f64], samples: usize, d: usize, with_bias: bool, lambda: f64) -> Mat<f64> {
    let n = d + with_bias as usize;
    let a = Mat::<f64>::from_fn(samples, n, |r, c| if c < d { rows[r * d + c] } else { 1.0 });
    let mut m = &a * a.transpose();
    for i in 0..samples {
        m[(i, i)] += samples as f64 * lambda;
    }
    let solved = match m.llt(Side::Lower) {
        Ok(llt) => llt.solve(&a),
        Err(_) => return Mat::from_fn(n, n, |i, j| if i == j { 1.0 / lambda } else { 0.0 }),
    };
    let mut inverse = a.transpose() * &solved;
    for j in 0..n {
        for i in 0..n {
            let identity = if i == j { 1.0 } else { 0.0 };
            inverse[(i, j)] = (identity - inverse[(i, j)]) / lambda;
        }
    }
    inverse
}

/// A consumer ready for OBS: its weight as a matrix, the inverse Hessian, its bias.
pub(crate) struct Layer<'h> {
    op: OpId,
    view: DenseView,
    weight_name: String,
    weight: Vec<f64>,
    hessian: &'h Hessian,
    /// (H + λI)⁻¹, bias-augmented when `bias` is set; empty for FLAP, which needs no inverse.
    inverse: Mat<f64>,
    bias: Option<(BiasSlot, Vec<f64>)>,
}

impl<'h> Layer<'h> {
    /// Prepares `node`'s consumer layer from its Hessian (`None`: not a dense consumer, or H is
    /// not usable).
    pub(crate) fn new(graph: &Graph, op: OpId, hessian: &'h Hessian, damping: f64) -> Option<Layer<'h>> {
        let view = dense_view(graph, op)?;
        if view.columns != hessian.columns {
            return None;
        }
        let w = graph.op_input(op, 1)?;
        let weight = constant_tensor(graph, w)?.to_f64_vec()?;
        let bias = bias_of(graph, op, view.rows);
        let inverse = damped_inverse(hessian, damping, bias.is_some())?;
        Some(Layer { op, view, weight_name: graph.value(w).name.clone(), weight, hessian, inverse, bias })
    }

    /// The layer without the inverse Hessian, for FLAP.
    pub(crate) fn without_inverse(graph: &Graph, op: OpId, hessian: &'h Hessian) -> Option<Layer<'h>> {
        let view = dense_view(graph, op)?;
        let w = graph.op_input(op, 1)?;
        let weight = constant_tensor(graph, w)?.to_f64_vec()?;
        (view.columns == hessian.columns).then(|| Layer {
            op,
            view,
            weight_name: graph.value(w).name.clone(),
            weight,
            hessian,
            inverse: Mat::zeros(0, 0),
            bias: None,
        })
    }

    /// ½ Σ_rows w_Q [(H⁻¹)_QQ]⁻¹ w_Qᵀ: the least error of removing the columns `q`.
    pub(crate) fn cost(&self, q: &[usize]) -> f64 {
        obs_cost(&self.view, &self.weight, &self.inverse, q)
    }

    /// The weight and bias after removing the columns `q` with the optimal update of the others.
    fn compensate(&self, q: &[usize]) -> Option<(Vec<f64>, Option<Vec<f64>>)> {
        let view = self.view;
        let n = self.inverse.nrows();
        let block = Mat::<f64>::from_fn(q.len(), q.len(), |i, j| self.inverse[(q[i], q[j])]);
        let llt = block.llt(Side::Lower).ok()?;
        // Z = [(H⁻¹)_QQ]⁻¹ (H⁻¹)_Q,: ; δW = −W_Q Z.
        let rows_q = Mat::<f64>::from_fn(q.len(), n, |i, j| self.inverse[(q[i], j)]);
        let z = llt.solve(&rows_q);
        let w_q = Mat::<f64>::from_fn(view.rows, q.len(), |r, i| self.weight[view.offset(r, q[i])]);
        let delta = &w_q * &z;
        let mut weight = self.weight.clone();
        let removed: BTreeSet<usize> = q.iter().copied().collect();
        for r in 0..view.rows {
            for c in (0..view.columns).filter(|c| !removed.contains(c)) {
                weight[view.offset(r, c)] -= delta[(r, c)];
            }
        }
        let bias = self.bias.as_ref().map(|(_, b)| b.iter().enumerate().map(|(r, &v)| v - delta[(r, view.columns)]).collect());
        Some((weight, bias))
    }
}

/// ½ Σ_rows w_Q [(H⁻¹)_QQ]⁻¹ w_Qᵀ for a weight read through `view` and the inverse Hessian.
fn obs_cost(view: &DenseView, weight: &[f64], inverse: &Mat<f64>, q: &[usize]) -> f64 {
    if q.is_empty() {
        return 0.0;
    }
    let block = Mat::<f64>::from_fn(q.len(), q.len(), |i, j| inverse[(q[i], q[j])]);
    let Ok(llt) = block.llt(Side::Lower) else { return f64::INFINITY };
    let w_q = Mat::<f64>::from_fn(q.len(), view.rows, |i, r| weight[view.offset(r, q[i])]);
    let solved = llt.solve(&w_q);
    let mut cost = 0.0;
    for r in 0..view.rows {
        for i in 0..q.len() {
            cost += w_q[(i, r)] * solved[(i, r)];
        }
    }
    0.5 * cost
}

/// FLAP's fluctuation score of removing the columns `q`: Σ_q Var(x_q)·‖W_:,q‖².
pub(crate) fn fluctuation(view: &DenseView, weight: &[f64], hessian: &Hessian, q: &[usize]) -> f64 {
    q.iter()
        .map(|&c| {
            let var = (hessian.diagonal[c] - hessian.mean[c] * hessian.mean[c]).max(0.0);
            let norm: f64 = (0..view.rows).map(|r| weight[view.offset(r, c)].powi(2)).sum();
            var * norm
        })
        .sum()
}

/// How removed columns are made up for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    /// OBS update of the kept columns and the bias.
    Obs,
    /// The removed columns' mean contribution folded into the bias (FLAP).
    MeanIntoBias,
}

/// Computes the compensations of the consumers that read removed channels, each consumer's
/// Hessian and inverse computed in turn and dropped once its compensation is made.
pub(crate) fn compensations(
    graph: &Graph,
    masked: &[MaskedSlice],
    consumers: &Consumers,
    statistics: &Statistics,
    damping: f64,
    method: Method,
) -> (Vec<Compensation>, Vec<String>) {
    let mut per_consumer: BTreeMap<(&str, &str), BTreeSet<usize>> = BTreeMap::new();
    for s in masked {
        per_consumer.entry((&s.node, &s.weight)).or_default().extend(&s.indices);
    }
    // One consumer at a time (faer spreads each one's products and factorisation over the
    // threads): two of the largest layers' Hessians and inverses at once would double the peak.
    let results: Vec<Result<Compensation, String>> = per_consumer
        .into_iter()
        .filter_map(|((node, weight), indices)| {
            let h = statistics.hessian(graph, node)?;
            let layer = consumers.layer(graph, node, &h, method == Method::Obs, damping)?;
            let (op, view) = (layer.op, layer.view);
            let h = layer.hessian;
            let w = graph.value_by_name(weight)?;
            if graph.op_input(op, 1) != Some(w) {
                return None;
            }
            let skip = |why: &str| Some(Err(format!("`{node}`: {why}")));
            let original = match compensable_weight(graph, w)? {
                Ok(t) => t,
                Err(why) => return skip(why),
            };
            let q = view.columns_of(indices.iter().copied());
            let (new_weight, new_bias) = match method {
                Method::Obs => {
                    let Some(out) = layer.compensate(&q) else { return skip("its Hessian could not be factored") };
                    (Some(out.0), out.1.zip(layer.bias.as_ref()).map(|(b, (slot, _))| (slot.clone(), b)))
                }
                Method::MeanIntoBias => {
                    let Some((slot, mut bias)) = bias_of(graph, op, view.rows) else { return skip("it has no bias to fold the mean into") };
                    for (r, b) in bias.iter_mut().enumerate() {
                        *b += q.iter().map(|&c| layer.weight[view.offset(r, c)] * h.mean[c]).sum::<f64>();
                    }
                    (None, Some((slot, bias)))
                }
            };
            Some(Ok(Compensation::new(node, weight, &original.dims(), new_weight, new_bias)))
        })
        .collect();
    done_and_notes(results)
}

/// Writes compensations into a graph, in place: the weights and biases keep their names, so the
/// removal planned on the graph still names them.
pub fn apply_compensations(graph: &mut Graph, compensations: &[Compensation]) -> Result<(), String> {
    if compensations.is_empty() {
        return Ok(());
    }
    let ops: BTreeMap<String, OpId> = graph.op_ids().map(|op| (graph.op(op).name.clone(), op)).collect();
    for c in compensations {
        let w = graph.value_by_name(&c.weight).ok_or_else(|| format!("`{}` is not in the model", c.weight))?;
        if let Some(t) = &c.tensor {
            put_constant(graph, w, t.clone())?;
        }
        if let Some(b) = &c.bias {
            let (op, slot, sign) = match &b.slot {
                BiasSlot::Input(slot) => (&c.node, *slot, 1.0),
                BiasSlot::Add(add, slot) => (add, *slot, 1.0),
                BiasSlot::BatchNormMean(bn) => (bn, 3, -1.0),
            };
            // The consumer itself is the reader of its weight of that name: node names need not be
            // unique, nor set.
            let reader = matches!(b.slot, BiasSlot::Input(_))
                .then(|| graph.consumers(w).into_iter().map(|(op, _)| op).find(|&r| graph.op(r).name == *op))
                .flatten();
            let op = reader.or_else(|| ops.get(op.as_str()).copied()).ok_or_else(|| format!("`{op}` is not in the model"))?;
            let old = graph.op_input(op, slot).ok_or_else(|| format!("`{}` has no bias input", graph.op(op).name))?;
            let dims = constant_tensor(graph, old).map(|t| t.dims()).unwrap_or_default();
            let values: Vec<f32> = b.values.iter().map(|v| sign * v).collect();
            put_constant(graph, old, Tensor::from_f32(&graph.value(old).name, &dims, &values))?;
        }
    }
    Ok(())
}

/// Replaces the tensor of a constant that [`rewritable`] accepted, keeping its name.
fn put_constant(graph: &mut Graph, v: ValueId, tensor: Tensor) -> Result<(), String> {
    if graph.value(v).initializer().is_some() {
        graph.set_initializer(v, tensor);
        return Ok(());
    }
    let not_constant = || format!("`{}` is not a constant prunec can rewrite", graph.value(v).name);
    let op = graph.producer(v).map(|(op, _)| op).filter(|&op| graph.op(op).op_type == "Constant").ok_or_else(not_constant)?;
    let attr = graph.op_mut(op).attributes.iter_mut().find(|a| a.name() == "value");
    attr.ok_or_else(|| "a Constant node without a `value` tensor".to_string())?.tensor = Some(tensor);
    Ok(())
}

/// Where the consumers' Hessians come from. Measured ones are computed from the layer's input
/// activation each time one is asked for, and dropped by the caller once used: a Hessian and
/// its inverse take 2·8·d² bytes for d input columns (340 MB for a 512-channel 3×3 convolution),
/// so holding every layer's at once takes many times the model's size.
pub(crate) enum Statistics<'c> {
    /// Computed beforehand, by node name: BatchNormalization's analytic ones, or a calibration
    /// that holds its Hessians ([`super::statistics::collect`]).
    Computed(std::borrow::Cow<'c, BTreeMap<String, Hessian>>),
    /// Measured from each consumer's input activation when asked.
    Measured(&'c BTreeMap<String, super::criteria::LayerInput>),
}

impl Statistics<'_> {
    /// `node`'s Hessian (`None` when it has no statistics, or its input cannot be read).
    pub(crate) fn hessian(&self, graph: &Graph, node: &str) -> Option<std::borrow::Cow<'_, Hessian>> {
        use std::borrow::Cow;
        match self {
            Statistics::Computed(map) => map.get(node).map(Cow::Borrowed),
            Statistics::Measured(inputs) => {
                let i = inputs.get(node)?;
                let x = &i.activation;
                input_hessian(graph, i.op, &x.values, &x.shape, super::statistics::MAX_HESSIAN_ROWS).map(Cow::Owned)
            }
        }
    }

    /// How many consumers have a Hessian, without computing any.
    pub(crate) fn count(&self, graph: &Graph) -> usize {
        match self {
            Statistics::Computed(map) => map.len(),
            Statistics::Measured(inputs) => inputs
                .values()
                .filter(|i| {
                    let x = &i.activation;
                    // What makes `accumulate` give up.
                    input_rows(graph, i.op, &x.values, &x.shape, super::statistics::MAX_HESSIAN_ROWS)
                        .is_some_and(|(d, count, _)| d > 0 && count > 0)
                })
                .count(),
        }
    }
}

/// The dense consumers of some groups: the op of each by node name (the last op of that name).
pub(crate) struct Consumers(BTreeMap<String, OpId>);

impl Consumers {
    /// The consumers of `groups`.
    pub(crate) fn of(graph: &Graph, groups: &[&Group]) -> Consumers {
        let names: BTreeSet<&str> =
            groups.iter().flat_map(|g| &g.weights).filter(|w| w.role == Role::Consumer).map(|w| w.node.as_str()).collect();
        Consumers(graph.op_ids().map(|op| (graph.op(op).name.clone(), op)).filter(|(n, _)| names.contains(n.as_str())).collect())
    }

    /// `node`'s layer on its Hessian `h`: its weights and, for OBS (`inverse`), the damped
    /// inverse Hessian (the expensive part: one factorisation).
    fn layer<'h>(&self, graph: &Graph, node: &str, h: &'h Hessian, inverse: bool, damping: f64) -> Option<Layer<'h>> {
        let op = *self.0.get(node)?;
        if inverse { Layer::new(graph, op, h, damping) } else { Layer::without_inverse(graph, op, h) }
    }
}

/// Scores every channel of each group by what removing it costs the group's consumers: the OBS
/// error for [`super::Criterion::Obspa`], the fluctuation for [`super::Criterion::Flap`].
/// Consumers without statistics (no Hessian, not dense) count with H = I: ½‖w_Q‖².
///
/// The layers are taken one after another (faer spreads each one's products and factorisation
/// over the threads): each one's Hessian and inverse are computed, every slice the groups read
/// of it is costed, and both are dropped before the next layer.
pub(crate) fn score_groups(
    graph: &Graph,
    groups: &[&Group],
    criterion: super::Criterion,
    reduction: super::Reduction,
    consumers: &Consumers,
    statistics: &Statistics,
    damping: f64,
) -> Vec<Option<Vec<f64>>> {
    let obs = criterion == super::Criterion::Obspa;
    // Which slices (group, weight) read each consumer.
    let mut slices: BTreeMap<&str, Vec<(usize, usize)>> = BTreeMap::new();
    for (gi, g) in groups.iter().enumerate() {
        for (wi, w) in g.weights.iter().enumerate().filter(|(_, w)| w.role == Role::Consumer) {
            slices.entry(w.node.as_str()).or_default().push((gi, wi));
        }
    }
    let costs: BTreeMap<(usize, usize), Vec<f64>> = slices
        .into_iter()
        .flat_map(|(node, read)| {
            let h = statistics.hessian(graph, node);
            let layer = h.as_deref().and_then(|h| consumers.layer(graph, node, h, obs, damping));
            match &layer {
                None => Vec::new(),
                Some(l) => read
                    .into_iter()
                    .filter(|&(gi, wi)| {
                        let w = &groups[gi].weights[wi];
                        l.view.axis == w.axis && l.weight_name == w.weight
                    })
                    .map(|(gi, wi)| {
                        let costs = groups[gi].weights[wi]
                            .indices
                            .iter()
                            .map(|idx| {
                                let q = l.view.columns_of(idx.iter().copied());
                                if obs { l.cost(&q) } else { fluctuation(&l.view, &l.weight, l.hessian, &q) }
                            })
                            .collect();
                        ((gi, wi), costs)
                    })
                    .collect::<Vec<((usize, usize), Vec<f64>)>>(),
            }
        })
        .collect();
    groups
        .par_iter()
        .enumerate()
        .map(|(gi, g)| {
            let channels = g.channels? as usize;
            let per_slice: Vec<Vec<f64>> = g
                .weights
                .iter()
                .enumerate()
                .filter(|(_, w)| w.role == Role::Consumer)
                .filter_map(|(wi, w)| match costs.get(&(gi, wi)) {
                    Some(c) => Some(c.clone()),
                    None => {
                        let t = constant_tensor(graph, graph.value_by_name(&w.weight)?)?;
                        let sums = t.dtype().is_float().then(|| t.axis_sums(w.axis, |x| 0.5 * x * x)).flatten()?;
                        Some(w.indices.iter().map(|idx| idx.iter().map(|&i| sums.get(i).copied().unwrap_or(0.0)).sum()).collect())
                    }
                })
                .collect();
            super::criteria::reduce(&per_slice, channels, reduction)
        })
        .collect()
}

/// Analytic input statistics of a dense consumer fed by a BatchNormalization (directly or through
/// a Relu): each channel is N(β, γ²·v/(v+ε)), rectified by the Relu, channels and positions
/// independent (padding ignored). `None` when the input comes from anything else.
pub fn bn_hessian(graph: &Graph, op: OpId) -> Option<Hessian> {
    let view = dense_view(graph, op)?;
    let (mut producer, _) = graph.producer(graph.op_input(op, 0)?)?;
    let relu = graph.op(producer).op_type == "Relu";
    if relu {
        producer = graph.producer(graph.op_input(producer, 0)?)?.0;
    }
    let bn = graph.op(producer);
    if bn.op_type != "BatchNormalization" {
        return None;
    }
    let param = |slot: usize| constant_tensor(graph, graph.op_input(producer, slot)?)?.to_f64_vec();
    let (gamma, beta, var) = (param(1)?, param(2)?, param(4)?);
    let eps = bn.attr_float("epsilon").unwrap_or(1e-5) as f64;
    let channels = view.columns / view.per_index;
    if gamma.len() != channels || beta.len() != channels || var.len() != channels {
        return None;
    }
    let moments: Vec<(f64, f64)> = (0..channels)
        .map(|c| {
            let (mu, sigma) = (beta[c], gamma[c].abs() * (var[c] / (var[c] + eps)).max(0.0).sqrt());
            if !relu {
                return (mu, mu * mu + sigma * sigma);
            }
            if sigma <= 0.0 {
                let m = mu.max(0.0);
                return (m, m * m);
            }
            let t = mu / sigma;
            let (cdf, pdf) = (normal_cdf(t), (-0.5 * t * t).exp() / (2.0 * std::f64::consts::PI).sqrt());
            (mu * cdf + sigma * pdf, (mu * mu + sigma * sigma) * cdf + mu * sigma * pdf)
        })
        .collect();
    let d = view.columns;
    let mean: Vec<f64> = (0..d).map(|q| moments[q / view.per_index].0).collect();
    let mut second = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            second[i * d + j] = if i == j { moments[i / view.per_index].1 } else { mean[i] * mean[j] };
        }
    }
    let diagonal = (0..d).map(|i| second[i * d + i]).collect();
    Some(Hessian { columns: d, second, diagonal, mean, samples: 0, rows: None })
}

/// Φ(x) by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7).
fn normal_cdf(x: f64) -> f64 {
    let z = x.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-z * z).exp();
    if x >= 0.0 { 0.5 * (1.0 + erf) } else { 0.5 * (1.0 - erf) }
}

/// The Hessians of many consumers from their input activations (`(op, data, shape)`), in
/// parallel; consumers [`input_hessian`] cannot read are left out.
pub fn input_hessians(graph: &Graph, reads: &[(OpId, &[f32], &[usize])], max_rows: usize) -> BTreeMap<String, Hessian> {
    reads
        .par_iter()
        .filter_map(|&(op, data, shape)| Some((graph.op(op).name.clone(), input_hessian(graph, op, data, shape, max_rows)?)))
        .collect()
}

/// A layer's input activation in the original and in the pruned model so far, and its shape.
pub type PairedInput<'a> = (OpId, &'a [f32], &'a [f32], &'a [usize]);

/// The [`CrossMoments`] of many layers from their paired input activations, in parallel; layers
/// [`cross_moments`] cannot read are left out.
pub fn cross_moments_of(graph: &Graph, reads: &[PairedInput], max_rows: usize) -> BTreeMap<String, CrossMoments> {
    reads
        .par_iter()
        .filter_map(|&(op, x, x_now, shape)| Some((graph.op(op).name.clone(), cross_moments(graph, op, x, x_now, shape, max_rows)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A naive strided, padded, dilated 2-D convolution of one sample, for comparison.
    #[allow(clippy::too_many_arguments)]
    fn direct_conv(x: &[f32], c: usize, h: usize, w: usize, weight: &[f32], k: usize, stride: usize, pad: usize, dil: usize) -> Vec<f64> {
        let extent = (k - 1) * dil + 1;
        let (oh, ow) = ((h + 2 * pad - extent) / stride + 1, (w + 2 * pad - extent) / stride + 1);
        let mut out = Vec::new();
        for i in 0..oh {
            for j in 0..ow {
                let mut acc = 0.0;
                for ch in 0..c {
                    for a in 0..k {
                        for b in 0..k {
                            let (y, x0) = ((i * stride + a * dil) as i64 - pad as i64, (j * stride + b * dil) as i64 - pad as i64);
                            if y >= 0 && x0 >= 0 && (y as usize) < h && (x0 as usize) < w {
                                acc += (weight[(ch * k + a) * k + b] * x[(ch * h + y as usize) * w + x0 as usize]) as f64;
                            }
                        }
                    }
                }
                out.push(acc);
            }
        }
        out
    }

    fn unnamed_op(op_type: &str) -> prunec_ir::Op {
        prunec_ir::Op {
            name: String::new(),
            op_type: op_type.into(),
            domain: String::new(),
            attributes: Vec::new(),
            meta: Default::default(),
            seq: 0,
        }
    }

    #[test]
    fn im2col_columns_reproduce_the_convolution() {
        let (c, h, w, k, stride, pad, dil) = (2, 7, 6, 3, 2, 1, 2);
        let x: Vec<f32> = (0..c * h * w).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
        let weight: Vec<f32> = (0..c * k * k).map(|i| ((i * 13 % 7) as f32) * 0.5 - 1.0).collect();
        let mut op = unnamed_op("Conv");
        for (name, v) in [("strides", stride), ("pads", pad), ("dilations", dil)] {
            let n = if name == "pads" { 4 } else { 2 };
            op.set_attr_ints(name, &vec![v as i64; n]);
        }
        let unfold = Im2col::new(&op, &[1, c, h, w], &[k, k]).expect("valid geometry");
        let want = direct_conv(&x, c, h, w, &weight, k, stride, pad, dil);
        assert_eq!(unfold.positions(), want.len());
        let mut column = vec![0.0; c * k * k];
        for (p, want) in want.iter().enumerate() {
            unfold.column(&x, p, &mut column);
            let got: f64 = column.iter().zip(&weight).map(|(a, &b)| a * b as f64).sum();
            assert!((got - want).abs() < 1e-9, "position {p}: {got} vs {want}");
        }
    }

    #[test]
    fn refitting_on_unchanged_inputs_is_the_one_shot_obs_update() {
        // x̃ = x: the refit's normal equations are OBS's on the damped, bias-augmented H.
        let (rows, d) = (3, 4);
        let samples: Vec<[f64; 4]> = (0..9)
            .map(|i| {
                let f = i as f64;
                [f.sin(), (1.3 * f).cos(), 0.5 * f - 2.0, 0.0]
            })
            .collect();
        let count = samples.len() as f64;
        let mut second = vec![0.0; d * d];
        let mut mean = vec![0.0; d];
        for x in &samples {
            for i in 0..d {
                mean[i] += x[i] / count;
                for j in 0..d {
                    second[i * d + j] += x[i] * x[j] / count;
                }
            }
        }
        let diagonal = (0..d).map(|i| second[i * d + i]).collect();
        let h = Hessian { columns: d, second, diagonal, mean, samples: samples.len() as u64, rows: None };
        let view = DenseView { rows, columns: d, per_index: 1, transposed: false, axis: 1 };
        let weight: Vec<f64> = (0..rows * d).map(|i| ((i * 7 % 5) as f64) - 2.0).collect();
        let bias = vec![0.5, -1.0, 2.0];
        let (mut cross, mut output_mean) = (vec![0.0; rows * d], vec![0.0; rows]);
        for x in &samples {
            for r in 0..rows {
                let y: f64 = (0..d).map(|c| weight[view.offset(r, c)] * x[c]).sum();
                output_mean[r] += y / count;
                for c in 0..d {
                    cross[r * d + c] += y * x[c] / count;
                }
            }
        }
        let m = CrossMoments { current: h.clone(), output_cross: cross, output_mean, output_rows: None };
        let damping = 0.05;
        let (refit_w, refit_b) = refit_layer(&view, &weight, Some(&bias), &[0, 2, 3], &m, damping).expect("factorable");
        let mut graph = Graph::new(Default::default());
        let op = graph.add_op(unnamed_op("Gemm"), &[], &[]).expect("an op without edges");
        let layer = Layer {
            op,
            view,
            weight_name: "w".into(),
            weight: weight.clone(),
            hessian: &h,
            inverse: damped_inverse(&h, damping, true).expect("invertible"),
            bias: Some((BiasSlot::Input(2), bias.clone())),
        };
        let (obs_w, obs_b) = layer.compensate(&[1]).expect("factorable");
        for r in 0..rows {
            for c in [0, 2, 3] {
                let (a, b) = (refit_w[view.offset(r, c)], obs_w[view.offset(r, c)]);
                assert!((a - b).abs() < 1e-9, "row {r} column {c}: {a} vs {b}");
            }
        }
        for (a, b) in refit_b.expect("bias").iter().zip(obs_b.expect("bias")) {
            assert!((a - b).abs() < 1e-9, "bias {a} vs {b}");
        }
        // A layer that lost nothing, on unchanged inputs, keeps its weights.
        let (same, _) = refit_layer(&view, &weight, Some(&bias), &[0, 1, 2, 3], &m, damping).expect("factorable");
        for (a, b) in same.iter().zip(&weight) {
            assert!((a - b).abs() < 1e-9);
        }
    }

    #[test]
    fn refitting_on_few_rows_through_woodbury_equals_the_dense_solve() {
        // 3 rows, 8 columns (one dead): the kept rows and the dense moments give one refit.
        let (samples, d, rows) = (3, 8, 2);
        let value = |s: usize, c: usize, salt: f64| if c == 5 { 0.0 } else { ((s * 7 + c * 3) as f64 * salt).sin() };
        let now: Vec<f64> = (0..samples * d).map(|k| value(k / d, k % d, 0.7)).collect();
        let before: Vec<f64> = (0..samples * d).map(|k| value(k / d, k % d, 1.1)).collect();
        let view = DenseView { rows, columns: d, per_index: 1, transposed: false, axis: 1 };
        let weight: Vec<f64> = (0..rows * d).map(|i| ((i * 5 % 7) as f64) * 0.3 - 1.0).collect();
        let outputs: Vec<f64> =
            (0..samples * rows).map(|k| (0..d).map(|c| weight[view.offset(k % rows, c)] * before[(k / rows) * d + c]).sum()).collect();
        let n = samples as f64;
        let mean: Vec<f64> = (0..d).map(|c| (0..samples).map(|s| now[s * d + c]).sum::<f64>() / n).collect();
        let second: Vec<f64> = (0..d * d).map(|k| (0..samples).map(|s| now[s * d + k / d] * now[s * d + k % d]).sum::<f64>() / n).collect();
        let diagonal: Vec<f64> = (0..d).map(|c| second[c * d + c]).collect();
        let output_cross: Vec<f64> =
            (0..rows * d).map(|k| (0..samples).map(|s| outputs[s * rows + k / d] * now[s * d + k % d]).sum::<f64>() / n).collect();
        let output_mean: Vec<f64> = (0..rows).map(|r| (0..samples).map(|s| outputs[s * rows + r]).sum::<f64>() / n).collect();
        let hessian = |second: Vec<f64>, kept_rows: Option<Vec<f64>>| Hessian {
            columns: d,
            second,
            diagonal: diagonal.clone(),
            mean: mean.clone(),
            samples: samples as u64,
            rows: kept_rows,
        };
        let dense =
            CrossMoments { current: hessian(second.clone(), None), output_cross, output_mean: output_mean.clone(), output_rows: None };
        let low_rank = CrossMoments {
            current: hessian(Vec::new(), Some(now.clone())),
            output_cross: Vec::new(),
            output_mean,
            output_rows: Some(outputs),
        };
        let bias = [0.25, -0.5];
        let kept = [0, 2, 3, 5, 6, 7];
        let (w_dense, b_dense) = refit_layer(&view, &weight, Some(&bias), &kept, &dense, 0.05).expect("dense solve");
        let (w_low, b_low) = refit_layer(&view, &weight, Some(&bias), &kept, &low_rank, 0.05).expect("woodbury solve");
        for (a, b) in w_dense.iter().zip(&w_low).chain(b_dense.expect("bias").iter().zip(&b_low.expect("bias"))) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
        // Undamped, few rows leave A singular: no refit rather than a wild one.
        assert!(refit_layer(&view, &weight, Some(&bias), &kept, &low_rank, 0.0).is_none());
    }

    #[test]
    fn a_single_column_costs_its_weight_squared_over_the_inverse_diagonal() {
        // OBS's classic saliency w²/(2·[H⁻¹]_cc), per row, summed.
        let h = Hessian {
            columns: 2,
            second: vec![2.0, 0.5, 0.5, 1.0],
            diagonal: vec![2.0, 1.0],
            mean: vec![0.0, 0.0],
            samples: 1,
            rows: None,
        };
        let inverse = damped_inverse(&h, 0.0, false).expect("positive definite");
        let view = DenseView { rows: 2, columns: 2, per_index: 1, transposed: false, axis: 1 };
        let weight = [1.0, 2.0, -1.0, 0.5];
        let cost = obs_cost(&view, &weight, &inverse, &[0]);
        let det = 2.0 * 1.0 - 0.25;
        let inv_00 = 1.0 / det;
        assert!((cost - (1.0 + 1.0) / (2.0 * inv_00)).abs() < 1e-12);
        // Removing a column the other can stand in for is cheaper than its magnitude alone.
        assert!(cost < 0.5 * (1.0 + 1.0) * 2.0);
    }
}
