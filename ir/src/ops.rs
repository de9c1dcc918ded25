//! Coupling rules: for each op type, which of its tensor axes carry the same channels.
//!
//! [`RULES`] is the table, one row per ONNX `op_type` (default domain), sorted by name. A rule
//! reads the op and states facts through [`RuleCx`]:
//!
//! - `couple(a, b)`: axis `a` of one tensor and axis `b` of another carry the same channels,
//!   one to one, so removing channel `i` from one removes channel `i` from the other;
//! - `weight(dim, role)`: a constant input's axis is sliced when the channels go: a producer
//!   (creates the channels: output rows of a Conv/Gemm/MatMul weight, an embedding table's
//!   columns), a consumer (reads them: input columns) or a parameter (BatchNorm and bias vectors,
//!   constant operands of elementwise ops);
//! - `offset(part, whole, start, step)`: a tensor's axis is a strided window of another's
//!   (Concat inputs in their output, Split and Slice outputs in their input);
//! - `block(fine, coarse, n)`: an axis merged from a coarse axis and inner axes of size `n`
//!   (Flatten's `C·H·W`, attention's `H·D`): each coarse channel owns a block of `n`;
//! - `groups(a, b, n)`: both axes are cut into `n` blocks and block `j` of one only meets block
//!   `j` of the other (a grouped convolution): a channel is a whole block;
//! - `freeze(dim, reason)`: these channels must not change, and why.
//!
//! There is no default rule: an op missing from the table freezes every axis it touches, and
//! so does an op whose attributes or shapes a rule does not handle. Freezing is always safe;
//! guessing never is.

use crate::graph::Graph;
use crate::ids::{OpId, ValueId};
use crate::shape::Dim;
use std::collections::BTreeSet;

/// A tensor axis: `(value, axis)`.
pub type DimRef = (ValueId, usize);

/// How a weight axis relates to a group's channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The weight creates the channels (listed as `<node>:out`).
    Producer,
    /// The weight reads the channels (listed as `<node>:in`).
    Consumer,
    /// A per-channel vector sliced along (bias, BatchNorm statistics, elementwise constant).
    Param,
}

/// A fact stated by a rule.
#[derive(Clone, Debug)]
pub(crate) enum Fact {
    Couple(DimRef, DimRef, OpId),
    /// `part[i]` is `whole[start + i·step]`, for every `i` of `part`.
    Offset {
        part: DimRef,
        whole: DimRef,
        start: usize,
        step: usize,
        op: OpId,
    },
    /// `fine[f]` is `coarse[(f / stride) % len(coarse)]`: the coarse axis is one factor of the
    /// fine one, `stride` being the size of the factors inside it. For the outer factor (Flatten,
    /// heads `H·D`) a coarse channel owns a block of fine ones; for the inner factor (a channel
    /// shuffle's groups) it owns one index in each outer block.
    Block {
        fine: DimRef,
        coarse: DimRef,
        stride: usize,
        op: OpId,
    },
    /// `a` and `b` are each cut into `groups` equal blocks, and block `j` of one goes with block
    /// `j` of the other only (a grouped convolution): a channel is a whole block.
    Groups {
        a: DimRef,
        b: DimRef,
        groups: usize,
        op: OpId,
    },
    Weight {
        dim: DimRef,
        role: Role,
        op: OpId,
    },
    Freeze {
        value: ValueId,
        axis: Option<usize>,
        reason: String,
        op: Option<OpId>,
    },
}

/// What a rule sees of one op, and where it writes its facts.
pub(crate) struct RuleCx<'a> {
    pub graph: &'a Graph,
    pub op: OpId,
    pub inputs: Vec<Option<ValueId>>,
    pub outputs: Vec<Option<ValueId>>,
    pub facts: Vec<Fact>,
}

impl RuleCx<'_> {
    fn op_label(&self) -> String {
        let op = self.graph.op(self.op);
        format!("{} `{}`", op.op_type, op.name)
    }

    fn input(&self, slot: usize) -> Option<ValueId> {
        self.inputs.get(slot).copied().flatten()
    }

    fn output(&self, slot: usize) -> Option<ValueId> {
        self.outputs.get(slot).copied().flatten()
    }

    fn dims(&self, v: ValueId) -> Option<&[Dim]> {
        self.graph.value(v).shape.as_ref().map(|s| s.0.as_slice())
    }

    fn rank(&self, v: ValueId) -> Option<usize> {
        self.dims(v).map(<[Dim]>::len)
    }

    /// Whether the value is a constant: an initializer or a `Constant` node's output.
    fn is_const(&self, v: ValueId) -> bool {
        crate::groups::constant_tensor(self.graph, v).is_some()
    }

    fn attr_int(&self, name: &str) -> Option<i64> {
        self.graph.op(self.op).attr_int(name)
    }

    fn attr_ints(&self, name: &str) -> Option<Vec<i64>> {
        self.graph.op(self.op).attr_ints(name).map(<[i64]>::to_vec)
    }

    /// The integer values of a constant input (shapes, axes, pads).
    fn const_ints(&self, slot: usize) -> Option<Vec<i64>> {
        crate::groups::constant_tensor(self.graph, self.input(slot)?)?.to_i64_vec()
    }

    pub(crate) fn couple(&mut self, a: DimRef, b: DimRef) {
        self.facts.push(Fact::Couple(a, b, self.op));
    }

    fn offset(&mut self, part: DimRef, whole: DimRef, start: usize, step: usize) {
        self.facts.push(Fact::Offset { part, whole, start, step, op: self.op });
    }

    fn block(&mut self, fine: DimRef, coarse: DimRef, stride: usize) {
        self.facts.push(Fact::Block { fine, coarse, stride, op: self.op });
    }

    fn groups(&mut self, a: DimRef, b: DimRef, groups: usize) {
        self.facts.push(Fact::Groups { a, b, groups, op: self.op });
    }

    fn known_size(&self, (v, axis): DimRef) -> Option<u64> {
        self.dims(v)?.get(axis)?.known()
    }

    /// Whether the value is a weight: a constant, or a `DequantizeLinear` of a constant integer
    /// weight (QDQ models), whose integers are then sliced with its channels.
    fn is_weight(&self, v: ValueId) -> bool {
        self.is_const(v) || crate::quant::dequantized_source(self.graph, v).is_some()
    }

    /// States a weight's role; for a dequantised weight ([`RuleCx::is_weight`]) the role is the
    /// integer constant's, in its use by the `DequantizeLinear` (which couples the two axes), so
    /// the slice that is scored, sliced and masked is the constant's.
    fn weight(&mut self, (v, axis): DimRef, role: Role) {
        match crate::quant::dequantized_source(self.graph, v).filter(|_| !self.is_const(v)) {
            Some((q, dq)) => self.facts.push(Fact::Weight { dim: (q, axis), role, op: dq }),
            None => self.facts.push(Fact::Weight { dim: (v, axis), role, op: self.op }),
        }
    }

    fn freeze(&mut self, value: ValueId, axis: Option<usize>, why: &str) {
        let reason = format!("{} {why}", self.op_label());
        self.facts.push(Fact::Freeze { value, axis, reason, op: Some(self.op) });
    }

    /// Freezes every axis of every input, output and captured value of the op.
    pub(crate) fn freeze_all(&mut self, why: &str) {
        let values: Vec<ValueId> =
            self.inputs.iter().chain(&self.outputs).flatten().copied().chain(self.graph.op_captures(self.op)).collect();
        for v in values {
            self.freeze(v, None, why);
        }
    }

    /// Couples every axis of input `slot` with the same axis of output 0 (ranks must match).
    fn pass_through(&mut self, slot: usize) -> bool {
        let (Some(x), Some(y)) = (self.input(slot), self.output(0)) else { return false };
        match (self.rank(x), self.rank(y)) {
            (Some(rx), Some(ry)) if rx == ry => {
                for a in 0..rx {
                    self.couple((x, a), (y, a));
                }
                true
            }
            _ => false,
        }
    }
}

