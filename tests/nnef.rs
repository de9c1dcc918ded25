//! The tract backend: `prunec MODEL -o OUT --emit onnx,nnef` writes a tract NNEF archive beside
//! the ONNX output, and the archive computes what the ONNX output computes, in tract's Python
//! package (against ONNX Runtime on the ONNX output) and in tract-nnef in-process (against
//! tract on the ONNX output). Models tract cannot serialise are refused with the op's name.

mod common;

use common::{Case, FeedSpec, all_cases, feed, feed_json, prunec, python, root, run_captured, shared};
use prunec::backends::nnef::load_archive;
use prunec::backends::tract_onnx::prelude::*;
use prunec::runtime::tract::{Plan, compare};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest difference between the archive's outputs and the ONNX output's, relative to the
/// output's scale. Both sides run the same decluttered graph in tract or the ONNX graph in ONNX
/// Runtime, so only the order of float sums differs: 1e-6 on most models, a few 1e-5 behind
/// the softmax of deep models. A wrong or missing op moves outputs by whole percents.
const REL_TOLERANCE: f64 = 1e-4;

/// The models whose archive prunec refuses, with the phrase the refusal must contain and why.
/// Each is checked to fail as stated, so a model that starts working must leave this list.
const REFUSED: &[(&str, &str, &str)] = &[
    ("if_subgraph_then", "no NNEF serialiser for `IfThenElse` (node `If`)", "tract 0.23.9 cannot write If to NNEF"),
    ("if_subgraph_else", "no NNEF serialiser for `IfThenElse` (node `If`)", "tract 0.23.9 cannot write If to NNEF"),
    // An archive is the model for every feed; verification's copy decides the If for one feed
    // only, so the backend gets the model as written, which tract cannot type.
    ("silero_vad_op15", "IfThenElse: Condition failed", "tract cannot type an If whose branches differ in rank"),
    ("exotic", "input `sparse_w` has no known type", "tract reads no sparse initializers, functions or sequences"),
];

