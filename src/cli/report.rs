//! The report of a compile run: a table on stderr and, with `--report`, JSON (the schema is
//! `docs/report.schema.json`, checked by `tests/report_schema.rs`).

use super::args::CompileArgs;
use anyhow::{Context, Result};
use prunec::{Compiled, Recipe};
use std::path::Path;

/// The version of the JSON report's layout; a change that removes or renames a field bumps it.
pub const REPORT_SCHEMA_VERSION: u32 = 1;

/// What a compile run did, for the report.
pub struct Summary<'a> {
    /// The run.
    pub compiled: &'a Compiled,
    /// The effective recipe.
    pub recipe: &'a Recipe,
    /// The command line.
    pub args: &'a CompileArgs,
}

impl Summary<'_> {
    /// Prints the pass timings, each pass's details, sizes before and after, and verification.
    pub fn print(&self) {
        let c = self.compiled;
        for run in &c.runs {
            let ms = run.elapsed.as_secs_f64() * 1e3;
            match (run.report.ops_removed, run.report.values_removed) {
                (0, 0) => eprintln!("pass {:<8} {ms:.1} ms", run.name),
                (ops, values) => eprintln!("pass {:<8} {ms:.1} ms, removed {ops} ops and {values} values", run.name),
            }
            if self.args.verbose {
                let options: Vec<String> = run.options.iter().map(|(k, v)| format!("{k}={v}")).collect();
                if !options.is_empty() {
                    eprintln!("     options: {}", options.join(", "));
                }
            }
        }
        for line in c.runs.iter().filter_map(|r| r.report.details.as_ref()).flat_map(|d| d.summary()) {
            eprintln!("{line}");
        }
        if self.args.verbose {
            for p in c.runs.iter().filter_map(|r| r.report.details::<prunec::passes::prune::PruneReport>()) {
                for f in &p.frozen {
                    eprintln!("       frozen group {}: {}", f.id, f.reason);
                }
            }
        }
        let (before, after) = (&c.before, &c.after);
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
        if let Some(v) = &c.verification {
            eprintln!(
                "{:<12} {:>14.2}ms {:>14.2}ms {:>8}",
                "tract time",
                v.original_ms,
                v.pruned_ms,
                format!("{:.2}x", v.pruned_ms / v.original_ms)
            );
            eprintln!("{:<12} (verification's one cold run of each; `prunec bench ORIGINAL PRUNED` measures latency to rely on)", "");
            let shapes: Vec<String> = c.inputs.shapes.iter().map(|(n, s)| format!("{n}{s:?}")).collect();
            eprintln!("verify in tract on {} ({}):", c.inputs.source, shapes.join(", "));
            for o in &v.outputs {
                let reference = match v.reference.as_str() {
                    _ if o.vacuous.is_some() => format!("; vacuous: {} (this output proves nothing)", o.vacuous.as_deref().unwrap_or("")),
                    "exact" if v.judged => format!("; equals the original ({:.1e} of scale)", o.reference_rel),
                    _ if v.judged => match o.float_error {
                        Some(noise) => format!(
                            "; equals {} ({:.1e} of scale: over the tolerance {:.0e}, within {}× the float error of {:.1e} measured on the reference)",
                            v.reference_description,
                            o.reference_rel,
                            v.tolerance,
                            prunec::runtime::verify::FLOAT_ERROR_MARGIN,
                            noise
                        ),
                        None => format!("; equals {} ({:.1e} of scale)", v.reference_description, o.reference_rel),
                    },
                    _ => String::new(),
                };
                eprintln!(
                    "  output `{}`: max abs diff {:.3e} ({:.3e} of scale), cosine {:.6}{reference}",
                    o.name, o.max_abs, o.rel, o.cosine
                );
            }
            for why in &v.not_judged {
                eprintln!("  not judged against a reference: {why}");
            }
        }
    }

    /// Writes the whole report as JSON.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let Summary { compiled: c, recipe, args: a } = *self;
        let passes: Vec<serde_json::Value> = c
            .runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "options": r.options.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v.clone()))).collect::<serde_json::Map<_, _>>(),
                    "ms": r.elapsed.as_secs_f64() * 1e3,
                    "ops_removed": r.report.ops_removed,
                    "values_removed": r.report.values_removed,
                    "reference": r.report.reference.kind(),
                    "details": r.report.details.as_ref().map(|d| d.to_json()),
                })
            })
            .collect();
        let report = serde_json::json!({
            "schema_version": REPORT_SCHEMA_VERSION,
            "tool": { "name": "prunec", "version": env!("CARGO_PKG_VERSION") },
            "model": a.model,
            "output": if a.dry_run { None } else { a.output.as_ref() },
            "recipe": recipe,
            "inputs": c.inputs,
            "passes": passes,
            "before": c.before,
            "after": c.after,
            "verification": c.verification,
        });
        let text = serde_json::to_string_pretty(&report)? + "\n";
        std::fs::write(path, text).with_context(|| format!("writing the report `{}`", path.display()))
    }
}
