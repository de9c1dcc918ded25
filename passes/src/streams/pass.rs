//! The `single-stream` pass: tie the text branch of a suffix or range of dual-stream blocks to
//! the image branch (or the other way, or both to their average where the twins are aligned),
//! then run those blocks as single-stream blocks.

use super::convert::convert;
use super::twins::{DualBlock, RowRanges, StreamReport, TwinWeight, average_image_weights, find_streams, tie_text_weights};
use crate::options::{OptionSpec, PassOptions};
use crate::reference::{Reference, ReferenceEdit};
use crate::{Context, Pass, PassDetails, PassError, PassReport};
use prunec_ir::Model;
use serde::Serialize;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Which branch's weights the merged stream keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tie {
    /// The image branch (the text weights are overwritten by their twins).
    #[default]
    Image,
    /// The text branch (the image weights are overwritten by their twins; image rows with no
    /// text twin, such as SD3's last gates, keep their values).
    Text,
    /// The element-wise mean of both branches for the aligned twins (modulation rows, Q/K/V,
    /// output projections, norms' affine weights); the MLP keeps the image branch's weights,
    /// since hidden units are in an arbitrary order per stream and their mean means nothing.
    Average,
}

impl Tie {
    fn as_str(self) -> &'static str {
        match self {
            Tie::Image => "image",
            Tie::Text => "text",
            Tie::Average => "average",
        }
    }
}

/// The options of `single-stream`. `last` and `blocks` choose the blocks; setting one clears
/// the other, so the later one given wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SingleStreamOptions {
    /// Convert the last `K` dual-stream blocks.
    pub last: Option<usize>,
    /// Convert the dual-stream blocks `[start, end)`.
    pub blocks: Option<(usize, usize)>,
    /// Whose weights the merged stream keeps.
    pub tie: Tie,
}

impl Default for SingleStreamOptions {
    fn default() -> Self {
        SingleStreamOptions { last: Some(1), blocks: None, tie: Tie::Image }
    }
}

impl PassOptions for SingleStreamOptions {
    const SCHEMA: &'static [OptionSpec] = &[
        OptionSpec { key: "last", kind: "integer|none", default: "1", doc: "convert the last K dual-stream blocks (clears blocks)" },
        OptionSpec {
            key: "blocks",
            kind: "START..END|none",
            default: "none",
            doc: "convert the dual-stream blocks START..END-1 (clears last)",
        },
        OptionSpec {
            key: "tie",
            kind: "image|text|average",
            default: "image",
            doc: "which branch's weights the merged stream keeps; average: the mean of both for aligned weights, the image's for the MLP",
        },
    ];

    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "last" => {
                self.last = match value {
                    "none" => None,
                    v => Some(v.parse::<usize>().ok().filter(|&k| k > 0).ok_or("a positive integer or none")?),
                };
                if self.last.is_some() {
                    self.blocks = None;
                }
            }
            "blocks" => {
                self.blocks = match value {
                    "none" => None,
                    v => {
                        let (a, b) = v.split_once("..").ok_or("START..END")?;
                        let (a, b) = (a.parse::<usize>().map_err(|_| "START..END")?, b.parse::<usize>().map_err(|_| "START..END")?);
                        if a >= b {
                            return Err("START..END with START < END".into());
                        }
                        Some((a, b))
                    }
                };
                if self.blocks.is_some() {
                    self.last = None;
                }
            }
            "tie" => {
                self.tie = match value {
                    "image" => Tie::Image,
                    "text" => Tie::Text,
                    "average" => Tie::Average,
                    _ => return Err("image, text or average".into()),
                }
            }
            _ => return Err(format!("no option `{key}`")),
        }
        Ok(())
    }

    fn get(&self, key: &str) -> String {
        match key {
            "last" => self.last.map_or("none".into(), |k| k.to_string()),
            "blocks" => self.blocks.map_or("none".into(), |(a, b)| format!("{a}..{b}")),
            "tie" => self.tie.as_str().into(),
            _ => String::new(),
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.last.is_none() && self.blocks.is_none() {
            return Err("give last=K or blocks=START..END".into());
        }
        Ok(())
    }
}

/// Dual-to-single stream conversion of MMDiT blocks.
pub struct SingleStream {
    /// Its options.
    pub options: SingleStreamOptions,
}

/// What `single-stream` did.
#[derive(Clone, Debug, Serialize)]
pub struct SingleStreamReport {
    /// Whose weights were kept.
    pub tie: Tie,
    /// Dual-stream blocks found.
    pub dual_blocks: usize,
    /// The blocks converted.
    pub blocks: Vec<BlockParameters>,
    /// Float weight elements of the model before and after.
    pub parameters_before: u64,
    /// After.
    pub parameters_after: u64,
}

/// One converted block's weights.
#[derive(Clone, Debug, Serialize)]
pub struct BlockParameters {
    /// Position among the dual-stream blocks.
    pub index: usize,
    /// Its twin weights, both branches, before.
    pub before: u64,
    /// The kept branch's, after.
    pub after: u64,
    /// The data-free divergence of its twins before tying.
    pub divergence: Option<f64>,
}

