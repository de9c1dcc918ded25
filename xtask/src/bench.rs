//! `cargo xtask bench`: the figures recorded in BENCHMARKS.md.
//!
//! `cargo xtask bench roundtrip [--runs N] [--model PATH]...` measures `prunec MODEL -o OUT
//! --passes none` (read, then write back, no pass) against a plain `cp` of the same file. Both are
//! measured the same way, as whole child processes: wall time around the spawn, peak RSS as
//! reported by GNU time for that one child. The two alternate run by run so that a noisy
//! neighbour on a small machine slows both rather than one, and the prunec/copy ratios are the
//! figures to compare across machines; the absolute times are only meaningful next to them.
//!
//! `cargo xtask bench prune [--runs N] [--model PATH]...` measures `prunec MODEL -o OUT --ratio
//! 0.5` (read, shape inference, groups, pruning, verification in tract, write) against `cp`, and
//! then, from one `--report` of the same command, the model's parameters, MACs and tract latency
//! before and after pruning.
//!
//! The release binary is rebuilt first so the figures always describe the code in the tree.
//! Everything the bench reports (the Markdown table, the machine, the date) goes to stdout, ready
//! to paste; progress goes to stderr.

use anyhow::{Context, Result, bail, ensure};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// GNU time reports one child's own peak RSS, which spares an unsafe `wait4` and a libc dependency.
const GNU_TIME: &str = "/usr/bin/time";

const DEFAULT_RUNS: usize = 10;

/// Runs `cargo xtask bench SUBCOMMAND [ARGS]`; `roundtrip` is the only subcommand so far.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("roundtrip") => roundtrip(root, &RoundtripArgs::parse(&args[1..])?, Kind::Roundtrip),
        Some("groups") => roundtrip(root, &RoundtripArgs::parse(&args[1..])?, Kind::Groups),
        Some("prune") => roundtrip(root, &RoundtripArgs::parse(&args[1..])?, Kind::Prune),
        Some("big") => crate::bigmodel::bench(root, &args[1..]),
        Some(other) => bail!("unknown bench `{other}`; expected `roundtrip`, `groups`, `prune` or `big`"),
        None => bail!("usage: cargo xtask bench <roundtrip|groups|prune|big> [--runs N] [--model PATH]..."),
    }
}

struct RoundtripArgs {
    runs: usize,
    /// Empty means the default model.
    models: Vec<PathBuf>,
    /// Extra arguments for the measured prunec command (`--prunec-arg`, repeatable).
    prunec_args: Vec<String>,
}

impl RoundtripArgs {
    fn parse(args: &[String]) -> Result<Self> {
        let mut parsed = Self { runs: DEFAULT_RUNS, models: Vec::new(), prunec_args: Vec::new() };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || it.next().with_context(|| format!("`{arg}` needs a value"));
            match arg.as_str() {
                "--runs" => {
                    let v = value()?;
                    parsed.runs = v.parse().with_context(|| format!("--runs: `{v}` is not a count"))?;
                    ensure!(parsed.runs > 0, "--runs must be at least 1");
                }
                "--model" => parsed.models.push(PathBuf::from(value()?)),
                "--prunec-arg" => parsed.prunec_args.push(value()?.clone()),
                other => bail!("unknown argument `{other}`; expected --runs N, --model PATH or --prunec-arg ARG"),
            }
        }
        Ok(parsed)
    }
}

/// What is measured against what.
#[derive(Clone, Copy)]
enum Kind {
    /// `prunec MODEL -o OUT --passes none` against `cp MODEL COPY`.
    Roundtrip,
    /// `prunec groups MODEL` against `prunec inspect MODEL` (the same read and shape inference,
    /// without the group analysis), so the ratio isolates the analysis.
    Groups,
    /// `prunec MODEL -o OUT --ratio 0.5` against `cp MODEL COPY`.
    Prune,
}

/// The ratio of the prune bench.
const PRUNE_RATIO: &str = "0.5";

