//! The only module that knows about the terminal, clap and exit codes.

pub mod args;
mod bench;
mod blocks;
mod emit;
mod inspect;
mod report;

use anyhow::{Context, Result};
use args::{Cli, Command, CompileArgs};
use prunec::backends::onnx::{WriteOptions, write_model};
use prunec::frontend::{Loaded, ReadOptions, read_model};
use prunec::ir::model_stats;
use prunec::passes::prune::HessianSource;
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
        Some(Command::Bench(a)) => bench::run(&a),
        Some(Command::Blocks(a)) => blocks::run(&a),
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
        let shapes = args::input_shapes(input_shapes, &runtime_inputs(&loaded.model.graph))?;
        loaded.infer_shapes(&shapes).with_context(|| format!("reading `{}`", path.display()))?;
    }
    Ok(loaded)
}

fn compile(a: &CompileArgs) -> Result<()> {
    let (Some(model_path), Some(_)) = (&a.model, &a.output) else {
        unreachable!("clap requires MODEL and --output without a subcommand");
    };
    // Parse the pipeline before reading: a typo should not cost a model load.
    let options = prunec::passes::PipelineOptions { prune: a.prune_options() };
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
    refuse_unasked_big_verification(&loaded.model, &passes, a)?;
    let measured = if passes.iter().any(|p| p.name() == "prune") { calibration(&loaded, a)? } else { None };
    let (calibration, feed) = match measured {
        Some((calibration, feed)) => (Some(std::sync::Arc::new(calibration)), Some(feed)),
        None => (None, None),
    };
    let with_statistics = |refit: Option<prunec::passes::prune::Refit>| {
        let mut prune = options.prune.clone();
        prune.calibration = calibration.clone();
        prune.refit = refit.map(std::sync::Arc::new);
        prunec::passes::parse_pipeline(&list, &prunec::passes::PipelineOptions { prune })
    };
    let passes = if calibration.is_some() { with_statistics(None)? } else { passes };
    let original = loaded.model.clone();
    let before = model_stats(&loaded.model);
    let optimise = |model: &mut prunec::ir::Model, passes: &[Box<dyn prunec::passes::Pass>]| {
        prunec::passes::run_pipeline(model, passes).with_context(|| format!("optimising `{}`", model_path.display()))
    };
    let mut runs = optimise(&mut loaded.model, &passes)?;
    if let Some(refit) = refit(&original, &loaded.dir, &runs, feed.as_ref(), a)? {
        // The choice of channels does not depend on the compensations, so a second run removes
        // the same ones and writes the refit weights instead of the one-shot ones.
        loaded.model = original.clone();
        runs = optimise(&mut loaded.model, &with_statistics(Some(refit))?)?;
    }
    let after = model_stats(&loaded.model);
    let prune = runs.iter().rev().find_map(|r| r.report.prune.as_ref());

    let verification = if a.no_verify || passes.is_empty() {
        None
    } else {
        let feed = verification_feed(&original, a, "verification")?;
        check_feed_matches_input_shapes(&original, &feed, a)?;
        match prunec::verify::verify(&original, &loaded.model, prune, &loaded.dir, &feed, prunec::verify::MASKING_TOLERANCE) {
            Ok(v) => Some(v),
            Err(e @ prunec::verify::VerifyError::OriginalNotRunnable(_)) => return Err(unverified(model_path, "cannot verify", &e)),
            Err(e) => return Err(unverified(model_path, "verification failed on", &e)),
        }
    };
    if !passes.is_empty() {
        pin_input_shapes(&mut loaded.model, a)?;
    }
    let summary = report::Summary { runs: &runs, prune, before: &before, after: &after, verification: verification.as_ref(), args: a };
    summary.print();
    if let Some(path) = &a.report {
        summary.write_json(path)?;
    }
    if a.dry_run {
        eprintln!("dry run: nothing written");
        return Ok(());
    }
    // The tract archive first: a model tract cannot serialise is refused before anything is written.
    let Some(output) = &emit::tract_outputs(&loaded, a)? else { return Ok(()) };
    let written = write_model(&loaded.model, output, &WriteOptions { external_data: a.external_data, layout: a.external_data_layout })
        .with_context(|| format!("writing `{}`", output.display()))?;
    let data = match (&written.data, written.data_files) {
        (Some(d), 1) => format!(" + {} ({} bytes)", d.display(), written.data_bytes),
        (Some(d), n) => format!(" + {} and {} more data files ({} bytes)", d.display(), n - 1, written.data_bytes),
        (None, _) => String::new(),
    };
    eprintln!("wrote {} ({} bytes){data}", written.model.display(), written.model_bytes);
    Ok(())
}

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

