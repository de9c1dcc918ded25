//! Detection, removal and the reference on graphs built op by op.

use super::*;
use prunec_ir::{DType, Graph, Model, Op, Shape, Tensor, Value, ValueId, ValueKind};

/// A graph built op by op, every value f32 of a known shape.
#[derive(Default)]
struct Builder {
    graph: Graph,
}

impl Builder {
    fn input(&mut self, name: &str, dims: &[u64]) -> ValueId {
        let id = self.value(name, dims, ValueKind::Input);
        self.graph.inputs.push(id);
        id
    }

    fn weight(&mut self, name: &str, dims: &[u64], fill: impl Fn(usize) -> f32) -> ValueId {
        let data: Vec<f32> = (0..dims.iter().product::<u64>() as usize).map(fill).collect();
        self.graph.add_initializer(name, Tensor::from_f32(name, dims, &data))
    }

    fn ints(&mut self, name: &str, values: &[i64]) -> ValueId {
        self.graph.add_initializer(name, Tensor::from_i64(name, &[values.len() as u64], values))
    }

    fn value(&mut self, name: &str, dims: &[u64], kind: ValueKind) -> ValueId {
        let mut v = Value::new(name, kind);
        v.dtype = Some(DType::F32);
        v.shape = Some(Shape::known(dims));
        self.graph.add_value(v).expect("a new name")
    }

    fn op(&mut self, op_type: &str, inputs: &[ValueId], dims: &[u64]) -> ValueId {
        self.op_with(op_type, inputs, &[dims], Vec::new())[0]
    }

    fn op_with(&mut self, op_type: &str, inputs: &[ValueId], outputs: &[&[u64]], attributes: Vec<prunec_ir::Attribute>) -> Vec<ValueId> {
        let n = self.graph.op_count();
        let outs: Vec<ValueId> =
            outputs.iter().enumerate().map(|(i, d)| self.value(&format!("{op_type}{n}_{i}"), d, ValueKind::Produced)).collect();
        let op = Op {
            name: format!("{op_type}{n}"),
            op_type: op_type.into(),
            domain: String::new(),
            attributes,
            meta: Default::default(),
            seq: u64::MAX,
        };
        let inputs: Vec<Option<ValueId>> = inputs.iter().copied().map(Some).collect();
        let outputs: Vec<Option<ValueId>> = outs.iter().copied().map(Some).collect();
        self.graph.add_op(op, &inputs, &outputs).expect("a valid op");
        outs
    }

    /// `x + W2·relu(W1·x)` on `[1, 4, 8]`; the Relu's output is returned too.
    fn mlp_residual(&mut self, x: ValueId) -> (ValueId, ValueId) {
        let w1 = self.weight("w1", &[8, 8], |i| i as f32 * 0.01);
        let w2 = self.weight("w2", &[8, 8], |i| 0.5 - i as f32 * 0.01);
        let h = self.op("MatMul", &[x, w1], &[1, 4, 8]);
        let r = self.op("Relu", &[h], &[1, 4, 8]);
        let b = self.op("MatMul", &[r, w2], &[1, 4, 8]);
        (self.op("Add", &[x, b], &[1, 4, 8]), r)
    }
}

#[test]
fn a_residual_mlp_is_one_layer_of_one_region() {
    let mut g = Builder::default();
    let x = g.input("x", &[1, 4, 8]);
    let (y, _) = g.mlp_residual(x);
    g.graph.outputs.push(y);
    let report = find_blocks(&g.graph);
    assert!(report.declined.is_empty(), "{:?}", report.declined);
    let [layer] = &report.layers[..] else { panic!("{report:?}") };
    assert_eq!((layer.nodes, layer.parameters, layer.macs), (4, 128, 2 * 4 * 8 * 8));
    assert_eq!(layer.sub_blocks[0].kind, BlockKind::Mlp);
    assert_eq!(layer.sub_blocks[0].regions[0].skip, "x");
    assert!(layer.score.protected && layer.score.weight_proxy.is_some());
}

