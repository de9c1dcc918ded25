//! Control flow and functions in tract's copy of a model: verification that runs for real on
//! models tract refuses as written.
//!
//! tract analyses both branches of an `If` and refuses one whose branches disagree, and reads
//! neither model-local functions nor sequences. Where it refuses a model, the runtime gives it a
//! copy that computes the same function on the feed at hand: the small integer inputs an `If`
//! decides on bound to their fed values, every `If` whose condition is then known replaced by
//! its taken branch (nested ones too), functions expanded, sequences written as their tensors.
//! These tests check that the copy computes what ONNX Runtime computes on the model itself, that
//! a plan refuses a feed that would take another branch, that silero VAD prunes verified, and
//! that verification still refuses a broken result.

mod common;

use common::{prunec, run_captured, shared_cases, testdata_cases};
use prost::Message;
use prunec::backends::tract_onnx::prelude::IntoTensor;
use prunec::frontend::{ReadOptions, read_model};
use prunec::ir::proto::{
    self, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TypeProto, ValueInfoProto,
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::Dimension, tensor_shape_proto::dimension,
};
use prunec::ir::{Model, Tensor};
use prunec::runtime::tract::{Feed, Plan, TractTensor, save_npz};
use std::path::Path;
use std::time::Duration;

fn value_info(name: &str, elem: DataType, dims: &[Option<i64>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(v) => dimension::Value::DimValue(*v),
                None => dimension::Value::DimParam("n".into()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape: Some(proto::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A value with only its element type recorded, as branch outputs are.
fn untyped_rank(name: &str, elem: DataType) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor { elem_type: Some(elem as i32), shape: None })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn if_node(name: &str, cond: &str, output: &str, then_branch: GraphProto, else_branch: GraphProto) -> NodeProto {
    let branch = |key: &str, g: GraphProto| AttributeProto {
        name: Some(key.into()),
        r#type: Some(AttributeType::Graph as i32),
        g: Some(g),
        ..Default::default()
    };
    NodeProto {
        attribute: vec![branch("then_branch", then_branch), branch("else_branch", else_branch)],
        ..node("If", name, &[cond], &[output])
    }
}

fn branch(name: &str, nodes: Vec<NodeProto>, initializer: Vec<TensorProto>, output: &str) -> GraphProto {
    GraphProto {
        name: Some(name.into()),
        node: nodes,
        initializer,
        output: vec![untyped_rank(output, DataType::Float)],
        ..Default::default()
    }
}

fn int64s(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Int64 as i32),
        int64_data: values.to_vec(),
        ..Default::default()
    }
}

fn floats(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Float as i32),
        float_data: values.to_vec(),
        ..Default::default()
    }
}

fn model_of(graph: GraphProto) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(13) }],
        producer_name: Some("prunec-tests".into()),
        graph: Some(graph),
        ..Default::default()
    }
}