fn unverified(model: &Path, what: &str, e: &prunec::verify::VerifyError) -> anyhow::Error {
    Unverified(format!("{what} the result for `{}`: {e}; nothing was written (--no-verify writes the model unverified)", model.display()))
        .into()
}

/// Verifying a model of more than [`prunec::verify::VERIFY_MAX_WEIGHT_BYTES`] of weights takes
/// several times its size in memory, so it is not started unasked; but an unverified model is
/// never written unasked either: the user says which, before the passes spend any time.
fn refuse_unasked_big_verification(model: &prunec::ir::Model, passes: &[Box<dyn prunec::passes::Pass>], a: &CompileArgs) -> Result<()> {
    let bytes = model_stats(model).weight_bytes;
    if a.verify || a.no_verify || passes.is_empty() || bytes <= prunec::verify::VERIFY_MAX_WEIGHT_BYTES {
        return Ok(());
    }
    Err(Unverified(format!(
        "not verifying `{}` unasked: it has {:.2} GiB of weights, over the {} GiB above which verification (several copies of the weights in tract) \
         must be asked for; nothing was written: pass --verify to verify anyway, or --no-verify to write the model unverified",
        a.model.as_deref().unwrap_or(Path::new("")).display(),
        bytes as f64 / (1u64 << 30) as f64,
        prunec::verify::VERIFY_MAX_WEIGHT_BYTES >> 30
    ))
    .into())
}

/// The passes specialised the model to `--input-shape`; verifying it on `--inputs` of another
/// shape would fail inside the model, so say what disagrees instead.
fn check_feed_matches_input_shapes(model: &prunec::ir::Model, feed: &prunec::backends::tract::Feed, a: &CompileArgs) -> Result<()> {
    for (name, dims) in args::input_shapes(&a.input_shapes, &runtime_inputs(&model.graph))? {
        let Some(given) = feed.0.get(&name) else { continue };
        let given: Vec<u64> = given.shape().iter().map(|&d| d as u64).collect();
        if given != dims {
            anyhow::bail!(
                "--inputs gives `{name}` the shape {given:?} but --input-shape says {dims:?}; the model is specialised to \
                 --input-shape, so verify on inputs of that shape (or pass --no-verify); nothing was written"
            );
        }
    }
    Ok(())
}

/// Makes the output declare the `--input-shape` sizes of its inputs where the model left them
/// open: the passes folded shape arithmetic (and verification ran) at those sizes, so the result
/// is only valid for them, and a runtime should say so at the input, not fail in a Reshape.
fn pin_input_shapes(model: &mut prunec::ir::Model, a: &CompileArgs) -> Result<()> {
    use prunec::ir::proto::tensor_shape_proto::{Dimension, dimension::Value as DimValue};
    let graph = &mut model.graph;
    for (name, dims) in args::input_shapes(&a.input_shapes, &runtime_inputs(graph))? {
        let Some(id) = graph.value_by_name(&name) else { continue };
        // Every record of the input: it may be an output or listed in value_info too.
        let mut pinned = false;
        for record in graph.value_mut(id).records_mut() {
            let Some(shape) = declared_shape_mut(record) else { continue };
            if shape.dim.len() != dims.len() || (0..dims.len()).any(|axis| declared_open(shape, axis)) {
                shape.dim = dims.iter().map(|&d| Dimension { value: Some(DimValue::DimValue(d as i64)), denotation: None }).collect();
                pinned = true;
            }
        }
        if pinned {
            eprintln!("note: input `{name}` now declares {dims:?}: the model was specialised to --input-shape");
        }
    }
    Ok(())
}

