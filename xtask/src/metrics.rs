//! `cargo xtask metrics`: how much of a real model's task quality survives pruning without
//! fine-tuning, per criterion and share of parameters removed (the table in BENCHMARKS.md).
//!
//! For each shared real model with a dev set (`../shared/data/`), the first samples calibrate
//! (`--inputs` of the data-driven criteria) and the rest are held out for the metric, so no
//! criterion is scored on the data it saw. Each run is `prunec MODEL -o OUT --target params=R
//! --criterion C ...`, timed as a whole command; the metric is computed by `xtask/metrics.py` in
//! ONNX Runtime (the reference client, not prunec's own runner).
//!
//! `cargo xtask metrics [--model rec|cls|magika]... [--ratios 0.1,0.2,0.3] [--criteria LIST]`

use anyhow::{Context, Result, bail, ensure};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// A real model with its dev set and metric.
struct Subject {
    /// Short name (`--model`) and the kind `metrics.py` evaluates.
    kind: &'static str,
    model: &'static str,
    data: &'static str,
    /// Samples of the dev set used for calibration; the rest are held out.
    calibration: usize,
    /// `--input-shape` of every run: the model is pruned for this shape (one sample), so every
    /// criterion prunes the same groups and `--hessian noise` has sizes to draw inputs at.
    input_shape: &'static str,
    /// Whether a higher metric is better.
    higher_is_better: bool,
}

const SUBJECTS: &[Subject] = &[
    Subject {
        kind: "rec",
        model: "models/real/rapidocr/ch_PP-OCRv4_rec_infer.onnx",
        data: "data/rapidocr_rec.dev.npz",
        calibration: 16,
        input_shape: "x=1,3,48,320",
        higher_is_better: false,
    },
    Subject {
        kind: "cls",
        model: "models/real/rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        data: "data/rapidocr_cls.dev.npz",
        calibration: 16,
        input_shape: "x=1,3,48,192",
        higher_is_better: true,
    },
    Subject {
        kind: "magika",
        model: "models/real/magika/model.onnx",
        data: "data/magika.dev.npz",
        calibration: 64,
        input_shape: "bytes=1,2048",
        higher_is_better: true,
    },
];

/// A criterion as the table names it, with its prunec arguments.
const CRITERIA: &[(&str, &[&str])] = &[
    ("l2", &["--criterion", "l2"]),
    ("random", &["--criterion", "random"]),
    ("wanda", &["--criterion", "wanda", "@inputs"]),
    ("flap", &["--criterion", "flap", "--hessian", "calib", "@inputs"]),
    ("obspa-identity", &["--criterion", "obspa", "--hessian", "identity"]),
    ("obspa-bn", &["--criterion", "obspa", "--hessian", "bn"]),
    ("obspa-noise", &["--criterion", "obspa", "--hessian", "noise"]),
    ("obspa-calib-oneshot", &["--criterion", "obspa", "--hessian", "calib", "--refit", "none", "@inputs"]),
    ("obspa-calib", &["--criterion", "obspa", "--hessian", "calib", "@inputs"]),
    ("obspa-calib-outputs", &["--criterion", "obspa", "--hessian", "calib", "--refit", "outputs", "@inputs"]),
];