/// `y = If(len(x) > 2) { If(rank(x) == 1) { unsqueeze(x * w) } else { x } } else { x }` over
/// `x: f32[n]`: both `If`s decide on sizes, the inner one on a `Size(Shape(x))` its branch
/// computes, and their branches differ in rank, so tract refuses the model as written. The
/// then-branch's product is named `len`, like a value of the main graph, which the inlined copy
/// must rename (and the inner `If` read renamed); `w` is a weight of the main graph read only
/// inside the branches. ONNX wants names unique across scopes (ONNX Runtime refuses the model
/// with `len` twice), so `clash` makes the model tract's copy must handle and ONNX Runtime does
/// not run.
fn nested_if_model(clash: bool) -> ModelProto {
    let product = if clash { "len" } else { "product" };
    let inner_then = branch(
        "inner_then",
        vec![node("Unsqueeze", "inner/Unsqueeze", &[product, "axes"], &["inner_then_y"])],
        vec![int64s("axes", &[1], &[0])],
        "inner_then_y",
    );
    let inner_else = branch("inner_else", vec![node("Identity", "inner/Identity", &["x"], &["inner_else_y"])], vec![], "inner_else_y");
    let outer_then = branch(
        "outer_then",
        vec![
            node("Mul", "outer/Mul", &["x", "w"], &[product]),
            node("Shape", "outer/Shape", &["x"], &["outer_shape"]),
            node("Size", "outer/Size", &["outer_shape"], &["rank"]),
            node("Equal", "outer/Equal", &["rank", "one"], &["is_vector"]),
            if_node("inner/If", "is_vector", "outer_then_y", inner_then, inner_else),
        ],
        vec![int64s("one", &[], &[1])],
        "outer_then_y",
    );
    let outer_else = branch("outer_else", vec![node("Identity", "outer/Identity", &["x"], &["outer_else_y"])], vec![], "outer_else_y");
    let mut gather = node("Gather", "Gather", &["shape", "zero"], &["len"]);
    gather.attribute.push(AttributeProto {
        name: Some("axis".into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(0),
        ..Default::default()
    });
    let graph = GraphProto {
        name: Some("nested_if".into()),
        node: vec![
            node("Shape", "Shape", &["x"], &["shape"]),
            gather,
            node("Greater", "Greater", &["len", "two"], &["long"]),
            if_node("outer/If", "long", "y", outer_then, outer_else),
        ],
        initializer: vec![int64s("zero", &[], &[0]), int64s("two", &[], &[2]), floats("w", &[1], &[3.0])],
        input: vec![value_info("x", DataType::Float, &[None])],
        output: vec![untyped_rank("y", DataType::Float)],
        ..Default::default()
    };
    model_of(graph)
}

/// `y = If(sr == 16000) { unsqueeze(x) } else { x }`: the sample rate decides, and the
/// branches differ in rank.
fn sample_rate_model() -> ModelProto {
    let then_branch =
        branch("wide", vec![node("Unsqueeze", "wide/Unsqueeze", &["x", "axes"], &["wide_y"])], vec![int64s("axes", &[1], &[0])], "wide_y");
    let else_branch = branch("narrow", vec![node("Identity", "narrow/Identity", &["x"], &["narrow_y"])], vec![], "narrow_y");
    let graph = GraphProto {
        name: Some("sample_rate".into()),
        node: vec![node("Equal", "Equal", &["sr", "rate"], &["is_16k"]), if_node("If", "is_16k", "y", then_branch, else_branch)],
        initializer: vec![int64s("rate", &[], &[16000])],
        input: vec![value_info("x", DataType::Float, &[Some(4)]), value_info("sr", DataType::Int64, &[])],
        output: vec![untyped_rank("y", DataType::Float)],
        ..Default::default()
    };
    model_of(graph)
}

fn write(dir: &Path, name: &str, model: &ModelProto) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, model.encode_to_vec()).expect("writing the model");
    path
}

fn read(path: &Path) -> prunec::frontend::Loaded {
    read_model(path, &ReadOptions::default()).expect("prunec reads it")
}

fn floats_feed(name: &str, values: &[f32]) -> (String, TractTensor) {
    (name.to_string(), TractTensor::from_shape(&[values.len()], values).expect("a vector"))
}

fn output(plan: &Plan, feed: &Feed) -> (Vec<usize>, Vec<f32>) {
    let out = plan.run(feed).expect("the plan runs");
    let y = &out.values[0].1;
    (y.shape().to_vec(), y.try_as_plain_ram().expect("in memory").as_slice::<f32>().expect("f32").to_vec())
}

#[test]
fn nested_ifs_deciding_on_shapes_are_inlined_at_the_fed_sizes() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let long = Feed([floats_feed("x", &[1.0, 2.0, 3.0, 4.0])].into());
    let short = Feed([floats_feed("x", &[5.0, 6.0])].into());
    for clash in [false, true] {
        let path = write(scratch.path(), &format!("nested_if_{clash}.onnx"), &nested_if_model(clash));
        assert!(Plan::from_file(&path, &long).is_err(), "tract runs the model as written now: the test proves nothing");
        let loaded = read(&path);
        // Long enough: the outer then-branch, then the inner one (a vector has rank 1).
        let plan = Plan::from_model(&loaded.model, &loaded.dir, &long).expect("tract runs its copy");
        assert_eq!(output(&plan, &long), (vec![1, 4], vec![3.0, 6.0, 9.0, 12.0]), "clash {clash}");
        // Too short: the outer else-branch. A plan is built per feed, at its sizes.
        let plan = Plan::from_model(&loaded.model, &loaded.dir, &short).expect("tract runs its copy");
        assert_eq!(output(&plan, &short), (vec![2], vec![5.0, 6.0]), "clash {clash}");
        if !clash {
            let npz = scratch.path().join("long.npz");
            save_npz(&long, &npz).expect("saves");
            let rel = common::tract_against_onnx_runtime(&path, &npz);
            assert_eq!(rel, 0.0, "tract's copy differs from ONNX Runtime by {rel:e} of scale");
        }
    }
}