/// Runs the model (for a pipeline that prunes) for the statistics the criterion needs: activation moments for wanda, consumer
/// Hessians for obspa and flap (on `--inputs`, or on seeded synthetic inputs for
/// `--hessian noise`). `None` when the criterion needs no run.
fn calibration(loaded: &Loaded, a: &CompileArgs) -> Result<Option<(prunec::passes::prune::Calibration, prunec::backends::tract::Feed)>> {
    let criterion = a.prune.criterion;
    let hessian = a.prune_options().hessian;
    let wants_hessians = criterion.needs_hessians() && hessian.runs_model();
    if !(criterion.needs_calibration() || wants_hessians) {
        return Ok(None);
    }
    let model = &loaded.model;
    let (feed, source) = match (&a.inputs, hessian) {
        (Some(inputs), _) if criterion.needs_calibration() || hessian == HessianSource::Calib => {
            (verification_feed(model, a, "calibration")?, format!("`{}`", inputs.display()))
        }
        (None, _) if criterion.needs_calibration() || hessian == HessianSource::Calib => {
            anyhow::bail!(
                "the `{}` criterion{} needs calibration inputs: pass --inputs FILE.npz",
                a.prune.criterion_name(),
                if criterion.needs_hessians() { " with --hessian calib" } else { "" }
            );
        }
        _ => {
            let feed = noise_feed(model, a)?;
            let shapes: Vec<String> = feed.0.iter().map(|(n, t)| format!("{n}{:?}", t.shape())).collect();
            (
                feed,
                format!(
                    "noise: seeded uniform inputs, piecewise constant over 8×8 pixel blocks for images (seed {}) {}",
                    a.prune.seed,
                    shapes.join(", ")
                ),
            )
        }
    };
    let calibration = prunec::calibrate::collect(model, &loaded.dir, &feed, &source, wants_hessians)
        .with_context(|| format!("running `{}` for the `{}` criterion's statistics", loaded.dir.display(), a.prune.criterion_name()))?;
    Ok(Some((calibration, feed)))
}

/// OBSPA's sequential refit (`--refit prefix|outputs`) of the channels the first run removed.
/// `None` when there is nothing to refit.
fn refit(
    original: &prunec::ir::Model,
    dir: &Path,
    runs: &[prunec::passes::PassRun],
    feed: Option<&prunec::backends::tract::Feed>,
    a: &CompileArgs,
) -> Result<Option<prunec::passes::prune::Refit>> {
    let options = a.prune_options();
    let report = runs.iter().rev().find_map(|r| r.report.prune.as_ref());
    let (Some(report), Some(feed)) = (report, feed) else { return Ok(None) };
    let target = match a.refit_mode() {
        args::RefitMode::None => return Ok(None),
        args::RefitMode::Prefix => prunec::calibrate::RefitTarget::OwnOutputs,
        args::RefitMode::Outputs => prunec::calibrate::RefitTarget::OriginalOutputs,
    };
    if options.criterion != prunec::passes::prune::Criterion::Obspa || !options.hessian.runs_model() || report.masked.is_empty() {
        return Ok(None);
    }
    let refit = prunec::calibrate::refit(original, dir, feed, report, target, options.damping)
        .context("running the pruned model level by level to refit its layers")?;
    Ok(Some(refit))
}

/// Seeded synthetic inputs for `--hessian noise`: the shapes of `--input-shape` or the recorded
/// ones, with the batch axis set to `--noise-samples` wherever the model declares it open.
fn noise_feed(model: &prunec::ir::Model, a: &CompileArgs) -> Result<prunec::backends::tract::Feed> {
    use prunec::backends::tract::{Feed, random_feed};
    use prunec::ir::Dim;
    let graph = &model.graph;
    let names = runtime_inputs(graph);
    let given = args::input_shapes(&a.input_shapes, &names)?;
    let samples = a.prune.noise_samples.max(1) as u64;
    let mut shapes = std::collections::BTreeMap::new();
    for v in names.iter().filter_map(|n| graph.value_by_name(n)).map(|id| graph.value(id)) {
        let declared_batch_open = declared_shape(v).is_some_and(|s| declared_open(s, 0));
        let mut dims: Vec<u64> = match (given.get(&v.name), &v.shape) {
            (Some(dims), _) => dims.clone(),
            (None, Some(shape)) => shape.0.iter().map(|d| if let Dim::Known(n) = d { *n } else { 1 }).collect(),
            (None, None) => continue,
        };
        let recorded_open = v.shape.as_ref().and_then(|s| s.0.first()).is_some_and(|d| d.known().is_none());
        if let Some(batch) = dims.first_mut().filter(|_| declared_batch_open || recorded_open) {
            *batch = samples;
        }
        shapes.insert(v.name.clone(), dims);
    }
    let mut feed = random_feed(model, Feed::default(), &shapes, a.prune.seed)?;
    for tensor in feed.0.values_mut() {
        if let Some(smooth) = smooth_image_noise(tensor) {
            *tensor = smooth;
        }
    }
    Ok(feed)
}

