//! Builds the synthetic test models under `testdata/models/`.
//!
//! Each model is tiny and exercises one structure the pruner must get right: a residual add, a
//! depthwise convolution, a grouped convolution, split/concat, attention heads, an `If` whose branches read outer-scope
//! values, dead code, schema corners that must survive a round trip unchanged, and external data.
//!
//! The output is byte-identical on every run, so the committed models only change when this file
//! does: weights come from a splitmix64 stream seeded by the graph's name, everything is emitted in
//! program order and nothing records a time or a path. Names follow the PyTorch exporter
//! (`/block1/conv1/Conv`, `block1.conv1.weight`, `/block1/conv1/Conv_output_0`) so the models read
//! like the ones users bring.

use crate::proto::{attr_float, attr_graph, attr_int, attr_ints, attr_tensor, tensor_f32, tensor_i64};
use anyhow::{Context, Result, ensure};
use prost::Message;
use prunec_ir::proto::{
    AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, SparseTensorProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
    tensor_proto::{DataLocation, DataType},
    tensor_shape_proto::{Dimension, dimension},
    type_proto,
};
use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

const IR_VERSION: i64 = 8;
const OPSET: i64 = 17;
const PRODUCER: &str = "prunec-xtask";

/// Initializers with at least this many elements go to the external data file. Both conv
/// weights qualify (216 and 32 elements) and both biases stay inline, so the data file holds
/// two tensors and readers see a non-zero offset.
const EXTERNAL_MIN_ELEMS: i64 = 32;

