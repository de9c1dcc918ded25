//! Half-precision, quantised and integer-input models prune like f32 ones.
//!
//! The models are made at test time from the shared zoo models by `tests/validate/exporters.py`:
//! - `fp16`: the whole graph in float16, inputs and outputs included; `fp16_io`: float16 inside,
//!   behind Casts from and to an f32 interface; `fp16_matmul`: `fp16` with its Gemms as MatMul
//!   and Add (tract 0.23.9 cannot run a float16 Gemm with a bias as written; prunec gives it
//!   the other two lowered to a Gemm and an Add);
//! - `qdq`: resnet18 quantised by ONNX Runtime's `quantize_static` (QDQ format, int8 weights
//!   with per-channel scales and zero points, uint8 activations), calibrated on its inputs;
//! - `uint8`: a uint8 image input (Cast to float, Div by 255) in front of a zoo CNN.
//!
//! For each, the default command (`prunec MODEL -o OUT`, verification in tract on random
//! inputs of the input's type) must exit 0, and the output must pass the full ONNX checker and
//! strict shape inference and run in ONNX Runtime and tract with the original's output shapes.

mod common;

use common::{prunec, shared};
use prunec::frontend::{ReadOptions, read_model};
use prunec::runtime::tract::{Feed, Plan, random_feed};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The `(model, feed)` pairs that `exporters.py KIND` makes of a zoo model in `dir`.
fn variants(kind: &str, name: &str, dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    let zoo = shared().join("models/zoo");
    let (src, feed) = (zoo.join(format!("{name}.onnx")), zoo.join(format!("{name}.inputs.npz")));
    common::exporters(&[Path::new(kind), &src, &feed, dir])
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(m, f)| (PathBuf::from(m), PathBuf::from(f))))
        .collect()
}

/// Prunes `model` with the default command plus `extra`; panics unless it verified and wrote the
/// output. Returns stderr (the report).
fn prune_verified(model: &Path, out: &Path, extra: &[&str]) -> String {
    let o = prunec().arg(model).arg("-o").arg(out).args(extra).output().expect("running prunec");
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(0), "{}: prunec failed:\n{stderr}", model.display());
    assert!(stderr.contains("verify in tract on"), "{}: not verified:\n{stderr}", model.display());
    assert!(out.exists(), "{}: no output", model.display());
    stderr
}

/// The full checker, strict shape inference and ONNX Runtime (output shapes and types on `feed`)
/// on the pruned model, then tract: it must run the pruned file with the original's output
/// shapes and types (on random inputs of the input types).
fn check_pruned(original: &Path, pruned: &Path, feed: &Path) {
    check_in_onnx_runtime(original, pruned, feed);
    let model = read_model(original, &ReadOptions { infer_shapes: false }).expect("prunec reads the variant").model;
    let feed = random_feed(&model, Feed(BTreeMap::new()), &BTreeMap::new(), 0).expect("random inputs");
    // Read by prunec: tract runs its own copy where it refuses the model as written.
    let run = |p: &Path| {
        let read = read_model(p, &ReadOptions { infer_shapes: false }).expect("prunec reads it");
        Plan::from_model(&read.model, &read.dir, &feed).and_then(|plan| plan.run(&feed))
    };
    let want = run(original).unwrap_or_else(|e| panic!("tract cannot run {}: {e}", original.display()));
    let got = run(pruned).unwrap_or_else(|e| panic!("tract cannot run {}: {e}", pruned.display()));
    for ((name, w), (_, g)) in want.values.iter().zip(&got.values) {
        assert_eq!(w.shape(), g.shape(), "{}: output `{name}` changed shape in tract", pruned.display());
        assert_eq!(w.datum_type(), g.datum_type(), "{}: output `{name}` changed type in tract", pruned.display());
    }
}

/// The full checker, strict shape inference and ONNX Runtime only.
fn check_in_onnx_runtime(original: &Path, pruned: &Path, feed: &Path) {
    common::exporters(&[Path::new("check"), original, pruned, feed]);
}

/// The float element types of a model's weights, as prunec reads them (pruning may turn shape
/// constants into int64 initializers).
fn weight_types(model: &Path) -> Vec<String> {
    let m = read_model(model, &ReadOptions { infer_shapes: false }).expect("reads").model;
    let mut types: Vec<String> = m
        .graph
        .value_ids()
        .filter_map(|v| m.graph.value(v).initializer().filter(|t| t.dtype().is_float()).map(|t| t.dtype().to_string()))
        .collect();
    types.sort();
    types.dedup();
    types
}

