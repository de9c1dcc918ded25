//! Developer tasks for prunec: `cargo xtask <task>`.
//!
//! - `setup`: create `.venv` with the Python validators the tests use (onnx, onnxruntime).
//! - `codegen`: regenerate the committed ONNX protobuf bindings from `ir/proto/onnx.proto`.
//! - `testdata`: regenerate the synthetic test models under `testdata/models/`.
//! - `bench`: measure the figures recorded in BENCHMARKS.md.
//! - `metrics`: task metrics of the real models pruned by each criterion (BENCHMARKS.md).
//! - `hostile`: regenerate the hostile-input corpus under `testdata/hostile/`.
//! - `fuzz`: run a cargo-fuzz target for a fixed budget (not part of CI).
//! - `bigmodel`: generate a model over 2 GiB (external data) for `bench big`; never committed.

mod bench;
mod bigmodel;
mod codegen;
mod fuzz;
mod hostile;
mod metrics;
mod proto;
mod setup;
mod testdata;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else {
        bail!("usage: cargo xtask <setup|codegen|testdata|bench|bigmodel> [args]");
    };
    match task.as_str() {
        "codegen" => codegen::run(&project_root()),
        "testdata" => testdata::run(&project_root()),
        "setup" => setup::run(&project_root()),
        "bench" => bench::run(&project_root(), &args[1..]),
        "metrics" => metrics::run(&project_root(), &args[1..]),
        "bigmodel" => bigmodel::run(&args[1..]),
        "hostile" => hostile::run(&project_root(), &args[1..]),
        "fuzz" => fuzz::run(&project_root(), &args[1..]),
        other => bail!("unknown task `{other}`; expected setup, codegen, testdata, bench or bigmodel"),
    }
    .with_context(|| format!("xtask {task}"))
}

/// The workspace root, one level above this crate.
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}