/// A coupling rule.
pub(crate) type Rule = fn(&mut RuleCx);

/// The table: `(op_type, rule)`, sorted by op type.
pub(crate) const RULES: &[(&str, Rule)] = &[
    ("Abs", unary),
    ("Add", broadcast),
    ("AveragePool", pool),
    ("BatchNormalization", batch_norm),
    ("Cast", unary),
    ("Ceil", unary),
    ("Clip", unary),
    ("Concat", concat),
    ("Constant", constant),
    ("Conv", conv),
    ("ConvInteger", conv_integer),
    ("ConvTranspose", conv_transpose),
    ("Cos", unary),
    ("DequantizeLinear", quantize_linear),
    ("Div", broadcast),
    ("Dropout", unary),
    ("Einsum", einsum),
    ("Elu", unary),
    ("Equal", broadcast),
    ("Erf", unary),
    ("Exp", unary),
    ("Expand", expand),
    ("Flatten", reshape),
    ("Floor", unary),
    ("GRU", gru),
    ("Gather", gather),
    ("Gelu", unary),
    ("Gemm", gemm),
    ("GlobalAveragePool", pool),
    ("GlobalMaxPool", pool),
    ("Greater", broadcast),
    ("GroupNormalization", group_norm),
    ("HardSigmoid", unary),
    ("HardSwish", unary),
    ("Identity", unary),
    ("InstanceNormalization", instance_norm),
    ("IsNaN", unary),
    ("LSTM", lstm),
    ("LayerNormalization", layer_norm),
    ("LeakyRelu", unary),
    ("Less", broadcast),
    ("Log", unary),
    ("MatMul", matmul),
    ("MatMulInteger", matmul_integer),
    ("Max", broadcast),
    ("MaxPool", pool),
    ("Min", broadcast),
    ("Mish", unary),
    ("Mul", broadcast),
    ("Neg", unary),
    ("Not", unary),
    ("PRelu", broadcast),
    ("Pad", pad),
    ("Pow", broadcast),
    ("QLinearConv", qlinear_conv),
    ("QLinearMatMul", qlinear_matmul),
    ("QuantizeLinear", quantize_linear),
    ("Reciprocal", unary),
    ("ReduceMax", reduce),
    ("ReduceMean", reduce),
    ("ReduceMin", reduce),
    ("ReduceProd", reduce),
    ("ReduceSum", reduce),
    ("Relu", unary),
    ("Reshape", reshape),
    ("Resize", resize),
    ("Round", unary),
    ("Selu", unary),
    ("Shape", shape),
    ("Sigmoid", unary),
    ("Sign", unary),
    ("Sin", unary),
    ("Slice", slice),
    ("Softmax", softmax),
    ("Softplus", unary),
    ("Split", split),
    ("Sqrt", unary),
    ("Squeeze", reshape),
    ("Sub", broadcast),
    ("Tanh", unary),
    ("Transpose", transpose),
    ("Unsqueeze", reshape),
    ("Upsample", resize),
    ("Where", broadcast),
];

/// The op types (default domain) that have a coupling rule, in table order: the ops whose
/// tensors a pruning rewrite may resize.
pub fn coupled_op_types() -> impl Iterator<Item = &'static str> {
    RULES.iter().map(|(name, _)| *name)
}

/// The rule for an op, if the table has one.
pub(crate) fn rule_for(domain: &str, op_type: &str) -> Option<Rule> {
    if !(domain.is_empty() || domain == "ai.onnx") {
        return None;
    }
    RULES.binary_search_by(|(name, _)| name.cmp(&op_type)).ok().map(|i| RULES[i].1)
}

fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

/// Elementwise on input 0 (other inputs are scalars or options: Clip's bounds, Dropout's ratio).
fn unary(cx: &mut RuleCx) {
    if !cx.pass_through(0) {
        cx.freeze_all("has a tensor of unknown rank");
    }
    // Clip's min/max and similar scalar operands carry no channels.
    for slot in 1..cx.inputs.len() {
        if let Some(v) = cx.input(slot)
            && cx.rank(v).unwrap_or(1) > 0
        {
            cx.freeze(v, None, "reads it as a non-channel operand");
        }
    }
}

/// Numpy-style broadcasting: an operand axis of the output's size is the output's axis; a
/// size-1 axis broadcasts and carries nothing. Constant operands are sliced with the channels.
fn broadcast(cx: &mut RuleCx) {
    let Some(y) = cx.output(0) else { return };
    let Some(out_dims) = cx.dims(y).map(<[Dim]>::to_vec) else {
        return cx.freeze_all("has an output of unknown rank");
    };
    for slot in 0..cx.inputs.len() {
        let Some(x) = cx.input(slot) else { continue };
        let Some(in_dims) = cx.dims(x).map(<[Dim]>::to_vec) else {
            return cx.freeze_all("has an operand of unknown rank");
        };
        if in_dims.len() > out_dims.len() {
            return cx.freeze_all("has an operand of higher rank than its output");
        }
        let shift = out_dims.len() - in_dims.len();
        let constant = cx.is_const(x);
        for (a, d) in in_dims.iter().enumerate() {
            let out = &out_dims[a + shift];
            match (d, out) {
                // A size-1 axis broadcasts (or is a single channel): either way it carries none.
                (Dim::Known(1), _) => {}
                _ if d == out => {
                    cx.couple((x, a), (y, a + shift));
                    if constant {
                        cx.weight((x, a), Role::Param);
                    }
                }
                _ => {
                    cx.freeze(x, Some(a), "broadcasts an axis whose size is not known to match");
                    cx.freeze(y, Some(a + shift), "broadcasts an axis whose size is not known to match");
                }
            }
        }
    }
}

fn constant(_cx: &mut RuleCx) {}

/// Conv: `W[M, C/group, k...]`, `B[M]`; `X[N, C, ...]` → `Y[N, M, ...]`.
fn conv(cx: &mut RuleCx) {
    conv_slots(cx, 1, Some(2));
}

/// QLinearConv: Conv on quantised tensors (`x, x_scale, x_zero_point, w, w_scale, w_zero_point,
/// y_scale, y_zero_point, B`); `w_scale` and `w_zero_point` are per output channel when 1-D.
fn qlinear_conv(cx: &mut RuleCx) {
    if !quantized_params(cx, &[1, 2, 6, 7], &[4, 5], 1) {
        return;
    }
    conv_slots(cx, 3, Some(8));
}

/// ConvInteger: Conv of integers (`x, w, x_zero_point, w_zero_point`), no bias; `w_zero_point`
/// is per output channel when 1-D.
fn conv_integer(cx: &mut RuleCx) {
    if !quantized_params(cx, &[2], &[3], 1) {
        return;
    }
    conv_slots(cx, 1, None);
}

