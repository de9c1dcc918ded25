//! `cargo xtask bigmodel --out DIR [--gib G] [--dim N] [--seed S]`: a model larger than protobuf's
//! 2 GiB limit, generated on demand for the huge-model benchmark (`cargo xtask bench big`).
//!
//! The model is a stack of `Gemm` layers of `dim × dim` f32 weights (`transB=1`, as PyTorch
//! exports `nn.Linear`) with a `Relu` between them, input `[1, dim]`. Every weight and bias lives
//! in one external data file, `DIR/big.onnx.data`, at page-aligned offsets, and every value's
//! shape is recorded, as exporters of large models do. At the default 2.5 GiB and dim 8192 that
//! is 10 layers of 256 MiB.
//!
//! Weights are uniform in ±1/√dim (PyTorch's `nn.Linear` initialisation) from a SplitMix64
//! stream seeded per tensor, so the files are the same on every run, and they are written
//! through a small buffer: generating the model never holds more than one megabyte of it.
//! The files are not committed and no test or CI job builds them.

use anyhow::{Context, Result, bail, ensure};
use prost::Message;
use prunec_ir::SplitMix64;
use prunec_ir::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
    attribute_proto::AttributeType,
    tensor_proto::{DataLocation, DataType},
    tensor_shape_proto::{Dimension, dimension},
    type_proto,
};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The model file name inside `--out`; its data file is this name plus `.data`.
pub const MODEL_FILE: &str = "big.onnx";
/// Default total weight size.
pub const DEFAULT_GIB: f64 = 2.5;
const DEFAULT_DIM: u64 = 8192;
const ALIGNMENT: u64 = 4096;

/// What to generate.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Weight bytes to aim for (rounded to whole layers, at least two).
    pub gib: f64,
    /// Width of every layer.
    pub dim: u64,
    /// Seed of the weights.
    pub seed: u64,
}

impl Default for Spec {
    fn default() -> Self {
        Spec { gib: DEFAULT_GIB, dim: DEFAULT_DIM, seed: 0 }
    }
}

impl Spec {
    /// Number of Gemm layers.
    pub fn layers(&self) -> u64 {
        let layer_bytes = (self.dim * self.dim * 4) as f64;
        ((self.gib * (1u64 << 30) as f64 / layer_bytes).round() as u64).max(2)
    }
}

/// Runs `cargo xtask bigmodel ARGS`.
pub fn run(args: &[String]) -> Result<()> {
    let mut spec = Spec::default();
    let mut out: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("`{arg}` needs a value"));
        match arg.as_str() {
            "--out" => out = Some(PathBuf::from(value()?)),
            "--gib" => {
                let v = value()?;
                spec.gib = v.parse().ok().filter(|g: &f64| *g > 0.0).with_context(|| format!("--gib: `{v}` is not a positive size"))?;
            }
            "--dim" => {
                let v = value()?;
                spec.dim = v.parse().ok().filter(|d| *d > 0).with_context(|| format!("--dim: `{v}` is not a positive width"))?;
            }
            "--seed" => {
                let v = value()?;
                spec.seed = v.parse().with_context(|| format!("--seed: `{v}` is not a number"))?;
            }
            other => bail!("unknown argument `{other}`; expected --out DIR, --gib G, --dim N or --seed S"),
        }
    }
    let out = out.context("usage: cargo xtask bigmodel --out DIR [--gib 2.5] [--dim 8192] [--seed 0]")?;
    let model = generate(&out, &spec)?;
    eprintln!("bigmodel: wrote {} and {}.data", model.display(), model.display());
    Ok(())
}

