//! PPCL's linear text stream (`single-stream{text=linear}`): in a converted block the text
//! stream's update is replaced by one affine map `t ↦ t·W + b` (`W` of `D×D`), fitted by least
//! squares on the text stream measured entering and leaving that block of the original model.
//!
//! The fit is of the residual form `y − x = [x, 1]·Θ`, `W = I + Θ_x`, `b = Θ_1`, with a
//! vanishing ridge (`λ = 1e-9 ×` the mean squared input): with at least `D + 1` token rows it
//! is ordinary least squares; with fewer (a tiny model's eight text tokens) it is the
//! minimum-norm solution, which is the identity map off the span of the measured tokens rather
//! than an arbitrary one.

use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use prunec_ir::{Graph, Tensor, ValueId};

/// A fitted map `y ≈ x·W + b` over the last axis.
#[derive(Clone, Debug)]
pub struct TextMap {
    /// `D×D`, row-major, as the `B` of `MatMul(x, W)`.
    pub weight: Vec<f32>,
    /// `D`.
    pub bias: Vec<f32>,
    /// Token rows it was fitted on.
    pub samples: usize,
    /// `‖y − (x·W + b)‖_F / ‖y − x‖_F` on those rows: below 1 is better than leaving the text
    /// stream unchanged (the identity baseline); `None` when `y = x`.
    pub residual: Option<f64>,
}

/// Fits the map from `x` and `y`, both `N×D` row-major (`N` token rows). Fails when the sizes
/// disagree or the values are not finite.
pub fn fit_text_map(x: &[f32], y: &[f32], d: usize) -> Result<TextMap, String> {
    if d == 0 || x.len() != y.len() || !x.len().is_multiple_of(d) || x.is_empty() {
        return Err(format!("text stream of {} and {} values is not a whole number of rows of {d}", x.len(), y.len()));
    }
    if x.iter().chain(y).any(|v| !v.is_finite()) {
        return Err("the measured text stream has values that are not finite".into());
    }
    let n = x.len() / d;
    let cols = d + 1;
    let a = Mat::<f64>::from_fn(n, cols, |r, c| if c < d { x[r * d + c] as f64 } else { 1.0 });
    let delta = Mat::<f64>::from_fn(n, d, |r, c| (y[r * d + c] - x[r * d + c]) as f64);
    let scale = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64 + 1.0;
    let lambda = 1e-9 * scale * n as f64;
    // Normal equations in whichever space is smaller: columns (N ≥ D + 1) or rows.
    let theta = if n >= cols {
        let mut g = a.transpose() * &a;
        for i in 0..cols {
            g[(i, i)] += lambda;
        }
        let llt = g.llt(Side::Lower).map_err(|_| "the text stream's normal equations are not positive definite".to_string())?;
        llt.solve(a.transpose() * &delta)
    } else {
        let mut g = &a * a.transpose();
        for i in 0..n {
            g[(i, i)] += lambda;
        }
        let llt = g.llt(Side::Lower).map_err(|_| "the text stream's Gram matrix is not positive definite".to_string())?;
        a.transpose() * llt.solve(&delta)
    };
    let mut weight = vec![0f32; d * d];
    for i in 0..d {
        for j in 0..d {
            weight[i * d + j] = (theta[(i, j)] + if i == j { 1.0 } else { 0.0 }) as f32;
        }
    }
    let bias: Vec<f32> = (0..d).map(|j| theta[(d, j)] as f32).collect();
    // The residual of the map as written (f32), against the identity's.
    let (mut num, mut den) = (0f64, 0f64);
    for r in 0..n {
        for j in 0..d {
            let mut fit = bias[j] as f64;
            for i in 0..d {
                fit += x[r * d + i] as f64 * weight[i * d + j] as f64;
            }
            let (yv, xv) = (y[r * d + j] as f64, x[r * d + j] as f64);
            num += (yv - fit) * (yv - fit);
            den += (yv - xv) * (yv - xv);
        }
    }
    Ok(TextMap { weight, bias, samples: n, residual: (den > 0.0).then(|| (num / den).sqrt()) })
}

/// Adds `MatMul(x, W) + b` for `map` (weights named after `prefix`) and returns its output,
/// recorded with `x`'s type and shape.
pub(super) fn add_text_map(graph: &mut Graph, x: ValueId, map: &TextMap, prefix: &str) -> Result<ValueId, String> {
    let d = map.bias.len() as u64;
    let w = graph.add_initializer(&format!("{prefix}.weight"), Tensor::from_f32(&format!("{prefix}.weight"), &[d, d], &map.weight));
    let b = graph.add_initializer(&format!("{prefix}.bias"), Tensor::from_f32(&format!("{prefix}.bias"), &[d], &map.bias));
    let (dtype, shape) = (graph.value(x).dtype, graph.value(x).shape.clone());
    let dims: Option<Vec<u64>> = shape.as_ref().and_then(|s| s.0.iter().map(|d| d.known()).collect());
    let product = super::convert::new_op(graph, "MatMul", &[x, w], &format!("{prefix}/MatMul"), dtype, dims.as_deref(), |_| {})?;
    super::convert::new_op(graph, "Add", &[product, b], &format!("{prefix}/Add"), dtype, dims.as_deref(), |_| {})
}
