//! Shared test support: where the test models are, how to feed them, how to call prunec and the
//! external validators.
#![allow(dead_code)]

use prunec::ir::Model;
use prunec::runtime::tract::{Feed, TractTensor, load_npz, random_feed};
use serde_json::{Value as Json, json};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shared models and data: `$PRUNEC_SHARED`, else `../shared` beside the checkout.
pub fn shared() -> PathBuf {
    let dir = std::env::var_os("PRUNEC_SHARED").map(PathBuf::from).unwrap_or_else(|| root().join("../shared"));
    assert!(dir.join("models").is_dir(), "shared models not found at {} (set PRUNEC_SHARED)", dir.display());
    dir
}

/// The Python with onnx and onnxruntime: `$PRUNEC_PYTHON`, else `.venv/bin/python` (made by
/// `cargo xtask setup`).
pub fn python() -> PathBuf {
    let py = std::env::var_os("PRUNEC_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"));
    assert!(py.exists(), "no Python validator at {} (run `cargo xtask setup` or set PRUNEC_PYTHON)", py.display());
    py
}

/// The prunec binary under test.
pub fn prunec() -> Command {
    Command::new(env!("CARGO_BIN_EXE_prunec"))
}

/// A finished run of a command.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `cmd` with stdin closed and both outputs captured (read on their own threads, so a full
/// pipe cannot stall it). `Err` when it cannot start, or is still running after `hang`: it is
/// then killed.
pub fn run_captured(mut cmd: Command, hang: Duration) -> Result<Run, String> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let pipe = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = pipe(Box::new(child.stdout.take().expect("stdout is piped")));
    let err = pipe(Box::new(child.stderr.take().expect("stderr is piped")));
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("waiting for the command: {e}"))? {
            break status;
        }
        if start.elapsed() > hang {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {hang:?}: killed"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok(Run { code: status.code(), stdout, stderr, elapsed: start.elapsed() })
}

/// One input tensor of a feed: a constant or seeded random values.
#[derive(Clone, Debug)]
pub struct Input {
    pub name: &'static str,
    pub dtype: &'static str,
    pub shape: Vec<u64>,
    /// `None` for random values.
    pub fill: Option<f64>,
}

/// Where a test model's inputs come from.
#[derive(Clone, Debug)]
pub enum FeedSpec {
    /// Arrays of an `.npz` file (extra keys, such as labels, are ignored).
    Npz(PathBuf),
    /// Listed tensors; inputs not listed get random values of their recorded shape.
    Tensors(Vec<Input>),
}

/// A model every test suite runs over.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub path: PathBuf,
    pub feed: FeedSpec,
}

fn input(name: &'static str, dtype: &'static str, shape: &[u64], fill: Option<f64>) -> Input {
    Input { name, dtype, shape: shape.to_vec(), fill }
}

/// Every model of `testdata/models` and `../shared/models`.
pub fn all_cases() -> Vec<Case> {
    let mut cases = testdata_cases();
    cases.extend(shared_cases());
    cases
}

/// The synthetic models of `testdata/models`.
pub fn testdata_cases() -> Vec<Case> {
    let dir = root().join("testdata/models");
    let case =
        |name: &str, file: &str, feed: Vec<Input>| Case { name: name.to_string(), path: dir.join(file), feed: FeedSpec::Tensors(feed) };
    vec![
        case("attention", "attention.onnx", vec![]),
        case("byte_embed", "byte_embed.onnx", vec![]),
        case("concat_split", "concat_split.onnx", vec![]),
        case("conv_residual", "conv_residual.onnx", vec![]),
        case("dead_code", "dead_code.onnx", vec![]),
        case("depthwise", "depthwise.onnx", vec![]),
        case("grouped_conv", "grouped_conv.onnx", vec![]),
        case("mlp", "mlp.onnx", vec![]),
        case("exotic", "exotic.onnx", vec![input("x", "float32", &[2, 4], None)]),
        case("external_data", "external_data/model.onnx", vec![]),
        case("if_subgraph_then", "if_subgraph.onnx", vec![input("cond", "bool", &[], Some(1.0))]),
        case("if_subgraph_else", "if_subgraph.onnx", vec![input("cond", "bool", &[], Some(0.0))]),
    ]
}

