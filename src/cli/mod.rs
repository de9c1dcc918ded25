//! The only module that knows about the terminal, clap and exit codes.

pub mod args;
mod inspect;
mod report;

use anyhow::{Context, Result};
use args::{Cli, Command, CompileArgs};
use prunec::backends::onnx::{WriteOptions, write_model};
use prunec::frontend::{Loaded, ReadOptions, read_model};
use prunec::ir::model_stats;
use std::path::Path;

/// Runs one invocation.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Inspect(a)) => inspect::run(&a),
        Some(Command::Dump(a)) => {
            let loaded = load(&a.model, &a.input_shapes)?;
            emit(&prunec::ir::dump(&loaded.model))
        }
        Some(Command::Groups(a)) => {
            let mut loaded = load(&a.model, &a.input_shapes)?;
            if !a.no_fold {
                let fold = prunec::passes::parse_pipeline("fold", &Default::default())?;
                prunec::passes::run_pipeline(&mut loaded.model, &fold).with_context(|| format!("folding `{}`", a.model.display()))?;
            }
            let groups = prunec::ir::analyse_groups(&loaded.model.graph);
            if a.json { emit(&format!("{}\n", serde_json::to_string_pretty(&groups)?)) } else { emit(&groups.to_string()) }
        }
        Some(Command::Passes) => {
            let list: String = prunec::passes::REGISTRY.iter().map(|r| format!("{:<12} {}\n", r.name, r.summary)).collect();
            emit(&list)
        }
        None => compile(&cli.compile),
    }
}

/// Writes a command's report to stdout. A closed pipe (`prunec dump m.onnx | head`) ends the
/// output quietly instead of failing.
pub(crate) fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

/// Reads a model, with shape inference at the given input shapes.
pub(crate) fn load(path: &Path, input_shapes: &[String]) -> Result<Loaded> {
    let mut loaded = read_model(path, &ReadOptions { infer_shapes: input_shapes.is_empty() })
        .with_context(|| format!("reading `{}`", path.display()))?;
    if !input_shapes.is_empty() {
        let graph = &loaded.model.graph;
        let names: Vec<String> =
            graph.inputs.iter().filter(|&&v| graph.value(v).initializer().is_none()).map(|&v| graph.value(v).name.clone()).collect();
        let shapes = args::input_shapes(input_shapes, &names)?;
        loaded.infer_shapes(&shapes);
    }
    Ok(loaded)
}

fn compile(a: &CompileArgs) -> Result<()> {
    let (Some(model_path), Some(output)) = (&a.model, &a.output) else {
        unreachable!("clap requires MODEL and --output without a subcommand");
    };
    // Parse the pipeline before reading: a typo should not cost a model load.
    let options = prunec::passes::PipelineOptions { prune: a.prune.options() };
    let list = match (a.fold_bn, a.passes.trim()) {
        (false, _) => a.passes.clone(),
        (true, "none") => "fold-bn".to_string(),
        (true, list) => format!("{list},fold-bn"),
    };
    let passes = prunec::passes::parse_pipeline(&list, &options)?;
    let infer_shapes = passes.iter().any(|p| p.needs_shapes());
    let mut loaded = if infer_shapes {
        load(model_path, &a.input_shapes)?
    } else {
        read_model(model_path, &ReadOptions { infer_shapes }).with_context(|| format!("reading `{}`", model_path.display()))?
    };
    let passes = if a.prune.criterion.needs_calibration() && passes.iter().any(|p| p.name() == "prune") {
        let Some(inputs) = &a.inputs else {
            anyhow::bail!("the `{}` criterion needs calibration inputs: pass --inputs FILE.npz", a.prune.criterion_name());
        };
        let feed = verification_feed(&loaded.model, a)?;
        let source = format!("`{}`", inputs.display());
        let calibration = prunec::calibrate::collect(&loaded.model, &loaded.dir, &feed, &source)
            .with_context(|| format!("running `{}` on the calibration inputs", model_path.display()))?;
        let options = prunec::passes::PipelineOptions {
            prune: prunec::passes::prune::PruneOptions { calibration: Some(std::sync::Arc::new(calibration)), ..options.prune.clone() },
        };
        prunec::passes::parse_pipeline(&list, &options)?
    } else {
        passes
    };
    let original = loaded.model.clone();
    let before = model_stats(&loaded.model);
    let runs =
        prunec::passes::run_pipeline(&mut loaded.model, &passes).with_context(|| format!("optimising `{}`", model_path.display()))?;
    let after = model_stats(&loaded.model);
    let prune = runs.iter().rev().find_map(|r| r.report.prune.as_ref());

    let verification = if a.no_verify || passes.is_empty() {
        None
    } else {
        let feed = verification_feed(&original, a)?;
        match prunec::verify::verify(&original, &loaded.model, prune, &loaded.dir, &feed, prunec::verify::MASKING_TOLERANCE) {
            Ok(v) => Some(v),
            Err(e @ prunec::verify::VerifyError::OriginalNotRunnable(_)) => {
                eprintln!("verification skipped: {e}");
                None
            }
            Err(e) => return Err(e).context(format!("verifying the result for `{}`; nothing was written", model_path.display())),
        }
    };

    let summary = report::Summary { runs: &runs, prune, before: &before, after: &after, verification: verification.as_ref(), args: a };
    summary.print();
    if let Some(path) = &a.report {
        summary.write_json(path)?;
    }
    if a.dry_run {
        eprintln!("dry run: nothing written");
        return Ok(());
    }
    let written = write_model(&loaded.model, output, &WriteOptions { external_data: a.external_data })
        .with_context(|| format!("writing `{}`", output.display()))?;
    let data = written.data.as_ref().map(|d| format!(" + {} ({} bytes)", d.display(), written.data_bytes)).unwrap_or_default();
    eprintln!("wrote {} ({} bytes){data}", written.model.display(), written.model_bytes);
    Ok(())
}

/// Inputs for verification: `--inputs`, then seeded random values at `--input-shape` or the
/// recorded shapes.
fn verification_feed(model: &prunec::ir::Model, a: &CompileArgs) -> Result<prunec::backends::tract::Feed> {
    use prunec::backends::tract::{Feed, load_npz, random_feed};
    let given = match &a.inputs {
        Some(path) => load_npz(path, model).with_context(|| format!("reading inputs `{}`", path.display()))?,
        None => Feed::default(),
    };
    let graph = &model.graph;
    let names: Vec<String> =
        graph.inputs.iter().filter(|&&v| graph.value(v).initializer().is_none()).map(|&v| graph.value(v).name.clone()).collect();
    let shapes = args::input_shapes(&a.input_shapes, &names)?;
    Ok(random_feed(model, given, &shapes, a.prune.seed)?)
}
