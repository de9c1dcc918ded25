//! Models as today's exporters write them: every shape recorded, symbolic dimensions.
//!
//! PyTorch's dynamo exporter records a `value_info` for almost every value, weights included,
//! and names the batch dimension. After pruning, every record must agree with the rewritten
//! graph, or ONNX's full checker, strict shape inference and tract refuse the model. The variants
//! are made at test time from the shared zoo models by `tests/validate/exporters.py` (ONNX's
//! shape inference records every value; a record is added for every initializer; one variant
//! names the batch dimension). For each, the default command must verify in tract for real and
//! write a model that:
//! - the full checker and strict shape inference accept;
//! - ONNX Runtime and tract run with the original's output shapes.
//!
//! `tiny_llama`, a real dynamo export with symbolic batch and sequence, goes through the same
//! checks, by magnitude and by OBSPA on its saved inputs.

mod common;

use common::{prunec, shared};
use prunec::frontend::{ReadOptions, read_model};
use prunec::runtime::tract::{Plan, load_npz};
use std::path::{Path, PathBuf};

/// The variants of a zoo model, made in `dir`.
fn variants(name: &str, dir: &Path) -> Vec<PathBuf> {
    let src = shared().join(format!("models/zoo/{name}.onnx"));
    common::exporters(&[Path::new("make"), &src, dir]).lines().map(PathBuf::from).collect()
}

/// Prunes `model` with the default command; panics unless it verified and wrote the output.
fn prune_verified(model: &Path, out: &Path) {
    let o = prunec().arg(model).arg("-o").arg(out).output().expect("running prunec");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{}: prunec failed:\n{stderr}", model.display());
    assert!(stderr.contains("verify in tract on"), "{}: not verified:\n{stderr}", model.display());
    assert!(out.exists(), "{}: no output", model.display());
}

/// The full checker, strict shape inference and ONNX Runtime (output shapes) on the pruned
/// model, then tract: it must run the pruned file with the original's output shapes.
fn check_pruned(original: &Path, pruned: &Path, inputs: &Path) {
    common::exporters(&[Path::new("check"), original, pruned, inputs]);
    let model = read_model(original, &ReadOptions { infer_shapes: false }).expect("prunec reads the variant").model;
    let feed = load_npz(inputs, &model).expect("inputs");
    // Read by prunec, so that tract sees dynamo's position arithmetic folded at the feed's sizes.
    let run = |p: &Path| {
        let read = read_model(p, &ReadOptions { infer_shapes: false }).expect("prunec reads it");
        Plan::from_model(&read.model, &read.dir, &feed).and_then(|plan| plan.run(&feed))
    };
    let want = run(original).unwrap_or_else(|e| panic!("tract cannot run {}: {e}", original.display()));
    let got = run(pruned).unwrap_or_else(|e| panic!("tract cannot run {}: {e}", pruned.display()));
    for ((name, w), (_, g)) in want.values.iter().zip(&got.values) {
        assert_eq!(w.shape(), g.shape(), "{}: output `{name}` changed shape in tract", pruned.display());
    }
}

#[test]
fn zoo_cnns_with_every_value_and_weight_recorded_prune_to_models_every_tool_accepts() {
    let scratch = tempfile::tempdir().expect("temp dir");
    for name in ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5"] {
        let dir = scratch.path().join(name);
        std::fs::create_dir(&dir).expect("folder");
        let inputs = shared().join(format!("models/zoo/{name}.inputs.npz"));
        let made = variants(name, &dir);
        assert_eq!(made.len(), 2, "{name}: {made:?}");
        for variant in made {
            let out = variant.with_extension("pruned.onnx");
            prune_verified(&variant, &out);
            check_pruned(&variant, &out, &inputs);
        }
    }
}

/// tract cannot analyse tiny_llama's position arithmetic as exported (a CumSum over values
/// computed from the input's shape: "TDim is not a number"); folded at the feed's sizes, it
/// runs. So the default command verifies it for real, and OBSPA measures it on its inputs.
#[test]
fn tiny_llama_a_dynamo_export_prunes_verified_to_a_model_every_tool_accepts() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let model = shared().join("models/zoo/tiny_llama.onnx");
    let inputs = shared().join("models/zoo/tiny_llama.inputs.npz");
    let out = scratch.path().join("tiny_llama.pruned.onnx");
    // Folded at the feed's sizes, tract computes what ONNX Runtime does.
    let rel = common::tract_against_onnx_runtime(&model, &inputs);
    assert!(rel < 1e-5, "tract's logits differ from ONNX Runtime's by {rel:e} of scale");
    prune_verified(&model, &out);
    check_pruned(&model, &out, &inputs);
    // Every group but the hidden one, which RMSNorm normalises, is judged by masking.
    let o = prunec().arg(&model).arg("-o").arg(&out).args(["--keep-normalized", "--criterion", "obspa", "--inputs"]).arg(&inputs).output();
    let o = o.expect("running prunec");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("masked original (0.0e0"), "not judged:\n{stderr}");
    assert!(stderr.contains("compensated") && stderr.contains("tiny_llama.inputs.npz"), "no calibration:\n{stderr}");
    check_pruned(&model, &out, &inputs);
}
