//! `prunec streams`: the dual-stream blocks of an MMDiT model, their twin ops and weights, and
//! how far the text weights are from the image weights.

use anyhow::{Context, Result};
use clap::Args;
use prunec::passes::streams::{Order, StreamReport, find_streams};
use std::fmt::Write;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct StreamsArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Print JSON: `prunec::passes::streams::StreamReport` (`{"blocks", "declined"}`).
    #[arg(long)]
    pub json: bool,
    /// Concrete shape of an input, as for `inspect`.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
}

pub(super) fn run(a: &StreamsArgs) -> Result<()> {
    let mut loaded = super::load(&a.model, &a.input_shapes)?;
    // As for `prunec blocks`: folded shape arithmetic leaves the branches' own ops, and turns
    // each stream's Reshape targets into constants the walk compares as shape arguments.
    let fold = prunec::passes::parse_pipeline("fold")?;
    prunec::passes::run_pipeline(&mut loaded.model, &fold, &mut Default::default())
        .with_context(|| format!("folding `{}`", a.model.display()))?;
    let report = find_streams(&loaded.model.graph);
    if a.json { super::emit(&format!("{}\n", serde_json::to_string_pretty(&report)?)) } else { super::emit(&text(&report)) }
}

/// One section per block: its streams, the twin ops by type, the twin weights with their
/// divergence; then the declined layers.
pub fn text(report: &StreamReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} dual-stream block(s), {} declined", report.blocks.len(), report.declined.len());
    for b in &report.blocks {
        let order = match b.order {
            Order::TextFirst => "[txt, img]",
            Order::ImageFirst => "[img, txt]",
        };
        let divergence = b.divergence.map_or("-".to_string(), |d| format!("{d:.4}"));
        let _ = writeln!(
            out,
            "block {} (layer {}): {order} on axis {}, {} twin ops, {} twin weights, {} text parameters, divergence {divergence}",
            b.index,
            b.layer,
            b.axis,
            b.ops.len(),
            b.weights.len(),
            b.text_parameters
        );
        let _ = writeln!(out, "  text  {} -> {}", b.text_input, b.text_output.as_deref().unwrap_or("(ends at the attention)"));
        let _ = writeln!(out, "  image {} -> {}", b.image_input, b.image_output);
        let _ = writeln!(out, "  anchors: {}", b.anchors.join(", "));
        if !b.shared.is_empty() {
            let _ = writeln!(out, "  shared: {}", b.shared.join(", "));
        }
        for [t, i] in &b.positional {
            let _ = writeln!(out, "  positional: {t} ~ {i}");
        }
        let _ = writeln!(out, "  {:<10} {:<60} image", "op", "text");
        for op in &b.ops {
            let _ = writeln!(out, "  {:<10} {:<60} {}", op.op_type, op.text, op.image);
        }
        let _ = writeln!(out, "  {:<14} {:>10}  {:<44} image", "shape", "divergence", "text weight");
        for w in &b.weights {
            let shape: Vec<String> = w.shape.iter().map(u64::to_string).collect();
            let d = w.divergence.map_or("-".to_string(), |d| format!("{d:.4}"));
            // Slice twins say which rows: SD3's last text modulation is (scale, shift), the
            // image's (shift, scale, ...).
            let rows = w.rows.as_ref().map_or(String::new(), |r| {
                format!(" (axis {} rows {}..{} ~ {}..{})", r.axis, r.text[0], r.text[1], r.image[0], r.image[1])
            });
            let _ = writeln!(out, "  {:<14} {:>10}  {:<44} {}{rows}", format!("[{}]", shape.join(",")), d, w.text, w.image);
        }
    }
    if !report.declined.is_empty() {
        let _ = writeln!(out, "declined:");
        for d in &report.declined {
            let _ = writeln!(out, "  layer {}: {}", d.layer, d.reason);
        }
    }
    out
}
