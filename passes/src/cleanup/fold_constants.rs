//! Constant folding of shape arithmetic: small integer computations whose result is known
//! become initializers.
//!
//! Exporters compute shapes at run time (`Shape → Gather → Concat → Reshape`) even where every
//! size involved is fixed. Folding them shrinks the graph and, because a `Shape` read of a fixed
//! axis then disappears, lets the group analysis prune channels that such reads froze. Only
//! sizes that are known numbers are folded: a symbolic dimension stays computed, so dynamic
//! models stay dynamic. Values are tracked element by element, so `Gather(Shape(x), 1)` folds
//! when axis 1 of `x` is known even if its batch axis is not.

use crate::{Context, Pass, PassError, PassReport};
use prunec_ir::{DType, Graph, Model, OpId, Tensor, ValueId, ValueKind};
use std::collections::HashMap;

/// The `fold` pass.
pub(crate) struct FoldConstants;

/// Integer tensors larger than this are not tracked: shape arithmetic is small.
const MAX_ELEMENTS: usize = 64;

/// A small integer tensor whose elements may be unknown.
#[derive(Clone, Debug)]
struct Partial {
    dims: Vec<u64>,
    data: Vec<Option<i64>>,
}

impl Partial {
    fn known(&self) -> Option<Vec<i64>> {
        self.data.iter().copied().collect()
    }
}

impl Pass for FoldConstants {
    fn name(&self) -> &'static str {
        "fold"
    }

    fn options(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    fn needs_shapes(&self) -> bool {
        true
    }

    fn run(&self, model: &mut Model, _: &mut Context) -> Result<PassReport, PassError> {
        fold_shape_arithmetic(model, MAX_ELEMENTS)
    }
}

/// An op output that becomes an initializer: the value, its elements and its dims.
type Folded = (ValueId, Vec<i64>, Vec<u64>);

/// Folds every small integer computation of `model` whose result is known into an initializer
/// (see the module's documentation), tracking integer tensors of up to `max_elements` elements,
/// then removes what became dead. The `fold` pass tracks [`MAX_ELEMENTS`]: what it folds is
/// written into the user's model. A runtime that specialises a model to one feed may track more
/// (position ids and masks computed from the sequence length) in its own copy.
pub fn fold_shape_arithmetic(model: &mut Model, max_elements: usize) -> Result<PassReport, PassError> {
    let graph = &mut model.graph;
    let order = graph.topo_order().map_err(|source| PassError::BrokeGraph { pass: "fold", source })?;
    let mut values: HashMap<ValueId, Partial> = HashMap::new();
    let mut folds: Vec<(OpId, Vec<Folded>)> = Vec::new();
    for op in order {
        let outputs = graph.op_outputs(op);
        let Some(results) = evaluate(graph, op, &mut values, max_elements) else { continue };
        let mut complete = Vec::new();
        for (slot, partial) in results.into_iter().enumerate() {
            let Some(v) = outputs.get(slot).copied().flatten() else { continue };
            if let Some(known) = partial.known() {
                complete.push((v, known, partial.dims.clone()));
            }
            values.insert(v, partial);
        }
        let is_source = graph.op(op).op_type == "Constant";
        let all_known = complete.len() == outputs.iter().flatten().count();
        if !is_source
            && all_known
            && !complete.is_empty()
            && complete.iter().all(|(v, ..)| !graph.is_output(*v) && int_dtype(graph, *v).is_some())
        {
            folds.push((op, complete));
        }
    }
    let mut report = PassReport::default();
    for (op, outputs) in folds {
        graph.remove_op(op);
        report.ops_removed += 1;
        for (v, data, dims) in outputs {
            let dtype = int_dtype(graph, v).expect("checked above");
            let name = graph.value(v).name.clone();
            let tensor = int_tensor(&name, dtype, &dims, &data);
            let value = graph.value_mut(v);
            value.kind = ValueKind::Initializer(tensor);
            value.shape = Some(prunec_ir::Shape::known(&dims));
            graph.initializers.push(v);
        }
    }
    let dce = super::remove_dead_code(model);
    report.ops_removed += dce.ops_removed;
    report.values_removed += dce.values_removed;
    Ok(report)
}