/// The real and zoo models of `../shared/models`, with real or suitable inputs.
pub fn shared_cases() -> Vec<Case> {
    let shared = shared();
    let models = shared.join("models");
    let mut cases = Vec::new();
    for name in [
        "mobilenet_v2",
        "mobilenet_v3_small",
        "resnet18",
        "shufflenet_v2_x0_5",
        "tiny_bert",
        "tiny_flux",
        "tiny_qwenimage",
        "tiny_sd3",
        "tiny_vit",
    ] {
        cases.push(Case {
            name: name.to_string(),
            path: models.join(format!("zoo/{name}.onnx")),
            feed: FeedSpec::Npz(models.join(format!("zoo/{name}.inputs.npz"))),
        });
    }
    let real = |name: &str, file: &str, feed: Vec<Input>| Case {
        name: name.to_string(),
        path: models.join("real").join(file),
        feed: FeedSpec::Tensors(feed),
    };
    cases.push(real("ppocr_det", "rapidocr/ch_PP-OCRv4_det_infer.onnx", vec![input("x", "float32", &[1, 3, 64, 64], None)]));
    cases.push(real("ppocr_rec", "rapidocr/ch_PP-OCRv4_rec_infer.onnx", vec![input("x", "float32", &[1, 3, 48, 96], None)]));
    cases.push(real("ppocr_cls", "rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx", vec![input("x", "float32", &[1, 3, 48, 192], None)]));
    cases.push(Case {
        name: "magika".into(),
        path: models.join("real/magika/model.onnx"),
        feed: FeedSpec::Tensors(vec![input("bytes", "int32", &[2, 2048], Some(7.0))]),
    });
    cases.push(real(
        "silero_vad_op15",
        "silero/silero_vad_16k_op15.onnx",
        vec![
            input("input", "float32", &[1, 512], None),
            input("state", "float32", &[2, 1, 128], Some(0.0)),
            input("sr", "int64", &[], Some(16000.0)),
        ],
    ));
    cases.push(real(
        "silero_vad_sequence",
        "silero/silero_vad_16k_sequence.onnx",
        vec![
            input("input", "float32", &[2, 576], None),
            input("h", "float32", &[1, 1, 128], Some(0.0)),
            input("c", "float32", &[1, 1, 128], Some(0.0)),
        ],
    ));
    cases
}

/// Builds the tract feed of a case for `model`.
pub fn feed(case: &Case, model: &Model) -> Feed {
    match &case.feed {
        FeedSpec::Npz(path) => load_npz(path, model).expect("reading npz inputs"),
        FeedSpec::Tensors(inputs) => {
            let mut given = Feed::default();
            let mut shapes = BTreeMap::new();
            for i in inputs {
                match i.fill {
                    Some(v) => {
                        given.0.insert(i.name.to_string(), constant(i, v));
                    }
                    None => {
                        shapes.insert(i.name.to_string(), i.shape.clone());
                    }
                }
            }
            random_feed(model, given, &shapes, 7).expect("random inputs")
        }
    }
}

fn constant(i: &Input, v: f64) -> TractTensor {
    let shape: Vec<usize> = i.shape.iter().map(|&d| d as usize).collect();
    let n: usize = shape.iter().product();
    match i.dtype {
        "float32" => TractTensor::from_shape(&shape, &vec![v as f32; n]),
        "int64" => TractTensor::from_shape(&shape, &vec![v as i64; n]),
        "int32" => TractTensor::from_shape(&shape, &vec![v as i32; n]),
        "bool" => TractTensor::from_shape(&shape, &vec![v != 0.0; n]),
        other => panic!("test input type {other} not handled"),
    }
    .expect("tensor of the declared shape")
}

/// The feed of a case in the validator's JSON form.
pub fn feed_json(case: &Case) -> Json {
    match &case.feed {
        FeedSpec::Npz(path) => json!({ "npz": path }),
        FeedSpec::Tensors(inputs) => json!({
            "tensors": inputs.iter().map(|i| json!({
                "name": i.name, "dtype": i.dtype, "shape": i.shape,
                "fill": i.fill.map_or(json!("random"), |v| json!(v)),
            })).collect::<Vec<_>>()
        }),
    }
}

/// Runs `tests/validate/validate.py` over a manifest of cases; panics with its report on failure.
pub fn validate_with_python(cases: &[Json], scratch: &Path) {
    let manifest = scratch.join("manifest.json");
    std::fs::write(&manifest, serde_json::to_string_pretty(&cases).expect("json")).expect("writing manifest");
    let out = Command::new(python()).arg(root().join("tests/validate/validate.py")).arg(&manifest).output().expect("running python");
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "external validation failed:\n{report}{}", String::from_utf8_lossy(&out.stderr));
}

/// `prunec inspect --json` of a model.
pub fn inspect_json(path: &Path) -> Json {
    let out = prunec().arg("inspect").arg("--json").arg(path).output().expect("running prunec");
    assert!(out.status.success(), "inspect {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("inspect prints JSON")
}

/// The details the first pass named `name` reports in a `--report` JSON.
pub fn pass_details<'a>(report: &'a Json, name: &str) -> &'a Json {
    report["passes"].as_array().and_then(|p| p.iter().find(|p| p["name"] == name)).map_or(&Json::Null, |p| &p["details"])
}

/// The options the first pass named `name` ran with, in a `--report` JSON.
pub fn pass_options<'a>(report: &'a Json, name: &str) -> &'a Json {
    report["passes"].as_array().and_then(|p| p.iter().find(|p| p["name"] == name)).map_or(&Json::Null, |p| &p["options"])
}