/// What `--input-shape` the real models need: their inputs have open sizes, which the archive
/// and the comparison fix to the test feed's.
fn input_shape_args(case: &Case) -> Vec<String> {
    match &case.feed {
        FeedSpec::Tensors(inputs) if case.path.starts_with(shared()) => inputs
            .iter()
            .filter(|i| !i.shape.is_empty())
            .flat_map(|i| {
                ["--input-shape".to_string(), format!("{}={}", i.name, i.shape.iter().map(u64::to_string).collect::<Vec<_>>().join(","))]
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Prunes a model (the default pipeline, no verification: the masking check has its own tests)
/// writing both formats; the ONNX and NNEF paths, or prunec's stderr when it fails.
fn prune_both(case: &Case, dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let onnx = dir.join(format!("{}.onnx", case.name));
    let mut cmd = prunec();
    cmd.arg(&case.path).arg("-o").arg(&onnx).args(["--emit", "onnx,nnef", "--no-verify"]).args(input_shape_args(case));
    let run = run_captured(cmd, Duration::from_secs(600)).expect("prunec runs");
    if run.code != Some(0) {
        return Err(run.stderr);
    }
    let nnef = dir.join(format!("{}.nnef.tgz", case.name));
    assert!(onnx.is_file() && nnef.is_file(), "{}: both outputs written:\n{}", case.name, run.stderr);
    Ok((onnx, nnef))
}

/// Every model tract runs, pruned and written as NNEF: each archive loads and runs in tract's
/// Python package with ONNX Runtime's outputs of the ONNX output, and in tract-nnef in-process
/// with tract's outputs of the ONNX output. The refused ones fail as `REFUSED` says.
#[test]
fn archives_of_pruned_models_compute_what_the_onnx_output_computes() {
    let scratch = tempfile::tempdir().unwrap();
    let mut manifest = Vec::new();
    let mut in_process = Vec::new();
    for case in all_cases().into_iter() {
        let refused = REFUSED.iter().find(|(name, _, _)| *name == case.name);
        match (prune_both(&case, scratch.path()), refused) {
            (Ok((onnx, nnef)), None) => {
                let got = check_in_process(&case, &onnx, &nnef);
                eprintln!("in-process {}: {got:.3e} of scale", case.name);
                in_process.push((case.name.clone(), got));
                // PP-OCR's detector outputs a probability map, which random inputs leave near 0
                // everywhere (largest value ~1e-7, where tract's sigmoid and ONNX Runtime's
                // differ by 4e-7): measure it against the probability's range instead.
                let floor = if case.name == "ppocr_det" { 1.0 } else { 0.0 };
                manifest.push(json!({ "nnef": nnef, "onnx": onnx, "feed": feed_json(&case), "rel": REL_TOLERANCE, "scale_floor": floor }));
            }
            (Ok(_), Some((_, _, why))) => panic!("{} is listed as refused ({why}) but prunec wrote its archive", case.name),
            (Err(stderr), Some((_, phrase, _))) => {
                assert!(stderr.contains(phrase), "{}: the refusal names `{phrase}`:\n{stderr}", case.name)
            }
            (Err(stderr), None) => panic!("{}: prunec failed:\n{stderr}", case.name),
        }
    }
    let bad: Vec<_> = in_process.iter().filter(|(_, rel)| rel.partial_cmp(&REL_TOLERANCE).is_none_or(|o| o.is_gt())).collect();
    assert!(bad.is_empty(), "archives run in-process differ from the ONNX output beyond {REL_TOLERANCE:e}: {bad:?}");
    run_validator(&manifest, scratch.path());
}

/// Runs the archive with tract-nnef and the ONNX output with tract-onnx on the case's feed;
/// the worst output difference relative to its scale.
fn check_in_process(case: &Case, onnx: &Path, nnef: &Path) -> f64 {
    let model = prunec::load(onnx, &Default::default()).expect("reading the ONNX output").model;
    let feed = feed(case, &model);
    let want =
        Plan::from_file(onnx, &feed).and_then(|p| p.run(&feed)).unwrap_or_else(|e| panic!("{}: ONNX output in tract: {e}", case.name));
    let plan = load_archive(nnef).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let inputs: TVec<TValue> = model
        .graph
        .inputs
        .iter()
        .map(|&v| model.graph.value(v))
        .filter(|v| v.initializer().is_none())
        .map(|v| feed.0[&v.name].clone().into())
        .collect();
    let got = plan.run(inputs).unwrap_or_else(|e| panic!("{}: running the archive: {e:#}", case.name));
    assert_eq!(got.len(), want.values.len(), "{}: as many outputs", case.name);
    let mut worst = 0f64;
    for ((name, w), g) in want.values.iter().zip(got) {
        let d = compare(w, &g.into_tensor()).unwrap_or_else(|e| panic!("{}: output `{name}`: {e}", case.name));
        worst = worst.max(d.max_abs / d.ref_max_abs.max(f64::MIN_POSITIVE));
    }
    worst
}

fn run_validator(manifest: &[serde_json::Value], scratch: &Path) {
    let path = scratch.join("nnef_manifest.json");
    std::fs::write(&path, serde_json::to_string_pretty(manifest).unwrap()).unwrap();
    let out = std::process::Command::new(python()).arg(root().join("tests/validate/nnef_validate.py")).arg(&path).output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{report}");
    assert!(out.status.success(), "tract's Python package disagrees with ONNX Runtime:\n{report}");
}

/// The `graph.nnef` of one archive, reviewed as a snapshot: the header names the tract
/// extensions the graph needs, the pruned widths are visible in the tensor shapes.
#[test]
fn archive_graph_text_of_a_pruned_testdata_model() {
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("conv_residual.nnef.tgz");
    let run = run_captured(
        {
            let mut c = prunec();
            c.arg(root().join("testdata/models/conv_residual.onnx")).arg("-o").arg(&out).args(["--ratio", "0.5"]);
            c
        },
        Duration::from_secs(300),
    )
    .unwrap();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!scratch.path().join("conv_residual.onnx").exists(), "an `.nnef.tgz` output alone writes no ONNX");
    insta::assert_snapshot!("conv_residual_pruned_graph_nnef", archive_entry(&out, "graph.nnef"));
}

/// One file of a `.nnef.tgz` archive, as text.
fn archive_entry(path: &Path, name: &str) -> String {
    use std::io::Read;
    let file = std::fs::File::open(path).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().to_str() == Some(name) {
            let mut text = String::new();
            entry.read_to_string(&mut text).unwrap();
            return text;
        }
    }
    panic!("no `{name}` in {}", path.display());
}

/// Writes two QDQ models with onnx's helpers: `weights.onnx` quantises only its MatMul weight
/// (per output channel), `activations.onnx` also quantises its input.
fn qdq_models(dir: &Path) {
    let script = r#"
import sys, numpy as np, onnx
from onnx import helper as h, numpy_helper as nh, TensorProto as T
rng = np.random.default_rng(0)
def model(name, quantise_input):
    w = nh.from_array(rng.integers(-127, 128, size=(8, 6)).astype(np.int8), "w_q")
    ws = nh.from_array((rng.random(6) * 0.05 + 0.01).astype(np.float32), "w_scale")
    wz = nh.from_array(rng.integers(-3, 4, size=6).astype(np.int8), "w_zero")
    b = nh.from_array(rng.standard_normal((6, 4)).astype(np.float32), "w2")
    inits, nodes, x = [w, ws, wz, b], [], "x"
    if quantise_input:
        inits += [nh.from_array(np.array(0.02, np.float32), "x_scale"), nh.from_array(np.array(3, np.int8), "x_zero")]
        nodes += [h.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="/in/q"),
                  h.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="/in/dq")]
        x = "x_dq"
    nodes += [h.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], name="/fc1/dq", axis=1),
              h.make_node("MatMul", [x, "w"], ["h"], name="/fc1/MatMul"),
              h.make_node("Relu", ["h"], ["a"], name="/act"),
              h.make_node("MatMul", ["a", "w2"], ["y"], name="/fc2/MatMul")]
    g = h.make_graph(nodes, name, [h.make_tensor_value_info("x", T.FLOAT, [2, 8])], [h.make_tensor_value_info("y", T.FLOAT, [2, 4])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, f"{sys.argv[1]}/{name}.onnx")
model("weights", False)
model("activations", True)
"#;
    let out = std::process::Command::new(python()).arg("-c").arg(script).arg(dir).output().unwrap();
    assert!(out.status.success(), "making the QDQ models: {}", String::from_utf8_lossy(&out.stderr));
}

