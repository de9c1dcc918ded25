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
//! checks, but tract cannot run it, so the default command refuses to write it (exit code 3).

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
    let run = |p: &Path| Plan::from_file(p, &feed).and_then(|plan| plan.run(&feed));
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

/// tract cannot analyse tiny_llama's position arithmetic (a CumSum over values computed from the
/// input's shape), whatever its records say: the default command must refuse to write it
/// unverified (exit code 3, nothing written), and `--no-verify` must write a model whose every
/// record agrees with it. When tract runs it, this test fails: then require verification here.
#[test]
fn tiny_llama_a_dynamo_export_is_refused_unverified_and_prunes_to_a_model_every_tool_accepts() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let model = shared().join("models/zoo/tiny_llama.onnx");
    let out = scratch.path().join("tiny_llama.pruned.onnx");
    let o = prunec().arg(&model).arg("-o").arg(&out).output().expect("running prunec");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "stderr:\n{stderr}");
    assert!(stderr.contains("tract cannot run the original model") && stderr.contains("CumSum"), "stderr:\n{stderr}");
    assert_eq!(std::fs::read_dir(scratch.path()).expect("listing").count(), 0, "something was written");
    let o = prunec().arg(&model).arg("-o").arg(&out).arg("--no-verify").output().expect("running prunec");
    assert!(o.status.success(), "prunec --no-verify failed:\n{}", String::from_utf8_lossy(&o.stderr));
    common::exporters(&[Path::new("check"), &model, &out, &shared().join("models/zoo/tiny_llama.inputs.npz")]);
}