/// The lines of `after` that are not in `before` (`+`) and the reverse (`-`), in dump order: a
/// rewrite's snapshot, small enough to review where the whole dump is not.
pub fn dump_diff(before: &str, after: &str) -> String {
    let (b, a): (std::collections::BTreeSet<&str>, std::collections::BTreeSet<&str>) = (before.lines().collect(), after.lines().collect());
    let removed = before.lines().filter(|l| !a.contains(l)).map(|l| format!("- {l}"));
    let added = after.lines().filter(|l| !b.contains(l)).map(|l| format!("+ {l}"));
    removed.chain(added).collect::<Vec<_>>().join("\n")
}

/// Runs `tests/validate/exporters.py ARGS…` (the exporter variants made at test time) in the
/// validator Python; its stdout.
pub fn exporters(args: &[&Path]) -> String {
    let out = Command::new(python()).arg(root().join("tests/validate/exporters.py")).args(args).output().expect("running python");
    assert!(
        out.status.success(),
        "exporters.py {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How far tract's outputs of `model` on the arrays of `inputs` are from ONNX Runtime's: the
/// largest difference over the outputs, relative to each output's scale (at least 1). The model
/// is read by prunec, so tract runs its own copy where it refuses the model as written (shape
/// arithmetic folded at the feed's sizes, ops it lacks lowered): this is what says the copy
/// computes what the model does.
pub fn tract_against_onnx_runtime(model: &Path, inputs: &Path) -> f64 {
    let read = prunec::frontend::read_model(model, &prunec::frontend::ReadOptions { infer_shapes: false }).expect("prunec reads it");
    let feed = load_npz(inputs, &read.model).expect("inputs");
    let plan = prunec::runtime::tract::Plan::from_model(&read.model, &read.dir, &feed);
    let outputs = plan.and_then(|plan| plan.run(&feed)).unwrap_or_else(|e| panic!("tract cannot run {}: {e}", model.display()));
    let scratch = tempfile::tempdir().expect("temp dir");
    let computed = scratch.path().join("tract.npz");
    // `.npz` is written in f32 (f16 has no writer); the comparison is in f64 anyway.
    let as_f32 = |t: TractTensor| if t.datum_type().is_float() { t.cast_to::<f32>().expect("casts").into_owned() } else { t };
    let outputs = Feed(outputs.values.into_iter().map(|(name, t)| (name, as_f32(t))).collect());
    prunec::runtime::tract::save_npz(&outputs, &computed).expect("saves");
    exporters(&[Path::new("against"), model, inputs, &computed]).trim().parse().expect("a number")
}

/// torchvision initialises ViT's classifier to zeros, which makes every comparison of tiny_vit's
/// output vacuous (verification refuses it): gives `heads.head` fixed non-zero weights, where
/// the model has it.
pub fn weigh_vit_head(model: &mut Model) {
    for name in ["heads.head.weight", "heads.head.bias"] {
        let Some(v) = model.graph.value_by_name(name) else { continue };
        let Some(t) = model.graph.value(v).initializer().cloned() else { continue };
        let values: Vec<f32> = (0..t.numel()).map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0).collect();
        model.graph.value_mut(v).kind = prunec::ir::ValueKind::Initializer(prunec::ir::Tensor::from_f32(name, &t.dims(), &values));
    }
}

/// Zeroes the output projections of `layer`'s residual branches (their weights and biases):
/// the layer becomes an exact identity.
pub fn zero_output_projections(model: &mut Model, layer: &prunec::passes::layers::Layer) {
    for region in layer.sub_blocks.iter().flat_map(|s| &s.regions) {
        zero_dense_before(model, &region.branch);
    }
}

/// Zeroes the modulation projections `layer`'s adaLN gates are cut from (weights and biases):
/// its gates are 0 at every timestep.
pub fn zero_gate_projections(model: &mut Model, layer: &prunec::passes::layers::Layer) {
    for region in layer.sub_blocks.iter().flat_map(|s| &s.regions) {
        zero_dense_before(model, region.gate.as_deref().expect("a gated residual"));
    }
}

/// Walks back from the value `name` through its computed inputs to the first dense op (Gemm or
/// MatMul), zeroing the float constants of it and of the Adds on the way (biases).
fn zero_dense_before(model: &mut Model, name: &str) {
    let graph = &mut model.graph;
    let mut value = graph.value_by_name(name).expect("the start is a value");
    loop {
        let (op, _) = graph.producer(value).expect("the chain ends in a dense op");
        let op_type = graph.op(op).op_type.clone();
        let mut next = None;
        for input in graph.op_inputs(op).into_iter().flatten() {
            match prunec::ir::constant_tensor(graph, input).filter(|t| t.dtype().is_float()).map(|t| (t.name().to_string(), t.dims())) {
                Some((name, dims)) if ["Add", "Gemm", "MatMul"].contains(&op_type.as_str()) => {
                    let n = dims.iter().product::<u64>() as usize;
                    graph.set_initializer(input, prunec::ir::Tensor::from_f32(&name, &dims, &vec![0.0; n]));
                }
                Some(_) => {}
                None => next = next.or(Some(input)),
            }
        }
        if op_type == "Gemm" || op_type == "MatMul" {
            break;
        }
        value = next.expect("a computed input");
    }
}