/// Image-shaped (N, C, H, W) float noise made piecewise constant over 8×8 blocks: natural
/// images are smooth, and i.i.d. pixel noise gives convolutions input statistics no real image
/// has (all energy at the highest frequencies).
fn smooth_image_noise(t: &prunec::backends::tract::TractTensor) -> Option<prunec::backends::tract::TractTensor> {
    const BLOCK: usize = 8;
    let shape = t.shape().to_vec();
    let [_, _, h, w] = shape[..] else { return None };
    if h < 2 * BLOCK || w < 2 * BLOCK {
        return None;
    }
    let values = t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?;
    let smooth: Vec<f32> = (0..values.len())
        .map(|k| {
            let (plane, y, x) = (k / (h * w), k / w % h, k % w);
            values[plane * h * w + (y / BLOCK * BLOCK) * w + x / BLOCK * BLOCK]
        })
        .collect();
    prunec::backends::tract::TractTensor::from_shape(&shape, &smooth).ok()
}

/// Inputs for verification: `--inputs`, then seeded random values at `--input-shape` or the
/// recorded shapes. An `--inputs` file that gives some inputs but not all is said on stderr, naming the inputs
/// that get random values (`purpose`: what the inputs are for).
fn verification_feed(model: &prunec::ir::Model, a: &CompileArgs, purpose: &str) -> Result<prunec::backends::tract::Feed> {
    use prunec::backends::tract::{Feed, load_npz, random_feed};
    let names = runtime_inputs(&model.graph);
    let given = match &a.inputs {
        Some(path) => {
            let given = load_npz(path, model).with_context(|| format!("reading inputs `{}`", path.display()))?;
            let generated: Vec<String> = names.iter().filter(|n| !given.0.contains_key(*n)).map(|n| format!("`{n}`")).collect();
            if !generated.is_empty() {
                eprintln!(
                    "note: `{}` has no array for input {}; {purpose} feeds {} seeded random values (seed {})",
                    path.display(),
                    generated.join(", "),
                    if generated.len() == 1 { "it" } else { "them" },
                    a.prune.seed
                );
            }
            given
        }
        None => Feed::default(),
    };
    let shapes = args::input_shapes(&a.input_shapes, &names)?;
    Ok(random_feed(model, given, &shapes, a.prune.seed)?)
}

/// The graph inputs a caller feeds (not the initializers IR < 4 also lists as inputs).
fn runtime_inputs(graph: &prunec::ir::Graph) -> Vec<String> {
    graph.inputs.iter().filter(|&&v| graph.value(v).initializer().is_none()).map(|&v| graph.value(v).name.clone()).collect()
}

/// The shape a value's recorded type declares, if it has one.
fn declared_shape(v: &prunec::ir::Value) -> Option<&prunec::ir::proto::TensorShapeProto> {
    match v.info.as_ref()?.r#type.as_ref()?.value.as_ref()? {
        prunec::ir::proto::type_proto::Value::TensorType(t) => t.shape.as_ref(),
        _ => None,
    }
}

/// The shape a record declares, to change.
fn declared_shape_mut(info: &mut prunec::ir::proto::ValueInfoProto) -> Option<&mut prunec::ir::proto::TensorShapeProto> {
    match info.r#type.as_mut()?.value.as_mut()? {
        prunec::ir::proto::type_proto::Value::TensorType(t) => t.shape.as_mut(),
        _ => None,
    }
}

/// Whether a declared axis is open: no size, a symbolic one, or a non-positive `dim_value`
/// (PaddlePaddle writes an open size as -1).
fn declared_open(shape: &prunec::ir::proto::TensorShapeProto, axis: usize) -> bool {
    use prunec::ir::proto::tensor_shape_proto::dimension::Value as DimValue;
    !shape.dim.get(axis).is_some_and(|d| matches!(d.value, Some(DimValue::DimValue(n)) if n > 0))
}