#[test]
fn an_input_deciding_an_if_is_bound_and_a_plan_refuses_another_value() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let path = write(scratch.path(), "sample_rate.onnx", &sample_rate_model());
    let loaded = read(&path);
    let at = |sr: i64| {
        let mut feed = Feed([floats_feed("x", &[1.0, 2.0, 3.0, 4.0])].into());
        feed.0.insert("sr".into(), TractTensor::from(sr));
        feed
    };
    assert!(Plan::from_file(&path, &at(16000)).is_err(), "tract runs the model as written now: the test proves nothing");
    let wide = Plan::from_model(&loaded.model, &loaded.dir, &at(16000)).expect("tract runs its copy");
    assert_eq!(output(&wide, &at(16000)).0, [1, 4]);
    let narrow = Plan::from_model(&loaded.model, &loaded.dir, &at(8000)).expect("tract runs its copy");
    assert_eq!(output(&narrow, &at(8000)).0, [4]);
    // The 16 kHz plan holds only the 16 kHz branch: it must not answer for 8 kHz.
    let refused = wide.run(&at(8000)).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(refused.contains("`sr` decides the model's control flow"), "the plan ran another branch's feed: {refused:?}");
}

/// How far two runtimes' outputs of silero may differ, relative to scale: four times what ONNX
/// Runtime's graph optimisations alone change (2.4e-5 on the state); a wrong branch or a
/// missing op changes outputs by whole percents.
const SILERO_FLOAT_ERROR: f64 = 1e-4;

/// The silero case's feed (512 samples, zero state, 16 kHz) as an `.npz` in `dir`, the samples
/// scaled to a tenth: the case's uniform noise in [-1, 1) is louder than speech, and its
/// spectrum drives every gate of the LSTM into saturation, where no change of its weights
/// shows in the outputs (ONNX Runtime's outputs do not move when they double).
fn silero_inputs(dir: &Path) -> (common::Case, std::path::PathBuf) {
    let case = shared_cases().into_iter().find(|c| c.name == "silero_vad_op15").expect("the silero case");
    let model = read_model(&case.path, &ReadOptions { infer_shapes: false }).expect("reads").model;
    let mut feed = common::feed(&case, &model);
    let samples = feed.0["input"].to_plain_array_view::<f32>().expect("f32 samples").mapv(|v| v * 0.1);
    feed.0.insert("input".into(), samples.into_tensor());
    let npz = dir.join("silero.npz");
    save_npz(&feed, &npz).expect("saves");
    (case, npz)
}

#[test]
fn silero_vad_prunes_verified_and_onnx_runtime_runs_the_result() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let (case, npz) = silero_inputs(scratch.path());
    // tract's copy (the Ifs inlined at 512 samples) computes what ONNX Runtime computes, to the
    // float error of the model: ONNX Runtime's own graph optimisations move its state by 2.4e-5
    // (the spectrum's magnitudes reach hundreds before the LSTM).
    let rel = common::tract_against_onnx_runtime(&case.path, &npz);
    assert!(rel < SILERO_FLOAT_ERROR, "tract's copy of silero differs from ONNX Runtime by {rel:e} of scale");
    let out = scratch.path().join("silero.pruned.onnx");
    let mut cmd = prunec();
    cmd.arg(&case.path).arg("-o").arg(&out).arg("--inputs").arg(&npz);
    let run = run_captured(cmd, Duration::from_secs(120)).expect("prunec runs");
    assert_eq!(run.code, Some(0), "prunec failed:\n{}", run.stderr);
    // Verification ran, at the fed sizes, and judged the result against the masked original.
    assert!(run.stderr.contains("(input[1, 512], sr[], state[2, 1, 128])"), "not verified at the fed sizes:\n{}", run.stderr);
    assert_eq!(run.stderr.matches("equals the masked original").count(), 2, "both outputs judged:\n{}", run.stderr);
    let params = |p: &Path| common::inspect_json(p)["parameters"].as_u64().expect("parameters");
    assert!(params(&out) < params(&case.path), "nothing pruned:\n{}", run.stderr);
    // The checker (full), strict shape inference, ONNX Runtime with the original's output shapes
    // and types, and tract's copy of the result against ONNX Runtime's run of it.
    common::exporters(&[Path::new("check"), &case.path, &out, &npz]);
    let rel = common::tract_against_onnx_runtime(&out, &npz);
    assert!(rel < SILERO_FLOAT_ERROR, "tract's copy of the pruned silero differs from ONNX Runtime by {rel:e} of scale");
}