/// The quantisation parameters of a QLinear or Integer op: `scalars` are per tensor (a 1-D one
/// freezes what it touches); `per_channel` ones run along axis `out_axis` of the output when
/// 1-D and are sliced with it. An op whose weight is not one [`crate::quant`] can score and mask
/// (a nonzero weight zero point) is frozen. Returns whether the op's rule goes on.
fn quantized_params(cx: &mut RuleCx, scalars: &[usize], per_channel: &[usize], out_axis: usize) -> bool {
    if !crate::quant::reads_quantized_weight(cx.graph, cx.op) {
        cx.freeze_all("has a weight that is not a constant with a zero zero point (not pruned)");
        return false;
    }
    for &slot in scalars {
        if let Some(p) = cx.input(slot)
            && cx.rank(p).unwrap_or(1) > 0
        {
            cx.freeze(p, None, "reads it as a per-tensor quantisation parameter");
        }
    }
    let Some(y) = cx.output(0) else {
        cx.freeze_all("has a missing output");
        return false;
    };
    let out_axis = if out_axis == usize::MAX { cx.rank(y).unwrap_or(1).saturating_sub(1) } else { out_axis };
    for &slot in per_channel {
        let Some(p) = cx.input(slot) else { continue };
        match cx.rank(p) {
            Some(0) => {}
            Some(1) => {
                cx.couple((p, 0), (y, out_axis));
                cx.weight((p, 0), Role::Param);
            }
            _ => {
                cx.freeze_all("has a quantisation parameter of unexpected rank");
                return false;
            }
        }
    }
    true
}

/// DequantizeLinear and QuantizeLinear: elementwise on input 0. A 1-D scale and zero point run
/// along `axis` (per channel, default 1) and are sliced with its channels, like a bias; scalar
/// ones (per tensor) carry no channel and are kept. A constant input is sliced with the
/// channels of the output it dequantises (the weight roles are stated by the op that reads the
/// dequantised weight, see [`RuleCx::weight`]).
fn quantize_linear(cx: &mut RuleCx) {
    if cx.attr_int("block_size").unwrap_or(0) != 0 {
        return cx.freeze_all("uses blocked quantisation (not handled)");
    }
    let (Some(x), Some(y)) = (cx.input(0), cx.output(0)) else { return cx.freeze_all("has a missing input") };
    if !cx.pass_through(0) {
        return cx.freeze_all("has a tensor of unknown rank");
    }
    let rank = cx.rank(x).unwrap_or(0);
    for slot in 1..3 {
        let Some(p) = cx.input(slot) else { continue };
        match cx.rank(p) {
            Some(0) => {}
            Some(1) => {
                let Some(axis) = normalize_axis(cx.attr_int("axis").unwrap_or(1), rank) else {
                    return cx.freeze_all("has an invalid axis");
                };
                cx.couple((p, 0), (y, axis));
                if cx.is_const(p) {
                    cx.weight((p, 0), Role::Param);
                }
            }
            _ => return cx.freeze_all("has a scale or zero point of unexpected rank"),
        }
    }
}

/// Conv with its weight in input `w_slot` and its bias in `b_slot`.
fn conv_slots(cx: &mut RuleCx, w_slot: usize, b_slot: Option<usize>) {
    let (Some(x), Some(w), Some(y)) = (cx.input(0), cx.input(w_slot), cx.output(0)) else { return cx.freeze_all("has a missing input") };
    let (Some(wd), Some(xd)) = (cx.dims(w).map(<[Dim]>::to_vec), cx.dims(x).map(<[Dim]>::to_vec)) else {
        return cx.freeze_all("has a weight or input of unknown shape");
    };
    if !cx.is_weight(w) || wd.len() < 3 {
        return cx.freeze_all("has a weight that is not a constant tensor");
    }
    let group = cx.attr_int("group").unwrap_or(1);
    let bias = b_slot.and_then(|b| cx.input(b));
    cx.couple((x, 0), (y, 0));
    let (Some(m), Some(c)) = (wd[0].known(), xd.get(1).and_then(Dim::known)) else {
        return cx.freeze_all("has channel counts that are not known");
    };
    if group == 1 {
        cx.couple((x, 1), (w, 1));
        cx.weight((w, 1), Role::Consumer);
    } else if group as u64 == c && m == c {
        // Depthwise: output channel i reads input channel i only, so both sides are one set.
        cx.couple((x, 1), (y, 1));
    } else if group > 1 && c % group as u64 == 0 && m % group as u64 == 0 {
        // Grouped: output group j reads input group j only, so channels go a whole group at a
        // time (the weight's input axis, within one group, keeps its size).
        cx.groups((x, 1), (y, 1), group as usize);
    } else {
        cx.freeze(x, Some(1), "has a `group` that does not divide its channels");
        cx.freeze(y, Some(1), "has a `group` that does not divide its channels");
    }
    cx.couple((y, 1), (w, 0));
    cx.weight((w, 0), Role::Producer);
    if let Some(b) = bias {
        cx.couple((y, 1), (b, 0));
        cx.weight((b, 0), Role::Param);
    }
}

/// ConvTranspose: `W[C, M/group, k...]`: the roles of the weight's first two axes are swapped.
fn conv_transpose(cx: &mut RuleCx) {
    let (Some(x), Some(w), Some(y)) = (cx.input(0), cx.input(1), cx.output(0)) else { return cx.freeze_all("has a missing input") };
    if !cx.is_weight(w) || cx.rank(w).unwrap_or(0) < 3 {
        return cx.freeze_all("has a weight that is not a constant tensor");
    }
    if cx.attr_int("group").unwrap_or(1) != 1 {
        return cx.freeze_all("is a grouped transposed convolution (not pruned yet)");
    }
    cx.couple((x, 0), (y, 0));
    cx.couple((x, 1), (w, 0));
    cx.weight((w, 0), Role::Consumer);
    cx.couple((y, 1), (w, 1));
    cx.weight((w, 1), Role::Producer);
    if let Some(b) = cx.input(2) {
        cx.couple((y, 1), (b, 0));
        cx.weight((b, 0), Role::Param);
    }
}

/// Gemm: `Y[M,N] = A[M,K]·B[K,N] + C` (with `transA`, `transB`); B is the weight when constant.
fn gemm(cx: &mut RuleCx) {
    let (Some(a), Some(b), Some(y)) = (cx.input(0), cx.input(1), cx.output(0)) else { return cx.freeze_all("has a missing input") };
    let trans_a = cx.attr_int("transA").unwrap_or(0) != 0;
    let trans_b = cx.attr_int("transB").unwrap_or(0) != 0;
    let (a_m, a_k) = if trans_a { (1, 0) } else { (0, 1) };
    let (b_k, b_n) = if trans_b { (1, 0) } else { (0, 1) };
    cx.couple((a, a_m), (y, 0));
    cx.couple((a, a_k), (b, b_k));
    cx.couple((b, b_n), (y, 1));
    if cx.is_weight(a) {
        cx.weight((a, a_k), Role::Consumer);
    }
    if cx.is_weight(b) {
        cx.weight((b, b_k), Role::Consumer);
        cx.weight((b, b_n), Role::Producer);
    }
    if cx.inputs.len() > 2 {
        let mut sub =
            RuleCx { graph: cx.graph, op: cx.op, inputs: vec![cx.output(0), cx.input(2)], outputs: vec![cx.output(0)], facts: Vec::new() };
        broadcast(&mut sub);
        cx.facts.extend(sub.facts);
    }
}

/// MatMul with numpy semantics: `[..., M, K]·[..., K, N]`; batch axes broadcast.
fn matmul(cx: &mut RuleCx) {
    matmul_slots(cx, 1);
}

/// QLinearMatMul: MatMul on quantised tensors (`a, a_scale, a_zero_point, b, b_scale,
/// b_zero_point, y_scale, y_zero_point`); `b_scale` and `b_zero_point` are per column of the
/// output when 1-D.
fn qlinear_matmul(cx: &mut RuleCx) {
    if !quantized_params(cx, &[1, 2, 6, 7], &[4, 5], usize::MAX) {
        return;
    }
    matmul_slots(cx, 3);
}