/// A small integer tensor every element of which the evaluator knows (booleans as 0 and 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownIntegers {
    /// The tensor's dims.
    pub dims: Vec<u64>,
    /// Its elements in row-major order.
    pub data: Vec<i64>,
}

/// Every op output of `graph` whose elements the evaluator of [`fold_shape_arithmetic`] computes
/// completely, tracking tensors of up to `max_elements` elements, booleans included (as 0 and
/// 1). Nothing is changed: a runtime's copy asks which way an `If` goes, whose condition is a
/// boolean the fold never writes as a constant.
pub fn known_integers(graph: &Graph, max_elements: usize) -> Result<HashMap<ValueId, KnownIntegers>, PassError> {
    let order = graph.topo_order().map_err(|source| PassError::BrokeGraph { pass: "fold", source })?;
    let mut values: HashMap<ValueId, Partial> = HashMap::new();
    let mut known = HashMap::new();
    for op in order {
        let outputs = graph.op_outputs(op);
        let Some(results) = evaluate(graph, op, &mut values, max_elements) else { continue };
        for (slot, partial) in results.into_iter().enumerate() {
            let Some(v) = outputs.get(slot).copied().flatten() else { continue };
            if let Some(data) = partial.known() {
                known.insert(v, KnownIntegers { dims: partial.dims.clone(), data });
            }
            values.insert(v, partial);
        }
    }
    Ok(known)
}

fn int_dtype(graph: &Graph, v: ValueId) -> Option<DType> {
    graph.value(v).dtype.filter(|&d| d == DType::I64 || d == DType(prunec_ir::proto::tensor_proto::DataType::Int32 as i32))
}

fn int_tensor(name: &str, dtype: DType, dims: &[u64], data: &[i64]) -> Tensor {
    let width = dtype.bit_width().unwrap_or(64) as usize / 8;
    Tensor::from_raw(name, dtype, dims, data.iter().flat_map(|v| v.to_le_bytes().into_iter().take(width)).collect())
}