/// Multiplies every element of the float initializer `name` by `factor`.
fn scale_weight(model: &mut Model, name: &str, factor: f32) {
    let v = model.graph.value_by_name(name).unwrap_or_else(|| panic!("no `{name}`"));
    let t = model.graph.value(v).initializer().expect("a weight").clone();
    let values: Vec<f32> = t.to_f32_vec().expect("floats").into_iter().map(|x| x * factor).collect();
    model.graph.set_initializer(v, Tensor::from_f32(name, &t.dims(), &values));
}

#[test]
fn a_pruned_silero_with_a_weight_changed_inside_a_branch_is_refused() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let (case, npz) = silero_inputs(scratch.path());
    let loaded = read(&case.path);
    let feed = prunec::runtime::tract::load_npz(&npz, &loaded.model).expect("inputs");
    let mut pruned = loaded.model.clone();
    let fold = prunec::passes::parse_pipeline("fold,prune").expect("registered");
    let runs = prunec::passes::run_pipeline(&mut pruned, &fold, &mut Default::default()).expect("the passes run");
    let references: Vec<_> = runs.iter().map(|r| r.report.reference.clone()).collect();
    let verify = |m: &Model| prunec::runtime::verify::verify(&loaded.model, m, &references, &loaded.dir, &feed, 1e-4);
    let v = verify(&pruned).unwrap_or_else(|e| panic!("the pruned silero does not verify: {e}"));
    assert!(v.judged && v.reference == "masked", "{v:?}");
    // The LSTM's input weights are read only inside `If` branches (the taken one among them).
    // (Not its recurrent weights: from the zero state of this feed, its one step multiplies
    // them by zero.)
    let mut broken = pruned.clone();
    scale_weight(&mut broken, "model.decoder.rnn.weight_ih", 1.01);
    let e = verify(&broken).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("differs from the masked original"), "a changed LSTM weight passed verification: {e:?}");
    // And through a Constant inside the taken branch: the slice of the input weights that
    // starts at row 0 starts at row 1 instead.
    let mut shifted = pruned.clone();
    let changed = shift_branch_constant(&mut shifted, "/model/decoder/rnn/Constant_8_output_0");
    assert!(changed, "the branch constant was not found");
    assert!(verify(&shifted).is_err(), "a changed constant inside the taken branch passed verification");
}

/// Adds 1 to the int64 `Constant` producing `name` inside any subgraph of the main graph's ops.
fn shift_branch_constant(model: &mut Model, name: &str) -> bool {
    fn walk(g: &mut GraphProto, name: &str) -> bool {
        let mut found = false;
        for n in &mut g.node {
            if n.op_type() == "Constant" && n.output.iter().any(|o| o == name) {
                for a in &mut n.attribute {
                    if let Some(t) = a.t.as_mut() {
                        let Some(values) = (!t.int64_data.is_empty()).then_some(&mut t.int64_data) else {
                            let raw = t.raw_data.as_mut().expect("int64 raw data");
                            let shifted: Vec<u8> = raw
                                .chunks(8)
                                .flat_map(|c| (i64::from_le_bytes(c.try_into().expect("8 bytes")) + 1).to_le_bytes())
                                .collect();
                            *raw = shifted.into();
                            found = true;
                            continue;
                        };
                        values.iter_mut().for_each(|v| *v += 1);
                        found = true;
                    }
                }
            }
            for a in &mut n.attribute {
                for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                    found |= walk(sub, name);
                }
            }
        }
        found
    }
    let mut found = false;
    for op in model.graph.op_ids().collect::<Vec<_>>() {
        for a in &mut model.graph.op_mut(op).attributes {
            for sub in a.proto.g.iter_mut().chain(a.proto.graphs.iter_mut()) {
                found |= walk(sub, name);
            }
        }
    }
    found
}

