//! `cargo xtask fuzz --target decode|pipeline [--seconds N | --runs N] [--max-len BYTES]`: builds
//! a cargo-fuzz target of `fuzz/` and runs it for a fixed budget, then prints the executions,
//! the rate and the findings. Not part of CI: a run is an exploration, its findings become
//! hostile cases or regression tests.
//!
//! What works on this project's machines (stable toolchain only): `cargo fuzz run -s none`.
//! cargo-fuzz passes only stable codegen flags (`-Cpasses=sancov-module`, `-Cllvm-args=...`)
//! when no sanitizer is asked for; AddressSanitizer (the default `-s address`) needs
//! `-Zsanitizer`, a nightly flag. prunec's code is safe Rust, so the sanitizer would mostly
//! watch third-party unsafe code; panics, overflow checks (`-a`, debug assertions), timeouts
//! and libFuzzer's RSS and malloc limits are what find prunec's bugs. Set
//! `PRUNEC_FUZZ_SANITIZER=address` to use ASan where a nightly toolchain exists.
//!
//! The seed corpus is copied at run time into `fuzz/corpus/<target>/` (git-ignored) from
//! `testdata/models/` and `testdata/hostile/`; for `pipeline`, when `.venv` (from `cargo xtask
//! setup`) has onnx, each model is also added with ONNX's inferred shapes recorded, because the
//! target runs without tract's shape inference and the passes only prune what has known shapes.
//! Crashes land in `fuzz/artifacts/<target>/` (git-ignored too).

use anyhow::{Context, Result, bail, ensure};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const TARGETS: &[&str] = &["decode", "pipeline"];

struct Options {
    target: String,
    seconds: Option<u64>,
    runs: Option<u64>,
    max_len: u64,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options { target: String::new(), seconds: None, runs: None, max_len: 4096 };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--target" => o.target = value()?.clone(),
            "--seconds" => o.seconds = Some(value()?.parse().context("--seconds")?),
            "--runs" => o.runs = Some(value()?.parse().context("--runs")?),
            "--max-len" => o.max_len = value()?.parse().context("--max-len")?,
            other => bail!("unknown option `{other}`"),
        }
    }
    ensure!(TARGETS.contains(&o.target.as_str()), "--target must be one of {TARGETS:?}");
    ensure!(o.seconds.is_some() || o.runs.is_some(), "give a budget: --seconds N or --runs N");
    Ok(o)
}

/// Runs one fuzz target for the budget and reports.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let o = parse(args).context("usage: cargo xtask fuzz --target decode|pipeline (--seconds N | --runs N) [--max-len BYTES]")?;
    let fuzz = root.join("fuzz");
    let ok = Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|out| out.status.success());
    ensure!(ok, "cargo-fuzz is not installed: `cargo install cargo-fuzz`");

    let corpus = fuzz.join("corpus").join(&o.target);
    let seeds = seed_corpus(root, &corpus, o.target == "pipeline")?;
    let artifacts = fuzz.join("artifacts").join(&o.target);
    std::fs::create_dir_all(&artifacts)?;
    let before = list(&artifacts);

    let sanitizer = std::env::var("PRUNEC_FUZZ_SANITIZER").unwrap_or_else(|_| "none".into());
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&fuzz).args(["fuzz", "run", "-s", &sanitizer, "-a", &o.target]).arg(&corpus).arg("--");
    cmd.arg(format!("-max_len={}", o.max_len)).args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]);
    // No `-jobs`/`-workers`: libFuzzer then fuzzes in this one process, on one core, so the
    // machine (two cores) stays usable and the statistics arrive on this pipe (with `-jobs`
    // they go to `fuzz-N.log` files instead).
    if let Some(s) = o.seconds {
        cmd.arg(format!("-max_total_time={s}"));
    }
    if let Some(r) = o.runs {
        cmd.arg(format!("-runs={r}"));
    }
    cmd.arg(format!("-artifact_prefix={}/", artifacts.display()));
    eprintln!("{seeds} seeds in {}; running {cmd:?}", corpus.display());
    let start = Instant::now();
    let mut child = cmd.stderr(Stdio::piped()).spawn().context("starting cargo fuzz")?;
    let mut stats = Stats::default();
    for line in BufReader::new(child.stderr.take().context("stderr")?).lines() {
        let line = line?;
        stats.read(&line);
        eprintln!("{line}");
    }
    let status = child.wait()?;
    let elapsed = start.elapsed();
    let found: Vec<PathBuf> = list(&artifacts).into_iter().filter(|p| !before.contains(p)).collect();

    println!("target:      {}", o.target);
    println!("executions:  {}", stats.executions.map_or("?".into(), |n| n.to_string()));
    println!("exec/s:      {}", stats.rate.map_or("?".into(), |n| n.to_string()));
    println!("duration:    {:.0} s (including the build)", elapsed.as_secs_f64());
    println!("corpus:      {} inputs in {}", list(&corpus).len(), corpus.display());
    println!("findings:    {}", found.len());
    for f in &found {
        println!("  {}", f.display());
    }
    ensure!(found.is_empty() && status.success(), "the fuzzer found {} problem(s) (exit {status})", found.len());
    Ok(())
}

