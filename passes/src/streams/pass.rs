//! The `single-stream` pass: tie the text branch of a suffix or range of dual-stream blocks to
//! the image branch (or the other way, or both to their average where the twins are aligned),
//! then run those blocks as single-stream blocks.

use super::convert::convert;
use super::linear::{TextMap, add_text_map, fit_text_map};
use super::twins::{DualBlock, RowRanges, StreamReport, TwinWeight, average_image_weights, find_streams, tie_text_weights};
use crate::measure::Inputs;
use crate::options::{OptionSpec, PassOptions};
use crate::reference::{Reference, ReferenceEdit};
use crate::{Context, Pass, PassDetails, PassError, PassReport};
use prunec_ir::{Model, ValueId};
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

/// What a converted block does with the text stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TextStream {
    /// The merged block's weights update the text tokens too: the block is single-stream.
    #[default]
    Tied,
    /// PPCL: the text stream's update in the block is one fitted affine map of the text stream
    /// entering it ([`super::fit_text_map`]); the image branch runs on the joint sequence as
    /// for `tied` (its attention reads the text tokens entering the block, through the merged
    /// weights), and the map's output is the text stream that later blocks read.
    Linear,
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
    /// What the converted blocks do with the text stream.
    pub text: TextStream,
}

impl Default for SingleStreamOptions {
    fn default() -> Self {
        SingleStreamOptions { last: Some(1), blocks: None, tie: Tie::Image, text: TextStream::Tied }
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
        OptionSpec {
            key: "text",
            kind: "tied|linear",
            default: "tied",
            doc: "linear (PPCL): each converted block's text update becomes an affine map fitted on the text stream measured on --inputs (else seeded noise)",
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
            "text" => {
                self.text = match value {
                    "tied" => TextStream::Tied,
                    "linear" => TextStream::Linear,
                    _ => return Err("tied or linear".into()),
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
            "text" => match self.text {
                TextStream::Tied => "tied".into(),
                TextStream::Linear => "linear".into(),
            },
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
    /// What the converted blocks do with the text stream.
    pub text: TextStream,
    /// For `text=linear`: where the text stream was measured (the inputs' file, or the noise).
    pub measured_on: Option<String>,
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
    /// For `text=linear`, the fitted text map; `None` where the block has no text output.
    pub text_map: Option<TextMapReport>,
}

/// A fitted text map, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct TextMapReport {
    /// The map's weight and bias value names.
    pub weight: String,
    /// Its bias.
    pub bias: String,
    /// Token rows it was fitted on.
    pub samples: usize,
    /// `‖y − (x·W + b)‖ / ‖y − x‖` on those rows (1 is the identity's).
    pub residual: Option<f64>,
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
            let map = match &b.text_map {
                Some(m) => format!(
                    ", text map fitted on {} tokens, residual {} of the identity's",
                    m.samples,
                    m.residual.map_or("-".into(), |r| format!("{r:.3e}"))
                ),
                None if self.text == TextStream::Linear => ", no text output to map".into(),
                None => String::new(),
            };
            lines.push(format!("       block {}: twin weights {} -> {}, divergence {d}{map}", b.index, b.before, b.after));
        }
        if let Some(source) = &self.measured_on {
            lines.push(format!("       text stream measured on {source}"));
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
        let linear = self.options.text == TextStream::Linear;
        // PPCL: the text stream entering and leaving each chosen block of the original model.
        let (maps, measured_on) = if linear { fit_maps(model, &report.blocks[range.clone()], cx)? } else { (Vec::new(), None) };
        let before = parameters(model);
        let mut tied = model.clone();
        for b in &chosen {
            merge(&mut tied.graph, b, average).map_err(PassError::BadOption)?;
        }
        let mut map_reports: Vec<Option<TextMapReport>> = vec![None; chosen.len()];
        if linear {
            // One block at a time, so that each block's text output can become its own map: a
            // converted block leaves the dual-stream blocks, so the next chosen one is found
            // again at the same position.
            for (k, map) in maps.iter().enumerate() {
                let again = find_streams(&tied.graph);
                let block = again.blocks.get(range.start).filter(|b| b.anchors == chosen[k].anchors).ok_or_else(|| {
                    PassError::BadOption(format!(
                        "single-stream: block {} is not found again after converting the ones before",
                        range.start + k
                    ))
                })?;
                if let (Some(map), Some(out)) = (map, &block.text_output) {
                    let g = &mut tied.graph;
                    let missing = |name: &str| PassError::BadOption(format!("single-stream: no value `{name}`"));
                    let (x, y) = (
                        g.value_by_name(&block.text_input).ok_or_else(|| missing(&block.text_input))?,
                        g.value_by_name(out).ok_or_else(|| missing(out))?,
                    );
                    let prefix = format!("{}/single_stream/text_map", block.text_input);
                    let mapped = add_text_map(g, x, map, &prefix).map_err(|e| PassError::BadOption(format!("single-stream: {e}")))?;
                    for (reader, _) in g.consumers(y) {
                        g.replace_input(reader, y, mapped);
                    }
                    map_reports[k] = Some(TextMapReport {
                        weight: format!("{prefix}.weight"),
                        bias: format!("{prefix}.bias"),
                        samples: map.samples,
                        residual: map.residual,
                    });
                }
                convert(&mut tied, &again, range.start..range.start + 1)
                    .map_err(|e| PassError::BadOption(format!("single-stream: {e}")))?;
            }
        } else {
            convert(&mut tied, &report, range.clone()).map_err(|e| PassError::BadOption(format!("single-stream: {e}")))?;
        }
        let ops_before = model.graph.op_count();
        let values_before = model.graph.value_ids().count();
        *model = tied;
        let map_parameters = |m: &Option<TextMapReport>| -> u64 {
            m.iter()
                .flat_map(|m| [&m.weight, &m.bias])
                .filter_map(|w| model.graph.value_by_name(w))
                .filter_map(|v| model.graph.value(v).initializer())
                .map(|t| t.numel())
                .sum()
        };
        let details = SingleStreamReport {
            tie: self.options.tie,
            text: self.options.text,
            measured_on,
            dual_blocks: n,
            blocks: report.blocks[range]
                .iter()
                .zip(map_reports)
                .map(|(b, text_map)| {
                    let image: BTreeSet<&str> = b.weights.iter().map(|w| w.image.as_str()).collect();
                    let kept: u64 = image
                        .iter()
                        .filter_map(|w| model.graph.value_by_name(w))
                        .filter_map(|v| model.graph.value(v).initializer())
                        .map(|t| t.numel())
                        .sum();
                    let after = kept + map_parameters(&text_map);
                    BlockParameters { index: b.index, before: b.text_parameters + kept, after, divergence: b.divergence, text_map }
                })
                .collect(),
            parameters_before: before,
            parameters_after: parameters(model),
        };
        let reference = if linear {
            Reference::Unjudged {
                why: vec![
                    "single-stream text=linear: the text stream of each converted block is a least-squares fit of the measured one, which no edit of the original computes".into(),
                ],
            }
        } else {
            Reference::Edit(Arc::new(Tied { blocks: chosen, average }))
        };
        Ok(PassReport {
            ops_removed: ops_before.saturating_sub(model.graph.op_count()),
            values_removed: values_before.saturating_sub(model.graph.value_ids().count()),
            reference,
            details: Some(Arc::new(details)),
            warnings: Vec::new(),
        })
    }
}

/// Measures the text stream entering and leaving each of `blocks` in `model` (on the user's
/// inputs, else on seeded noise) and fits each block's map; `None` for a block whose text
/// branch ends at the attention (nothing reads a text output to replace). Also says where it
/// measured.
fn fit_maps(model: &Model, blocks: &[DualBlock], cx: &mut Context) -> Result<(Vec<Option<TextMap>>, Option<String>), PassError> {
    let g = &model.graph;
    let value = |name: &str| g.value_by_name(name).ok_or_else(|| PassError::BadOption(format!("single-stream: no value `{name}`")));
    let mut pairs: Vec<Option<(ValueId, ValueId)>> = Vec::new();
    for b in blocks {
        pairs.push(match &b.text_output {
            Some(out) => Some((value(&b.text_input)?, value(out)?)),
            None => None,
        });
    }
    let probes: Vec<ValueId> = pairs.iter().flatten().flat_map(|&(x, y)| [x, y]).collect();
    if probes.is_empty() {
        return Ok((pairs.iter().map(|_| None).collect(), None));
    }
    // Eight samples where the batch is open, as for the other passes' data-free statistics.
    let inputs = if cx.has_inputs() { Inputs::Given } else { Inputs::Noise { samples: 8, seed: 0 } };
    let mut measure = cx.measure(model, inputs).map_err(|e| PassError::Measure(format!("single-stream text=linear: {e}")))?;
    let source = measure.source().to_string();
    let captured = measure.capture(model, &probes).map_err(|e| PassError::Measure(format!("single-stream text=linear: {e}")))?;
    let mut maps = Vec::new();
    for (b, pair) in blocks.iter().zip(&pairs) {
        let Some((x, y)) = pair else {
            maps.push(None);
            continue;
        };
        let (Some(ax), Some(ay)) = (captured.get(x), captured.get(y)) else {
            return Err(PassError::Measure(format!("single-stream text=linear: block {}'s text stream was not computed", b.index)));
        };
        let d = ax.shape.last().copied().unwrap_or(0);
        if ax.shape != ay.shape {
            return Err(PassError::Measure(format!("single-stream text=linear: block {}'s text stream changes shape", b.index)));
        }
        let map = fit_text_map(&ax.values, &ay.values, d)
            .map_err(|e| PassError::Measure(format!("single-stream text=linear: block {}: {e}", b.index)))?;
        maps.push(Some(map));
    }
    Ok((maps, Some(source)))
}