#[test]
fn fp16_zoo_cnns_prune_verify_and_run_everywhere() {
    let scratch = tempfile::tempdir().expect("temp dir");
    for name in ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5"] {
        let dir = scratch.path().join(name);
        std::fs::create_dir(&dir).expect("folder");
        let made = variants("fp16", name, &dir);
        assert_eq!(made.len(), 3, "{name}: {made:?}");
        for (variant, feed) in made {
            let out = variant.with_extension("pruned.onnx");
            // tract runs a float16 Gemm with a bias lowered to a Gemm and an Add (its own
            // expansion multiplies C by an f32 beta): first, that it computes what ONNX Runtime does.
            let rel = common::tract_against_onnx_runtime(&variant, &feed);
            assert!(rel < 1e-2, "{}: tract differs from ONNX Runtime by {rel:e} of scale", variant.display());
            // The inputs are float16 where the model's are: the `.npz` reader takes them.
            let report = prune_verified(&variant, &out, &["--inputs", feed.to_str().expect("a UTF-8 path")]);
            assert!(report.contains("channels removed") && report.contains("equals the masked original"), "{report}");
            check_pruned(&variant, &out, &feed);
            // Weights are sliced in their own type.
            assert_eq!(weight_types(&out), weight_types(&variant), "{}", out.display());
        }
    }
}

#[test]
fn a_qdq_resnet18_from_onnx_runtime_prunes_with_its_per_channel_scales() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let made = variants("qdq", "resnet18", scratch.path());
    let [(model, feed)] = made.as_slice() else { panic!("{made:?}") };
    let groups = prunec().arg("groups").arg(model).output().expect("running prunec groups");
    let listing = String::from_utf8_lossy(&groups.stdout);
    assert!(groups.status.success(), "{}", String::from_utf8_lossy(&groups.stderr));
    let header = listing.lines().next().unwrap_or_default();
    assert!(!header.contains(" 0 prunable"), "no prunable group in the QDQ model:\n{listing}");
    // A producer is the int8 weight read by its DequantizeLinear; its scale and zero point are
    // sliced with it, like a bias.
    assert!(listing.contains("_quantized axis 0") && listing.contains("_scale axis 0"), "{listing}");
    // Its int8 weights and int32 biases are parameters: as many as the f32 model's, plus the
    // f32 scales (one per output channel of each layer and one per activation).
    let parameters = |m: &Path| common::inspect_json(m)["parameters"].as_u64().expect("a count");
    let (quantized, float) = (parameters(model), parameters(&shared().join("models/zoo/resnet18.onnx")));
    assert!(quantized > float && quantized < float + float / 100, "{quantized} parameters against the f32 model's {float}");
    let out = model.with_extension("pruned.onnx");
    let report = prune_verified(model, &out, &[]);
    assert!(std::fs::metadata(&out).expect("output").len() < std::fs::metadata(model).expect("input").len());
    let after = parameters(&out);
    assert!(after < quantized * 3 / 4, "{quantized} -> {after} parameters:\n{report}");
    check_pruned(model, &out, feed);
    // A parameter target counts the int8 weights as the report does: 30% is 30%, not all of
    // them (the estimate once saw float constants only, and bisected to the largest ratio).
    let targeted = model.with_extension("target.onnx");
    let report = prune_verified(model, &targeted, &["--target", "params=0.3"]);
    let saved = 1.0 - parameters(&targeted) as f64 / quantized as f64;
    assert!((0.3..0.31).contains(&saved), "--target params=0.3 saved {saved}:\n{report}");
    check_pruned(model, &targeted, feed);
}

#[test]
fn a_uint8_image_input_in_front_of_zoo_cnns_prunes_and_verifies_on_random_pixels() {
    let scratch = tempfile::tempdir().expect("temp dir");
    for name in ["resnet18", "mobilenet_v2"] {
        let dir = scratch.path().join(name);
        std::fs::create_dir(&dir).expect("folder");
        let made = variants("uint8", name, &dir);
        let [(model, feed)] = made.as_slice() else { panic!("{made:?}") };
        let out = model.with_extension("pruned.onnx");
        prune_verified(model, &out, &[]);
        check_pruned(model, &out, feed);
    }
}

/// ONNX Runtime's operator format: QLinearConv pairs inside the residual blocks are pruned with
/// their per-channel `w_scale` and `w_zero_point` and int32 biases; the residual sums are
/// `com.microsoft` QLinearAdd ops, which have no coupling rule and freeze the stages.
#[test]
fn a_qoperator_resnet18_prunes_its_qlinearconv_pairs() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let made = variants("qoperator", "resnet18", scratch.path());
    let [(model, feed)] = made.as_slice() else { panic!("{made:?}") };
    let groups = prunec().arg("groups").arg(model).output().expect("running prunec groups");
    let listing = String::from_utf8_lossy(&groups.stdout);
    assert!(listing.lines().next().unwrap_or_default().ends_with(" 8 prunable"), "{listing}");
    assert!(listing.contains("_scale axis 0 (/layer1/layer1.0/conv1/Conv_quant)"), "{listing}");
    // tract runs the com.microsoft ops (QLinearAdd, QLinearGlobalAveragePool, QGemm) lowered
    // to DequantizeLinear, the float op and QuantizeLinear: first, that it computes what ONNX
    // Runtime does, to a few quantisation steps of the output.
    let rel = common::tract_against_onnx_runtime(model, feed);
    assert!(rel < 5e-2, "tract differs from ONNX Runtime by {rel:e} of scale");
    let out = model.with_extension("pruned.onnx");
    let stderr = prune_verified(model, &out, &[]);
    assert!(stderr.contains("8 of 8 prunable groups pruned") && stderr.contains("equals the masked original"), "{stderr}");
    check_pruned(model, &out, feed);
}
