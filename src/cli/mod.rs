//! The only module that knows about the terminal, clap and exit codes.

pub mod args;
mod bench;
mod blocks;
mod emit;
mod inspect;
mod progress;
mod report;
mod sensitivity;
mod streams;

use anyhow::{Context, Result};
use args::{Cli, Command, CompileArgs};
use prunec::Recipe;
use prunec::backends::onnx::{WriteOptions, write_model};
use prunec::frontend::{Loaded, ReadOptions, read_model};
use prunec::passes::Pipeline;
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
                let fold = Pipeline::parse("fold")?;
                prunec::passes::run_pipeline(&mut loaded.model, &fold, &mut Default::default())
                    .with_context(|| format!("folding `{}`", a.model.display()))?;
            }
            let groups = prunec::ir::analyse_groups(&loaded.model.graph);
            if a.json { emit(&format!("{}\n", serde_json::to_string_pretty(&groups)?)) } else { emit(&groups.to_string()) }
        }
        Some(Command::Passes) => emit(&passes_text()),
        Some(Command::Bench(a)) => bench::run(&a),
        Some(Command::Blocks(a)) => blocks::run(&a),
        Some(Command::Streams(a)) => streams::run(&a),
        Some(Command::Sensitivity(a)) => sensitivity::run(&a),
        None => compile(&cli.compile),
    }
}