#[test]
fn a_branch_value_that_is_a_graph_output_declines_the_block() {
    let mut g = Builder::default();
    let x = g.input("x", &[1, 4, 8]);
    let (y, cache) = g.mlp_residual(x);
    g.graph.outputs.extend([y, cache]);
    let report = find_blocks(&g.graph);
    assert!(report.layers.is_empty());
    let reason = DeclineReason::InternalValueUsed { value: "Relu1_0".into(), reader: None };
    assert_eq!(report.declined.iter().map(|d| &d.reason).collect::<Vec<_>>(), [&reason]);
    assert_eq!(report.declined[0].text, "internal value `Relu1_0` is a graph output");
}

#[test]
fn a_sum_broadcasting_its_skip_is_a_shape_change() {
    let mut g = Builder::default();
    let x = g.input("x", &[1, 1, 8]);
    let w = g.weight("w", &[8, 8], |i| i as f32);
    let positions = g.weight("p", &[1, 3, 8], |_| 1.0);
    let h = g.op("MatMul", &[x, w], &[1, 1, 8]);
    let b = g.op("Add", &[h, positions], &[1, 3, 8]);
    let y = g.op("Add", &[x, b], &[1, 3, 8]);
    g.graph.outputs.push(y);
    let report = find_blocks(&g.graph);
    assert!(report.layers.is_empty());
    let reason = DeclineReason::ShapeChange { skip: "[1,1,8]".into(), output: "[1,3,8]".into() };
    assert_eq!(report.declined.iter().map(|d| &d.reason).collect::<Vec<_>>(), [&reason]);
}

#[test]
fn a_gate_is_scored_by_the_modulation_rows_it_is_split_from() {
    let mut g = Builder::default();
    let x = g.input("x", &[1, 4, 8]);
    let temb = g.input("temb", &[1, 8]);
    // Rows 16..24 of the modulation (the third chunk, the gate) are 2, the others 0.
    let modulation = g.weight("modulation", &[24, 8], |i| if i >= 16 * 8 { 2.0 } else { 0.0 });
    let trans_b = prunec_ir::Attribute::from_proto(prunec_ir::proto::AttributeProto {
        name: Some("transB".into()),
        i: Some(1),
        r#type: Some(prunec_ir::proto::attribute_proto::AttributeType::Int as i32),
        ..Default::default()
    })
    .expect("an attribute");
    let m = g.op_with("Gemm", &[temb, modulation], &[&[1, 24]], vec![trans_b])[0];
    let sizes = g.ints("sizes", &[8, 8, 8]);
    let axis = prunec_ir::Attribute::from_proto(prunec_ir::proto::AttributeProto {
        name: Some("axis".into()),
        i: Some(1),
        r#type: Some(prunec_ir::proto::attribute_proto::AttributeType::Int as i32),
        ..Default::default()
    })
    .expect("an attribute");
    let chunks = g.op_with("Split", &[m, sizes], &[&[1, 8], &[1, 8], &[1, 8]], vec![axis]);
    let axes = g.ints("axes", &[1]);
    let gate = g.op("Unsqueeze", &[chunks[2], axes], &[1, 1, 8]);
    let w = g.weight("w", &[8, 8], |_| 0.5);
    let f = g.op("MatMul", &[x, w], &[1, 4, 8]);
    let b = g.op("Mul", &[gate, f], &[1, 4, 8]);
    let y = g.op("Add", &[x, b], &[1, 4, 8]);
    g.graph.outputs.push(y);
    let report = find_blocks(&g.graph);
    let [layer] = &report.layers[..] else { panic!("{report:?}") };
    assert_eq!(layer.sub_blocks[0].regions[0].gate.as_deref(), Some("Unsqueeze2_0"));
    assert_eq!(layer.score.gates, [2.0]);
    assert_eq!(layer.score.weight_proxy, Some(0.5 * 2.0));
    // The modulation only feeds this gate, so it goes with the block.
    assert_eq!(layer.parameters, 24 * 8 + 8 * 8);
}