/// Writes every synthetic test model to `<root>/testdata/models/`.
pub fn run(root: &Path) -> Result<()> {
    let dir = root.join("testdata/models");
    let builders: [fn() -> Result<ModelProto>; 10] =
        [conv_residual, depthwise, grouped_conv, concat_split, attention, if_subgraph, dead_code, exotic, mlp, byte_embed];
    for build in builders {
        let model = build()?;
        let graph = model.graph.as_ref().expect("every builder sets a graph");
        write(&dir.join(format!("{}.onnx", graph.name())), &model.encode_to_vec())?;
    }

    let (model, data) = external_data()?;
    let dir = dir.join("external_data");
    write(&dir.join("model.onnx"), &model.encode_to_vec())?;
    write(&dir.join("model.onnx.data"), &data)?;
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("model paths have a parent folder");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The models
// ---------------------------------------------------------------------------------------------

/// A small ResNet-style classifier: stem, one residual block, a strided conv with batch norm
/// and a Gemm head.
fn conv_residual() -> Result<ModelProto> {
    let mut g = GraphBuilder::new("conv_residual");
    let x = g.input("input", DataType::Float, &[1, 3, 16, 16]);

    let stem = g.conv("/stem/conv", &x, Conv::new(3, 8, 3));
    let stem = g.op("/stem/relu", "Relu", &[&stem], vec![]);

    let h = g.conv("/block1/conv1", &stem, Conv::new(8, 8, 3));
    let h = g.op("/block1/relu1", "Relu", &[&h], vec![]);
    let h = g.conv("/block1/conv2", &h, Conv::new(8, 8, 3));
    // The add ties block1/conv2's output channels to the stem's: they can only be pruned together.
    let h = g.op("/block1", "Add", &[&h, &stem], vec![]);
    let h = g.op("/block1/relu2", "Relu", &[&h], vec![]);

    // No bias before batch norm, as PyTorch models are written: the norm's shift subsumes it.
    let h = g.conv("/down/conv", &h, Conv::new(8, 16, 3).stride(2).without_bias());
    let h = g.batch_norm("/down/bn", &h, 16);
    let h = g.op("/down/relu", "Relu", &[&h], vec![]);

    let h = g.op("/pool", "GlobalAveragePool", &[&h], vec![]);
    let h = g.op("", "Flatten", &[&h], vec![attr_int("axis", 1)]);
    let y = g.gemm("/fc", &h, 16, 10);
    g.output(&y, "output", DataType::Float, &[1, 10]);
    Ok(model(g.finish()?, &[]))
}

/// A MobileNetV2 inverted residual: 1x1 expand, ReLU6, depthwise 3x3, 1x1 project, add.
fn depthwise() -> Result<ModelProto> {
    let mut g = GraphBuilder::new("depthwise");
    let x = g.input("input", DataType::Float, &[1, 4, 12, 12]);

    let h = g.conv("/expand/conv", &x, Conv::new(4, 12, 1));
    // Opset 11+ Clip takes its bounds as inputs; exporters emit them as scalar initializers.
    let min = g.initializer(tensor_f32("expand.act.min", &[], &[0.0]));
    let max = g.initializer(tensor_f32("expand.act.max", &[], &[6.0]));
    let h = g.op("/expand/act", "Clip", &[&h, &min, &max], vec![]);

    let h = g.conv("/dw/conv", &h, Conv::new(12, 12, 3).depthwise());
    let h = g.op("/dw/relu", "Relu", &[&h], vec![]);
    let h = g.conv("/project/conv", &h, Conv::new(12, 4, 1));
    let y = g.op("", "Add", &[&h, &x], vec![]);
    g.output(&y, "output", DataType::Float, &[1, 4, 12, 12]);
    Ok(model(g.finish()?, &[]))
}

/// A ResNeXt bottleneck: 1x1 reduce, 3x3 convolution in 2 groups, 1x1 expand, add.
fn grouped_conv() -> Result<ModelProto> {
    let mut g = GraphBuilder::new("grouped_conv");
    let x = g.input("input", DataType::Float, &[1, 4, 8, 8]);
    let h = g.conv("/reduce/conv", &x, Conv::new(4, 8, 1));
    let h = g.op("/reduce/relu", "Relu", &[&h], vec![]);
    let h = g.conv("/grouped/conv", &h, Conv::new(8, 8, 3).groups(2));
    let h = g.op("/grouped/relu", "Relu", &[&h], vec![]);
    let h = g.conv("/expand/conv", &h, Conv::new(8, 4, 1));
    let y = g.op("", "Add", &[&h, &x], vec![]);
    g.output(&y, "output", DataType::Float, &[1, 4, 8, 8]);
    Ok(model(g.finish()?, &[]))
}

/// A conv whose channels are split between two branches and concatenated again.
fn concat_split() -> Result<ModelProto> {
    let mut g = GraphBuilder::new("concat_split");
    let x = g.input("input", DataType::Float, &[1, 3, 8, 8]);

    let h = g.conv("/stem/conv", &x, Conv::new(3, 8, 1));
    // Split sizes as an input, not an attribute (opset 13+): pruning the stem must rewrite them.
    let sizes = g.initializer(tensor_i64("split_sizes", &[2], &[3, 5]));
    let parts = g.node("", "Split", &[&h, &sizes], 2, vec![attr_int("axis", 1)]);

    let a = g.conv("/branch_a/conv", &parts[0], Conv::new(3, 6, 3));
    let a = g.op("/branch_a/relu", "Relu", &[&a], vec![]);
    let b = g.conv("/branch_b/conv", &parts[1], Conv::new(5, 6, 1));
    let b = g.op("/branch_b/relu", "Relu", &[&b], vec![]);

    let h = g.op("", "Concat", &[&a, &b], vec![attr_int("axis", 1)]);
    let y = g.conv("/head/conv", &h, Conv::new(12, 4, 1));
    g.output(&y, "output", DataType::Float, &[1, 4, 8, 8]);
    Ok(model(g.finish()?, &[]))
}

/// A three-layer perceptron on a batch of 64 rows: more samples than any layer has inputs, so a
/// consumer's least-squares refit on calibration data has one exact answer (OBSPA's test). The
/// hidden layers' consumers are a MatMul with a bias Add and a Gemm.
fn mlp() -> Result<ModelProto> {
    let mut g = GraphBuilder::new("mlp");
    let x = g.input("x", DataType::Float, &[64, 16]);
    let h = g.gemm("/fc1", &x, 16, 32);
    let h = g.op("/act1", "Relu", &[&h], vec![]);
    let h = g.linear("/fc2", &h, 32, 24);
    let h = g.op("/act2", "Relu", &[&h], vec![]);
    let y = g.gemm("/fc3", &h, 24, 8);
    g.output(&y, "output", DataType::Float, &[64, 8]);
    Ok(model(g.finish()?, &[]))
}

/// Magika's front end in small: per-position embeddings [1, 16, 4] regrouped into rows of four
/// positions, [1, 4, 16], then read as channels by a convolution. Embedding feature `c` is
/// convolution input channel `c`, `c + 4`, `c + 8` and `c + 12`.
fn byte_embed() -> Result<ModelProto> {
    let mut g = GraphBuilder::new("byte_embed");
    let x = g.input("x", DataType::Float, &[1, 16, 6]);
    let h = g.linear("/embed", &x, 6, 4);
    let h = g.op("/embed/act", "Relu", &[&h], vec![]);
    let rows = g.initializer(tensor_i64("regroup.shape", &[3], &[1, 4, 16]));
    let h = g.op("/regroup", "Reshape", &[&h, &rows], vec![]);
    let h = g.op("/regroup", "Transpose", &[&h], vec![attr_ints("perm", &[0, 2, 1])]);
    let image = g.initializer(tensor_i64("regroup.image_shape", &[4], &[1, 16, 4, 1]));
    let h = g.op("/to_image", "Reshape", &[&h, &image], vec![]);
    let h = g.conv("/conv", &h, Conv::new(16, 8, 1));
    let h = g.op("/conv/act", "Relu", &[&h], vec![]);
    let h = g.op("/head", "Flatten", &[&h], vec![attr_int("axis", 1)]);
    let y = g.gemm("/head", &h, 32, 3);
    g.output(&y, "output", DataType::Float, &[1, 3]);
    Ok(model(g.finish()?, &[]))
}

/// One post-norm transformer encoder layer: two-head self-attention and a ReLU feed-forward
/// block, written out op by op as the PyTorch exporter does.
fn attention() -> Result<ModelProto> {
    const SEQ: i64 = 6;
    const DIM: i64 = 16;
    const HEADS: i64 = 2;
    const HEAD_DIM: i64 = DIM / HEADS;
    const HIDDEN: i64 = 32;

    let mut g = GraphBuilder::new("attention");
    let x = g.input("x", DataType::Float, &[1, SEQ, DIM]);

    // One shape constant serves all three head splits, so pruning heads must rewrite it once
    // for all of them; 0 copies the batch dimension, as exporters write it.
    let heads_shape = g.initializer(tensor_i64("attn.heads_shape", &[4], &[0, SEQ, HEADS, HEAD_DIM]));
    let q = split_heads(&mut g, "q", &x, &heads_shape, DIM);
    let k = split_heads(&mut g, "k", &x, &heads_shape, DIM);
    let v = split_heads(&mut g, "v", &x, &heads_shape, DIM);
    let k_t = g.op("/attn/k_t", "Transpose", &[&k], vec![attr_ints("perm", &[0, 1, 3, 2])]);

    let scale = g.initializer(tensor_f32("attn.scale", &[], &[(HEAD_DIM as f32).sqrt()]));
    let scores = g.op("/attn/scores", "MatMul", &[&q, &k_t], vec![]);
    let scores = g.op("/attn/scores", "Div", &[&scores, &scale], vec![]);
    let probs = g.op("/attn/scores", "Softmax", &[&scores], vec![attr_int("axis", -1)]);

    let ctx = g.op("/attn/context", "MatMul", &[&probs, &v], vec![]);
    let ctx = g.op("/attn/context", "Transpose", &[&ctx], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    let merged_shape = g.initializer(tensor_i64("attn.merged_shape", &[3], &[1, SEQ, DIM]));
    let ctx = g.op("/attn/context", "Reshape", &[&ctx, &merged_shape], vec![]);
    let attn = g.linear("/attn/out_proj", &ctx, DIM, DIM);
    let h = g.op("/attn", "Add", &[&attn, &x], vec![]);
    let h = g.layer_norm("/norm", &h, DIM);

    let f = g.linear("/ffn/fc1", &h, DIM, HIDDEN);
    let f = g.op("/ffn/act", "Relu", &[&f], vec![]);
    let f = g.linear("/ffn/fc2", &f, HIDDEN, DIM);
    let y = g.op("/ffn", "Add", &[&f, &h], vec![]);
    g.output(&y, "output", DataType::Float, &[1, SEQ, DIM]);
    Ok(model(g.finish()?, &[]))
}

/// Projects `x` [1, S, D] and splits it into heads: [1, H, S, D/H].
fn split_heads(g: &mut GraphBuilder, name: &str, x: &str, heads_shape: &str, dim: i64) -> String {
    let h = g.linear(&format!("/attn/{name}_proj"), x, dim, dim);
    let scope = format!("/attn/{name}");
    let h = g.op(&scope, "Reshape", &[&h, heads_shape], vec![]);
    g.op(&scope, "Transpose", &[&h], vec![attr_ints("perm", &[0, 2, 1, 3])])
}

/// An `If` whose branches are single MatMuls. The then branch reads its weight from the main
/// graph (an outer-scope capture the IR must keep alive); the else branch owns its weight.
fn if_subgraph() -> Result<ModelProto> {
    let mut g = GraphBuilder::new("if_subgraph");
    let x = g.input("x", DataType::Float, &[1, 4]);
    let cond = g.input("cond", DataType::Bool, &[]);
    let h = g.linear("/fc0", &x, 4, 8);
    let w_then = g.param("head_then.weight", &[8, 3], 8);

    let mut then_branch = GraphBuilder::new("then_branch");
    let y = then_branch.op("/If/then_branch", "MatMul", &[&h, &w_then], vec![]);
    then_branch.output(&y, "then_out", DataType::Float, &[1, 3]);

    let mut else_branch = GraphBuilder::new("else_branch");
    let w_else = else_branch.param("head_else.weight", &[8, 3], 8);
    let y = else_branch.op("/If/else_branch", "MatMul", &[&h, &w_else], vec![]);
    else_branch.output(&y, "else_out", DataType::Float, &[1, 3]);

    let branches = vec![attr_graph("then_branch", then_branch.finish()?), attr_graph("else_branch", else_branch.finish()?)];
    let y = g.op("", "If", &[&cond], branches);
    g.output(&y, "y", DataType::Float, &[1, 3]);
    Ok(model(g.finish()?, &[]))
}

/// A live MatMul → Relu path, plus a branch off the MatMul whose result nobody reads and an
/// initializer that no node reads at all.
fn dead_code() -> Result<ModelProto> {
    let mut g = GraphBuilder::new("dead_code");
    let x = g.input("input", DataType::Float, &[1, 8]);
    let h = g.matmul("/fc", &x, 8, 8);
    let y = g.op("/relu", "Relu", &[&h], vec![]);
    g.output(&y, "output", DataType::Float, &[1, 8]);

    let gate = g.op("/gate", "Sigmoid", &[&h], vec![]);
    let gate_scale = g.param("gate.scale", &[8], 8);
    g.op("/gate", "Mul", &[&gate, &gate_scale], vec![]);
    g.param("unused.weight", &[8], 8);
    Ok(model(g.finish()?, &[]))
}

/// Schema corners that the IR carries without modelling them; a read/write cycle must keep
/// every one of them. Only the ONNX checker has to accept it, though onnxruntime runs it too.
fn exotic() -> Result<ModelProto> {
    const CUSTOM: &str = "com.example";
    let mut g = GraphBuilder::new("exotic");
    let batch = Dimension { denotation: Some("DATA_BATCH".into()), value: Some(dimension::Value::DimParam("batch".into())) };
    let feature = Dimension { denotation: Some("DATA_FEATURE".into()), ..dim(4) };
    let row = tensor_type(DataType::Float, vec![batch, feature]);
    g.graph.input.push(ValueInfoProto {
        name: Some("x".into()),
        r#type: Some(row.clone()),
        doc_string: Some("One row of four features per example.".into()),
        metadata_props: vec![entry("unit", "none"), entry("range", "[-1, 1]")],
    });

    let mut scale = node("Scale2", "/scale/Scale2", &["x"], &["/scale/Scale2_output_0"], vec![]);
    scale.domain = Some(CUSTOM.into());
    scale.doc_string = Some("Calls the model-local function com.example.Scale2.".into());
    scale.metadata_props = vec![entry("pytorch.module", "scale")];
    g.graph.node.push(scale);

    let seq = g.op("/seq", "SequenceConstruct", &["/scale/Scale2_output_0", "x"], vec![]);
    let seq_type = TypeProto {
        denotation: None,
        value: Some(type_proto::Value::SequenceType(Box::new(type_proto::Sequence { elem_type: Some(Box::new(row.clone())) }))),
    };
    g.graph.value_info.push(ValueInfoProto { name: Some(seq.clone()), r#type: Some(seq_type), ..Default::default() });

    // The typed repeated fields rather than raw_data: readers must handle both encodings.
    let index = g.initializer(TensorProto {
        name: Some("seq.index".into()),
        data_type: Some(DataType::Int64 as i32),
        int64_data: vec![0],
        ..Default::default()
    });
    let bias = g.initializer(TensorProto {
        name: Some("bias".into()),
        dims: vec![4],
        data_type: Some(DataType::Float as i32),
        float_data: vec![0.5, -0.25, 0.125, -0.0625],
        ..Default::default()
    });
    let first = g.op("/seq", "SequenceAt", &[&seq, &index], vec![]);
    let y = g.op("", "Add", &[&first, &bias], vec![]);
    g.output_typed(&y, "y", row);

    // Three non-zeros of a 4x4 matrix, indexed by their row-major position. The checker's
    // full_check rejects the Identity reading it: shape inference types a sparse initializer as
    // sparse_tensor(float), which no standard op accepts, whereas runtimes densify it at load.
    let mut indices = tensor_i64("", &[3], &[1, 6, 11]);
    indices.name = None;
    g.graph.sparse_initializer.push(SparseTensorProto {
        values: Some(tensor_f32("sparse_w", &[3], &[1.0, 2.0, 3.0])),
        indices: Some(indices),
        dims: vec![4, 4],
    });
    let dense = g.op("/sparse", "Identity", &["sparse_w"], vec![]);
    g.output(&dense, "dense_w", DataType::Float, &[4, 4]);

    let mut graph = g.finish()?;
    graph.doc_string = Some("Schema corners for the losslessness test.".into());
    graph.metadata_props = vec![entry("purpose", "losslessness")];

    let scale2 = FunctionProto {
        name: Some("Scale2".into()),
        domain: Some(CUSTOM.into()),
        input: vec!["X".into()],
        output: vec!["Y".into()],
        node: vec![
            node("Constant", "Scale2/Constant", &[], &["two"], vec![attr_tensor("value", tensor_f32("two", &[], &[2.0]))]),
            node("Mul", "Scale2/Mul", &["X", "two"], &["Y"], vec![]),
        ],
        opset_import: vec![opset("", OPSET)],
        doc_string: Some("Y = 2 * X".into()),
        ..Default::default()
    };

    let mut model = model(graph, &[(CUSTOM, 1), ("ai.onnx.ml", 3)]);
    model.doc_string = Some("Synthetic model exercising rarely used ONNX fields.".into());
    model.domain = Some("com.example.prunec".into());
    model.model_version = Some(3);
    model.metadata_props = vec![entry("author", PRODUCER), entry("license", "MIT OR Apache-2.0")];
    model.functions = vec![scale2];
    Ok(model)
}

/// A small conv net whose large initializers live in `model.onnx.data`; returns the model and
/// the data file's bytes.
fn external_data() -> Result<(ModelProto, Vec<u8>)> {
    let mut g = GraphBuilder::new("external_data");
    let x = g.input("input", DataType::Float, &[1, 3, 8, 8]);
    let h = g.conv("/conv1", &x, Conv::new(3, 8, 3));
    let h = g.op("/relu", "Relu", &[&h], vec![]);
    let y = g.conv("/conv2", &h, Conv::new(8, 4, 1));
    g.output(&y, "output", DataType::Float, &[1, 4, 8, 8]);
    let mut graph = g.finish()?;
    let data = externalize(&mut graph, "model.onnx.data", EXTERNAL_MIN_ELEMS);
    Ok((model(graph, &[]), data))
}

/// Moves the bytes of every initializer with at least `min_elems` elements into one data file.
/// Tensors are packed back to back without alignment padding, as `onnx.save_model` does by
/// default, so readers meet offsets that are not multiples of anything.
fn externalize(graph: &mut GraphProto, location: &str, min_elems: i64) -> Vec<u8> {
    let mut data = Vec::new();
    for t in &mut graph.initializer {
        if t.dims.iter().product::<i64>() < min_elems {
            continue;
        }
        let raw = t.raw_data.take().expect("the builder stores every initializer as raw_data");
        t.external_data =
            vec![entry("location", location), entry("offset", &data.len().to_string()), entry("length", &raw.len().to_string())];
        t.data_location = Some(DataLocation::External as i32);
        data.extend_from_slice(&raw);
    }
    data
}

// ---------------------------------------------------------------------------------------------
// Graph builder
// ---------------------------------------------------------------------------------------------

/// Hyper-parameters of a 2-D convolution. Padding is always `k / 2`, which keeps the spatial
/// size at stride 1 for the odd kernels used here.
#[derive(Clone, Copy)]
struct Conv {
    cin: i64,
    cout: i64,
    k: i64,
    stride: i64,
    group: i64,
    bias: bool,
}

impl Conv {
    fn new(cin: i64, cout: i64, k: i64) -> Conv {
        Conv { cin, cout, k, stride: 1, group: 1, bias: true }
    }

    fn stride(self, stride: i64) -> Conv {
        Conv { stride, ..self }
    }

    fn depthwise(self) -> Conv {
        Conv { group: self.cin, ..self }
    }

    fn groups(self, group: i64) -> Conv {
        Conv { group, ..self }
    }

    fn without_bias(self) -> Conv {
        Conv { bias: false, ..self }
    }
}

/// Accumulates one graph's nodes, initializers, inputs and outputs in program order.
///
/// Layers take a scope such as `/block1/conv1`; the node is named `<scope>/<OpType>`, its output
/// `<node name>_output_0` and its parameters `block1.conv1.<weight|bias|…>`.
struct GraphBuilder {
    graph: GraphProto,
    rng: Rng,
}

impl GraphBuilder {
    fn new(name: &str) -> GraphBuilder {
        GraphBuilder { graph: GraphProto { name: Some(name.into()), ..Default::default() }, rng: Rng::seeded(name) }
    }

    /// Declares a graph input of a fully known tensor type and returns its name.
    fn input(&mut self, name: &str, elem: DataType, dims: &[i64]) -> String {
        self.graph.input.push(value_info(name, tensor_type(elem, dims.iter().map(|&d| dim(d)).collect())));
        name.into()
    }

    /// Makes `value` a graph output called `name`. The producer's output is renamed rather than
    /// copied through an Identity, as the PyTorch exporter does.
    fn output(&mut self, value: &str, name: &str, elem: DataType, dims: &[i64]) {
        self.output_typed(value, name, tensor_type(elem, dims.iter().map(|&d| dim(d)).collect()));
    }

    fn output_typed(&mut self, value: &str, name: &str, ty: TypeProto) {
        for n in &mut self.graph.node {
            for v in n.input.iter_mut().chain(n.output.iter_mut()) {
                if v == value {
                    *v = name.into();
                }
            }
        }
        self.graph.output.push(value_info(name, ty));
    }

    fn initializer(&mut self, tensor: TensorProto) -> String {
        let name = tensor.name().to_string();
        self.graph.initializer.push(tensor);
        name
    }

    /// A float initializer drawn uniformly from ±1/√fan_in, PyTorch's default for conv and
    /// linear layers, so activations keep a sensible scale through the network.
    fn param(&mut self, name: &str, dims: &[i64], fan_in: i64) -> String {
        let bound = 1.0 / (fan_in as f32).sqrt();
        self.random(name, dims, -bound, bound)
    }

    fn random(&mut self, name: &str, dims: &[i64], lo: f32, hi: f32) -> String {
        let data: Vec<f32> = (0..dims.iter().product()).map(|_| self.rng.uniform(lo, hi)).collect();
        self.initializer(tensor_f32(name, dims, &data))
    }

    /// Appends a node named `<scope>/<op_type>` with `outputs` outputs and returns their names.
    fn node(&mut self, scope: &str, op_type: &str, inputs: &[&str], outputs: usize, attrs: Vec<AttributeProto>) -> Vec<String> {
        let name = format!("{scope}/{op_type}");
        let outputs: Vec<String> = (0..outputs).map(|i| format!("{name}_output_{i}")).collect();
        let output_refs: Vec<&str> = outputs.iter().map(String::as_str).collect();
        self.graph.node.push(node(op_type, &name, inputs, &output_refs, attrs));
        outputs
    }

    /// Appends a single-output node and returns its output's name.
    fn op(&mut self, scope: &str, op_type: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.node(scope, op_type, inputs, 1, attrs).remove(0)
    }

    fn conv(&mut self, scope: &str, x: &str, c: Conv) -> String {
        let prefix = param_prefix(scope);
        let fan_in = c.cin / c.group * c.k * c.k;
        let weight = self.param(&format!("{prefix}.weight"), &[c.cout, c.cin / c.group, c.k, c.k], fan_in);
        let bias = c.bias.then(|| self.param(&format!("{prefix}.bias"), &[c.cout], fan_in));
        let mut inputs = vec![x, weight.as_str()];
        inputs.extend(bias.as_deref());
        let pad = c.k / 2;
        let attrs = vec![
            attr_ints("dilations", &[1, 1]),
            attr_int("group", c.group),
            attr_ints("kernel_shape", &[c.k, c.k]),
            attr_ints("pads", &[pad, pad, pad, pad]),
            attr_ints("strides", &[c.stride, c.stride]),
        ];
        self.op(scope, "Conv", &inputs, attrs)
    }

    /// Inference-mode batch norm with statistics far enough from identity that folding it into
    /// the preceding conv, or dropping it, changes the output.
    fn batch_norm(&mut self, scope: &str, x: &str, channels: i64) -> String {
        let prefix = param_prefix(scope);
        let c = &[channels];
        let scale = self.random(&format!("{prefix}.weight"), c, 0.5, 1.5);
        let bias = self.random(&format!("{prefix}.bias"), c, -0.1, 0.1);
        let mean = self.random(&format!("{prefix}.running_mean"), c, -0.1, 0.1);
        let var = self.random(&format!("{prefix}.running_var"), c, 0.5, 1.5);
        let attrs = vec![attr_float("epsilon", 1e-5), attr_float("momentum", 0.9)];
        self.op(scope, "BatchNormalization", &[x, &scale, &bias, &mean, &var], attrs)
    }

    /// `x · W` with `W` stored as [fan_in, fan_out], the layout exporters give `nn.Linear` when
    /// the input has more than two dimensions.
    fn matmul(&mut self, scope: &str, x: &str, fan_in: i64, fan_out: i64) -> String {
        let weight = self.param(&format!("{}.weight", param_prefix(scope)), &[fan_in, fan_out], fan_in);
        self.op(scope, "MatMul", &[x, &weight], vec![])
    }

    /// `x · W + b` as a MatMul followed by an Add.
    fn linear(&mut self, scope: &str, x: &str, fan_in: i64, fan_out: i64) -> String {
        let h = self.matmul(scope, x, fan_in, fan_out);
        let bias = self.param(&format!("{}.bias", param_prefix(scope)), &[fan_out], fan_in);
        self.op(scope, "Add", &[&h, &bias], vec![])
    }

    /// `x · Wᵀ + b` as one Gemm, the form exporters give `nn.Linear` on 2-D inputs.
    fn gemm(&mut self, scope: &str, x: &str, fan_in: i64, fan_out: i64) -> String {
        let prefix = param_prefix(scope);
        let weight = self.param(&format!("{prefix}.weight"), &[fan_out, fan_in], fan_in);
        let bias = self.param(&format!("{prefix}.bias"), &[fan_out], fan_in);
        let attrs = vec![attr_float("alpha", 1.0), attr_float("beta", 1.0), attr_int("transB", 1)];
        self.op(scope, "Gemm", &[x, &weight, &bias], attrs)
    }

    fn layer_norm(&mut self, scope: &str, x: &str, dim: i64) -> String {
        let prefix = param_prefix(scope);
        let scale = self.random(&format!("{prefix}.weight"), &[dim], 0.5, 1.5);
        let bias = self.random(&format!("{prefix}.bias"), &[dim], -0.1, 0.1);
        let attrs = vec![attr_int("axis", -1), attr_float("epsilon", 1e-5)];
        self.op(scope, "LayerNormalization", &[x, &scale, &bias], attrs)
    }

    /// The finished graph, once every node has a unique, non-empty name: tests and snapshots
    /// refer to nodes by name.
    fn finish(self) -> Result<GraphProto> {
        let mut seen = BTreeSet::new();
        for n in &self.graph.node {
            let name = n.name();
            ensure!(!name.is_empty() && seen.insert(name), "graph `{}`: node name `{name}` is empty or repeated", self.graph.name());
        }
        Ok(self.graph)
    }
}

/// `/block1/conv1` → `block1.conv1`, the state-dict prefix PyTorch gives that module's parameters.
fn param_prefix(scope: &str) -> String {
    scope.trim_start_matches('/').replace('/', ".")
}

/// Wraps a main graph into a model importing the default domain at [`OPSET`] plus `extra_opsets`.
fn model(graph: GraphProto, extra_opsets: &[(&str, i64)]) -> ModelProto {
    let mut opset_import = vec![opset("", OPSET)];
    opset_import.extend(extra_opsets.iter().map(|&(domain, version)| opset(domain, version)));
    ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import,
        producer_name: Some(PRODUCER.into()),
        graph: Some(graph),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Protobuf helpers
// ---------------------------------------------------------------------------------------------

fn node(op_type: &str, name: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|&s| s.into()).collect(),
        output: outputs.iter().map(|&s| s.into()).collect(),
        name: Some(name.into()),
        op_type: Some(op_type.into()),
        attribute: attrs,
        ..Default::default()
    }
}

fn opset(domain: &str, version: i64) -> OperatorSetIdProto {
    OperatorSetIdProto { domain: Some(domain.into()), version: Some(version) }
}

fn entry(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto { key: Some(key.into()), value: Some(value.into()) }
}

fn dim(value: i64) -> Dimension {
    Dimension { denotation: None, value: Some(dimension::Value::DimValue(value)) }
}

fn tensor_type(elem: DataType, dims: Vec<Dimension>) -> TypeProto {
    TypeProto {
        denotation: None,
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: Some(elem as i32),
            shape: Some(TensorShapeProto { dim: dims }),
        })),
    }
}

fn value_info(name: &str, ty: TypeProto) -> ValueInfoProto {
    ValueInfoProto { name: Some(name.into()), r#type: Some(ty), ..Default::default() }
}

/// splitmix64: tiny, seedable and the same on every platform, so the weights never change.
struct Rng(u64);

impl Rng {
    /// Seeds from a label (FNV-1a), so each graph draws its own stream and adding a model does
    /// not shift the weights of the others.
    fn seeded(label: &str) -> Rng {
        Rng(label.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`.
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        // 24 random bits fill an f32 mantissa exactly, so the unit draw is exact.
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }
}