/// MatMulInteger: MatMul of integers (`A, B, a_zero_point, b_zero_point`); `b_zero_point` is per
/// column of the output when 1-D (a per-row `a_zero_point` freezes what it touches).
fn matmul_integer(cx: &mut RuleCx) {
    if !quantized_params(cx, &[2], &[3], usize::MAX) {
        return;
    }
    matmul_slots(cx, 1);
}

/// MatMul with its second operand in input `b_slot`.
fn matmul_slots(cx: &mut RuleCx, b_slot: usize) {
    let (Some(a), Some(b), Some(y)) = (cx.input(0), cx.input(b_slot), cx.output(0)) else { return cx.freeze_all("has a missing input") };
    let (Some(ra), Some(rb), Some(ry)) = (cx.rank(a), cx.rank(b), cx.rank(y)) else {
        return cx.freeze_all("has an operand of unknown rank");
    };
    if ra < 2 || rb < 2 {
        return cx.freeze_all("multiplies a vector (rank-1 MatMul is not handled)");
    }
    cx.couple((a, ra - 1), (b, rb - 2));
    cx.couple((a, ra - 2), (y, ry - 2));
    cx.couple((b, rb - 1), (y, ry - 1));
    for (v, rv) in [(a, ra), (b, rb)] {
        if cx.is_weight(v) {
            let (k, n) = if v == a { (ra - 1, ra - 2) } else { (rb - 2, rb - 1) };
            cx.weight((v, k), Role::Consumer);
            cx.weight((v, n), Role::Producer);
        }
        // Batch axes align from the right; broadcast ones (size 1) carry nothing.
        for axis in 0..rv - 2 {
            let out_axis = axis + (ry - rv);
            let same = cx.dims(v).map(|d| d[axis].clone()) == cx.dims(y).map(|d| d[out_axis].clone());
            if same && cx.dims(v).map(|d| d[axis] != Dim::Known(1)).unwrap_or(false) {
                cx.couple((v, axis), (y, out_axis));
            }
        }
    }
}

/// BatchNormalization: per-channel scale, bias, mean and variance on axis 1.
fn batch_norm(cx: &mut RuleCx) {
    if !cx.pass_through(0) {
        return cx.freeze_all("has an input of unknown rank");
    }
    for slot in 1..5 {
        if let (Some(x), Some(p)) = (cx.input(0), cx.input(slot)) {
            cx.couple((x, 1), (p, 0));
            cx.weight((p, 0), Role::Param);
        }
    }
    for slot in 1..cx.outputs.len() {
        if let Some(o) = cx.output(slot) {
            cx.freeze(o, None, "has training-mode statistics outputs");
        }
    }
}

/// InstanceNormalization: normalises each channel over space; scale and bias per channel.
fn instance_norm(cx: &mut RuleCx) {
    if !cx.pass_through(0) {
        return cx.freeze_all("has an input of unknown rank");
    }
    for slot in 1..3 {
        if let (Some(x), Some(p)) = (cx.input(0), cx.input(slot)) {
            cx.couple((x, 1), (p, 0));
            cx.weight((p, 0), Role::Param);
        }
    }
}

/// LayerNormalization over the last axis only: the normalised axis passes through with its
/// scale and bias (removing channels changes the statistics, so pruning it is not exact).
fn layer_norm(cx: &mut RuleCx) {
    let (Some(x), Some(_)) = (cx.input(0), cx.output(0)) else { return cx.freeze_all("has a missing input") };
    let Some(rank) = cx.rank(x) else { return cx.freeze_all("has an input of unknown rank") };
    if normalize_axis(cx.attr_int("axis").unwrap_or(-1), rank) != Some(rank - 1) {
        return cx.freeze_all("normalises over several axes");
    }
    cx.pass_through(0);
    for slot in 1..3 {
        if let Some(p) = cx.input(slot) {
            cx.couple((x, rank - 1), (p, 0));
            cx.weight((p, 0), Role::Param);
        }
    }
    for slot in 1..cx.outputs.len() {
        if let Some(o) = cx.output(slot) {
            cx.freeze(o, None, "has mean/inverse-deviation outputs");
        }
    }
}

/// GroupNormalization: every group must keep the same number of channels, which channel-wise
/// removal does not guarantee.
fn group_norm(cx: &mut RuleCx) {
    cx.freeze_all("normalises channel groups that must stay equal in size (not pruned yet)");
}

/// Einsum: equal letters are equal axes. A letter in the output is produced (for a constant
/// operand, its rows are produced channels); a letter only in the inputs is contracted.
fn einsum(cx: &mut RuleCx) {
    let equation: String =
        cx.graph.op(cx.op).attr_string("equation").map(|s| String::from_utf8_lossy(s).replace(' ', "")).unwrap_or_default();
    let Some((lhs, rhs)) = equation.split_once("->") else { return cx.freeze_all("has an implicit-output equation (not handled)") };
    if equation.contains('.') {
        return cx.freeze_all("has an ellipsis in its equation (not handled)");
    }
    let operands: Vec<&str> = lhs.split(',').collect();
    if operands.len() != cx.inputs.len() || cx.output(0).is_none() {
        return cx.freeze_all("has an equation that does not match its inputs");
    }
    let mut places: Vec<(char, DimRef)> = Vec::new();
    let mut seen_in_operand = std::collections::BTreeSet::new();
    for (slot, letters) in operands.iter().enumerate() {
        let Some(v) = cx.input(slot) else { return cx.freeze_all("has a missing input") };
        seen_in_operand.clear();
        for (axis, c) in letters.chars().enumerate() {
            if !seen_in_operand.insert(c) {
                return cx.freeze_all("takes a diagonal (repeated letter in one operand)");
            }
            places.push((c, (v, axis)));
        }
    }
    let y = cx.output(0).expect("checked above");
    for (axis, c) in rhs.chars().enumerate() {
        places.push((c, (y, axis)));
    }
    let mut first: std::collections::BTreeMap<char, DimRef> = std::collections::BTreeMap::new();
    for &(c, dim) in &places {
        match first.get(&c) {
            Some(&f) => cx.couple(f, dim),
            None => {
                first.insert(c, dim);
            }
        }
    }
    for (slot, letters) in operands.iter().enumerate() {
        let Some(v) = cx.input(slot).filter(|&v| cx.is_const(v)) else { continue };
        for (axis, c) in letters.chars().enumerate() {
            let role = if rhs.contains(c) { Role::Producer } else { Role::Consumer };
            cx.weight((v, axis), role);
        }
    }
}

/// LSTM: hidden channel `j` is row `g·H + j` of each gate block of W and R, column `j` of R,
/// entry `g·H + j` of each of B's eight blocks, and axis `H` of the states and outputs.
fn lstm(cx: &mut RuleCx) {
    recurrent(cx, 4);
}

/// GRU: like LSTM with three gates.
fn gru(cx: &mut RuleCx) {
    recurrent(cx, 3);
}

