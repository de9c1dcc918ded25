//! `pip install prunec`: the wheel maturin builds from `pyproject.toml` (bin bindings) installs
//! a working `prunec` command into a fresh virtual environment.
//!
//! The wheel is built with the `dev` profile by default, into the workspace's target folder. The
//! prunec package alone resolves its dependencies' features differently from the workspace, so
//! after `cargo test --workspace` maturin compiles tract once more (2 min 38 s on an idle 2-core
//! machine; 30 s to build the wheel and 38 s for the whole test once that is done). A release
//! wheel is the same packaging with `--release` (README, "Install"); `PRUNEC_WHEEL_PROFILE=release`
//! tests that.

mod common;

use common::{python, root, run_captured};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn run(cmd: Command, what: &str) -> common::Run {
    let run = run_captured(cmd, Duration::from_secs(3600)).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(run.code, Some(0), "{what} failed:\n{}\n{}", run.stdout, run.stderr);
    run
}

#[test]
fn pip_install_of_the_wheel_gives_a_working_prunec() {
    let scratch = tempfile::tempdir().unwrap();
    let wheels = scratch.path().join("wheels");
    let profile = std::env::var("PRUNEC_WHEEL_PROFILE").unwrap_or_else(|_| "dev".into());
    let start = Instant::now();
    let mut build = Command::new(python());
    build.args(["-m", "maturin", "build", "--quiet", "--profile", &profile, "--out"]).arg(&wheels).current_dir(root());
    // Cargo's jobserver and profile settings of the test run must not leak into the wheel's build.
    for var in ["CARGO_MAKEFLAGS", "MAKEFLAGS", "MFLAGS", "CARGO_PRIMARY_PACKAGE"] {
        build.env_remove(var);
    }
    run(build, "maturin build");
    eprintln!("wheel built in {:.1} s", start.elapsed().as_secs_f64());
    let wheel = std::fs::read_dir(&wheels).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|e| e == "whl"));
    let wheel = wheel.expect("maturin wrote a wheel");
    let name = wheel.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with(&format!("prunec-{}-", env!("CARGO_PKG_VERSION"))), "wheel named after the crate's version: {name}");
    assert!(name.contains("linux"), "a Linux wheel: {name}");

    let venv = scratch.path().join("venv");
    let mut make = Command::new(python());
    make.args(["-m", "venv"]).arg(&venv);
    run(make, "python -m venv");
    let mut install = Command::new(venv.join("bin/python"));
    install.args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index"]).arg(&wheel);
    run(install, "pip install");

    let installed = venv.join("bin/prunec");
    assert!(installed.is_file(), "pip put `prunec` on the venv's PATH");
    let mut version = Command::new(&installed);
    version.arg("--version");
    let v = run(version, "prunec --version");
    assert_eq!(v.stdout.trim(), format!("prunec {}", env!("CARGO_PKG_VERSION")));

    prune_with(&installed, scratch.path());
    eprintln!("wheel test took {:.1} s", start.elapsed().as_secs_f64());
}

/// A real prune with the installed command: both formats written, verification passed.
fn prune_with(prunec: &Path, dir: &Path) {
    let out = dir.join("out.onnx");
    let mut cmd = Command::new(prunec);
    cmd.arg(root().join("testdata/models/conv_residual.onnx")).arg("-o").arg(&out).args(["--ratio", "0.5", "--emit", "onnx,nnef"]);
    let r = run(cmd, "the installed prunec");
    assert!(r.stderr.contains("equals the masked original"), "verification ran:\n{}", r.stderr);
    assert!(out.is_file() && dir.join("out.nnef.tgz").is_file(), "both outputs written:\n{}", r.stderr);
}
