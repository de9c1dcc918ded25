//! The same inputs and recipe give byte-identical ONNX, NNEF and report files (timings aside)
//! across runs and across `RAYON_NUM_THREADS` values: outputs can be cached and diffed.

mod common;

use common::{prunec, root, run_captured, shared};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Runs a recipe in `dir` (relative output paths, so the report names the same files) with
/// `threads` rayon threads.
fn run_recipe(model: &Path, recipe: &[&str], dir: &Path, threads: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut cmd = prunec();
    cmd.current_dir(dir).arg(model).args(["-o", "out.onnx", "--emit", "onnx,nnef", "--report", "report.json"]).args(recipe);
    cmd.env("RAYON_NUM_THREADS", threads.to_string());
    let run = run_captured(cmd, Duration::from_secs(900)).unwrap();
    assert_eq!(run.code, Some(0), "{} {recipe:?} with {threads} threads:\n{}", model.display(), run.stderr);
}

/// The report without what measures time (`ms`, `original_ms`, `pruned_ms`).
fn report_without_timings(path: &Path) -> Json {
    fn strip(v: &mut Json) {
        match v {
            Json::Object(map) => {
                map.retain(|k, _| !(k == "ms" || k.ends_with("_ms")));
                map.values_mut().for_each(strip);
            }
            Json::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v: Json = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    strip(&mut v);
    v
}

fn check(model: PathBuf, recipe: &[&str]) {
    let scratch = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = [1, 2, 2].iter().enumerate().map(|(i, t)| scratch.path().join(format!("run{i}_threads{t}"))).collect();
    for (dir, threads) in dirs.iter().zip([1, 2, 2]) {
        run_recipe(&model, recipe, dir, threads);
    }
    let first = &dirs[0];
    for other in &dirs[1..] {
        for file in ["out.onnx", "out.nnef.tgz"] {
            let (a, b) = (std::fs::read(first.join(file)).unwrap(), std::fs::read(other.join(file)).unwrap());
            assert!(a == b, "{} {recipe:?}: `{file}` differs between {} and {}", model.display(), first.display(), other.display());
        }
        assert_eq!(
            report_without_timings(&first.join("report.json")),
            report_without_timings(&other.join("report.json")),
            "{} {recipe:?}: the reports differ beyond timings",
            model.display()
        );
    }
}

#[test]
fn default_recipe_is_byte_identical_across_runs_and_thread_counts() {
    check(root().join("testdata/models/conv_residual.onnx"), &[]);
    check(shared().join("models/zoo/mobilenet_v3_small.onnx"), &["--ratio", "0.5", "--global"]);
}

/// OBSPA solves its least squares with faer on rayon's threads: the recipe whose arithmetic
/// could depend on the thread count.
#[test]
fn obspa_recipe_is_byte_identical_across_runs_and_thread_counts() {
    check(shared().join("models/zoo/mobilenet_v3_small.onnx"), &["--criterion", "obspa", "--target", "params=0.3"]);
}