fn recurrent(cx: &mut RuleCx, gates: usize) {
    let (Some(x), Some(w), Some(r)) = (cx.input(0), cx.input(1), cx.input(2)) else { return cx.freeze_all("has a missing input") };
    let Some(hidden) = cx.attr_int("hidden_size").filter(|&h| h > 0).map(|h| h as usize) else {
        return cx.freeze_all("has no hidden_size");
    };
    if !cx.is_const(w) || !cx.is_const(r) || cx.graph.op(cx.op).attr_int("layout").unwrap_or(0) != 0 {
        return cx.freeze_all("has non-constant weights or a batch-first layout (not handled)");
    }
    // The recurrent weight's columns are the hidden channels themselves.
    let channels = (r, 2);
    cx.weight(channels, Role::Consumer);
    cx.couple((x, 2), (w, 2));
    cx.weight((w, 2), Role::Consumer);
    for g in 0..gates {
        cx.offset(channels, (w, 1), g * hidden, 1);
        cx.offset(channels, (r, 1), g * hidden, 1);
    }
    cx.weight((w, 1), Role::Producer);
    cx.weight((r, 1), Role::Producer);
    if let Some(b) = cx.input(3) {
        for g in 0..2 * gates {
            cx.offset(channels, (b, 1), g * hidden, 1);
        }
        cx.weight((b, 1), Role::Param);
    }
    if let Some(p) = cx.input(7) {
        for g in 0..3 {
            cx.offset(channels, (p, 1), g * hidden, 1);
        }
        cx.weight((p, 1), Role::Param);
    }
    for slot in [5, 6] {
        if let Some(state) = cx.input(slot) {
            cx.couple(channels, (state, 2));
        }
    }
    if let Some(s) = cx.input(4) {
        cx.freeze(s, None, "reads it as sequence lengths");
    }
    if let Some(yall) = cx.output(0) {
        cx.couple(channels, (yall, 3));
    }
    for slot in [1, 2] {
        if let Some(state) = cx.output(slot) {
            cx.couple(channels, (state, 2));
        }
    }
}

/// Pooling keeps batch and channel axes; the spatial axes change size.
fn pool(cx: &mut RuleCx) {
    let (Some(x), Some(y)) = (cx.input(0), cx.output(0)) else { return };
    cx.couple((x, 0), (y, 0));
    cx.couple((x, 1), (y, 1));
    for slot in 1..cx.outputs.len() {
        if let Some(o) = cx.output(slot) {
            cx.freeze(o, None, "has an indices output");
        }
    }
}

/// Resize/Upsample: axes whose size does not change pass through; scaled axes are frozen.
fn resize(cx: &mut RuleCx) {
    let (Some(x), Some(y)) = (cx.input(0), cx.output(0)) else { return };
    let (Some(xd), Some(yd)) = (cx.dims(x).map(<[Dim]>::to_vec), cx.dims(y).map(<[Dim]>::to_vec)) else {
        return cx.freeze_all("has shapes that are not known");
    };
    for (a, (dx, dy)) in xd.iter().zip(&yd).enumerate() {
        if a < 2 && (dx == dy || a == 0) {
            cx.couple((x, a), (y, a));
        } else if a < 2 {
            cx.freeze(x, Some(a), "may rescale this axis");
            cx.freeze(y, Some(a), "may rescale this axis");
        }
    }
    for slot in 1..cx.inputs.len() {
        if let Some(v) = cx.input(slot) {
            cx.freeze(v, None, "reads it as scales or sizes");
        }
    }
}

/// Pad: axes with no padding pass through; padded axes are frozen.
fn pad(cx: &mut RuleCx) {
    let (Some(x), Some(y)) = (cx.input(0), cx.output(0)) else { return };
    let Some(rank) = cx.rank(x) else { return cx.freeze_all("has an input of unknown rank") };
    let pads = cx.attr_ints("pads").or_else(|| cx.const_ints(1));
    let axes: Vec<usize> = match cx.const_ints(3) {
        Some(axes) => axes.iter().filter_map(|&a| normalize_axis(a, rank)).collect(),
        None => (0..rank).collect(),
    };
    let Some(pads) = pads.filter(|p| p.len() == 2 * axes.len()) else { return cx.freeze_all("has pads that are not constant") };
    for a in 0..rank {
        let padded = axes.iter().position(|&x| x == a).map(|i| pads[i] != 0 || pads[i + axes.len()] != 0).unwrap_or(false);
        if padded {
            cx.freeze(x, Some(a), "pads this axis");
            cx.freeze(y, Some(a), "pads this axis");
        } else {
            cx.couple((x, a), (y, a));
        }
    }
    for slot in 1..cx.inputs.len() {
        if let Some(v) = cx.input(slot) {
            cx.freeze(v, None, "reads it as pads");
        }
    }
}

/// Concat: other axes pass through from every input; along the axis, input `k` is the window
/// of the output that starts after the inputs before it.
fn concat(cx: &mut RuleCx) {
    let Some(y) = cx.output(0) else { return };
    let Some(rank) = cx.rank(y) else { return cx.freeze_all("has an output of unknown rank") };
    let Some(axis) = cx.attr_int("axis").and_then(|a| normalize_axis(a, rank)) else { return cx.freeze_all("has an invalid axis") };
    let parts: Vec<ValueId> = cx.inputs.iter().flatten().copied().collect();
    windows(cx, y, &parts, rank, axis, "concatenates");
}

/// Split: other axes pass through to every output; along the axis, output `k` is the window of
/// the input after the outputs before it.
fn split(cx: &mut RuleCx) {
    let Some(x) = cx.input(0) else { return };
    let Some(rank) = cx.rank(x) else { return cx.freeze_all("has an input of unknown rank") };
    let Some(axis) = normalize_axis(cx.attr_int("axis").unwrap_or(0), rank) else { return cx.freeze_all("has an invalid axis") };
    if let Some(sizes) = cx.input(1) {
        cx.freeze(sizes, None, "reads it as split sizes");
    }
    let parts: Vec<ValueId> = cx.outputs.iter().flatten().copied().collect();
    windows(cx, x, &parts, rank, axis, "splits");
}

/// `parts` laid end to end along `axis` make `whole`; every other axis is shared.
fn windows(cx: &mut RuleCx, whole: ValueId, parts: &[ValueId], rank: usize, axis: usize, verb: &str) {
    let mut start = Some(0usize);
    for &part in parts {
        for a in (0..rank).filter(|&a| a != axis) {
            cx.couple((part, a), (whole, a));
        }
        match (start, cx.known_size((part, axis))) {
            (Some(s), Some(n)) => {
                cx.offset((part, axis), (whole, axis), s, 1);
                start = Some(s + n as usize);
            }
            _ => {
                start = None;
                let why = format!("{verb} along this axis with sizes that are not known");
                cx.freeze(part, Some(axis), &why);
                cx.freeze(whole, Some(axis), &why);
            }
        }
    }
}

/// Slice: axes not sliced pass through; a sliced axis is a strided window of the input.
fn slice(cx: &mut RuleCx) {
    let (Some(x), Some(y)) = (cx.input(0), cx.output(0)) else { return };
    let Some(rank) = cx.rank(x) else { return cx.freeze_all("has an input of unknown rank") };
    for slot in 1..cx.inputs.len() {
        if let Some(v) = cx.input(slot) {
            cx.freeze(v, None, "reads it as slice bounds");
        }
    }
    let (Some(starts), Some(_)) = (cx.const_ints(1), cx.const_ints(2)) else {
        return cx.freeze_all("slices with bounds that are not constant");
    };
    let axes: Option<Vec<usize>> = match cx.input(3) {
        Some(_) => cx.const_ints(3).and_then(|a| a.iter().map(|&a| normalize_axis(a, rank)).collect()),
        None => Some((0..starts.len()).collect()),
    };
    let steps = match cx.input(4) {
        Some(_) => cx.const_ints(4),
        None => Some(vec![1; starts.len()]),
    };
    let (Some(axes), Some(steps)) = (axes, steps) else { return cx.freeze_all("slices axes that are not constant") };
    for a in 0..rank {
        let Some(i) = axes.iter().position(|&s| s == a) else {
            cx.couple((x, a), (y, a));
            continue;
        };
        let window = match (cx.known_size((x, a)), cx.known_size((y, a))) {
            (Some(n), Some(_)) if steps[i] > 0 => {
                let start = if starts[i] < 0 { starts[i] + n as i64 } else { starts[i] }.clamp(0, n as i64);
                Some((start as usize, steps[i] as usize))
            }
            _ => None,
        };
        match window {
            Some((start, step)) => cx.offset((y, a), (x, a), start, step),
            None => {
                cx.freeze(x, Some(a), "slices this axis backwards or at sizes that are not known");
                cx.freeze(y, Some(a), "slices this axis backwards or at sizes that are not known");
            }
        }
    }
}