/// What libFuzzer's final statistics say.
#[derive(Default)]
struct Stats {
    executions: Option<u64>,
    rate: Option<u64>,
}

impl Stats {
    fn read(&mut self, line: &str) {
        let number = |s: &str| s.trim().parse::<u64>().ok();
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            self.executions = number(n);
        } else if let Some(n) = line.strip_prefix("stat::average_exec_per_sec:") {
            self.rate = number(n);
        } else if let Some(rest) = line.strip_prefix('#') {
            // Progress lines: `#1048576 pulse  cov: ... exec/s: 12345 rss: 80Mb`.
            if let Some(n) = rest.split_whitespace().next().and_then(number) {
                self.executions = Some(n);
            }
            if let Some(r) = rest.split("exec/s: ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(number) {
                self.rate = Some(r);
            }
        }
    }
}

/// Copies the test models and the hostile corpus into `corpus` (named by their path, so a
/// rerun overwrites rather than duplicates them); returns how many seeds it holds.
fn seed_corpus(root: &Path, corpus: &Path, with_shapes: bool) -> Result<usize> {
    std::fs::create_dir_all(corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let mut models = Vec::new();
    for dir in ["testdata/models", "testdata/hostile"] {
        collect_onnx(&root.join(dir), &mut models)?;
    }
    for model in &models {
        let rel = model.strip_prefix(root).unwrap_or(model).to_string_lossy().replace('/', "__");
        std::fs::copy(model, corpus.join(format!("seed__{rel}"))).with_context(|| format!("copying {}", model.display()))?;
    }
    let python = root.join(".venv/bin/python");
    if with_shapes && python.exists() {
        // Best effort: a model ONNX cannot infer is still seeded as it is.
        let script = "import sys, onnx\n\
                      from onnx import shape_inference\n\
                      for src in sys.argv[2:]:\n\
                      \x20   try:\n\
                      \x20       m = shape_inference.infer_shapes(onnx.load(src, load_external_data=False))\n\
                      \x20   except Exception as e:\n\
                      \x20       continue\n\
                      \x20   name = src.replace('/', '__')[-120:]\n\
                      \x20   onnx.save(m, sys.argv[1] + '/shapes__' + name)\n";
        let status = Command::new(&python).arg("-c").arg(script).arg(corpus).args(&models).status()?;
        if !status.success() {
            eprintln!("warning: ONNX shape inference of the seeds failed ({status}); seeding the models as they are");
        }
    }
    Ok(list(corpus).len())
}

fn collect_onnx(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    entries.sort();
    for path in entries {
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            collect_onnx(&path, out)?;
        } else if meta.is_file() && path.extension().is_some_and(|e| e == "onnx") {
            out.push(path);
        }
    }
    Ok(())
}

fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    v.sort();
    v
}
