//! `cargo xtask setup`: the Python validators the test suite calls.
//!
//! Creates `.venv` at the workspace root with the pinned packages of
//! `tests/validate/requirements.txt` (the reference ONNX checker, ONNX Runtime, tract's Python
//! bindings and maturin). Idempotent.

use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;

/// Creates or updates `.venv`.
pub fn run(root: &Path) -> Result<()> {
    let venv = root.join(".venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let host = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let status = Command::new(&host).args(["-m", "venv"]).arg(&venv).status().with_context(|| format!("running {host}"))?;
        if !status.success() {
            bail!("`{host} -m venv .venv` failed");
        }
    }
    let requirements = root.join("tests/validate/requirements.txt");
    let status = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements)
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!("installing {} failed", requirements.display());
    }
    println!("validators ready: {}", python.display());
    Ok(())
}