/// Gather: data axes other than `axis` pass through; an embedding table's columns are
/// produced channels.
fn gather(cx: &mut RuleCx) {
    let (Some(data), Some(indices), Some(y)) = (cx.input(0), cx.input(1), cx.output(0)) else { return };
    let (Some(rd), Some(ri)) = (cx.rank(data), cx.rank(indices)) else { return cx.freeze_all("has an operand of unknown rank") };
    let Some(axis) = normalize_axis(cx.attr_int("axis").unwrap_or(0), rd) else { return cx.freeze_all("has an invalid axis") };
    cx.freeze(data, Some(axis), "gathers along this axis");
    cx.freeze(indices, None, "reads it as indices");
    for a in (0..rd).filter(|&a| a != axis) {
        let out_axis = if a < axis { a } else { a - 1 + ri };
        cx.couple((data, a), (y, out_axis));
        if cx.is_const(data) && rd == 2 && a == 1 {
            cx.weight((data, a), Role::Producer);
        }
    }
}

/// Transpose: output axis `i` is input axis `perm[i]`.
fn transpose(cx: &mut RuleCx) {
    let (Some(x), Some(y)) = (cx.input(0), cx.output(0)) else { return };
    let Some(rank) = cx.rank(x) else { return cx.freeze_all("has an input of unknown rank") };
    let perm = cx.attr_ints("perm").unwrap_or_else(|| (0..rank as i64).rev().collect());
    if perm.len() != rank {
        return cx.freeze_all("has a perm that does not match its input's rank");
    }
    for (i, &p) in perm.iter().enumerate() {
        match normalize_axis(p, rank) {
            Some(p) => cx.couple((x, p), (y, i)),
            None => return cx.freeze_all("has an invalid perm"),
        }
    }
}

/// Softmax: the normalised axis is consumed non-linearly; the others pass through.
fn softmax(cx: &mut RuleCx) {
    let (Some(x), Some(y)) = (cx.input(0), cx.output(0)) else { return };
    let Some(rank) = cx.rank(x) else { return cx.freeze_all("has an input of unknown rank") };
    let Some(axis) = normalize_axis(cx.attr_int("axis").unwrap_or(-1), rank) else { return cx.freeze_all("has an invalid axis") };
    for a in 0..rank {
        if a == axis {
            cx.freeze(x, Some(a), "normalises over this axis");
            cx.freeze(y, Some(a), "normalises over this axis");
        } else {
            cx.couple((x, a), (y, a));
        }
    }
}

/// Reductions: reduced axes are frozen; the others pass through (kept or dropped per
/// `keepdims`).
fn reduce(cx: &mut RuleCx) {
    let (Some(x), Some(y)) = (cx.input(0), cx.output(0)) else { return };
    let Some(rank) = cx.rank(x) else { return cx.freeze_all("has an input of unknown rank") };
    let axes = match cx.attr_ints("axes").or_else(|| cx.const_ints(1)) {
        Some(axes) => axes.iter().map(|&a| normalize_axis(a, rank)).collect::<Option<Vec<_>>>(),
        None if cx.attr_int("noop_with_empty_axes").unwrap_or(0) == 0 => Some((0..rank).collect()),
        None => Some(Vec::new()),
    };
    let Some(axes) = axes else { return cx.freeze_all("has an invalid axis") };
    let keep = cx.attr_int("keepdims").unwrap_or(1) != 0;
    // A decomposed LayerNorm/RMSNorm statistic behaves like the fused op: the reduced axis
    // passes through the normalisation (shapes stay valid), only the statistics change.
    let statistic = keep && axes == [rank - 1] && is_norm_statistic(cx, x, y);
    let mut out_axis = 0;
    for a in 0..rank {
        if axes.contains(&a) {
            if !statistic {
                cx.freeze(x, Some(a), "reduces over this axis");
            }
            if keep {
                out_axis += 1;
            }
        } else {
            cx.couple((x, a), (y, out_axis));
            out_axis += 1;
        }
    }
    if let Some(v) = cx.input(1) {
        cx.freeze(v, None, "reads it as axes");
    }
}

/// Whether `y = ReduceMean(x)` over the last axis is the mean or the variance of a decomposed
/// normalisation: the mean is subtracted from `x` itself, or `x` is a square (`Pow(·, 2)`,
/// `Mul(a, a)`) whose mean feeds a division or reciprocal.
fn is_norm_statistic(cx: &RuleCx, x: ValueId, y: ValueId) -> bool {
    let graph = cx.graph;
    if graph.op(cx.op).op_type != "ReduceMean" {
        return false;
    }
    let centers_input = graph.consumers(y).iter().any(|&(op, _)| graph.op(op).op_type == "Sub" && graph.op_input(op, 0) == Some(x));
    let squared = graph.producer(x).is_some_and(|(op, _)| {
        let o = graph.op(op);
        let two = || {
            graph
                .op_input(op, 1)
                .and_then(|v| crate::groups::constant_tensor(graph, v))
                .and_then(|t| t.to_f64_vec())
                .is_some_and(|v| v == [2.0])
        };
        (o.op_type == "Pow" && two()) || (o.op_type == "Mul" && graph.op_input(op, 0) == graph.op_input(op, 1))
    });
    centers_input || squared
}

/// Shape: the sizes it reads must not change. When every reader of the shape picks entries
/// with constant indices (`Gather`, or a `Slice` of it), only those axes are frozen.
fn shape(cx: &mut RuleCx) {
    let (Some(x), Some(y)) = (cx.input(0), cx.output(0)) else { return };
    let Some(rank) = cx.rank(x) else { return cx.freeze(x, None, "reads this tensor's sizes") };
    let start = cx.attr_int("start").and_then(|s| normalize_axis(s.clamp(-(rank as i64), rank as i64 - 1), rank)).unwrap_or(0);
    match shape_entries_read(cx.graph, y, rank - start) {
        Some(entries) => {
            for e in entries {
                cx.freeze(x, Some(start + e), "reads this axis's size");
            }
        }
        None => cx.freeze(x, None, "reads this tensor's sizes"),
    }
}

/// The entries of a shape vector of length `len` that its readers look at, if all are constant picks.
fn shape_entries_read(graph: &Graph, shape: ValueId, len: usize) -> Option<Vec<usize>> {
    let mut entries = Vec::new();
    for (op_id, edge) in graph.consumers(shape) {
        let op = graph.op(op_id);
        let ints = |slot| graph.op_input(op_id, slot).and_then(|v| crate::groups::constant_tensor(graph, v)).and_then(|t| t.to_i64_vec());
        match (op.op_type.as_str(), edge) {
            ("Gather", crate::Edge::Input(0)) if op.attr_int("axis").unwrap_or(0) == 0 => {
                for i in ints(1)? {
                    entries.push(normalize_axis(i, len)?);
                }
            }
            ("Slice", crate::Edge::Input(0)) if graph.op_input(op_id, 3).is_none() || ints(3)? == [0] => {
                let (starts, ends) = (ints(1)?, ints(2)?);
                let clamp = |v: i64| if v < 0 { (v + len as i64).max(0) } else { v.min(len as i64) } as usize;
                if graph.op_input(op_id, 4).is_some() && ints(4)? != [1] {
                    return None;
                }
                entries.extend(clamp(*starts.first()?)..clamp(*ends.first()?));
            }
            _ => return None,
        }
    }
    Some(entries)
}

