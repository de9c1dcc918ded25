//! `prunec inspect`: a model's interface, size and cost.

use super::args::InspectArgs;
use anyhow::Result;
use prunec::ir::{Model, ModelStats, Value, model_stats};
use serde::Serialize;

#[derive(Serialize)]
struct Summary {
    model: String,
    ir_version: i64,
    producer: String,
    opsets: Vec<(String, i64)>,
    inputs: Vec<Port>,
    outputs: Vec<Port>,
    ops: u64,
    #[serde(flatten)]
    stats: ModelStats,
    flops: u64,
    shape_inference_problem: Option<String>,
    unknown_shapes: usize,
}

#[derive(Serialize)]
struct Port {
    name: String,
    dtype: String,
    shape: String,
}

pub(super) fn run(a: &InspectArgs) -> Result<()> {
    let loaded = super::load(&a.model, &a.input_shapes)?;
    let model = &loaded.model;
    let stats = model_stats(model);
    let summary = Summary {
        model: a.model.display().to_string(),
        ir_version: model.shell.ir_version(),
        producer: format!("{} {}", model.shell.producer_name(), model.shell.producer_version()).trim().to_string(),
        opsets: model.shell.opset_import.iter().map(|o| (o.domain().to_string(), o.version())).collect(),
        inputs: ports(model, &model.graph.inputs, true),
        outputs: ports(model, &model.graph.outputs, false),
        ops: stats.op_histogram.values().sum(),
        flops: stats.macs.saturating_mul(2),
        shape_inference_problem: loaded.inference.problem.clone(),
        unknown_shapes: loaded.inference.unknown.len(),
        stats,
    };
    if a.json { super::emit(&format!("{}\n", serde_json::to_string_pretty(&summary)?)) } else { super::emit(&text(&summary)) }
}

fn ports(model: &Model, ids: &[prunec::ir::ValueId], skip_initializers: bool) -> Vec<Port> {
    ids.iter()
        .map(|&id| model.graph.value(id))
        .filter(|v| !(skip_initializers && v.initializer().is_some()))
        .map(|v: &Value| Port {
            name: v.name.clone(),
            dtype: v.dtype.map_or("?".into(), |d| d.to_string()),
            shape: v.shape.as_ref().map_or("?".into(), |s| s.to_string()),
        })
        .collect()
}

fn text(s: &Summary) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let opsets: Vec<String> = s.opsets.iter().map(|(d, v)| format!("{}:{v}", if d.is_empty() { "ai.onnx" } else { d })).collect();
    let _ = writeln!(out, "model       {}", s.model);
    let _ = writeln!(out, "format      ir_version {}, opsets {}, producer {:?}", s.ir_version, opsets.join(" "), s.producer);
    for p in &s.inputs {
        let _ = writeln!(out, "input       {}: {}{}", p.name, p.dtype, p.shape);
    }
    for p in &s.outputs {
        let _ = writeln!(out, "output      {}: {}{}", p.name, p.dtype, p.shape);
    }
    let mut hist: Vec<(&String, &u64)> = s.stats.op_histogram.iter().collect();
    hist.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let hist: Vec<String> = hist.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(out, "ops         {} ({})", s.ops, hist.join(", "));
    if s.stats.subgraph_ops > 0 {
        let _ = writeln!(out, "subgraphs   {} ops inside If/Loop/Scan bodies", s.stats.subgraph_ops);
    }
    let _ = writeln!(out, "parameters  {} ({})", group_digits(s.stats.parameters), bytes(s.stats.parameter_bytes));
    let _ = writeln!(out, "weights     {} in all constant tensors", bytes(s.stats.weight_bytes));
    if s.stats.external_tensors > 0 {
        let _ = writeln!(out, "external    {} tensors, {}", s.stats.external_tensors, bytes(s.stats.external_bytes));
    } else {
        let _ = writeln!(out, "external    none");
    }
    let _ = write!(out, "MACs        {} (FLOPs {})", si(s.stats.macs), si(s.flops));
    if !s.stats.macs_unknown.is_empty() {
        let _ = write!(out, "; {} Conv/Gemm/MatMul ops not counted: shapes unknown (try --input-shape)", s.stats.macs_unknown.len());
    }
    out.push('\n');
    if let Some(p) = &s.shape_inference_problem {
        let _ = writeln!(out, "shapes      inference incomplete: {p}");
    }
    if s.unknown_shapes > 0 {
        let _ = writeln!(out, "shapes      {} values without a complete shape", s.unknown_shapes);
    }
    out
}

fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn bytes(n: u64) -> String {
    if n >= 1 << 20 { format!("{:.2} MiB", n as f64 / (1u64 << 20) as f64) } else { format!("{:.1} KiB", n as f64 / 1024.0) }
}

fn si(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.3} G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.3} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.3} k", n as f64 / 1e3),
        n => n.to_string(),
    }
}
