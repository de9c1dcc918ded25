//! The report of a compile run: a table on stderr and, with `--report`, JSON.

use super::args::CompileArgs;
use anyhow::{Context, Result};
use prunec::ir::ModelStats;
use prunec::passes::PassRun;
use prunec::passes::prune::PruneReport;
use prunec::runtime::verify::Verification;
use std::path::Path;

/// What a compile run did, for the report.
pub struct Summary<'a> {
    /// The passes run, with their reports and timings.
    pub runs: &'a [PassRun],
    /// The last channel-pruning report, if `prune` ran.
    pub prune: Option<&'a PruneReport>,
    /// Figures of the model as read.
    pub before: &'a ModelStats,
    /// Figures of the model as written.
    pub after: &'a ModelStats,
    /// What verification found, if it ran.
    pub verification: Option<&'a Verification>,
    /// The command line.
    pub args: &'a CompileArgs,
}

impl Summary<'_> {
    /// Prints the pass timings, the pruning summary, sizes before and after, and verification.
    pub fn print(&self) {
        let Summary { runs, prune, before, after, verification, args: a, .. } = *self;
        for run in runs {
            eprintln!(
                "pass {:<8} removed {} ops, {} values in {:.1} ms",
                run.name,
                run.report.ops_removed,
                run.report.values_removed,
                run.elapsed.as_secs_f64() * 1e3
            );
        }
        if let Some(p) = prune {
            let pruned = p.groups.iter().filter(|g| !g.removed.is_empty()).count();
            let how = match a.prune.target {
                Some(t) => format!("target {}, found ratio {:.3}", serde_json::to_string(&t).unwrap_or_default(), p.ratio),
                None => format!("ratio {}", p.ratio),
            };
            let scope = if a.prune.global { "across groups" } else { "per group" };
            eprintln!(
                "prune: {:?} criterion, {how} {scope}: {pruned} of {} prunable groups pruned ({} frozen), {} of {} channels removed",
                a.prune.criterion,
                p.groups.len(),
                p.frozen.len(),
                p.channels_removed,
                p.channels_prunable
            );
            eprintln!(
                "       {} weights sliced ({} copied for differing uses), {} shape constants or attributes rewritten",
                p.weights_sliced, p.weights_copied, p.shape_edits
            );
            if let Some(source) = &p.calibration {
                eprintln!("       statistics measured on {source}");
            }
            if let Some(c) = &p.compensation {
                let refit = match c.refit_levels {
                    0 => String::new(),
                    n => format!(", refit in {n} levels on the pruned prefix"),
                };
                eprintln!(
                    "       compensated {} layers ({} with statistics from {}{refit})",
                    c.layers_compensated, c.layers_with_statistics, c.hessian
                );
                for note in &c.notes {
                    eprintln!("       not compensated: {note}");
                }
            }
        }
        let change = |b: u64, a: u64| if b == 0 { String::new() } else { format!("{:+.1}%", (a as f64 / b as f64 - 1.0) * 100.0) };
        eprintln!("{:<12} {:>16} {:>16} {:>8}", "", "before", "after", "change");
        for (name, b, x) in [
            ("parameters", before.parameters, after.parameters),
            ("MACs", before.macs, after.macs),
            ("weight bytes", before.weight_bytes, after.weight_bytes),
            ("ops", before.op_histogram.values().sum(), after.op_histogram.values().sum()),
        ] {
            eprintln!("{name:<12} {b:>16} {x:>16} {:>8}", change(b, x));
        }
        if let Some(v) = verification {
            eprintln!(
                "{:<12} {:>14.2}ms {:>14.2}ms {:>8}",
                "tract time",
                v.original_ms,
                v.pruned_ms,
                format!("{:.2}x", v.pruned_ms / v.original_ms)
            );
            eprintln!("{:<12} (median of 3 runs each, alternating; `prunec bench ORIGINAL PRUNED` measures latency to rely on)", "");
            let inputs = a
                .inputs
                .as_ref()
                .map_or_else(|| format!("random inputs (seed {})", a.prune.seed), |p| format!("inputs from `{}`", p.display()));
            eprintln!("verify in tract on {inputs}:");
            let masked_reference = if prune.is_some_and(|p| !p.compensated.is_empty()) { "compensated and masked" } else { "masked" };
            for o in &v.outputs {
                let masked = match o.masked_rel {
                    Some(r) if v.masking_expected => format!("; equals the {masked_reference} original ({r:.1e} of scale)"),
                    Some(r) => format!("; {masked_reference} original differs by {r:.1e} of scale (not expected equal)"),
                    None => String::new(),
                };
                eprintln!("  output `{}`: max abs diff {:.3e} ({:.3e} of scale), cosine {:.6}{masked}", o.name, o.max_abs, o.rel, o.cosine);
            }
            for why in &v.masking_not_expected {
                eprintln!("  masking equivalence not expected: {why}");
            }
        }
    }

    /// Writes the whole report as JSON.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let Summary { runs, prune, before, after, verification, args: a } = *self;
        let passes: Vec<serde_json::Value> = runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "ms": r.elapsed.as_secs_f64() * 1e3,
                    "ops_removed": r.report.ops_removed,
                    "values_removed": r.report.values_removed,
                })
            })
            .collect();
        let report = serde_json::json!({
            "model": a.model,
            "output": if a.dry_run { None } else { a.output.as_ref() },
            "options": a.prune_options(),
            "passes": passes,
            "before": before,
            "after": after,
            "prune": prune,
            "verification": verification,
        });
        let text = serde_json::to_string_pretty(&report)? + "\n";
        std::fs::write(path, text).with_context(|| format!("writing the report `{}`", path.display()))
    }
}