/// Writes `DIR/big.onnx` and `DIR/big.onnx.data`; returns the model's path.
pub fn generate(dir: &Path, spec: &Spec) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating `{}`", dir.display()))?;
    let model_path = dir.join(MODEL_FILE);
    let data_name = format!("{MODEL_FILE}.data");
    let data_path = dir.join(&data_name);
    let (layers, dim) = (spec.layers(), spec.dim);
    eprintln!(
        "bigmodel: {layers} Gemm layers of {dim}x{dim} f32 ({:.2} GiB of weights)",
        (layers * dim * (dim + 1) * 4) as f64 / (1u64 << 30) as f64
    );

    let file = fs::File::create(&data_path).with_context(|| format!("creating `{}`", data_path.display()))?;
    let mut data = BufWriter::with_capacity(1 << 20, file);
    let mut at = 0u64;
    let mut graph = GraphProto { name: Some("big".into()), ..Default::default() };
    let f32_info = |name: &str| value_info(name, dim);
    graph.input.push(f32_info("input"));
    let mut x = "input".to_string();
    let bound = 1.0 / (dim as f64).sqrt();
    for i in 0..layers {
        let weight = format!("layers.{i}.weight");
        let bias = format!("layers.{i}.bias");
        for (name, dims, salt) in [(&weight, vec![dim, dim], 2 * i), (&bias, vec![dim], 2 * i + 1)] {
            let numel: u64 = dims.iter().product();
            let padding = at.next_multiple_of(ALIGNMENT) - at;
            data.write_all(&vec![0u8; padding as usize])?;
            at += padding;
            let mut rng = SplitMix64(spec.seed ^ (salt + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            write_uniform(&mut data, &mut rng, numel, bound).with_context(|| format!("writing `{}`", data_path.display()))?;
            graph.initializer.push(external_tensor(name, &dims, &data_name, at, numel * 4));
            at += numel * 4;
        }
        let gemm_out = format!("/layers.{i}/Gemm_output_0");
        graph.node.push(NodeProto {
            name: Some(format!("/layers.{i}/Gemm")),
            op_type: Some("Gemm".into()),
            input: vec![x.clone(), weight, bias],
            output: vec![gemm_out.clone()],
            attribute: vec![
                AttributeProto {
                    name: Some("alpha".into()),
                    f: Some(1.0),
                    r#type: Some(AttributeType::Float as i32),
                    ..Default::default()
                },
                AttributeProto { name: Some("beta".into()), f: Some(1.0), r#type: Some(AttributeType::Float as i32), ..Default::default() },
                AttributeProto { name: Some("transB".into()), i: Some(1), r#type: Some(AttributeType::Int as i32), ..Default::default() },
            ],
            ..Default::default()
        });
        if i + 1 == layers {
            x = gemm_out;
            break;
        }
        graph.value_info.push(f32_info(&gemm_out));
        let relu_out = format!("/layers.{i}/Relu_output_0");
        graph.node.push(NodeProto {
            name: Some(format!("/layers.{i}/Relu")),
            op_type: Some("Relu".into()),
            input: vec![gemm_out],
            output: vec![relu_out.clone()],
            ..Default::default()
        });
        graph.value_info.push(f32_info(&relu_out));
        x = relu_out;
    }
    // The last Gemm's output is the graph output under its exporter name.
    graph.output.push(f32_info(&x));
    let mut file = data.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing `{}`", data_path.display()))?;
    file.flush()?;
    drop(file);
    ensure!(fs::metadata(&data_path)?.len() == at, "`{}` has an unexpected size", data_path.display());

    let model = ModelProto {
        ir_version: Some(8),
        producer_name: Some("prunec-xtask-bigmodel".into()),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        graph: Some(graph),
        ..Default::default()
    };
    fs::write(&model_path, model.encode_to_vec()).with_context(|| format!("writing `{}`", model_path.display()))?;
    Ok(model_path)
}

/// Writes `numel` f32 values uniform in `±bound`, little-endian, through a 1 MiB buffer.
fn write_uniform(w: &mut impl Write, rng: &mut SplitMix64, numel: u64, bound: f64) -> std::io::Result<()> {
    const CHUNK: u64 = 1 << 18;
    let mut buf = Vec::with_capacity(CHUNK as usize * 4);
    let mut left = numel;
    let scale = (2.0 * bound / (1u64 << 32) as f64) as f32;
    while left > 0 {
        let n = left.min(CHUNK);
        buf.clear();
        // Two values per draw (the low and high halves): the generator is the bottleneck of a
        // multi-gigabyte file.
        for k in (0..n).step_by(2) {
            let bits = rng.next_u64();
            for half in [bits as u32, (bits >> 32) as u32].into_iter().take((n - k).min(2) as usize) {
                let v = half as f32 * scale - bound as f32;
                buf.extend_from_slice(&v.to_le_bytes());
            }
        }
        w.write_all(&buf)?;
        left -= n;
    }
    Ok(())
}

fn external_tensor(name: &str, dims: &[u64], location: &str, offset: u64, length: u64) -> TensorProto {
    let entry = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        data_location: Some(DataLocation::External as i32),
        external_data: vec![entry("location", location.into()), entry("offset", offset.to_string()), entry("length", length.to_string())],
        ..Default::default()
    }
}

/// `name: float[1, dim]`.
fn value_info(name: &str, dim: u64) -> ValueInfoProto {
    let dims = [1, dim].map(|d| Dimension { value: Some(dimension::Value::DimValue(d as i64)), denotation: None });
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim: dims.to_vec() }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

/// Runs `cargo xtask bench big [--runs N] [--dir DIR] [--gib G] [--prunec-arg ARG]...`.
///
/// Generates the model in `DIR` (default `target/bigmodel`) unless it is there already, then
/// measures `prunec big.onnx -o OUT --ratio 0.5 --no-verify` (`--prunec-arg --verify` verifies
/// instead: prunec refuses to choose between the two above 1 GiB of weights) against
/// `cp big.onnx big.onnx.data OUTDIR/` (the
/// least any tool that rewrites the model must do), alternating run by run after one untimed
/// warm-up of each, as whole child processes: wall time around the spawn, peak RSS from GNU time.
/// The figures (and whether they meet the goals: peak RSS under a quarter of the model, wall time
/// at most three times the copy) go to stdout as Markdown.
pub fn bench(root: &Path, args: &[String]) -> Result<()> {
    let mut runs = 3usize;
    let mut dir = root.join("target/bigmodel");
    let mut spec = Spec::default();
    let mut prunec_args: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("`{arg}` needs a value"));
        match arg.as_str() {
            "--runs" => {
                let v = value()?;
                runs = v.parse().ok().filter(|r| *r > 0).with_context(|| format!("--runs: `{v}` is not a positive count"))?;
            }
            "--dir" => dir = PathBuf::from(value()?),
            "--gib" => {
                let v = value()?;
                spec.gib = v.parse().ok().filter(|g: &f64| *g > 0.0).with_context(|| format!("--gib: `{v}` is not a positive size"))?;
            }
            "--prunec-arg" => prunec_args.push(value()?.clone()),
            other => bail!("unknown argument `{other}`; expected --runs N, --dir DIR, --gib G or --prunec-arg ARG"),
        }
    }
    ensure!(
        Path::new(GNU_TIME).is_file(),
        "{GNU_TIME} not found: the bench needs GNU time for per-process peak RSS (Debian package `time`)"
    );
    let prunec = crate::bench::build_prunec(root)?;
    let model = dir.join(MODEL_FILE);
    let data = dir.join(format!("{MODEL_FILE}.data"));
    if !(model.is_file() && data.is_file()) {
        generate(&dir, &spec)?;
    }
    let model_bytes = fs::metadata(&model)?.len() + fs::metadata(&data)?.len();
    let out_dir = dir.join("bench-out");
    let copy_dir = out_dir.join("copy");
    fs::create_dir_all(&copy_dir).with_context(|| format!("creating `{}`", copy_dir.display()))?;
    let out = out_dir.join("out.onnx");
    let rusage = out_dir.join("rusage.txt");
    if !prunec_args.iter().any(|a| a == "--verify" || a == "--no-verify") {
        prunec_args.push("--no-verify".into());
    }
    let prunec_cmd = || {
        let mut c = std::process::Command::new(&prunec);
        c.arg(&model).arg("-o").arg(&out).args(["--ratio", "0.5"]).args(&prunec_args);
        c
    };
    let copy_cmd = || {
        let mut c = std::process::Command::new("cp");
        c.arg(&model).arg(&data).arg(&copy_dir);
        c
    };
    // Each run starts without the previous run's outputs, so neither pays for replacing them, and
    // with no dirty pages left by the one before: prunec syncs its output before renaming it into
    // place, and its sync would otherwise also wait for the write-back of the previous copy.
    let clean = || -> Result<()> {
        for f in [out.clone(), out_dir.join("out.onnx.data"), copy_dir.join(MODEL_FILE), copy_dir.join(format!("{MODEL_FILE}.data"))] {
            if f.exists() {
                fs::remove_file(&f).with_context(|| format!("removing `{}`", f.display()))?;
            }
        }
        let status = std::process::Command::new("sync").status().context("running sync")?;
        ensure!(status.success(), "sync failed");
        Ok(())
    };
    eprintln!("bench big: {} ({:.2} GiB), {runs} runs each", model.display(), model_bytes as f64 / GIB);
    clean()?;
    measure(prunec_cmd(), &rusage).context("warm-up run of prunec")?;
    clean()?;
    measure(copy_cmd(), &rusage).context("warm-up run of cp")?;
    let (mut p, mut c) = (Vec::new(), Vec::new());
    for i in 0..runs {
        clean()?;
        p.push(measure(prunec_cmd(), &rusage).with_context(|| format!("prunec run {}", i + 1))?);
        let output_bytes = fs::metadata(&out)?.len() + fs::metadata(out_dir.join("out.onnx.data")).map(|m| m.len()).unwrap_or(0);
        clean()?;
        c.push(measure(copy_cmd(), &rusage).with_context(|| format!("cp run {}", i + 1))?);
        eprintln!(
            "bench big: run {}: prunec {:.2} s {:.0} MiB, cp {:.2} s {:.0} MiB, output {:.0} MiB",
            i + 1,
            p[i].0,
            p[i].1 as f64 / 1024.0,
            c[i].0,
            c[i].1 as f64 / 1024.0,
            output_bytes as f64 / MIB
        );
    }
    clean()?;
    let _ = fs::remove_dir_all(&out_dir);

    let median = |v: &[(f64, u64)]| {
        let mut w: Vec<f64> = v.iter().map(|x| x.0).collect();
        w.sort_by(f64::total_cmp);
        let n = w.len();
        if n % 2 == 1 { w[n / 2] } else { (w[n / 2 - 1] + w[n / 2]) / 2.0 }
    };
    let min = |v: &[(f64, u64)]| v.iter().map(|x| x.0).fold(f64::INFINITY, f64::min);
    let peak = |v: &[(f64, u64)]| v.iter().map(|x| x.1).max().unwrap_or(0) as f64 * 1024.0;
    let (pmed, cmed) = (median(&p), median(&c));
    let (prss, crss) = (peak(&p), peak(&c));
    let extra = if prunec_args.is_empty() { String::new() } else { format!(" {}", prunec_args.join(" ")) };
    println!("Command: `prunec big.onnx -o out.onnx --ratio 0.5{extra}` against `cp big.onnx big.onnx.data DIR/`");
    println!("Machine: {}", crate::bench::machine_line());
    println!("Date: {} (UTC)", crate::bench::today_utc());
    println!("Runs: {runs} of each, alternating, after one untimed warm-up of each.");
    println!();
    println!(
        "| model GiB | prunec median s | prunec min s | cp median s | cp min s | time ratio (median) | prunec peak RSS MiB | cp peak RSS MiB | prunec peak RSS / model |"
    );
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    println!(
        "| {:.2} | {pmed:.2} | {:.2} | {cmed:.2} | {:.2} | {:.2}× | {:.0} | {:.1} | {:.1}% |",
        model_bytes as f64 / GIB,
        min(&p),
        min(&c),
        pmed / cmed,
        prss / MIB,
        crss / MIB,
        100.0 * prss / model_bytes as f64
    );
    println!();
    let rss_ok = prss < model_bytes as f64 / 4.0;
    let time_ok = pmed <= 3.0 * cmed;
    println!(
        "Goals: peak RSS under a quarter of the model: {}; wall time at most 3× the copy: {}.",
        if rss_ok { "met" } else { "NOT met" },
        if time_ok { "met" } else { "NOT met" }
    );
    Ok(())
}

const GNU_TIME: &str = "/usr/bin/time";
const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

/// Runs `cmd` under GNU time; its wall time in seconds (taken here) and peak RSS in KiB.
fn measure(cmd: std::process::Command, rusage: &Path) -> Result<(f64, u64)> {
    let mut timed = std::process::Command::new(GNU_TIME);
    timed.arg("-f").arg("%M").arg("-o").arg(rusage).arg(cmd.get_program()).args(cmd.get_args());
    timed.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    let start = std::time::Instant::now();
    let output = timed.output().with_context(|| format!("running {GNU_TIME} {}", cmd.get_program().display()))?;
    let wall = start.elapsed().as_secs_f64();
    ensure!(
        output.status.success(),
        "`{}` failed ({}): {}",
        cmd.get_program().display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let text = fs::read_to_string(rusage).with_context(|| format!("reading `{}`", rusage.display()))?;
    let last = text.lines().last().unwrap_or("").trim();
    Ok((wall, last.parse().with_context(|| format!("unexpected GNU time output `{last}`"))?))
}