/// Expand: like broadcasting of the input to the output.
fn expand(cx: &mut RuleCx) {
    let (Some(x), Some(y)) = (cx.input(0), cx.output(0)) else { return };
    let mut sub = RuleCx { graph: cx.graph, op: cx.op, inputs: vec![Some(x)], outputs: vec![Some(y)], facts: Vec::new() };
    broadcast(&mut sub);
    cx.facts.extend(sub.facts);
    if let Some(s) = cx.input(1) {
        cx.freeze(s, None, "reads it as a shape");
    }
}

/// Reshape, Flatten, Squeeze, Unsqueeze: an axis passes through when it survives alone (only
/// size-1 axes are added or removed around it); an axis split into factors, or factors merged
/// into one axis, keeps the outermost factor's channels as blocks.
fn reshape(cx: &mut RuleCx) {
    let (Some(x), Some(y)) = (cx.input(0), cx.output(0)) else { return };
    for slot in 1..cx.inputs.len() {
        if let Some(v) = cx.input(slot) {
            cx.freeze(v, None, "reads it as a shape or axes");
        }
    }
    let (Some(xd), Some(yd)) = (cx.dims(x).map(<[Dim]>::to_vec), cx.dims(y).map(<[Dim]>::to_vec)) else {
        return cx.freeze_all("has shapes that are not known");
    };
    let Some(runs) = matching_runs(&xd, &yd) else { return cx.freeze_all("has shapes whose axes cannot be matched") };
    let size = |v: ValueId, a: usize| if v == x { xd[a].known() } else { yd[a].known() }.unwrap_or(1);
    for (run_x, run_y) in runs {
        match (run_x.as_slice(), run_y.as_slice()) {
            ([a], [b]) => cx.couple((x, *a), (y, *b)),
            // One axis split into several, or several merged into one: one factor keeps its
            // channels and the others are frozen. Normally the outermost (each channel owns a
            // contiguous block: flattening, attention heads); for a channel shuffle's split the
            // innermost, which the transpose makes outermost when the axis is merged back.
            ([single], factors) | (factors, [single]) => {
                let (one, many) = if run_x.len() == 1 { ((x, *single), y) } else { ((y, *single), x) };
                let inner_kept = many == y && (is_shuffle_split(cx.graph, y, factors) || is_packed_split(cx.graph, y, factors));
                let keep = if inner_kept { factors.len() - 1 } else { 0 };
                let stride: u64 = factors[keep + 1..].iter().map(|&f| size(many, f)).product();
                cx.block(one, (many, factors[keep]), stride as usize);
                for (_, &f) in factors.iter().enumerate().filter(|&(i, _)| i != keep) {
                    cx.freeze(many, Some(f), "is a factor of a reshape whose channels are not kept whole");
                }
            }
            // Several axes into several ([B,2048,64] -> [B,512,256]): on the common refinement of
            // both factorisations, an axis that is a single factor of one axis on the other side
            // keeps its channels there, as above; an axis without such a partner is frozen.
            _ => {
                let sizes_x: Vec<u64> = run_x.iter().map(|&a| size(x, a)).collect();
                let sizes_y: Vec<u64> = run_y.iter().map(|&b| size(y, b)).collect();
                let partners = regrouped_partners(&sizes_x, &sizes_y).unwrap_or_default();
                let mut paired = BTreeSet::new();
                for &(from_x, i, j, stride) in &partners {
                    let (coarse, fine) = if from_x { ((x, run_x[i]), (y, run_y[j])) } else { ((y, run_y[j]), (x, run_x[i])) };
                    cx.block(fine, coarse, stride as usize);
                    paired.extend([(x, run_x[i]), (y, run_y[j])]);
                }
                for (v, a) in run_x.iter().map(|&a| (x, a)).chain(run_y.iter().map(|&b| (y, b))) {
                    if !paired.contains(&(v, a)) {
                        cx.freeze(v, Some(a), "regroups this axis");
                    }
                }
            }
        }
    }
}

/// For a reshape run of axes `xs` into axes `ys` (equal products, sizes outermost first): the
/// pairs in which one axis is a single factor of the common refinement and lies inside one axis
/// of the other side, as `(coarse_is_x, x_axis, y_axis, stride)` with `stride` the size of the
/// finer axis's factors inside the coarse one. `None` when the factorisations have no common
/// refinement (a boundary of one side does not divide the next of the other) or an axis is the
/// fine side of two pairs (its channels would be tied together).
fn regrouped_partners(xs: &[u64], ys: &[u64]) -> Option<Vec<(bool, usize, usize, u64)>> {
    // Boundaries as element strides, innermost first: axis `a` spans strides `[b[a+1], b[a])`.
    let strides = |sizes: &[u64]| -> Option<Vec<u128>> {
        let mut out = vec![1u128];
        for &s in sizes.iter().rev() {
            out.push(out.last()?.checked_mul(s as u128)?);
        }
        out.reverse();
        Some(out)
    };
    let (bx, by) = (strides(xs)?, strides(ys)?);
    let mut cuts: Vec<u128> = bx.iter().chain(&by).copied().collect();
    cuts.sort_unstable();
    cuts.dedup();
    if cuts.windows(2).any(|w| w[0] == 0 || w[1] % w[0] != 0) {
        return None;
    }
    // Span of an axis as (outer stride, inner stride) and whether it is one refined factor.
    let span = |b: &[u128], a: usize| (b[a], b[a + 1]);
    let single = |(outer, inner): (u128, u128)| cuts.iter().filter(|&&c| c > inner && c <= outer).count() == 1;
    let mut partners = Vec::new();
    let mut fine_used = BTreeSet::new();
    for i in 0..xs.len() {
        for j in 0..ys.len() {
            let (sx, sy) = (span(&bx, i), span(&by, j));
            let inside = |a: (u128, u128), b: (u128, u128)| a.0 <= b.0 && a.1 >= b.1;
            let pair = if single(sx) && inside(sx, sy) && sx != sy {
                Some((true, sx.1 / sy.1, (false, j)))
            } else if single(sy) && inside(sy, sx) && sx != sy {
                Some((false, sy.1 / sx.1, (true, i)))
            } else {
                None
            };
            if let Some((from_x, stride, fine)) = pair {
                if !fine_used.insert(fine) {
                    return None;
                }
                partners.push((from_x, i, j, u64::try_from(stride).ok()?));
            }
        }
    }
    Some(partners)
}

/// Whether `split`, a reshape output whose `factors` came from one axis, feeds a channel
/// shuffle: one Transpose that swaps two adjacent factors, then one Reshape that merges them back.
fn is_shuffle_split(graph: &Graph, split: ValueId, factors: &[usize]) -> bool {
    let [outer, inner] = factors else { return false };
    let [(transpose, _)] = graph.consumers(split)[..] else { return false };
    let t = graph.op(transpose);
    if t.op_type != "Transpose" {
        return false;
    }
    let Some(perm) = t.attr_ints("perm") else { return false };
    let swapped = perm.get(*outer) == Some(&(*inner as i64)) && perm.get(*inner) == Some(&(*outer as i64));
    let Some(shuffled) = graph.op_output(transpose, 0) else { return false };
    let [(merge, _)] = graph.consumers(shuffled)[..] else { return false };
    let merges_back = graph.op(merge).op_type == "Reshape"
        && graph.value(graph.op_output(merge, 0).unwrap_or(shuffled)).shape.as_ref().map(|s| s.rank())
            == graph.value(split).shape.as_ref().map(|s| s.rank() - 1);
    swapped && merges_back
}