/// tract has no NNEF serialiser for QuantizeLinear and DequantizeLinear of values computed at
/// run time: the archive of a model that quantises an activation is refused with the op and the
/// node, and nothing is written, not even the ONNX output of `--emit onnx,nnef`.
#[test]
fn quantised_activations_are_refused_naming_the_op() {
    let scratch = tempfile::tempdir().unwrap();
    qdq_models(scratch.path());
    let out = scratch.path().join("activations_out.onnx");
    let mut cmd = prunec();
    cmd.arg(scratch.path().join("activations.onnx")).arg("-o").arg(&out).args(["--emit", "onnx,nnef", "--passes", "dce"]);
    let run = run_captured(cmd, Duration::from_secs(300)).unwrap();
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let phrase = "tract 0.23.9 has no NNEF serialiser for `QuantizeLinearI8` (node `/in/q`)";
    assert!(run.stderr.contains(phrase), "`{phrase}` in:\n{}", run.stderr);
    assert!(run.stderr.contains("their float form is not exact"), "says why no float form is offered:\n{}", run.stderr);
    assert!(!out.exists() && !scratch.path().join("activations_out.nnef.tgz").exists(), "nothing written");
}

/// Dequantized constant weights have an exact float form. tract folds them when it declutters,
/// so the archive of a weight-quantised model is written as it is; the `dequantize` pass does
/// the same in the ONNX output: ONNX Runtime gives bit-identical outputs before and after, and
/// that archive runs with those outputs too. A quantised activation has no exact float form, so
/// that model stays refused after the pass.
#[test]
fn dequantized_weights_have_an_exact_float_form() {
    let scratch = tempfile::tempdir().unwrap();
    qdq_models(scratch.path());
    let original = scratch.path().join("weights.onnx");
    let feed = json!({ "tensors": [] });
    let mut checks = Vec::new();
    for (name, passes) in [("as_is", "dce"), ("float", "dequantize")] {
        let out = scratch.path().join(format!("weights_{name}.onnx"));
        let mut cmd = prunec();
        cmd.arg(&original).arg("-o").arg(&out).args(["--emit", "onnx,nnef", "--passes", passes]);
        let run = run_captured(cmd, Duration::from_secs(300)).unwrap();
        assert_eq!(run.code, Some(0), "{passes}: {}", run.stderr);
        checks.push(json!({ "nnef": scratch.path().join(format!("weights_{name}.nnef.tgz")), "onnx": original, "feed": feed, "rel": REL_TOLERANCE }));
    }
    let float = scratch.path().join("weights_float.onnx");
    let model = prunec::load(&float, &Default::default()).unwrap().model;
    assert!(model.graph.op_ids().all(|op| model.graph.op(op).op_type != "DequantizeLinear"), "no DequantizeLinear left");
    let before = prunec::ir::dump(&prunec::load(&original, &Default::default()).unwrap().model);
    insta::assert_snapshot!("dequantize_qdq_weights_diff", common::dump_diff(&before, &prunec::ir::dump(&model)));
    common::validate_with_python(&[json!({ "original": original, "output": float, "feed": feed, "max_abs": 0.0 })], scratch.path());
    run_validator(&checks, scratch.path());

    let mut cmd = prunec();
    cmd.arg(scratch.path().join("activations.onnx")).arg("-o").arg(scratch.path().join("a.nnef.tgz")).args(["--passes", "dequantize"]);
    let run = run_captured(cmd, Duration::from_secs(300)).unwrap();
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("`QuantizeLinearI8` (node `/in/q`)"), "{}", run.stderr);
}