/// `prunec passes`: every pass with its options, from their schemas.
fn passes_text() -> String {
    let mut text = String::new();
    for r in prunec::passes::REGISTRY {
        text += &format!("{:<12} {}\n", r.name, r.summary);
        for o in r.options {
            let default = if o.default.is_empty() { "(none)" } else { o.default };
            text += &format!("    {:<16} {} [{}; default {default}]\n", o.key, o.doc, o.kind);
        }
    }
    text += "\nOptions are given as name{key=value,...} in --passes, e.g. prune{ratio=0.4,criterion=l1}.\n";
    text
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

/// The runtime through which a command's passes measure: tract, on the inputs of `file` (read
/// at `input_shapes`) when given, else on what each pass asks for (seeded noise).
pub(crate) fn tract_runtime(
    loaded: &Loaded,
    input_shapes: &[String],
    file: Option<&Path>,
    seed: u64,
) -> Result<prunec::runtime::measure::TractRuntime> {
    let names = prunec::runtime::inputs::runtime_inputs(&loaded.model.graph);
    let shapes = args::input_shapes(input_shapes, &names)?;
    let given = match file {
        Some(file) => {
            let (feed, _) = prunec::runtime::inputs::given_feed(&loaded.model, file, &shapes, seed)
                .with_context(|| format!("reading inputs `{}`", file.display()))?;
            Some(prunec::runtime::measure::GivenInputs { feed, source: format!("`{}`", file.display()) })
        }
        None => None,
    };
    Ok(prunec::runtime::measure::TractRuntime { dir: loaded.dir.clone(), given, input_shapes: shapes })
}

/// Reads a model, with shape inference at the given input shapes.
pub(crate) fn load(path: &Path, input_shapes: &[String]) -> Result<Loaded> {
    let mut loaded =
        read_model(path, &ReadOptions { infer_shapes: input_shapes.is_empty() }).map_err(|source| prunec::Error::reading(path, source))?;
    if !input_shapes.is_empty() {
        let shapes = args::input_shapes(input_shapes, &prunec::runtime::inputs::runtime_inputs(&loaded.model.graph))?;
        loaded.infer_shapes(&shapes).with_context(|| format!("reading `{}`", path.display()))?;
    }
    Ok(loaded)
}

/// A usage error found after clap: a pipeline or recipe that does not parse. Exit code 2.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Verification was meant to run and did not pass, or could not run: nothing is written, and
/// the binary exits with code 3. Only `--no-verify` writes a model that was not verified.
#[derive(Debug)]
pub struct Unverified(pub String);

impl std::fmt::Display for Unverified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unverified {}

/// The run the command line asks for: the recipe (file, then flags), its pipeline, and the
/// effective recipe the report records.
fn resolve(a: &CompileArgs) -> Result<(Recipe, Pipeline)> {
    let usage = |e: &dyn std::fmt::Display| anyhow::Error::from(Usage(e.to_string()));
    let mut recipe = match &a.recipe {
        Some(path) => Recipe::read(path).map_err(|e| usage(&e))?,
        None => Recipe::default(),
    };
    let shorthand = a.prune.pairs();
    let specs = match (&a.passes, recipe.specs().map_err(|e| usage(&e))?) {
        (Some(text), _) => {
            // Options written in `--passes` win over the shorthand flags.
            let mut specs = Pipeline::parse_specs(text).map_err(|e| usage(&e))?;
            for spec in specs.iter_mut().filter(|s| s.name == "prune") {
                let missing: Vec<_> = shorthand.iter().filter(|(k, _)| !spec.sets(k)).cloned().collect();
                spec.options.extend(missing);
            }
            specs
        }
        (None, specs) => {
            // Flags override a recipe's options.
            let mut specs = match specs {
                Some(specs) => specs,
                None => Pipeline::parse_specs(prunec::passes::DEFAULT_PIPELINE).map_err(|e| usage(&e))?,
            };
            for spec in specs.iter_mut().filter(|s| s.name == "prune") {
                spec.options.extend(shorthand.iter().cloned());
            }
            specs
        }
    };
    let mut specs = specs;
    if a.fold_bn {
        specs.push(prunec::passes::PassSpec { name: "fold-bn".into(), options: Vec::new() });
    }
    let pipeline = Pipeline::from_specs(&specs).map_err(|e| usage(&e))?;
    let v = &mut recipe.verify;
    v.enabled &= !a.no_verify;
    v.force |= a.verify;
    if let Some(t) = a.tolerance {
        v.tolerance = t;
    }
    if let Some(inputs) = &a.inputs {
        v.inputs = Some(inputs.clone());
    }
    if !a.input_shapes.is_empty() {
        v.input_shapes = a.input_shapes.clone();
    }
    v.open_interface |= a.open_interface;
    if let Some(seed) = &a.prune.seed {
        v.seed = seed.parse().map_err(|_| usage(&format!("--seed `{seed}` is not a non-negative integer")))?;
    }
    let o = &mut recipe.output;
    if let Some(x) = &a.external_data {
        o.external_data = x.clone();
    }
    if let Some(x) = &a.external_data_layout {
        o.layout = x.clone();
    }
    if !a.emit.is_empty() {
        o.emit = a.emit.clone();
    }
    // Settings of a recipe file are checked as the flags are.
    args::parse_external_data(&o.external_data).map_err(|e| usage(&e))?;
    args::parse_data_layout(&o.layout).map_err(|e| usage(&e))?;
    for f in &o.emit {
        args::parse_format(f).map_err(|e| usage(&e))?;
    }
    for pass in [&a.print_after, &a.stop_after].into_iter().flatten() {
        if pass != "all" && !pipeline.passes.iter().any(|p| p.name() == pass) {
            return Err(usage(&format!("the pipeline has no pass `{pass}` (it runs {pipeline})")));
        }
    }
    Ok((recipe.with_pipeline(&pipeline), pipeline))
}

fn compile(a: &CompileArgs) -> Result<()> {
    // Everything the command line says is checked before the model is read.
    let (recipe, pipeline) = resolve(a)?;
    if a.print_pipeline {
        return emit(&format!("{pipeline}\n"));
    }
    let Some(model_path) = &a.model else { unreachable!("clap requires MODEL unless --print-pipeline") };
    check_paths(a, &recipe)?;
    let mut after_pass = |run: &prunec::passes::PassRun, model: &prunec::ir::Model| {
        if a.print_after.as_deref().is_some_and(|p| p == "all" || p == run.name) {
            eprintln!("; IR after pass `{}`\n{}", run.name, prunec::ir::dump(model));
        }
        if a.stop_after.as_deref() == Some(run.name) { std::ops::ControlFlow::Break(()) } else { std::ops::ControlFlow::Continue(()) }
    };
    if a.verbose {
        eprintln!("pipeline: {pipeline}");
    }
    let mut bars = progress::Bars::new(!a.quiet);
    let compiled = match prunec::compile(model_path, &pipeline, &recipe, &mut after_pass, Some(&mut bars)) {
        Err(prunec::Error::Unverified(why)) => return Err(Unverified(why).into()),
        other => other?,
    };
    drop(bars);
    for warning in &compiled.warnings {
        eprintln!("warning: {warning}");
    }
    let summary = report::Summary { compiled: &compiled, recipe: &recipe, args: a };
    if !a.quiet {
        for note in &compiled.notes {
            eprintln!("note: {note}");
        }
        summary.print();
    }
    if let Some(path) = &a.report {
        summary.write_json(path)?;
    }
    if a.dry_run {
        if !a.quiet {
            eprintln!("dry run: nothing written");
        }
        return Ok(());
    }
    let Some(output) = &a.output else { return Ok(()) };
    let formats = emit::outputs(output, &recipe.output.emit);
    // The tract archive first: a model tract cannot serialise is refused before anything is written.
    let Some(output) = emit::tract_outputs(&compiled.loaded, &formats, &recipe.verify.input_shapes)? else { return Ok(()) };
    let write = WriteOptions {
        external_data: args::parse_external_data(&recipe.output.external_data).map_err(anyhow::Error::msg)?,
        layout: args::parse_data_layout(&recipe.output.layout).map_err(anyhow::Error::msg)?,
    };
    if output == Path::new("-") {
        return emit::to_stdout(&compiled.loaded, &write);
    }
    let written = write_model(&compiled.loaded.model, &output, &write).with_context(|| format!("writing `{}`", output.display()))?;
    let data = match (&written.data, written.data_files) {
        (Some(d), 1) => format!(" + {} ({} bytes)", d.display(), written.data_bytes),
        (Some(d), n) => format!(" + {} and {} more data files ({} bytes)", d.display(), n - 1, written.data_bytes),
        (None, _) => String::new(),
    };
    if !a.quiet {
        eprintln!("wrote {} ({} bytes){data}", written.model.display(), written.model_bytes);
    }
    Ok(())
}

/// Refuses, before any work, an output or report whose folder does not exist and inputs that
/// are not files: a typo should cost nothing.
fn check_paths(a: &CompileArgs, recipe: &Recipe) -> Result<()> {
    let folder_of = |p: &Path| p.parent().filter(|d| !d.as_os_str().is_empty()).map(Path::to_path_buf).unwrap_or_else(|| ".".into());
    let outputs = a.output.iter().filter(|o| !a.dry_run && o.as_os_str() != "-").map(|o| ("output", o));
    for (what, path) in outputs.chain(a.report.iter().map(|r| ("report", r))) {
        let folder = folder_of(path);
        if !folder.is_dir() {
            anyhow::bail!("the {what} folder `{}` does not exist (for `{}`); nothing was done", folder.display(), path.display());
        }
    }
    if let Some(inputs) = &recipe.verify.inputs
        && !inputs.is_file()
    {
        anyhow::bail!("the inputs `{}` are not a file; nothing was done", inputs.display());
    }
    Ok(())
}