#[test]
fn exotic_functions_and_sequences_run_in_tract_as_onnx_runtime_runs_them() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let case = testdata_cases().into_iter().find(|c| c.name == "exotic").expect("the exotic case");
    let model = read_model(&case.path, &ReadOptions { infer_shapes: false }).expect("reads").model;
    let npz = scratch.path().join("exotic.npz");
    save_npz(&common::feed(&case, &model), &npz).expect("saves");
    let feed = common::feed(&case, &model);
    assert!(Plan::from_file(&case.path, &feed).is_err(), "tract runs exotic as written now: the test proves nothing");
    let rel = common::tract_against_onnx_runtime(&case.path, &npz);
    assert_eq!(rel, 0.0, "tract's copy of exotic differs from ONNX Runtime by {rel:e} of scale");
}

fn int_attr(name: &str, value: i64) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(AttributeType::Int as i32), i: Some(value), ..Default::default() }
}

/// Every sequence op the copy lowers, over `x: f32[6]`: split into pairs, a pair inserted at 1,
/// the last erased, the length, one element, the rest stacked; and split into scalars, stacked
/// back.
fn sequences_model() -> ModelProto {
    let with = |mut n: NodeProto, attributes: Vec<AttributeProto>| {
        n.attribute = attributes;
        n
    };
    let graph = GraphProto {
        name: Some("sequences".into()),
        node: vec![
            node("SplitToSequence", "pairs", &["x", "two"], &["pairs"]),
            node("SequenceInsert", "insert", &["pairs", "c", "one"], &["inserted"]),
            node("SequenceErase", "erase", &["inserted", "minus_one"], &["erased"]),
            node("SequenceLength", "length", &["erased"], &["n"]),
            node("SequenceAt", "at", &["erased", "one"], &["a"]),
            with(node("ConcatFromSequence", "stack", &["erased"], &["stacked"]), vec![int_attr("axis", 0), int_attr("new_axis", 1)]),
            with(node("SplitToSequence", "scalars", &["x"], &["scalars"]), vec![int_attr("keepdims", 0)]),
            with(node("ConcatFromSequence", "rebuild", &["scalars"], &["rebuilt"]), vec![int_attr("axis", 0), int_attr("new_axis", 1)]),
        ],
        initializer: vec![
            int64s("two", &[], &[2]),
            int64s("one", &[], &[1]),
            int64s("minus_one", &[], &[-1]),
            floats("c", &[2], &[10.0, 20.0]),
        ],
        input: vec![value_info("x", DataType::Float, &[Some(6)])],
        output: vec![
            value_info("n", DataType::Int64, &[]),
            untyped_rank("a", DataType::Float),
            untyped_rank("stacked", DataType::Float),
            untyped_rank("rebuilt", DataType::Float),
        ],
        ..Default::default()
    };
    model_of(graph)
}

#[test]
fn sequences_of_known_length_are_written_as_their_tensors() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let path = write(scratch.path(), "sequences.onnx", &sequences_model());
    let feed = Feed([floats_feed("x", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])].into());
    assert!(Plan::from_file(&path, &feed).is_err(), "tract runs sequences now: the test proves nothing");
    let loaded = read(&path);
    let out = Plan::from_model(&loaded.model, &loaded.dir, &feed).expect("tract runs its copy").run(&feed).expect("runs");
    let values: Vec<(String, Vec<usize>, Vec<f64>)> = out
        .values
        .iter()
        .map(|(name, t)| {
            let f = t.cast_to::<f64>().expect("numbers").into_owned();
            (name.clone(), t.shape().to_vec(), f.try_as_plain_ram().expect("in memory").as_slice::<f64>().expect("f64").to_vec())
        })
        .collect();
    let want = [
        ("n", vec![], vec![3.0]),
        ("a", vec![2], vec![10.0, 20.0]),
        ("stacked", vec![3, 2], vec![1.0, 2.0, 10.0, 20.0, 3.0, 4.0]),
        ("rebuilt", vec![6], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
    ];
    for ((name, shape, data), (want_name, want_shape, want_data)) in values.iter().zip(want) {
        assert_eq!((name.as_str(), shape, data), (want_name, &want_shape, &want_data));
    }
    let npz = scratch.path().join("sequences.npz");
    save_npz(&feed, &npz).expect("saves");
    assert_eq!(common::tract_against_onnx_runtime(&path, &npz), 0.0, "ONNX Runtime computes otherwise");
}

