//! `prunec bench ORIGINAL PRUNED`: latency of both models in tract and ONNX Runtime, sizes
//! before and after, and the output cosine, as a table or `--json`.

mod common;

use common::{prunec, python, root, run_captured};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn testdata(name: &str) -> PathBuf {
    root().join("testdata/models").join(name)
}

/// Prunes a testdata model at ratio 0.5 into `dir`.
fn pruned(model: &str, dir: &Path) -> PathBuf {
    let out = dir.join(model);
    let mut cmd = prunec();
    cmd.arg(testdata(model)).arg("-o").arg(&out).args(["--ratio", "0.5", "--no-verify"]);
    let run = run_captured(cmd, Duration::from_secs(300)).unwrap();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    out
}

fn bench(args: &[&std::ffi::OsStr]) -> common::Run {
    let mut cmd = prunec();
    cmd.arg("bench").args(args).env("PRUNEC_PYTHON", python());
    run_captured(cmd, Duration::from_secs(300)).unwrap()
}

/// Replaces what changes between runs and machines (every number, paths, the ONNX Runtime
/// version) so the snapshot holds the schema.
fn redact(v: &mut Json, key: &str) {
    match v {
        Json::Number(_) => *v = Json::String("[number]".into()),
        Json::String(_) if key == "path" => *v = Json::String("[path]".into()),
        Json::String(_) if key == "version" => *v = Json::String("[version]".into()),
        Json::Array(items) => items.iter_mut().for_each(|i| redact(i, key)),
        Json::Object(map) => map.iter_mut().for_each(|(k, i)| redact(i, k)),
        _ => {}
    }
}

/// The JSON report: both runtimes measured (the validator venv has onnxruntime), the pruned
/// model smaller, its outputs close to the original's; the schema is a reviewed snapshot.
#[test]
fn json_report_of_a_pruned_model() {
    let scratch = tempfile::tempdir().unwrap();
    let small = pruned("mlp.onnx", scratch.path());
    let run = bench(&[testdata("mlp.onnx").as_os_str(), small.as_os_str(), "--json".as_ref(), "--runs".as_ref(), "5".as_ref()]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let report: Json = serde_json::from_str(&run.stdout).expect("--json prints JSON");
    let f = |p: &str| report.pointer(p).and_then(Json::as_f64).unwrap_or_else(|| panic!("{p} is a number in {report:#}"));
    assert!(f("/pruned/stats/parameters") < f("/original/stats/parameters"));
    assert!(f("/pruned/stats/macs") < f("/original/stats/macs"));
    assert!(f("/pruned/stats/weight_bytes") < f("/original/stats/weight_bytes"));
    for runtime in ["tract", "onnxruntime"] {
        let (o, p) = (f(&format!("/{runtime}/original/median_ms")), f(&format!("/{runtime}/pruned/median_ms")));
        assert!(o > 0.0 && p > 0.0, "{runtime} timed both");
        let ratio = f(&format!("/{runtime}/ratio"));
        assert!((ratio - p / o).abs() <= 1e-12 * ratio, "{runtime}: the ratio {ratio} is of the medians, {p} / {o}");
        assert_eq!(f(&format!("/{runtime}/original/runs")), 5.0);
        assert!(f(&format!("/{runtime}/original/min_ms")) <= o && o <= f(&format!("/{runtime}/original/max_ms")));
    }
    assert_eq!(report["tract"]["version"], "0.23.9");
    assert_eq!(f("/threads"), 1.0);
    let cosine = f("/outputs/0/cosine");
    assert!(cosine > 0.5 && cosine < 1.0, "pruning half the channels moves the output a little: cosine {cosine}");
    let mut schema = report.clone();
    redact(&mut schema, "");
    insta::assert_snapshot!("bench_json_schema", serde_json::to_string_pretty(&schema).unwrap());
}

/// The table names every figure; a model against itself has cosine 1 and no difference.
#[test]
fn table_of_a_model_against_itself() {
    let model = testdata("conv_residual.onnx");
    let run = bench(&[model.as_os_str(), model.as_os_str(), "--runs".as_ref(), "3".as_ref()]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    for phrase in ["parameters", "MACs", "weight bytes", "tract 0.23.9 median", "ONNX Runtime 1.", "1 thread", "cosine 1.000000"] {
        assert!(run.stdout.contains(phrase), "`{phrase}` in:\n{}", run.stdout);
    }
    assert!(run.stdout.contains("max abs diff 0.000e0"), "{}", run.stdout);
}

/// Without a Python that has onnxruntime, the ONNX Runtime figures are missing with the reason,
/// never silently.
#[test]
fn missing_onnx_runtime_is_reported() {
    let model = testdata("mlp.onnx");
    let mut cmd = prunec();
    cmd.arg("bench").arg(&model).arg(&model).args(["--runs", "2", "--python", "/nonexistent/python3"]);
    let run = run_captured(cmd, Duration::from_secs(300)).unwrap();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("ONNX Runtime latency: not measured: cannot start `/nonexistent/python3`"), "{}", run.stdout);
    assert!(run.stdout.contains("tract 0.23.9 median"), "tract is still measured:\n{}", run.stdout);
}

/// Two unrelated models are refused: bench compares two versions of one model.
#[test]
fn models_with_other_inputs_are_refused() {
    let run = bench(&[testdata("mlp.onnx").as_os_str(), testdata("conv_residual.onnx").as_os_str()]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("bench compares two versions of one model"), "{}", run.stderr);
}
