//! Developer tasks for prunec: `cargo xtask <task>`.
//!
//! - `setup`: create `.venv` with the Python validators the tests use (onnx, onnxruntime).
//! - `codegen`: regenerate the committed ONNX protobuf bindings from `ir/proto/onnx.proto`.
//! - `testdata`: regenerate the synthetic test models under `testdata/models/`.
//! - `bench`: measure the figures recorded in BENCHMARKS.md.

mod bench;
mod codegen;
mod setup;
mod testdata;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else {
        bail!("usage: cargo xtask <setup|codegen|testdata|bench> [args]");
    };
    match task.as_str() {
        "codegen" => codegen::run(&project_root()),
        "testdata" => testdata::run(&project_root()),
        "setup" => setup::run(&project_root()),
        "bench" => bench::run(&project_root(), &args[1..]),
        other => bail!("unknown task `{other}`; expected setup, codegen, testdata or bench"),
    }
    .with_context(|| format!("xtask {task}"))
}

/// The workspace root, one level above this crate.
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}
