//! `prunec blocks`: the removable residual layers of a model.

use anyhow::{Context, Result};
use clap::Args;
use prunec::passes::layers::{Aggregate, BlockReport, DeclineReason, Layer, MeasuredScores, find_blocks, measured_scores};
use std::fmt::Write;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct BlocksArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Print JSON: `prunec::passes::layers::BlockReport` (`{"layers", "stacks", "declined"}`).
    #[arg(long)]
    pub json: bool,
    /// Concrete shape of an input, as for `inspect`.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
    /// Inputs (`.npz`) to measure the data-driven scores on: block influence and the output
    /// change when the layer alone is removed (added to the table, and to the JSON as
    /// `measured`: `prunec::passes::layers::MeasuredScores`).
    #[arg(long, value_name = "FILE.npz")]
    pub inputs: Option<PathBuf>,
}

pub(super) fn run(a: &BlocksArgs) -> Result<()> {
    let mut loaded = super::load(&a.model, &a.input_shapes)?;
    // Folded shape arithmetic turns Shape reads of fixed axes into constants, so a branch's
    // size computations stop looking like values shared with the rest of the graph.
    let fold = prunec::passes::parse_pipeline("fold")?;
    prunec::passes::run_pipeline(&mut loaded.model, &fold, &mut Default::default())
        .with_context(|| format!("folding `{}`", a.model.display()))?;
    let report = find_blocks(&loaded.model.graph);
    let measured = match &a.inputs {
        Some(file) => Some(measure(&loaded, &report, &a.input_shapes, file)?),
        None => None,
    };
    if a.json {
        let mut json = serde_json::to_value(&report)?;
        if let (Some(m), Some(object)) = (&measured, json.as_object_mut()) {
            object.insert("measured".into(), serde_json::to_value(m)?);
        }
        super::emit(&format!("{}\n", serde_json::to_string_pretty(&json)?))
    } else {
        let mut out = text(&report);
        if let Some(m) = &measured {
            out += &measured_text(m);
        }
        super::emit(&out)
    }
}

/// The data-driven scores of every layer on the inputs of `file`, run in tract.
fn measure(
    loaded: &prunec::frontend::Loaded,
    report: &BlockReport,
    input_shapes: &[String],
    file: &std::path::Path,
) -> Result<MeasuredScores> {
    let mut runtime = super::tract_runtime(loaded, input_shapes, Some(file), 0)?;
    let mut cx = prunec::passes::Context::with_runtime(&mut runtime);
    measured_scores(&loaded.model, report, Aggregate::Mean, &mut cx).context("measuring the layers' scores")
}

/// The measured scores, one row per layer.
fn measured_text(m: &MeasuredScores) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "measured on {}: {} input set(s) ({}), {} runs",
        m.inputs.as_deref().unwrap_or("the inputs"),
        m.input_sets,
        m.input_sets_note,
        m.runs
    );
    let _ = writeln!(out, "{:>5} {:>12} {:>12}", "layer", "influence", "ablation");
    for l in &m.layers {
        let _ = writeln!(out, "{:>5} {:>12.4e} {:>12.4e}", l.layer, l.influence, l.ablation);
    }
    let _ = writeln!(
        out,
        "influence: mean 1 − cos(x_in, x_out) per token and stream; ablation: relative L2 change of the outputs with the layer alone removed"
    );
    out
}

/// The table: one row per layer, then the declined candidates.
pub fn text(report: &BlockReport) -> String {
    let mut out = String::new();
    let sizes: Vec<String> = report.stacks.iter().map(|s| s.layers.len().to_string()).collect();
    let _ = writeln!(
        out,
        "{} in {} ({}), {} declined",
        plural(report.layers.len(), "layer"),
        plural(report.stacks.len(), "stack"),
        if sizes.is_empty() { "none".to_string() } else { sizes.join(" + ") },
        report.declined.len()
    );
    let _ =
        writeln!(out, "{:>5} {:>9}  {:<28} {:>6} {:>11} {:>13}  score", "layer", "stack.pos", "sub-blocks", "nodes", "parameters", "MACs");
    for layer in &report.layers {
        let macs = format!("{}{}", layer.macs, if layer.macs_incomplete { "+?" } else { "" });
        let _ = writeln!(
            out,
            "{:>5} {:>9}  {:<28} {:>6} {:>11} {:>13}  {}",
            layer.index,
            format!("{}.{}", layer.stack, layer.position),
            layer.sub_block_summary(),
            layer.nodes,
            layer.parameters,
            macs,
            score(layer)
        );
    }
    if !report.declined.is_empty() {
        let _ = writeln!(out, "declined:");
        for d in &report.declined {
            let _ = writeln!(out, "  {}: {}", d.add, d.text);
        }
    }
    if report.declined.iter().any(|d| d.reason == DeclineReason::ShapeUnknown) {
        let _ = writeln!(out, "note: --input-shape gives shape inference the sizes to prove those sums keep their skip's shape");
    }
    out
}

/// The weight proxy (lower: removed first), and whether the position prior keeps the layer.
fn score(layer: &Layer) -> String {
    let proxy = layer.score.weight_proxy.map_or("-".to_string(), |p| format!("{p:.3e}"));
    if layer.score.protected { format!("{proxy} (kept: first or last layer)") } else { proxy }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 { format!("1 {what}") } else { format!("{n} {what}s") }
}