impl PassDetails for SingleStreamReport {
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn summary(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "single-stream: {} of {} dual-stream blocks converted ({}), parameters {} -> {}",
            self.blocks.len(),
            self.dual_blocks,
            match self.tie {
                Tie::Image => "weights of the image branch",
                Tie::Text => "weights of the text branch",
                Tie::Average => "aligned weights averaged, the MLP's of the image branch",
            },
            self.parameters_before,
            self.parameters_after
        )];
        for b in &self.blocks {
            let d = b.divergence.map_or("-".into(), |d| format!("{d:.4}"));
            lines.push(format!("       block {}: twin weights {} -> {}, divergence {d}", b.index, b.before, b.after));
        }
        lines
    }
}

/// The reference: the original with the tied branch's weights overwritten by their twins
/// (for `tie=average`, both twins set to the merged weights), which the conversion computes
/// exactly.
struct Tied {
    blocks: Vec<DualBlock>,
    average: bool,
}

/// Makes both twins of `block` hold the weights the merged stream keeps: `block`'s image
/// weights (already swapped for `tie=text`), averaged first for `tie=average`.
fn merge(graph: &mut prunec_ir::Graph, block: &DualBlock, average: bool) -> Result<(), String> {
    if average {
        average_image_weights(graph, block)?;
    }
    tie_text_weights(graph, block).map(|_| ())
}

impl ReferenceEdit for Tied {
    fn kind(&self) -> &'static str {
        "reference"
    }

    fn describe(&self) -> String {
        if self.average {
            "the original with the converted blocks' twin weights tied to their average (MLP: the image's)".into()
        } else {
            "the original with the converted blocks' twin weights tied".into()
        }
    }

    fn apply(&self, reference: &mut Model) -> Result<(), String> {
        for b in &self.blocks {
            merge(&mut reference.graph, b, self.average)?;
        }
        Ok(())
    }
}

/// `block` with its streams' weights swapped, so that tying its text weights ties the image
/// weights to the text branch.
fn swapped(block: &DualBlock) -> DualBlock {
    let mut b = block.clone();
    b.weights = block
        .weights
        .iter()
        .map(|w| TwinWeight {
            text: w.image.clone(),
            image: w.text.clone(),
            rows: w.rows.as_ref().map(|r| RowRanges { axis: r.axis, text: r.image, image: r.text }),
            ..w.clone()
        })
        .collect();
    b
}

fn parameters(model: &Model) -> u64 {
    let g = &model.graph;
    g.value_ids().filter_map(|v| g.value(v).initializer()).filter(|t| t.dtype().is_float()).map(|t| t.numel()).sum()
}

impl Pass for SingleStream {
    fn name(&self) -> &'static str {
        "single-stream"
    }

    fn options(&self) -> Vec<(&'static str, String)> {
        self.options.values()
    }

    fn needs_shapes(&self) -> bool {
        true
    }

    fn run(&self, model: &mut Model, cx: &mut Context) -> Result<PassReport, PassError> {
        // Matching compares Reshape targets and slices as constants: fold shape arithmetic first
        // (exact).
        crate::cleanup::FoldConstants.run(model, cx)?;
        let report: StreamReport = find_streams(&model.graph);
        let n = report.blocks.len();
        let range = match (self.options.last, self.options.blocks) {
            (_, Some((a, b))) => a..b,
            (Some(k), None) => n.saturating_sub(k)..n,
            (None, None) => return Err(PassError::BadOption("single-stream: give last=K or blocks=START..END".into())),
        };
        if range.end > n || range.start >= range.end || (self.options.last.is_some_and(|k| k > n)) {
            let why = report.declined.iter().map(|d| format!("layer {}: {}", d.layer, d.reason)).collect::<Vec<_>>().join("; ");
            return Err(PassError::BadOption(format!(
                "single-stream: blocks {}..{} asked, the model has {n} dual-stream blocks{}",
                range.start,
                range.end,
                if why.is_empty() { String::new() } else { format!(" (declined: {why})") }
            )));
        }
        let chosen: Vec<DualBlock> =
            report.blocks[range.clone()].iter().map(|b| if self.options.tie == Tie::Text { swapped(b) } else { b.clone() }).collect();
        let average = self.options.tie == Tie::Average;
        let before = parameters(model);
        let mut tied = model.clone();
        for b in &chosen {
            merge(&mut tied.graph, b, average).map_err(PassError::BadOption)?;
        }
        convert(&mut tied, &report, range.clone()).map_err(|e| PassError::BadOption(format!("single-stream: {e}")))?;
        let ops_before = model.graph.op_count();
        let values_before = model.graph.value_ids().count();
        *model = tied;
        let details = SingleStreamReport {
            tie: self.options.tie,
            dual_blocks: n,
            blocks: report.blocks[range]
                .iter()
                .map(|b| {
                    let image: BTreeSet<&str> = b.weights.iter().map(|w| w.image.as_str()).collect();
                    let kept: u64 = image
                        .iter()
                        .filter_map(|w| model.graph.value_by_name(w))
                        .filter_map(|v| model.graph.value(v).initializer())
                        .map(|t| t.numel())
                        .sum();
                    BlockParameters { index: b.index, before: b.text_parameters + kept, after: kept, divergence: b.divergence }
                })
                .collect(),
            parameters_before: before,
            parameters_after: parameters(model),
        };
        Ok(PassReport {
            ops_removed: ops_before.saturating_sub(model.graph.op_count()),
            values_removed: values_before.saturating_sub(model.graph.value_ids().count()),
            reference: Reference::Edit(Arc::new(Tied { blocks: chosen, average })),
            details: Some(Arc::new(details)),
            warnings: Vec::new(),
        })
    }
}
