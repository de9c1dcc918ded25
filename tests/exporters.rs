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

/// The declared input sizes of a model file, as text per axis (`batch` or `1`).
fn declared_inputs(path: &Path) -> Vec<Vec<String>> {
    let model = read_model(path, &ReadOptions { infer_shapes: false }).expect("reads").model;
    let graph = &model.graph;
    graph.inputs.iter().filter_map(|&v| graph.value(v).shape.as_ref()).map(|s| s.0.iter().map(|d| d.to_string()).collect()).collect()
}

/// `--input-shape` specialises the passes; `--open-interface` keeps the open sizes open where a
/// second verification, each open axis doubled, shows the result works there: resnet18 with a
/// named batch does (nothing in it reads the batch), PP-OCR's recognizer does not (the fold
/// wrote the batch of 1 into its Reshape targets), and is refused with nothing written.
#[test]
fn open_interface_keeps_a_named_batch_open_only_where_the_result_runs_at_another_batch() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let symbolic = variants("resnet18", scratch.path()).into_iter().find(|p| p.ends_with("symbolic.onnx")).expect("the symbolic variant");
    let out = scratch.path().join("open.onnx");
    let o = prunec().arg(&symbolic).arg("-o").arg(&out).args(["--input-shape", "input=1,3,224,224", "--open-interface"]).output();
    let stderr = String::from_utf8_lossy(&o.as_ref().expect("running prunec").stderr).into_owned();
    assert!(o.expect("ran").status.success(), "{stderr}");
    assert!(stderr.contains("verified again with `input` axis 0 at 2"), "{stderr}");
    assert_eq!(declared_inputs(&out), [["batch", "3", "224", "224"]]);
    check_pruned(&symbolic, &out, &shared().join("models/zoo/resnet18.inputs.npz"));
    let pinned = scratch.path().join("pinned.onnx");
    let o = prunec().arg(&symbolic).arg("-o").arg(&pinned).args(["--input-shape", "input=1,3,224,224"]).output().expect("running prunec");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(declared_inputs(&pinned), [["1", "3", "224", "224"]]);

    let rec = shared().join("models/real/rapidocr/ch_PP-OCRv4_rec_infer.onnx");
    let refused = scratch.path().join("rec.onnx");
    let o = prunec().arg(&rec).arg("-o").arg(&refused).args(["--input-shape", "x=1,3,48,320", "--open-interface"]).output();
    let o = o.expect("running prunec");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("does not keep its interface open") && stderr.contains("`x` axis 0 at 2"), "{stderr}");
    assert!(!refused.exists(), "written although refused");
}

/// PaddlePaddle declares open sizes as `dim_value: -1`. `--input-shape` pins the inputs, and
/// every record that still said -1 then contradicted them for ONNX's shape inference ("differ in
/// dimension 0: (1) vs (-1)", found on PP-OCR cls by the onnxsim benchmark): the pinned outputs
/// of the three PP-OCR models must pass the full checker and strict shape inference.
#[test]
fn paddle_models_pinned_to_their_real_input_sizes_pass_every_check() {
    let scratch = tempfile::tempdir().expect("temp dir");
    for (model, data, shape) in [
        ("ch_ppocr_mobile_v2.0_cls_infer", "rapidocr_cls", "x=48,3,48,192"),
        ("ch_PP-OCRv4_rec_infer", "rapidocr_rec", "x=48,3,48,320"),
        ("ch_PP-OCRv4_det_infer", "rapidocr_det", "x=2,3,640,640"),
    ] {
        let path = shared().join(format!("models/real/rapidocr/{model}.onnx"));
        let inputs = shared().join(format!("data/{data}.dev.npz"));
        let out = scratch.path().join(format!("{model}.pinned.onnx"));
        let o = prunec().arg(&path).arg("-o").arg(&out).args(["--input-shape", shape, "--inputs"]).arg(&inputs).output();
        let o = o.expect("running prunec");
        assert!(o.status.success(), "{model}: {}", String::from_utf8_lossy(&o.stderr));
        common::exporters(&[Path::new("check"), &path, &out, &inputs]);
    }
}
