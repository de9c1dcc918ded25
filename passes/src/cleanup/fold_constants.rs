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
        let graph = &mut model.graph;
        let order = graph.topo_order().map_err(|source| PassError::BrokeGraph { pass: "fold", source })?;
        let mut values: HashMap<ValueId, Partial> = HashMap::new();
        let mut folds: Vec<(OpId, Vec<(ValueId, Vec<i64>, Vec<u64>)>)> = Vec::new();
        for op in order {
            let outputs = graph.op_outputs(op);
            let Some(results) = evaluate(graph, op, &mut values) else { continue };
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
}

fn int_dtype(graph: &Graph, v: ValueId) -> Option<DType> {
    graph.value(v).dtype.filter(|&d| d == DType::I64 || d == DType(prunec_ir::proto::tensor_proto::DataType::Int32 as i32))
}

fn int_tensor(name: &str, dtype: DType, dims: &[u64], data: &[i64]) -> Tensor {
    let width = dtype.bit_width().unwrap_or(64) as usize / 8;
    Tensor::from_raw(name, dtype, dims, data.iter().flat_map(|v| v.to_le_bytes().into_iter().take(width)).collect())
}

/// What an op's outputs are, as far as small integers go; `None` if the op is not followed.
fn evaluate(graph: &Graph, op_id: OpId, values: &mut HashMap<ValueId, Partial>) -> Option<Vec<Partial>> {
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
        if t.numel() as usize > MAX_ELEMENTS {
            return None;
        }
        let p = Partial { dims: t.dims(), data: t.to_i64_vec()?.into_iter().map(Some).collect() };
        values.insert(v, p.clone());
        Some(p)
    };
    let out_dims = |slot: usize| graph.op_output(op_id, slot).and_then(|v| graph.value(v).shape.as_ref()?.concrete());
    let one = |p: Partial| Some(vec![p]);
    match op.op_type.as_str() {
        "Constant" | "Identity" => one(input(0).or_else(|| {
            let t = op.attr_tensor("value").filter(|t| (t.numel() as usize) <= MAX_ELEMENTS)?;
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
        "Cast" => {
            let to = op.attr_int("to")?;
            let x = input(0)?;
            let int = [DType::I64.0 as i64, prunec_ir::proto::tensor_proto::DataType::Int32 as i64];
            int.contains(&to).then_some(vec![x])
        }
        "Unsqueeze" | "Squeeze" | "Reshape" | "Flatten" => {
            let x = input(0)?;
            let dims = out_dims(0)?;
            (numel(&dims)? == x.data.len()).then(|| vec![Partial { dims, data: x.data }])
        }
        "Concat" => {
            let parts: Vec<Partial> = (0..graph.op_inputs(op_id).len()).map(&mut input).collect::<Option<_>>()?;
            if parts.iter().any(|p| p.dims.len() != 1) {
                return None;
            }
            let data: Vec<Option<i64>> = parts.into_iter().flat_map(|p| p.data).collect();
            one(Partial { dims: vec![data.len() as u64], data })
        }
        "Gather" => {
            let (data, indices) = (input(0)?, input(1)?);
            if data.dims.len() != 1 || op.attr_int("axis").unwrap_or(0) != 0 {
                return None;
            }
            let n = data.data.len() as i64;
            let picked: Vec<Option<i64>> = indices
                .known()?
                .into_iter()
                .map(|i| {
                    let i = if i < 0 { i + n } else { i };
                    (0..n).contains(&i).then(|| data.data[i as usize])
                })
                .collect::<Option<_>>()?;
            one(Partial { dims: indices.dims, data: picked })
        }
        "Slice" => {
            let data = input(0)?;
            if data.dims.len() != 1 {
                return None;
            }
            let (starts, ends) = (input(1)?.known()?, input(2)?.known()?);
            let step = match graph.op_input(op_id, 4) {
                Some(_) => *input(4)?.known()?.first()?,
                None => 1,
            };
            if graph.op_input(op_id, 3).is_some() && input(3)?.known()? != [0] || step == 0 {
                return None;
            }
            let n = data.data.len() as i64;
            let (lo, hi) = if step > 0 { (0, n) } else { (-1, n - 1) };
            let norm = |v: i64| if v < 0 { v + n } else { v }.clamp(lo, hi);
            let (mut i, end) = (norm(*starts.first()?), norm(*ends.first()?));
            let mut picked = Vec::new();
            while (step > 0 && i < end) || (step < 0 && i > end) {
                picked.push(data.data[i as usize]);
                i += step;
            }
            one(Partial { dims: vec![picked.len() as u64], data: picked })
        }
        "ConstantOfShape" => {
            let dims: Vec<u64> = input(0)?.known()?.into_iter().map(|d| u64::try_from(d).ok()).collect::<Option<_>>()?;
            let n = numel(&dims)?;
            let fill = match op.attr_tensor("value") {
                Some(t) => *t.to_i64_vec()?.first()?,
                // The default fill is a float zero: not shape arithmetic.
                None => return None,
            };
            (n <= MAX_ELEMENTS).then(|| vec![Partial { dims, data: vec![Some(fill); n] }])
        }
        "Equal" | "Where" => {
            let operands: Vec<Partial> = (0..graph.op_inputs(op_id).len()).map(&mut input).collect::<Option<_>>()?;
            let dims = operands.iter().try_fold(Vec::new(), |d, p| broadcast(&d, &p.dims))?;
            let n = numel(&dims)?;
            if operands.iter().any(|p| p.data.len() != n && p.data.len() != 1) {
                return None;
            }
            let at = |p: &Partial, i: usize| if p.data.len() == 1 { p.data[0] } else { p.data[i] };
            let data = (0..n)
                .map(|i| match operands.as_slice() {
                    [a, b] => Some(i64::from(at(a, i)? == at(b, i)?)),
                    [c, x, y] => {
                        if at(c, i)? != 0 {
                            at(x, i)
                        } else {
                            at(y, i)
                        }
                    }
                    _ => None,
                })
                .collect();
            one(Partial { dims, data })
        }
        "Add" | "Sub" | "Mul" | "Div" | "Mod" => {
            let (a, b) = (input(0)?, input(1)?);
            let dims = broadcast(&a.dims, &b.dims)?;
            let n = numel(&dims)?;
            if (a.data.len() != n && a.data.len() != 1) || (b.data.len() != n && b.data.len() != 1) {
                return None;
            }
            let at = |p: &Partial, i: usize| if p.data.len() == 1 { p.data[0] } else { p.data[i] };
            let data = (0..n)
                .map(|i| {
                    let (x, y) = (at(&a, i)?, at(&b, i)?);
                    match op.op_type.as_str() {
                        "Add" => x.checked_add(y),
                        "Sub" => x.checked_sub(y),
                        "Mul" => x.checked_mul(y),
                        "Div" => x.checked_div(y),
                        // Integer Mod takes the divisor's sign unless `fmod` asks for C's.
                        _ if op.attr_int("fmod").unwrap_or(0) != 0 => x.checked_rem(y),
                        _ => x.checked_rem(y).and_then(|r| if r != 0 && (r < 0) != (y < 0) { r.checked_add(y) } else { Some(r) }),
                    }
                })
                .collect();
            one(Partial { dims, data })
        }
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

/// Elements of a shape, if it has no more than [`MAX_ELEMENTS`] (hostile shapes overflow).
fn numel(dims: &[u64]) -> Option<usize> {
    let n = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d))?;
    (n <= MAX_ELEMENTS as u64).then_some(n as usize)
}