impl Kind {
    fn labels(self) -> (&'static str, &'static str) {
        match self {
            Kind::Roundtrip | Kind::Prune => ("prunec", "cp"),
            Kind::Groups => ("groups", "inspect"),
        }
    }
}

/// One measured child process.
struct Sample {
    wall: Duration,
    /// Peak resident set size in KiB (GNU time's `%M`).
    max_rss_kib: u64,
}

/// The figures of one model.
struct Row {
    label: String,
    model_bytes: u64,
    output_bytes: u64,
    prunec: Vec<Sample>,
    copy: Vec<Sample>,
    /// For the prune bench: the `--report` of one run.
    report: Option<serde_json::Value>,
}

fn roundtrip(root: &Path, args: &RoundtripArgs, kind: Kind) -> Result<()> {
    ensure!(
        Path::new(GNU_TIME).is_file(),
        "{GNU_TIME} not found: the bench needs GNU time for per-process peak RSS (Debian package `time`)"
    );
    let shared_models = shared_dir(root).join("models");
    // Canonical paths so the table can name shared models relative to the shared folder, however
    // they were given (`../shared/models/...` from the checkout, or absolute).
    let shared_models = fs::canonicalize(&shared_models).unwrap_or(shared_models);
    let models = if args.models.is_empty() { vec![largest_onnx(&shared_models)?] } else { args.models.clone() };
    let models = models
        .iter()
        .map(|m| {
            ensure!(m.is_file(), "model `{}` not found", m.display());
            fs::canonicalize(m).with_context(|| format!("resolving `{}`", m.display()))
        })
        .collect::<Result<Vec<_>>>()?;

    let prunec = build_prunec(root)?;
    let tmp = TempDir::new()?;
    let mut rows = Vec::new();
    for model in &models {
        eprintln!("bench: {} ({} runs each)", model.display(), args.runs);
        rows.push(bench_model(&prunec, model, &shared_models, &tmp.0, args, kind)?);
    }
    print!("{}", report(&rows, args.runs, kind)?);
    Ok(())
}

/// `$PRUNEC_SHARED`, else `../shared` beside the checkout (as the tests resolve it).
fn shared_dir(root: &Path) -> PathBuf {
    std::env::var_os("PRUNEC_SHARED").map(PathBuf::from).unwrap_or_else(|| root.join("../shared"))
}

/// The largest `.onnx` under `dir`, searched recursively: the model where I/O cost shows most.
fn largest_onnx(dir: &Path) -> Result<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("listing `{}` (set PRUNEC_SHARED?)", d.display()))? {
            let entry = entry.with_context(|| format!("listing `{}`", d.display()))?;
            let path = entry.path();
            let meta = entry.metadata().with_context(|| format!("reading `{}`", path.display()))?;
            if meta.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "onnx") && best.as_ref().is_none_or(|(size, _)| meta.len() > *size) {
                best = Some((meta.len(), path));
            }
        }
    }
    best.map(|(_, p)| p).with_context(|| format!("no .onnx file under `{}`", dir.display()))
}

/// Builds the release binary so the bench never measures a stale one.
pub(crate) fn build_prunec(root: &Path) -> Result<PathBuf> {
    eprintln!("bench: cargo build --release -p prunec");
    // `cargo xtask` runs under cargo, which names itself in $CARGO; honour it over whatever is on PATH.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let status = Command::new(&cargo)
        .args(["build", "--release", "-p", "prunec"])
        .current_dir(root)
        .status()
        .context("running cargo build --release -p prunec")?;
    ensure!(status.success(), "cargo build --release -p prunec failed");
    let bin = root.join("target/release/prunec");
    ensure!(bin.is_file(), "`{}` missing after the build", bin.display());
    Ok(bin)
}