/// What an op's outputs are, as far as small integers go; `None` if the op is not followed.
/// Booleans are tracked as 0 and 1.
fn evaluate(graph: &Graph, op_id: OpId, values: &mut HashMap<ValueId, Partial>, limit: usize) -> Option<Vec<Partial>> {
    let op = graph.op(op_id);
    if !(op.domain.is_empty() || op.domain == "ai.onnx") {
        return None;
    }
    let mut input = |slot: usize| -> Option<Partial> {
        let v = graph.op_input(op_id, slot)?;
        if let Some(p) = values.get(&v) {
            return Some(p.clone());
        }
        // An op output was followed already (ops go in order): if it is not in `values`, it is
        // not a small known integer. Looking again would walk whole chains of Identity ops.
        if graph.producer(v).is_some() {
            return None;
        }
        let t = graph.value(v).initializer()?;
        if t.numel() as usize > limit {
            return None;
        }
        let p = Partial { dims: t.dims(), data: t.to_i64_vec()?.into_iter().map(Some).collect() };
        values.insert(v, p.clone());
        Some(p)
    };
    let present = |slot: usize| graph.op_input(op_id, slot).is_some();
    // The recorded output shape: what a reshape has when its target is not all known.
    let out_dims = |slot: usize| graph.op_output(op_id, slot).and_then(|v| graph.value(v).shape.as_ref()?.concrete());
    let one = |p: Partial| Some(vec![p]);
    let reshape = |x: Partial, dims: Option<Vec<u64>>| {
        let dims = dims?;
        (dims.iter().product::<u64>() == x.data.len() as u64).then(|| vec![Partial { dims, data: x.data }])
    };
    match op.op_type.as_str() {
        "Constant" | "Identity" => one(input(0).or_else(|| {
            let t = op.attr_tensor("value").filter(|t| (t.numel() as usize) <= limit)?;
            Some(Partial { dims: t.dims(), data: t.to_i64_vec()?.into_iter().map(Some).collect() })
        })?),
        "Shape" => {
            let x = graph.op_input(op_id, 0)?;
            let dims = &graph.value(x).shape.as_ref()?.0;
            let rank = dims.len() as i64;
            let clamp = |v: i64| if v < 0 { (v + rank).max(0) } else { v.min(rank) } as usize;
            let (start, end) = (clamp(op.attr_int("start").unwrap_or(0)), clamp(op.attr_int("end").unwrap_or(rank)));
            let data: Vec<Option<i64>> = dims.get(start..end.max(start))?.iter().map(|d| d.known().map(|n| n as i64)).collect();
            one(Partial { dims: vec![data.len() as u64], data })
        }
        // The element count of a tensor whose every size is known, as a scalar (silero's LSTM
        // wrapper asks `Size(Shape(x)) == 2` for the rank).
        // A followed input's dims are known even where its value has no recorded shape.
        "Size" => {
            let dims = match input(0) {
                Some(x) => x.dims,
                None => graph.value(graph.op_input(op_id, 0)?).shape.as_ref()?.0.iter().map(|d| d.known()).collect::<Option<_>>()?,
            };
            let n = dims.iter().try_fold(1i64, |n, &d| n.checked_mul(i64::try_from(d).ok()?))?;
            one(Partial { dims: vec![], data: vec![Some(n)] })
        }
        "Cast" => {
            use prunec_ir::proto::tensor_proto::DataType as T;
            let to = T::try_from(op.attr_int("to")? as i32).ok()?;
            let x = input(0)?;
            match to {
                T::Int64 | T::Int32 => Some(vec![x]),
                T::Bool => one(Partial { dims: x.dims, data: x.data.into_iter().map(|v| v.map(|v| i64::from(v != 0))).collect() }),
                _ => None,
            }
        }
        "Unsqueeze" | "Squeeze" => {
            let x = input(0)?;
            let axes = if present(1) { Some(input(1)?.known()?) } else { op.attr_ints("axes").map(<[i64]>::to_vec) };
            let dims = if op.op_type == "Unsqueeze" { unsqueezed(&x.dims, &axes?) } else { squeezed(&x.dims, axes.as_deref()) };
            reshape(x, dims.or_else(|| out_dims(0)))
        }
        "Reshape" => {
            let x = input(0)?;
            let dims = input(1)?.known().and_then(|target| reshaped(&x.dims, &target, op.attr_int("allowzero").unwrap_or(0) != 0));
            reshape(x, dims.or_else(|| out_dims(0)))
        }
        "Flatten" => {
            let x = input(0)?;
            let rank = x.dims.len() as i64;
            let axis = op.attr_int("axis").unwrap_or(1);
            let axis = usize::try_from(if axis < 0 { axis + rank } else { axis }).ok().filter(|&a| a as i64 <= rank)?;
            reshape(x.clone(), Some(vec![x.dims[..axis].iter().product(), x.dims[axis..].iter().product()]))
        }
        "Concat" => {
            let parts: Vec<Partial> = (0..graph.op_inputs(op_id).len()).map(&mut input).collect::<Option<_>>()?;
            let first = parts.first()?;
            let rank = first.dims.len();
            let axis = normal_axis(op.attr_int("axis")?, rank)?;
            if parts.iter().any(|p| p.dims.len() != rank || (0..rank).any(|a| a != axis && p.dims[a] != first.dims[a])) {
                return None;
            }
            let mut dims = first.dims.clone();
            dims[axis] = parts.iter().map(|p| p.dims[axis]).sum();
            numel(&dims, limit)?;
            let outer: u64 = dims[..axis].iter().product();
            let mut data = Vec::new();
            for o in 0..outer as usize {
                for p in &parts {
                    let block = p.dims[axis..].iter().product::<u64>() as usize;
                    data.extend_from_slice(&p.data[o * block..(o + 1) * block]);
                }
            }
            one(Partial { dims, data })
        }
        "Gather" => {
            let (data, indices) = (input(0)?, input(1)?);
            let axis = normal_axis(op.attr_int("axis").unwrap_or(0), data.dims.len())?;
            let n = data.dims[axis] as i64;
            let picks: Vec<usize> = indices
                .known()?
                .into_iter()
                .map(|i| {
                    let i = if i < 0 { i + n } else { i };
                    (0..n).contains(&i).then_some(i as usize)
                })
                .collect::<Option<_>>()?;
            let dims: Vec<u64> = data.dims[..axis].iter().chain(&indices.dims).chain(&data.dims[axis + 1..]).copied().collect();
            numel(&dims, limit)?;
            let outer = data.dims[..axis].iter().product::<u64>() as usize;
            let inner = data.dims[axis + 1..].iter().product::<u64>() as usize;
            let mut picked = Vec::new();
            for o in 0..outer {
                for &i in &picks {
                    let at = (o * n as usize + i) * inner;
                    picked.extend_from_slice(&data.data[at..at + inner]);
                }
            }
            one(Partial { dims, data: picked })
        }
        "Slice" => {
            let data = input(0)?;
            let (starts, ends) = (input(1)?.known()?, input(2)?.known()?);
            let rank = data.dims.len();
            let axes = if present(3) { input(3)?.known()? } else { (0..starts.len() as i64).collect() };
            let steps = if present(4) { input(4)?.known()? } else { vec![1; starts.len()] };
            if axes.len() != starts.len() || ends.len() != starts.len() || steps.len() != starts.len() {
                return None;
            }
            // Per axis, the source indices it keeps.
            let mut picks: Vec<Vec<usize>> = data.dims.iter().map(|&d| (0..d as usize).collect()).collect();
            for (k, &axis) in axes.iter().enumerate() {
                let axis = normal_axis(axis, rank)?;
                picks[axis] = slice_indices(data.dims[axis] as i64, starts[k], ends[k], steps[k])?;
            }
            let dims: Vec<u64> = picks.iter().map(|p| p.len() as u64).collect();
            let n = numel(&dims, limit)?;
            let strides = strides(&data.dims);
            let sliced = (0..n)
                .map(|i| {
                    let at: usize = unravel(i, &dims).iter().enumerate().map(|(a, &j)| picks[a][j] * strides[a]).sum();
                    data.data[at]
                })
                .collect();
            one(Partial { dims, data: sliced })
        }
        "Range" => {
            let scalar = |p: Option<Partial>| -> Option<i64> { p.filter(|p| p.data.len() == 1)?.data[0] };
            let (start, end, delta) = (scalar(input(0))?, scalar(input(1))?, scalar(input(2))?);
            let count = usize::try_from(range_count(start, end, delta)?).ok().filter(|&c| c <= limit)?;
            one(Partial { dims: vec![count as u64], data: (0..count as i64).map(|k| start.checked_add(k.checked_mul(delta)?)).collect() })
        }
        "Expand" => {
            let x = input(0)?;
            let shape: Vec<u64> = input(1)?.known()?.into_iter().map(|d| u64::try_from(d).ok()).collect::<Option<_>>()?;
            let dims = broadcast(&x.dims, &shape)?;
            let n = numel(&dims, limit)?;
            one(Partial { data: (0..n).map(|i| x.data[broadcast_source(i, &dims, &x.dims)]).collect(), dims })
        }
        "ConstantOfShape" => {
            let dims: Vec<u64> = input(0)?.known()?.into_iter().map(|d| u64::try_from(d).ok()).collect::<Option<_>>()?;
            let n = numel(&dims, limit)?;
            let fill = match op.attr_tensor("value") {
                Some(t) => *t.to_i64_vec()?.first()?,
                // The default fill is a float zero: not shape arithmetic.
                None => return None,
            };
            one(Partial { dims, data: vec![Some(fill); n] })
        }
        "CumSum" => {
            let x = input(0)?;
            let axis = input(1).filter(|p| p.data.len() == 1)?.data[0]?;
            let axis = normal_axis(axis, x.dims.len())?;
            let (exclusive, reverse) = (op.attr_int("exclusive").unwrap_or(0) != 0, op.attr_int("reverse").unwrap_or(0) != 0);
            let (n, inner) = (x.dims[axis] as usize, x.dims[axis + 1..].iter().product::<u64>() as usize);
            let mut data = vec![None; x.data.len()];
            for o in 0..x.data.len() / (n * inner).max(1) {
                for i in 0..inner {
                    let mut sum = Some(0i64);
                    let order: Box<dyn Iterator<Item = usize>> = if reverse { Box::new((0..n).rev()) } else { Box::new(0..n) };
                    for k in order {
                        let at = (o * n + k) * inner + i;
                        let with = sum.zip(x.data[at]).and_then(|(s, v)| s.checked_add(v));
                        data[at] = if exclusive { sum } else { with };
                        sum = with;
                    }
                }
            }
            one(Partial { dims: x.dims, data })
        }
        "Not" | "Neg" | "Abs" => {
            let x = input(0)?;
            let f = |v: i64| match op.op_type.as_str() {
                "Not" => Some(i64::from(v == 0)),
                "Neg" => v.checked_neg(),
                _ => v.checked_abs(),
            };
            one(Partial { dims: x.dims, data: x.data.into_iter().map(|v| v.and_then(f)).collect() })
        }
        "Add" | "Sub" | "Mul" | "Div" | "Mod" | "Equal" | "Less" | "LessOrEqual" | "Greater" | "GreaterOrEqual" | "And" | "Or" | "Xor"
        | "Min" | "Max" | "Where" => {
            let operands: Vec<Partial> = (0..graph.op_inputs(op_id).len()).map(&mut input).collect::<Option<_>>()?;
            let dims = operands.iter().try_fold(Vec::new(), |d, p| broadcast(&d, &p.dims))?;
            let n = numel(&dims, limit)?;
            let data = (0..n)
                .map(|i| {
                    let args: Vec<i64> = operands.iter().map(|p| p.data[broadcast_source(i, &dims, &p.dims)]).collect::<Option<_>>()?;
                    elementwise(op, &args)
                })
                .collect();
            one(Partial { dims, data })
        }
        _ => None,
    }
}