/// Whether `split`, a reshape output whose `factors` came from one axis, unpacks a packed
/// projection (`in_proj` of q, k and v as one `[.., 3·E]` axis viewed as `[.., 3, E]`): the outer
/// factor only moves (Unsqueeze, Transpose, Squeeze) until Gathers pick its entries by constant
/// index. The parts then share the inner axis element by element (q's channel `i` is k's and
/// v's channel `i`), which is how the inner factor keeps its channels.
fn is_packed_split(graph: &Graph, split: ValueId, factors: &[usize]) -> bool {
    let [outer, _] = factors else { return false };
    let (mut value, mut axis) = (split, *outer);
    loop {
        let readers = graph.consumers(value);
        if readers.is_empty() {
            return false;
        }
        let rank_of = |v: ValueId| graph.value(v).shape.as_ref().map(|s| s.rank());
        let all_gather = readers.iter().all(|&(op, edge)| {
            let o = graph.op(op);
            let rank = rank_of(value).unwrap_or(0);
            let indices = graph.op_input(op, 1).and_then(|i| crate::groups::constant_tensor(graph, i));
            o.op_type == "Gather"
                && edge == crate::Edge::Input(0)
                && normalize_axis(o.attr_int("axis").unwrap_or(0), rank) == Some(axis)
                && indices.is_some_and(|t| t.dims().is_empty())
        });
        if all_gather {
            return true;
        }
        let [(op, crate::Edge::Input(0))] = readers[..] else { return false };
        let o = graph.op(op);
        let Some(next) = graph.op_output(op, 0) else { return false };
        let (Some(rank_in), Some(rank_out)) = (rank_of(value), rank_of(next)) else { return false };
        let axes = || -> Option<Vec<usize>> {
            let raw = o
                .attr_ints("axes")
                .map(<[i64]>::to_vec)
                .or_else(|| crate::groups::constant_tensor(graph, graph.op_input(op, 1)?)?.to_i64_vec())?;
            let rank = if o.op_type == "Unsqueeze" { rank_out } else { rank_in };
            raw.iter().map(|&a| normalize_axis(a, rank)).collect()
        };
        axis = match o.op_type.as_str() {
            "Transpose" => match o.attr_ints("perm") {
                Some(perm) => match perm.iter().position(|&p| p == axis as i64) {
                    Some(j) => j,
                    None => return false,
                },
                None => rank_in - 1 - axis,
            },
            "Unsqueeze" => {
                let Some(inserted) = axes() else { return false };
                match (0..rank_out).filter(|a| !inserted.contains(a)).nth(axis) {
                    Some(a) => a,
                    None => return false,
                }
            }
            "Squeeze" => {
                let Some(removed) = axes() else { return false };
                if removed.contains(&axis) {
                    return false;
                }
                axis - removed.iter().filter(|&&a| a < axis).count()
            }
            _ => return false,
        };
        value = next;
    }
}

/// Pairs the axes of two shapes into the shortest runs with equal size products, left to right,
/// leaving out size-1 axes (they carry no channels). A symbolic axis pairs only with the same
/// symbol, alone. `None` if the shapes do not line up.
fn matching_runs(xs: &[Dim], ys: &[Dim]) -> Option<Vec<(Vec<usize>, Vec<usize>)>> {
    let nx: Vec<usize> = (0..xs.len()).filter(|&a| xs[a] != Dim::Known(1)).collect();
    let ny: Vec<usize> = (0..ys.len()).filter(|&a| ys[a] != Dim::Known(1)).collect();
    let (mut i, mut j) = (0, 0);
    let mut runs = Vec::new();
    while i < nx.len() && j < ny.len() {
        let (dx, dy) = (&xs[nx[i]], &ys[ny[j]]);
        let (Some(sx), Some(sy)) = (dx.known(), dy.known()) else {
            if dx != dy || *dx == Dim::Unknown {
                return None;
            }
            runs.push((vec![nx[i]], vec![ny[j]]));
            i += 1;
            j += 1;
            continue;
        };
        let (mut rx, mut ry) = (vec![nx[i]], vec![ny[j]]);
        let (mut px, mut py) = (sx as u128, sy as u128);
        i += 1;
        j += 1;
        while px != py {
            if px < py {
                px = px.checked_mul(xs[*nx.get(i)?].known()? as u128)?;
                rx.push(nx[i]);
                i += 1;
            } else {
                py = py.checked_mul(ys[*ny.get(j)?].known()? as u128)?;
                ry.push(ny[j]);
                j += 1;
            }
        }
        runs.push((rx, ry));
    }
    (i == nx.len() && j == ny.len()).then_some(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_sorted_and_has_no_duplicates() {
        // `rule_for` binary-searches it.
        for pair in RULES.windows(2) {
            assert!(pair[0].0 < pair[1].0, "`{}` must come before `{}`", pair[1].0, pair[0].0);
        }
    }

    fn dims(sizes: &[&str]) -> Vec<Dim> {
        sizes.iter().map(|s| s.parse().map(Dim::Known).unwrap_or_else(|_| Dim::Sym(s.to_string()))).collect()
    }

    #[test]
    fn reshape_runs_pair_axes_by_size_products() {
        // Heads: [B,S,H*D] -> [B,S,H,D].
        assert_eq!(
            matching_runs(&dims(&["1", "6", "16"]), &dims(&["1", "6", "2", "8"])),
            Some(vec![(vec![1], vec![1]), (vec![2], vec![2, 3])])
        );
        // Flatten after global pooling: size-1 axes carry nothing.
        assert_eq!(matching_runs(&dims(&["1", "512", "1", "1"]), &dims(&["1", "512"])), Some(vec![(vec![1], vec![1])]));
        // Flatten of C*H*W.
        assert_eq!(
            matching_runs(&dims(&["N", "4", "2", "3"]), &dims(&["N", "24"])),
            Some(vec![(vec![0], vec![0]), (vec![1, 2, 3], vec![1])])
        );
        // A symbol pairs only with itself.
        assert_eq!(matching_runs(&dims(&["N", "4"]), &dims(&["M", "4"])), None);
        assert_eq!(matching_runs(&dims(&["2", "3"]), &dims(&["7"])), None);
    }

    #[test]
    fn regrouped_axes_keep_the_factors_they_hold_alone() {
        // Magika: [B, 2048, 64] -> [B, 512, 256], four positions of 64 features per row. The 512
        // rows own blocks of 4 positions; the 64 features recur once in each quarter of 256.
        assert_eq!(regrouped_partners(&[2048, 64], &[512, 256]), Some(vec![(false, 0, 0, 4), (true, 1, 1, 1)]));
        // [4, 6] -> [8, 3]: the refinement is 4·2·3.
        assert_eq!(regrouped_partners(&[4, 6], &[8, 3]), Some(vec![(true, 0, 0, 2), (false, 1, 1, 1)]));
        // 10 does not divide 15: no common refinement.
        assert_eq!(regrouped_partners(&[6, 10], &[4, 15]), None);
        // [4, 6] -> [2, 2, 2, 3] is not a several-to-several run, but would tie 4's two factors.
        assert_eq!(regrouped_partners(&[4, 6], &[2, 2, 2, 3]), None);
    }

    #[test]
    fn unknown_domains_have_no_rule() {
        assert!(rule_for("", "Conv").is_some());
        assert!(rule_for("ai.onnx", "Relu").is_some());
        assert!(rule_for("com.example", "Relu").is_none());
        assert!(rule_for("", "Loop").is_none());
    }
}