fn bench_model(prunec: &Path, model: &Path, shared_models: &Path, tmp: &Path, args: &RoundtripArgs, kind: Kind) -> Result<Row> {
    let runs = args.runs;
    let out = tmp.join("out.onnx");
    let copy = tmp.join("copy.onnx");
    let rusage = tmp.join("rusage.txt");
    let prunec_cmd = || {
        let mut c = Command::new(prunec);
        match kind {
            Kind::Roundtrip => c.arg(model).arg("-o").arg(&out).args(["--passes", "none"]),
            Kind::Groups => c.arg("groups").arg(model),
            Kind::Prune => c.arg(model).arg("-o").arg(&out).args(["--ratio", PRUNE_RATIO]),
        };
        c.args(&args.prunec_args);
        c
    };
    let copy_cmd = || match kind {
        Kind::Roundtrip | Kind::Prune => {
            let mut c = Command::new("cp");
            c.arg(model).arg(&copy);
            c
        }
        Kind::Groups => {
            let mut c = Command::new(prunec);
            c.arg("inspect").arg(model);
            c
        }
    };

    // One untimed run of each first: the first read of the model and the first exec of the binary
    // pay for the page cache, which would otherwise land on whichever of the two runs first.
    measure(prunec_cmd(), &rusage).context("warm-up run of prunec")?;
    measure(copy_cmd(), &rusage).context("warm-up run of cp")?;

    let (mut p, mut c) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for i in 0..runs {
        p.push(measure(prunec_cmd(), &rusage).with_context(|| format!("prunec run {}", i + 1))?);
        c.push(measure(copy_cmd(), &rusage).with_context(|| format!("cp run {}", i + 1))?);
    }
    // The table keeps median and min; the spread goes to stderr to judge how noisy the run was.
    let list = |v: &[Sample]| v.iter().map(|x| format!("{:.0}", ms(x.wall))).collect::<Vec<_>>().join(" ");
    eprintln!("bench:   prunec ms: {}\nbench:   cp ms:     {}", list(&p), list(&c));
    let size = |path: &Path| fs::metadata(path).map(|m| m.len()).with_context(|| format!("reading `{}`", path.display()));
    let label = model.strip_prefix(shared_models).unwrap_or(model).display().to_string();
    let output_bytes = if matches!(kind, Kind::Groups) { 0 } else { size(&out)? };
    let report = match kind {
        Kind::Prune => {
            let json = tmp.join("report.json");
            let status = prunec_cmd().arg("--report").arg(&json).stderr(Stdio::null()).status().context("running prunec --report")?;
            ensure!(status.success(), "prunec --report failed on `{}`", model.display());
            Some(serde_json::from_str(&fs::read_to_string(&json).context("reading the report")?).context("parsing the report")?)
        }
        _ => None,
    };
    Ok(Row { label, model_bytes: size(model)?, output_bytes, prunec: p, copy: c, report })
}