/// One element of an elementwise op on integers (booleans as 0 and 1).
fn elementwise(op: &prunec_ir::Op, args: &[i64]) -> Option<i64> {
    let truth = |b: bool| Some(i64::from(b));
    match (op.op_type.as_str(), args) {
        ("Where", &[c, x, y]) => Some(if c != 0 { x } else { y }),
        ("Min", _) => args.iter().copied().min(),
        ("Max", _) => args.iter().copied().max(),
        (kind, &[x, y]) => match kind {
            "Add" => x.checked_add(y),
            "Sub" => x.checked_sub(y),
            "Mul" => x.checked_mul(y),
            "Div" => x.checked_div(y),
            // Integer Mod takes the divisor's sign unless `fmod` asks for C's.
            "Mod" if op.attr_int("fmod").unwrap_or(0) != 0 => x.checked_rem(y),
            "Mod" => x.checked_rem(y).and_then(|r| if r != 0 && (r < 0) != (y < 0) { r.checked_add(y) } else { Some(r) }),
            "Equal" => truth(x == y),
            "Less" => truth(x < y),
            "LessOrEqual" => truth(x <= y),
            "Greater" => truth(x > y),
            "GreaterOrEqual" => truth(x >= y),
            "And" => truth(x != 0 && y != 0),
            "Or" => truth(x != 0 || y != 0),
            "Xor" => truth((x != 0) != (y != 0)),
            _ => None,
        },
        _ => None,
    }
}