#[test]
fn an_empty_graph_has_no_blocks() {
    let report = find_blocks(&Graph::default());
    assert!(report.layers.is_empty() && report.declined.is_empty());
}

fn model(graph: Graph) -> Model {
    Model { shell: Default::default(), graph }
}

#[test]
fn a_removed_sum_that_is_a_graph_output_keeps_its_name_through_an_identity() {
    let mut g = Builder::default();
    let x = g.input("x", &[1, 4, 8]);
    let (y, _) = g.mlp_residual(x);
    g.graph.outputs.push(y);
    let mut m = model(g.graph);
    let report = find_blocks(&m.graph);
    let removal = remove(&mut m, &report, &[Selection::Layer(0)]).expect("removable");
    assert_eq!(removal.spliced, ["Add3"]);
    let ops: Vec<String> = m.graph.op_ids().map(|op| m.graph.op(op).op_type.clone()).collect();
    assert_eq!(ops, ["Identity"]);
    assert_eq!(m.graph.outputs, [y]);
    assert!(m.graph.initializers.is_empty(), "the weights go with the branch");
}

#[test]
fn consecutive_layers_removed_together_leave_the_stream_reading_the_first_skip() {
    let mut g = Builder::default();
    let x = g.input("x", &[1, 4, 8]);
    let (y1, _) = g.mlp_residual(x);
    let w = g.weight("w3", &[8, 8], |i| i as f32 * 0.02);
    let h = g.op("MatMul", &[y1, w], &[1, 4, 8]);
    let y2 = g.op("Add", &[y1, h], &[1, 4, 8]);
    let out = g.op("Relu", &[y2], &[1, 4, 8]);
    g.graph.outputs.push(out);
    let mut m = model(g.graph);
    let report = find_blocks(&m.graph);
    assert_eq!(report.layers.len(), 2);
    remove(&mut m, &report, &[Selection::Layer(1), Selection::Layer(0)]).expect("removable");
    let (relu, _) = m.graph.producer(out).expect("the output is computed");
    assert_eq!(m.graph.op_inputs(relu), [Some(x)]);
    assert_eq!(m.graph.op_count(), 1);
}

#[test]
fn the_reference_multiplies_each_chosen_branch_by_zero() {
    let mut g = Builder::default();
    let x = g.input("x", &[1, 4, 8]);
    let (y, _) = g.mlp_residual(x);
    g.graph.outputs.push(y);
    let mut m = model(g.graph);
    let report = find_blocks(&m.graph);
    let zeroed = zero_residuals(&mut m, &report, &[Selection::SubBlock { layer: 0, sub_block: 0 }]).expect("zeroable");
    assert_eq!(zeroed, 1);
    let (add, _) = m.graph.producer(y).expect("the sum stays");
    let zeroed = m.graph.op_input(add, 1).expect("the branch input");
    let (mul, _) = m.graph.producer(zeroed).expect("a Mul");
    assert_eq!(m.graph.op(mul).op_type, "Mul");
    let zero = m.graph.op_input(mul, 1).and_then(|v| m.graph.value(v).initializer().cloned()).expect("a constant");
    assert_eq!((zero.dims(), zero.to_f32_vec()), (vec![], Some(vec![0.0])));
}

#[test]
fn selections_the_report_does_not_have_are_errors() {
    let mut g = Builder::default();
    let x = g.input("x", &[1, 4, 8]);
    let (y, _) = g.mlp_residual(x);
    g.graph.outputs.push(y);
    let mut m = model(g.graph);
    let report = find_blocks(&m.graph);
    let err = remove(&mut m, &report, &[Selection::SubBlock { layer: 0, sub_block: 3 }]).expect_err("one sub-block");
    assert_eq!(err.to_string(), "no such block: sub-block 3 of layer 0 (it has 1)");
    let err = remove_with(&mut m, &report, &[Selection::Layer(0)], Merge::Average).expect_err("a single layer stands for none");
    assert_eq!(err.to_string(), "cannot average the layers: layer 0: every layer of its stack 0 is removed, none can stand for it");
}