/// Runs `cmd` under GNU time, which writes its report to `rusage`, and returns its wall time and
/// peak RSS.
///
/// Wall time is taken here rather than from GNU time's `%e` (10 ms resolution); the extra exec of
/// `time` itself costs both commands the same.
fn measure(cmd: Command, rusage: &Path) -> Result<Sample> {
    let mut timed = Command::new(GNU_TIME);
    // `-o` keeps the figure apart from the child's own stderr.
    timed.arg("-f").arg("%M").arg("-o").arg(rusage).arg(cmd.get_program()).args(cmd.get_args());
    timed.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let start = Instant::now();
    let output = timed.output().with_context(|| format!("running {GNU_TIME} {}", cmd.get_program().display()))?;
    let wall = start.elapsed();
    if !output.status.success() {
        bail!("`{}` failed ({}): {}", cmd.get_program().display(), output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    let text = fs::read_to_string(rusage).with_context(|| format!("reading `{}`", rusage.display()))?;
    let last = text.lines().last().unwrap_or("").trim();
    let max_rss_kib = last.parse().with_context(|| format!("unexpected GNU time output `{last}`"))?;
    Ok(Sample { wall, max_rss_kib })
}

/// A scratch directory removed on drop, so an error halfway leaves no large outputs behind.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        // The pid keeps two benches running at once apart.
        let dir = std::env::temp_dir().join(format!("prunec-bench-{}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating `{}`", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Nothing useful to do on failure while dropping: it is a temp dir.
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn median(walls: &mut [Duration]) -> Duration {
    walls.sort();
    let n = walls.len();
    if n % 2 == 1 { walls[n / 2] } else { (walls[n / 2 - 1] + walls[n / 2]) / 2 }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The Markdown block: machine, date, table.
fn report(rows: &[Row], runs: usize, kind: Kind) -> Result<String> {
    let (a, b) = kind.labels();
    let mut s = String::new();
    writeln!(s, "Machine: {}", machine_line())?;
    writeln!(s, "Date: {} (UTC)", today_utc())?;
    writeln!(s, "Runs: {runs} of each, alternating, after one untimed warm-up of each.")?;
    writeln!(s)?;
    writeln!(
        s,
        "| model | size MiB | output MiB | {a} median ms | {a} min ms | {b} median ms | {b} min ms | time ratio (median) | {a} peak RSS MiB | {b} peak RSS MiB | RSS ratio |"
    )?;
    writeln!(s, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")?;
    for r in rows {
        let (mut pw, mut cw): (Vec<_>, Vec<_>) = (r.prunec.iter().map(|x| x.wall).collect(), r.copy.iter().map(|x| x.wall).collect());
        let (pmed, cmed) = (median(&mut pw), median(&mut cw));
        let (pmin, cmin) = (pw[0], cw[0]);
        let prss = r.prunec.iter().map(|x| x.max_rss_kib).max().unwrap_or(0);
        let crss = r.copy.iter().map(|x| x.max_rss_kib).max().unwrap_or(0);
        writeln!(
            s,
            "| `{}` | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1}× | {:.1} | {:.1} | {:.1}× |",
            r.label,
            mib(r.model_bytes),
            mib(r.output_bytes),
            ms(pmed),
            ms(pmin),
            ms(cmed),
            ms(cmin),
            pmed.as_secs_f64() / cmed.as_secs_f64(),
            prss as f64 / 1024.0,
            crss as f64 / 1024.0,
            prss as f64 / crss.max(1) as f64,
        )?;
    }
    if matches!(kind, Kind::Prune) {
        writeln!(s)?;
        writeln!(
            s,
            "The pruned models, from `--report` of one more run (tract time: verification's one cold run of each; `prunec bench` measures latency):"
        )?;
        writeln!(s)?;
        writeln!(
            s,
            "| model | parameters before | after | MACs before | after | tract ms before | after | latency ratio | cosine to original |"
        )?;
        writeln!(s, "|---|--:|--:|--:|--:|--:|--:|--:|--:|")?;
        for r in rows {
            let Some(j) = &r.report else { continue };
            let f = |p: &str| j.pointer(p).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
            let cosine = j.pointer("/verification/outputs").and_then(|o| o.as_array()).map_or(String::from("-"), |o| {
                o.iter().map(|x| format!("{:.4}", x["cosine"].as_f64().unwrap_or(f64::NAN))).collect::<Vec<_>>().join(", ")
            });
            writeln!(
                s,
                "| `{}` | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2}× | {cosine} |",
                r.label,
                f("/before/parameters"),
                f("/after/parameters"),
                f("/before/macs"),
                f("/after/macs"),
                f("/verification/original_ms"),
                f("/verification/pruned_ms"),
                f("/verification/pruned_ms") / f("/verification/original_ms"),
            )?;
        }
    }
    Ok(s)
}

/// `N cores, CPU, M GiB RAM`, from what Linux reports; unknown parts say so rather than fail.
pub(crate) fn machine_line() -> String {
    let cores = std::thread::available_parallelism().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| format!("{:.1} GiB RAM", kib as f64 / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "unknown RAM".into());
    format!("{cores} cores (nproc), {cpu}, {mem}")
}

/// Today's date as `YYYY-MM-DD`, without a date crate (Howard Hinnant's `civil_from_days`).
pub(crate) fn today_utc() -> String {
    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