/// Runs the table.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let mut kinds: Vec<String> = Vec::new();
    let mut ratios = vec![0.1, 0.2, 0.3];
    let mut criteria: Vec<String> = CRITERIA.iter().map(|(n, _)| n.to_string()).collect();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("`{arg}` needs a value"));
        match arg.as_str() {
            "--model" => kinds.push(value()?.clone()),
            "--ratios" => {
                ratios = value()?.split(',').map(|r| r.parse::<f64>().with_context(|| format!("ratio `{r}`"))).collect::<Result<_>>()?
            }
            "--criteria" => criteria = value()?.split(',').map(str::to_string).collect(),
            other => bail!("unknown argument `{other}`; expected --model rec|cls|magika, --ratios LIST or --criteria LIST"),
        }
    }
    for c in &criteria {
        ensure!(CRITERIA.iter().any(|(n, _)| n == c), "unknown criterion `{c}`");
    }
    let shared = std::env::var_os("PRUNEC_SHARED").map(PathBuf::from).unwrap_or_else(|| root.join("../shared"));
    let python = root.join(".venv/bin/python");
    ensure!(python.is_file(), "no `{}`: run `cargo xtask setup` first", python.display());
    let prunec = crate::bench::build_prunec(root)?;
    let scratch = std::env::temp_dir().join(format!("prunec-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let script = root.join("xtask/metrics.py");

    let mut out = String::new();
    writeln!(out, "Measured {} on {} with `cargo xtask metrics`.\n", crate::bench::today_utc(), crate::bench::machine_line())?;
    for subject in SUBJECTS.iter().filter(|s| kinds.is_empty() || kinds.iter().any(|k| k == s.kind)) {
        let model = shared.join(subject.model);
        let (calib, held_out) = (scratch.join(format!("{}.calib.npz", subject.kind)), scratch.join(format!("{}.eval.npz", subject.kind)));
        python_run(
            &python,
            &script,
            &[
                "split".as_ref(),
                shared.join(subject.data).as_os_str(),
                calib.as_os_str(),
                held_out.as_os_str(),
                subject.calibration.to_string().as_ref(),
            ],
        )?;
        let baseline = evaluate(&python, &script, subject.kind, &model, &model, &held_out)?;
        let arrow = if subject.higher_is_better { "higher is better" } else { "lower is better" };
        writeln!(
            out,
            "**{}** (`{}`): {} on {} held-out samples ({arrow}), original {:.4}; calibration: the first {} samples.\n",
            subject.kind, subject.model, baseline.0, baseline.2, baseline.1, subject.calibration
        )?;
        let header: String = ratios.iter().map(|r| format!(" {:.0}% params |", r * 100.0)).collect();
        writeln!(out, "| criterion (metric, change in parameters) |{header} prune time (s) at each |")?;
        writeln!(out, "|---|{}---|", "---|".repeat(ratios.len()))?;
        for name in &criteria {
            let (_, extra) = CRITERIA.iter().find(|(n, _)| n == name).expect("checked");
            let mut cells = String::new();
            let mut times = Vec::new();
            for &ratio in &ratios {
                let pruned = scratch.join(format!("{}.{name}.{ratio}.onnx", subject.kind));
                let mut cmd = Command::new(&prunec);
                cmd.arg(&model).arg("-o").arg(&pruned).arg("--target").arg(format!("params={ratio}")).arg("--no-verify");
                cmd.args(["--input-shape", subject.input_shape]);
                for a in extra.iter() {
                    match *a {
                        "@inputs" => {
                            cmd.arg("--inputs").arg(&calib);
                        }
                        other => {
                            cmd.arg(other);
                        }
                    }
                }
                let start = Instant::now();
                let run = cmd.output().with_context(|| format!("running {}", prunec.display()))?;
                times.push(start.elapsed().as_secs_f64());
                if !run.status.success() {
                    eprintln!("{} {name} {ratio}: {}", subject.kind, String::from_utf8_lossy(&run.stderr).trim());
                    cells.push_str(" failed |");
                    continue;
                }
                let (_, value, _) = evaluate(&python, &script, subject.kind, &model, &pruned, &held_out)?;
                // The share actually removed: the target may be out of reach (frozen groups).
                let stderr = String::from_utf8_lossy(&run.stderr);
                let removed = stderr.lines().find(|l| l.starts_with("parameters")).and_then(|l| l.split_whitespace().last()).unwrap_or("?");
                eprintln!("{} {name} params={ratio}: {value:.4} ({removed}) in {:.2}s", subject.kind, times.last().unwrap());
                cells.push_str(&format!(" {value:.4} ({removed}) |"));
            }
            let times: Vec<String> = times.iter().map(|t| format!("{t:.1}")).collect();
            writeln!(out, "| {name} |{cells} {} |", times.join(" / "))?;
        }
        writeln!(out)?;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    print!("{out}");
    Ok(())
}

/// The metric's name, value and sample count for `pruned`.
fn evaluate(python: &Path, script: &Path, kind: &str, original: &Path, pruned: &Path, data: &Path) -> Result<(String, f64, u64)> {
    let text = python_run(python, script, &["eval".as_ref(), kind.as_ref(), original.as_os_str(), pruned.as_os_str(), data.as_os_str()])?;
    let json: serde_json::Value = serde_json::from_str(text.trim()).with_context(|| format!("metrics.py printed `{text}`"))?;
    Ok((
        json["metric"].as_str().unwrap_or("?").to_string(),
        json["value"].as_f64().unwrap_or(f64::NAN),
        json["samples"].as_u64().unwrap_or(0),
    ))
}

fn python_run(python: &Path, script: &Path, args: &[&std::ffi::OsStr]) -> Result<String> {
    let out = Command::new(python).arg(script).args(args).output().with_context(|| format!("running {}", python.display()))?;
    ensure!(out.status.success(), "metrics.py {:?} failed: {}", args, String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
