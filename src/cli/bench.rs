//! `prunec bench ORIGINAL PRUNED`: what the pruning bought, measured.
//!
//! Both models run on the same inputs in one process, in alternation after a warm-up (see
//! `prunec::runtime::latency`), in tract and, when a Python with `onnxruntime` is found, in
//! ONNX Runtime with the same thread count. Sizes come from the IR statistics, the output
//! cosine from the tract runs.

use super::args;
use anyhow::{Context, Result, bail};
use clap::Args;
use prunec::ir::{ModelStats, model_stats};
use prunec::runtime::latency::{Latency, interleaved};
use prunec::runtime::tract::{Feed, Plan, compare, load_npz, random_feed, save_npz};
use serde_json::{Value as Json, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The script that times the models in ONNX Runtime.
const ORT_SCRIPT: &str = include_str!("bench_ort.py");

/// tract as prunec builds it runs every op on one thread (no `multithread-mm`), so ONNX
/// Runtime is pinned to one thread too: the figures compare models, not parallelism.
const THREADS: usize = 1;

/// `prunec bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The model before pruning.
    pub original: PathBuf,
    /// The model after pruning (the same inputs and outputs).
    pub pruned: PathBuf,
    /// Inputs (`.npz`, arrays named like the graph inputs); inputs not in it get seeded random
    /// values of their declared shape (open dims 1) or of `--input-shape`.
    #[arg(long, value_name = "FILE.npz")]
    pub inputs: Option<PathBuf>,
    /// Concrete shape of an input, as for `inspect`.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
    /// Timed runs of each model in each runtime.
    #[arg(long, default_value_t = 20, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub runs: u32,
    /// Untimed runs of each model before timing.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub warmup: u32,
    /// Seed of random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The Python whose `onnxruntime` times the models in ONNX Runtime (default: `python3`).
    #[arg(long, env = "PRUNEC_PYTHON", value_name = "PYTHON")]
    pub python: Option<PathBuf>,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `prunec bench`.
pub fn run(a: &BenchArgs) -> Result<()> {
    let mut original = super::load(&a.original, &a.input_shapes)?;
    let mut pruned = super::load(&a.pruned, &a.input_shapes)?;
    let names = prunec::runtime::inputs::runtime_inputs(&original.model.graph);
    let pruned_names = prunec::runtime::inputs::runtime_inputs(&pruned.model.graph);
    if names != pruned_names {
        bail!(
            "`{}` has the inputs {names:?} but `{}` has {pruned_names:?}: bench compares two versions of one model",
            a.original.display(),
            a.pruned.display()
        );
    }
    let given = match &a.inputs {
        Some(path) => load_npz(path, &original.model).with_context(|| format!("reading inputs `{}`", path.display()))?,
        None => Feed::default(),
    };
    let shapes = args::input_shapes(&a.input_shapes, &names)?;
    let feed = random_feed(&original.model, given, &shapes, a.seed)?;
    // MACs depend on the input size: count them at the size that is timed.
    let fed: BTreeMap<String, Vec<u64>> = feed.0.iter().map(|(n, t)| (n.clone(), t.shape().iter().map(|&d| d as u64).collect())).collect();
    original.infer_shapes(&fed).with_context(|| format!("reading `{}` at the timed input sizes", a.original.display()))?;
    pruned.infer_shapes(&fed).with_context(|| format!("reading `{}` at the timed input sizes", a.pruned.display()))?;
    let (before, after) = (model_stats(&original.model), model_stats(&pruned.model));
    // From the models as read, so that tract gets its own copy where it refuses one as written.
    let plan = |m: &prunec::frontend::Loaded, path: &std::path::Path| {
        Plan::from_model(&m.model, &m.dir, &feed).with_context(|| format!("building the tract plan of `{}`", path.display()))
    };
    let (plan_a, plan_b) = (plan(&original, &a.original)?, plan(&pruned, &a.pruned)?);
    drop((original, pruned));

    let (warmup, runs) = (a.warmup as usize, a.runs as usize);
    let (ta, tb) = interleaved(&plan_a, &plan_b, &feed, warmup, runs).context("running the models in tract")?;
    let (out_a, out_b) = (plan_a.run(&feed)?, plan_b.run(&feed)?);
    drop((plan_a, plan_b));
    let mut outputs = Vec::new();
    for ((name, want), (_, got)) in out_a.values.iter().zip(&out_b.values) {
        let d = compare(want, got).with_context(|| format!("output `{name}` of the two models"))?;
        outputs.push(json!({
            "name": name,
            "cosine": d.cosine,
            "max_abs": d.max_abs,
            "rel": d.max_abs / d.ref_max_abs.max(f64::MIN_POSITIVE),
        }));
    }
    let tract = runtime_json(prunec::backends::nnef::TRACT_VERSION, &ta, &tb);
    let ort = onnxruntime(a, &feed, warmup, runs);

    let source = match &a.inputs {
        Some(p) => format!("inputs from `{}`", p.display()),
        None => format!("random inputs (seed {})", a.seed),
    };
    let report = json!({
        "original": { "path": a.original, "stats": sizes(&before) },
        "pruned": { "path": a.pruned, "stats": sizes(&after) },
        "inputs": { "source": source, "shapes": fed },
        "threads": THREADS,
        "warmup": warmup,
        "runs": runs,
        "tract": tract,
        "onnxruntime": ort,
        "outputs": outputs,
    });
    if a.json {
        return super::emit(&format!("{}\n", serde_json::to_string_pretty(&report)?));
    }
    super::emit(&table(&report, &before, &after))
}

fn sizes(s: &ModelStats) -> Json {
    json!({ "parameters": s.parameters, "macs": s.macs, "weight_bytes": s.weight_bytes })
}

/// A runtime's figures: per-model latency and the ratio of the medians (pruned over original).
fn runtime_json(version: &str, original_ms: &[f64], pruned_ms: &[f64]) -> Json {
    match (Latency::of(original_ms), Latency::of(pruned_ms)) {
        (Some(o), Some(p)) => json!({
            "version": version,
            "original": o,
            "pruned": p,
            "ratio": p.median_ms / o.median_ms,
        }),
        _ => json!({ "unavailable": "no timed run" }),
    }
}

/// Times both models in ONNX Runtime through the Python script; says why when it cannot.
fn onnxruntime(a: &BenchArgs, feed: &Feed, warmup: usize, runs: usize) -> Json {
    let python = a.python.clone().unwrap_or_else(|| PathBuf::from("python3"));
    match run_ort(&python, a, feed, warmup, runs) {
        Ok(v) => v,
        Err(e) => json!({ "unavailable": format!("{e:#}") }),
    }
}

fn run_ort(python: &Path, a: &BenchArgs, feed: &Feed, warmup: usize, runs: usize) -> Result<Json> {
    let dir = tempfile::tempdir().context("creating a temporary folder for the inputs")?;
    let inputs = dir.path().join("inputs.npz");
    save_npz(feed, &inputs)?;
    let out = Command::new(python)
        .arg("-c")
        .arg(ORT_SCRIPT)
        .arg(&a.original)
        .arg(&a.pruned)
        .arg(&inputs)
        .args([warmup.to_string(), runs.to_string(), THREADS.to_string()])
        .output()
        .with_context(|| format!("cannot start `{}` (set --python or PRUNEC_PYTHON to a Python with onnxruntime)", python.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        bail!("ONNX Runtime failed under `{}`: {last}", python.display());
    }
    let v: Json = serde_json::from_str(stdout.trim()).with_context(|| format!("reading what `{}` printed", python.display()))?;
    if let Some(why) = v.get("unavailable") {
        bail!("{}", why.as_str().unwrap_or("onnxruntime unavailable"));
    }
    let times = |key: &str| -> Vec<f64> { v[key].as_array().map(|a| a.iter().filter_map(Json::as_f64).collect()).unwrap_or_default() };
    Ok(runtime_json(v["version"].as_str().unwrap_or("?"), &times("original_ms"), &times("pruned_ms")))
}

/// The human-readable report.
fn table(r: &Json, before: &ModelStats, after: &ModelStats) -> String {
    let mut t = String::new();
    let shapes: Vec<String> =
        r["inputs"]["shapes"].as_object().map(|m| m.iter().map(|(n, s)| format!("{n}{s}")).collect()).unwrap_or_default();
    t += &format!(
        "bench: `{}` against `{}` on {} {}\n       {THREADS} thread, {} warm-up and {} timed runs of each model, alternating\n",
        r["pruned"]["path"].as_str().unwrap_or("?"),
        r["original"]["path"].as_str().unwrap_or("?"),
        r["inputs"]["source"].as_str().unwrap_or("?"),
        shapes.join(", "),
        r["warmup"],
        r["runs"],
    );
    let change = |b: u64, a: u64| if b == 0 { String::new() } else { format!("{:+.1}%", (a as f64 / b as f64 - 1.0) * 100.0) };
    t += &format!("{:<28} {:>16} {:>16} {:>9}\n", "", "original", "pruned", "change");
    for (name, b, x) in [
        ("parameters", before.parameters, after.parameters),
        ("MACs", before.macs, after.macs),
        ("weight bytes", before.weight_bytes, after.weight_bytes),
    ] {
        t += &format!("{name:<28} {b:>16} {x:>16} {:>9}\n", change(b, x));
    }
    for (label, key) in [("tract", "tract"), ("ONNX Runtime", "onnxruntime")] {
        let rt = &r[key];
        if let Some(why) = rt.get("unavailable") {
            t += &format!("{label} latency: not measured: {}\n", why.as_str().unwrap_or("?"));
            continue;
        }
        let cell =
            |m: &Json| format!("{:.3} ms ±{:.0}%", m["median_ms"].as_f64().unwrap_or(f64::NAN), m["spread"].as_f64().unwrap_or(0.0) * 50.0);
        t += &format!(
            "{:<28} {:>16} {:>16} {:>9}\n",
            format!("{label} {} median", rt["version"].as_str().unwrap_or("?")),
            cell(&rt["original"]),
            cell(&rt["pruned"]),
            format!("{:.2}x", rt["ratio"].as_f64().unwrap_or(f64::NAN))
        );
    }
    t += "(± is half the interquartile range over the median; change of latency is the ratio of the medians)\n";
    for o in r["outputs"].as_array().into_iter().flatten() {
        t += &format!(
            "output `{}`: cosine {:.6}, max abs diff {:.3e} ({:.3e} of scale)\n",
            o["name"].as_str().unwrap_or("?"),
            o["cosine"].as_f64().unwrap_or(f64::NAN),
            o["max_abs"].as_f64().unwrap_or(f64::NAN),
            o["rel"].as_f64().unwrap_or(f64::NAN)
        );
    }
    t
}