/// Two model-local functions of domain `local`: `Scale(X)` is `LeakyRelu(X, alpha=@alpha)`
/// (alpha 2 unless the call says), `Both(X)` is `Scale(Scale(X), alpha=@beta)`: a nested call, an
/// attribute passed on by reference, a default. The main graph calls `Both` with beta 3 and
/// `Scale` with alpha 0.5, so the body of `Scale` is written three times and its names must not
/// clash.
fn functions_model() -> ModelProto {
    let opsets = || {
        vec![
            OperatorSetIdProto { domain: Some(String::new()), version: Some(13) },
            OperatorSetIdProto { domain: Some("local".into()), version: Some(1) },
        ]
    };
    let reference = |name: &str, to: &str| AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        ref_attr_name: Some(to.into()),
        ..Default::default()
    };
    let float_attr = |name: &str, v: f32| AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    };
    let call = |function: &str, name: &str, input: &str, output: &str, attribute: Vec<AttributeProto>| NodeProto {
        domain: Some("local".into()),
        attribute,
        ..node(function, name, &[input], &[output])
    };
    let scale = proto::FunctionProto {
        name: Some("Scale".into()),
        domain: Some("local".into()),
        input: vec!["X".into()],
        output: vec!["Y".into()],
        attribute_proto: vec![float_attr("alpha", 2.0)],
        node: vec![NodeProto { attribute: vec![reference("alpha", "alpha")], ..node("LeakyRelu", "leaky", &["X"], &["Y"]) }],
        opset_import: opsets(),
        ..Default::default()
    };
    let both = proto::FunctionProto {
        name: Some("Both".into()),
        domain: Some("local".into()),
        input: vec!["X".into()],
        output: vec!["Y".into()],
        attribute: vec!["beta".into()],
        node: vec![call("Scale", "first", "X", "T", vec![]), call("Scale", "second", "T", "Y", vec![reference("alpha", "beta")])],
        opset_import: opsets(),
        ..Default::default()
    };
    let graph = GraphProto {
        name: Some("functions".into()),
        node: vec![
            call("Both", "both", "x", "y1", vec![float_attr("beta", 3.0)]),
            call("Scale", "half", "x", "y2", vec![float_attr("alpha", 0.5)]),
        ],
        input: vec![value_info("x", DataType::Float, &[Some(4)])],
        output: vec![value_info("y1", DataType::Float, &[Some(4)]), value_info("y2", DataType::Float, &[Some(4)])],
        ..Default::default()
    };
    ModelProto { opset_import: opsets(), functions: vec![scale, both], ..model_of(graph) }
}

#[test]
fn model_local_functions_are_expanded_with_their_attributes_resolved() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let path = write(scratch.path(), "functions.onnx", &functions_model());
    let feed = Feed([floats_feed("x", &[-1.0, -2.0, -4.0, 4.0])].into());
    assert!(Plan::from_file(&path, &feed).is_err(), "tract expands functions now: the test proves nothing");
    let loaded = read(&path);
    let out = Plan::from_model(&loaded.model, &loaded.dir, &feed).expect("tract runs its copy").run(&feed).expect("runs");
    let values: Vec<Vec<f32>> =
        out.values.iter().map(|(_, t)| t.try_as_plain_ram().expect("in memory").as_slice::<f32>().expect("f32").to_vec()).collect();
    // Negative inputs times 2, then 3; times 0.5 for the second call. Positive ones pass.
    assert_eq!(values, [vec![-6.0, -12.0, -24.0, 4.0], vec![-0.5, -1.0, -2.0, 4.0]]);
    let npz = scratch.path().join("functions.npz");
    save_npz(&feed, &npz).expect("saves");
    assert_eq!(common::tract_against_onnx_runtime(&path, &npz), 0.0, "ONNX Runtime computes otherwise");
}