/// The broadcast shape of two shapes (numpy rules), if they broadcast.
fn broadcast(a: &[u64], b: &[u64]) -> Option<Vec<u64>> {
    let rank = a.len().max(b.len());
    let at = |d: &[u64], i: usize| if i + d.len() >= rank { d[i + d.len() - rank] } else { 1 };
    (0..rank)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

/// The flat index, in an operand of shape `from`, of element `flat` of the broadcast result
/// `to`: axes are aligned on the right, and an axis of size 1 repeats its one element.
fn broadcast_source(flat: usize, to: &[u64], from: &[u64]) -> usize {
    let index = unravel(flat, to);
    let skip = to.len() - from.len();
    let strides = strides(from);
    from.iter().enumerate().map(|(a, &d)| if d == 1 { 0 } else { index[a + skip] * strides[a] }).sum()
}

/// Row-major strides of a shape, in elements.
fn strides(dims: &[u64]) -> Vec<usize> {
    let mut strides = vec![1; dims.len()];
    for a in (0..dims.len().saturating_sub(1)).rev() {
        strides[a] = strides[a + 1] * dims[a + 1] as usize;
    }
    strides
}

/// The multi-index of a flat row-major index.
fn unravel(mut flat: usize, dims: &[u64]) -> Vec<usize> {
    let mut index = vec![0; dims.len()];
    for a in (0..dims.len()).rev() {
        let d = dims[a].max(1) as usize;
        index[a] = flat % d;
        flat /= d;
    }
    index
}

/// An axis attribute made non-negative, if it names an axis of a tensor of `rank`.
fn normal_axis(axis: i64, rank: usize) -> Option<usize> {
    let axis = if axis < 0 { axis + rank as i64 } else { axis };
    usize::try_from(axis).ok().filter(|&a| a < rank)
}

/// How many elements `Range(start, end, delta)` has: ceil((end − start) / delta), none when
/// the range runs the other way; `None` for a zero step or a span that overflows.
fn range_count(start: i64, end: i64, delta: i64) -> Option<i64> {
    let span = end.checked_sub(start)?;
    if delta == 0 {
        return None;
    }
    Some(if span == 0 || (span > 0) != (delta > 0) { 0 } else { (span.checked_abs()? - 1) / delta.checked_abs()? + 1 })
}

/// The source indices a Slice keeps along one axis of size `n` (ONNX's clamping rules).
fn slice_indices(n: i64, start: i64, end: i64, step: i64) -> Option<Vec<usize>> {
    if step == 0 {
        return None;
    }
    let (lo, hi) = if step > 0 { (0, n) } else { (-1, n - 1) };
    let norm = |v: i64| if v < 0 { v.saturating_add(n) } else { v }.clamp(lo, hi);
    let (mut i, end) = (norm(start), norm(end));
    let mut picked = Vec::new();
    while (step > 0 && i < end) || (step < 0 && i > end) {
        picked.push(i as usize);
        i = i.checked_add(step)?;
    }
    Some(picked)
}

/// Unsqueeze's output shape: a 1 inserted at each of `axes` (counted in the output's rank).
fn unsqueezed(dims: &[u64], axes: &[i64]) -> Option<Vec<u64>> {
    let rank = dims.len() + axes.len();
    let mut ones: Vec<usize> = axes.iter().map(|&a| normal_axis(a, rank)).collect::<Option<_>>()?;
    ones.sort_unstable();
    ones.dedup();
    if ones.len() != axes.len() {
        return None;
    }
    let mut rest = dims.iter();
    (0..rank).map(|a| if ones.binary_search(&a).is_ok() { Some(1) } else { rest.next().copied() }).collect()
}

/// Squeeze's output shape: the axes of size 1 named by `axes` (all of them without) removed.
fn squeezed(dims: &[u64], axes: Option<&[i64]>) -> Option<Vec<u64>> {
    let named: Option<Vec<usize>> = match axes {
        Some(axes) => Some(axes.iter().map(|&a| normal_axis(a, dims.len())).collect::<Option<_>>()?),
        None => None,
    };
    if named.as_ref().is_some_and(|named| named.iter().any(|&a| dims[a] != 1)) {
        return None;
    }
    Some(dims.iter().enumerate().filter(|&(a, &d)| !named.as_ref().map_or(d == 1, |named| named.contains(&a))).map(|(_, &d)| d).collect())
}

/// Reshape's output shape for a known target (`0` copies the input's size unless `allowzero`,
/// one `-1` takes what is left), if the element counts agree.
fn reshaped(dims: &[u64], target: &[i64], allowzero: bool) -> Option<Vec<u64>> {
    let total: u64 = dims.iter().product();
    let mut out: Vec<Option<u64>> = target
        .iter()
        .enumerate()
        .map(|(a, &t)| match t {
            -1 => Some(None),
            0 if !allowzero => dims.get(a).map(|&d| Some(d)),
            t => u64::try_from(t).ok().map(Some),
        })
        .collect::<Option<_>>()?;
    let open: Vec<usize> = (0..out.len()).filter(|&a| out[a].is_none()).collect();
    let known: u64 = out.iter().flatten().product();
    match open.as_slice() {
        [] => {}
        [a] if known != 0 && total.is_multiple_of(known) => out[*a] = Some(total / known),
        _ => return None,
    }
    let out: Vec<u64> = out.into_iter().collect::<Option<_>>()?;
    (out.iter().product::<u64>() == total).then_some(out)
}

/// Elements of a shape, if it has no more than `limit` (hostile shapes overflow).
fn numel(dims: &[u64], limit: usize) -> Option<usize> {
    let n = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d))?;
    (n <= limit as u64).then_some(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x: f32[2, 3, d]`; `Size(Shape(x))`, `Size(x)`, `Equal(Size(Shape(x)), 3)` and, through
    /// the graph's values, what an `If` on that condition would read.
    fn sizes_graph(d: prunec_ir::Dim) -> (Graph, [ValueId; 4]) {
        use prunec_ir::{Dim, Op, Shape, Value};
        let mut g = Graph::default();
        let mut x = Value::new("x", ValueKind::Input);
        x.dtype = Some(DType::F32);
        x.shape = Some(Shape(vec![Dim::Known(2), Dim::Known(3), d]));
        let x = g.add_value(x).unwrap();
        g.inputs.push(x);
        let three = g.add_initializer("three", Tensor::from_i64("three", &[], &[3]));
        let produced = |g: &mut Graph, name: &str, dtype: DType| {
            let mut v = Value::new(name, ValueKind::Produced);
            v.dtype = Some(dtype);
            g.add_value(v).unwrap()
        };
        let (shape, rank, numel) =
            (produced(&mut g, "shape", DType::I64), produced(&mut g, "rank", DType::I64), produced(&mut g, "numel", DType::I64));
        let is_3d = produced(&mut g, "is_3d", DType(prunec_ir::proto::tensor_proto::DataType::Bool as i32));
        g.add_op(Op::new("Shape", "shape"), &[Some(x)], &[Some(shape)]).unwrap();
        g.add_op(Op::new("Size", "rank"), &[Some(shape)], &[Some(rank)]).unwrap();
        g.add_op(Op::new("Size", "numel"), &[Some(x)], &[Some(numel)]).unwrap();
        g.add_op(Op::new("Equal", "is_3d"), &[Some(rank), Some(three)], &[Some(is_3d)]).unwrap();
        g.outputs.push(is_3d);
        (g, [shape, rank, numel, is_3d])
    }

    #[test]
    fn sizes_and_the_booleans_compared_from_them_are_known_where_the_shape_is() {
        let (g, [shape, rank, numel, is_3d]) = sizes_graph(prunec_ir::Dim::Known(4));
        let known = known_integers(&g, 64).unwrap();
        let of = |v: ValueId| known.get(&v).map(|k| (k.dims.clone(), k.data.clone()));
        assert_eq!(of(shape), Some((vec![3], vec![2, 3, 4])));
        assert_eq!(of(rank), Some((vec![], vec![3])));
        assert_eq!(of(numel), Some((vec![], vec![24])));
        assert_eq!(of(is_3d), Some((vec![], vec![1])), "the boolean an If would branch on");
        // A symbolic size leaves the element count unknown, but not the rank.
        let (g, [_, rank, numel, is_3d]) = sizes_graph(prunec_ir::Dim::Sym("n".into()));
        let known = known_integers(&g, 64).unwrap();
        assert_eq!(known.get(&rank).map(|k| k.data.clone()), Some(vec![3]));
        assert!(!known.contains_key(&numel));
        assert_eq!(known.get(&is_3d).map(|k| k.data.clone()), Some(vec![1]));
    }

    #[test]
    fn the_fold_writes_sizes_as_constants_and_leaves_booleans_computed() {
        let (g, [_, rank, numel, is_3d]) = sizes_graph(prunec_ir::Dim::Known(4));
        let mut model = Model { shell: Default::default(), graph: g };
        fold_shape_arithmetic(&mut model, 64).unwrap();
        let g = &model.graph;
        assert_eq!(g.value(rank).initializer().and_then(Tensor::to_i64_vec), Some(vec![3]));
        assert!(g.value_ids().all(|v| v != numel), "the unread element count is dead");
        assert!(g.producer(is_3d).is_some(), "the fold only writes integers: a boolean stays the Equal's");
    }

    #[test]
    fn range_counts_follow_onnx_ceil_of_span_over_delta_and_are_empty_when_running_the_other_way() {
        // What numpy.arange gives for the same arguments.
        for (start, end, delta, want) in [(0, 5, 2, 3), (5, 0, -2, 3), (0, 5, -1, 0), (0, -1, 2, 0), (3, 3, 1, 0), (-4, 4, 3, 3)] {
            assert_eq!(range_count(start, end, delta), Some(want), "range({start}, {end}, {delta})");
        }
        assert_eq!(range_count(0, 5, 0), None);
        assert_eq!(range_count(i64::MIN, i64::MAX, 1), None);
    }

    #[test]
    fn slices_clamp_as_onnx_says_for_both_directions() {
        assert_eq!(slice_indices(5, 1, i64::MAX, 1), Some(vec![1, 2, 3, 4]));
        assert_eq!(slice_indices(5, -1, i64::MIN, -1), Some(vec![4, 3, 2, 1, 0]));
        assert_eq!(slice_indices(5, -2, 10, 2), Some(vec![3]));
        assert_eq!(slice_indices(5, 0, 5, 0), None);
    }

    #[test]
    fn reshape_targets_copy_zeros_and_infer_one_minus_one() {
        assert_eq!(reshaped(&[2, 3, 4], &[0, -1], false), Some(vec![2, 12]));
        assert_eq!(reshaped(&[2, 3, 4], &[0, -1], true), None);
        assert_eq!(reshaped(&[2, 3, 4], &[-1, -1], false), None);
        assert_eq!(reshaped(&[2, 3, 4], &[5, -1], false), None);
        assert_eq!(unsqueezed(&[16], &[0, -1]), Some(vec![1, 16, 1]));
        assert_eq!(squeezed(&[1, 16, 1], None), Some(vec![16]));
        assert_eq!(squeezed(&[1, 16, 1], Some(&[16])), None);
        assert_eq!(squeezed(&[2, 16], Some(&[0])), None);
    }

    #[test]
    fn broadcast_reads_size_one_axes_repeatedly_and_aligns_on_the_right() {
        // [2, 3] from [3]: each row reads the same three elements.
        let from_row: Vec<usize> = (0..6).map(|i| broadcast_source(i, &[2, 3], &[3])).collect();
        assert_eq!(from_row, [0, 1, 2, 0, 1, 2]);
        // [2, 3] from [2, 1]: each row reads its one element.
        let from_column: Vec<usize> = (0..6).map(|i| broadcast_source(i, &[2, 3], &[2, 1])).collect();
        assert_eq!(from_column, [0, 0, 0, 1, 1, 1]);
        assert_eq!(broadcast(&[2, 1], &[3]), Some(vec![2, 3]));
        assert_eq!(broadcast(&[2], &[3]), None);
    }
}
