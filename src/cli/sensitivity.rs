//! `prunec sensitivity`: what each group's channels cost the outputs, measured by dry runs.

use anyhow::{Context, Result};
use clap::Args;
use prunec::passes::PassOptions;
use prunec::passes::prune::{FrozenGroup, PROBE_RATIOS, PruneOptions, SensitivityTable, sensitivity_table};
use std::fmt::Write;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct SensitivityArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Print JSON: `{"table": prunec::passes::prune::SensitivityTable, "frozen": [...]}`.
    #[arg(long)]
    pub json: bool,
    /// Concrete shape of an input, as for `inspect`.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
    /// Inputs (`.npz`) to run on; seeded noise without them.
    #[arg(long, value_name = "FILE.npz")]
    pub inputs: Option<PathBuf>,
    /// The shares of each group's channels to remove, one dry run each. [default: 0.3,0.6,0.9,
    /// the ratios the sensitivity allocation of `--target` measures]
    #[arg(long, value_delimiter = ',', value_name = "R,R,...", value_parser = parse_share)]
    pub ratios: Vec<f64>,
    /// The criterion that ranks each group's channels (as for the default command). [default: l2]
    #[arg(long, value_parser = super::args::prune_value("criterion"))]
    pub criterion: Option<String>,
    /// Seed of the synthetic inputs and of the random criterion. [default: 0]
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub(super) fn run(a: &SensitivityArgs) -> Result<()> {
    let mut options = PruneOptions::default();
    if let Some(c) = &a.criterion {
        options.set("criterion", c).map_err(|e| anyhow::anyhow!("--criterion: {e}"))?; // checked by clap
    }
    options.seed = a.seed;
    let ratios = if a.ratios.is_empty() { PROBE_RATIOS.to_vec() } else { a.ratios.clone() };
    // Checked before the work: reading and folding a large model takes a while.
    let given = match &a.inputs {
        Some(file) => Some(std::fs::metadata(file).map(|_| file.as_path()).with_context(|| format!("cannot read `{}`", file.display()))?),
        None => None,
    };
    let mut loaded = super::load(&a.model, &a.input_shapes)?;
    // The default pipeline folds shape arithmetic before pruning; the groups are the same here.
    let fold = prunec::passes::parse_pipeline("dce,fold")?;
    prunec::passes::run_pipeline(&mut loaded.model, &fold, &mut Default::default())
        .with_context(|| format!("folding `{}`", a.model.display()))?;
    let mut runtime = super::tract_runtime(&loaded, &a.input_shapes, given, a.seed)?;
    let mut bar = super::progress::Bars::new(true);
    let mut cx = prunec::passes::Context::with_runtime(&mut runtime).with_progress(&mut bar);
    let (table, frozen) = sensitivity_table(&loaded.model, &options, &ratios, &mut cx)
        .with_context(|| format!("measuring the groups of `{}`", a.model.display()))?;
    if a.json {
        let json = serde_json::json!({ "table": table, "frozen": frozen });
        super::emit(&format!("{}\n", serde_json::to_string_pretty(&json)?))
    } else {
        super::emit(&text(&table, &frozen))
    }
}

fn parse_share(s: &str) -> Result<f64, String> {
    let r: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if (0.0..1.0).contains(&r) { Ok(r) } else { Err(format!("{r} is not a share in [0, 1)")) }
}

/// The table: one row per candidate group, one loss column per ratio.
pub fn text(table: &SensitivityTable, frozen: &[FrozenGroup]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} groups measured alone, {} runs on {}; channels chosen by the {} criterion",
        table.groups.len(),
        table.runs,
        table.measured_on,
        table.criterion
    );
    let largest = table.ratios.iter().copied().fold(0.0, f64::max);
    let _ = write!(out, "{:>5} {:>8} {:>11}", "group", "channels", format!("params@{largest}"));
    for r in &table.ratios {
        let _ = write!(out, " {:>9}", format!("@{r}"));
    }
    let _ = writeln!(out, "  node");
    for g in &table.groups {
        let at_largest = table.ratios.iter().position(|&r| r == largest).and_then(|k| g.params_saved.get(k)).copied().unwrap_or(0.0);
        let _ = write!(out, "{:>5} {:>8} {:>10.1}%", g.id, g.channels, 100.0 * at_largest);
        for loss in &g.loss {
            let cell = match loss {
                Some(l) => format!("{:.3e}", l.sqrt()),
                None => "-".into(),
            };
            let _ = write!(out, " {cell:>9}");
        }
        let _ = writeln!(out, "  {}", g.node);
    }
    let _ = writeln!(
        out,
        "each cell: relative L2 change of the outputs (‖y − y′‖ / ‖y‖, mean of squares over outputs) with that share of the group's lowest-scored channels removed; params@R: share of the model's parameters that the largest ratio's removal saves alone; -: not measurable (no consumer weights, or outputs not finite)"
    );
    if !frozen.is_empty() {
        let _ = writeln!(out, "{} groups are not candidates (`prunec groups MODEL` lists why)", frozen.len());
    }
    out
}
