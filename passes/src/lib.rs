//! Graph passes: rewrites of a [`prunec_ir::Model`].
//!
//! A pass changes the model only through the IR's API and never touches protobuf. Each pass has
//! one row in [`REGISTRY`]: its name, a summary, the schema of its options ([`PassOptions`]) and
//! how to build it from `key=value` pairs. A pipeline ([`Pipeline`]) is parsed from text
//! (`dce,fold,prune{ratio=0.4},identity`) and prints back with every option filled in.
//!
//! A running pass gets a [`Context`]: the measuring service, when the pipeline has a runtime.
//! It returns a [`PassReport`] with its typed details and its verification [`Reference`]. The
//! driver ([`run_pipeline`]) reconciles the recorded shapes and checks the graph after every
//! pass, so a pass that breaks it is named.

mod cleanup;
mod error;
pub mod layers;
pub mod measure;
pub mod options;
pub mod prune;
pub mod reference;
pub mod streams;

pub use cleanup::{KnownIntegers, fold_shape_arithmetic, known_integers, remove_dead_code};
pub use error::PassError;
pub use measure::{Activation, Context, Inputs, Measure, MeasureError, Progress, Runtime, Stepwise};
pub use options::{NoOptions, OptionSpec, PassOptions, PassSpec};
pub use reference::{Reference, ReferenceEdit};

use prunec_ir::Model;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A rewrite of a model.
pub trait Pass: Send + Sync {
    /// The kebab-case name used in `--passes`.
    fn name(&self) -> &'static str;
    /// Every option with its value, in schema order (what the pipeline prints).
    fn options(&self) -> Vec<(&'static str, String)>;
    /// Whether the pass reads value shapes, so the reader must run shape inference first
    /// (which costs a copy of the weights inside tract).
    fn needs_shapes(&self) -> bool;
    /// Rewrites the model; `cx` offers what the pass may ask for (measurements).
    fn run(&self, model: &mut Model, cx: &mut Context) -> Result<PassReport, PassError>;
}

/// A pass's own account of what it did, beyond the counts every pass reports.
pub trait PassDetails: std::fmt::Debug + Send + Sync + std::any::Any {
    /// The details as the JSON report writes them.
    fn to_json(&self) -> serde_json::Value;
    /// Lines for the stderr report.
    fn summary(&self) -> Vec<String>;
}

/// What a pass did.
#[derive(Clone, Debug)]
pub struct PassReport {
    /// Ops removed.
    pub ops_removed: usize,
    /// Values removed (weights included).
    pub values_removed: usize,
    /// What the output must equal.
    pub reference: Reference,
    /// The pass's own details, when it has any.
    pub details: Option<Arc<dyn PassDetails>>,
    /// What the user asked for that the pass could not meet sensibly.
    pub warnings: Vec<String>,
}

impl Default for PassReport {
    fn default() -> Self {
        PassReport { ops_removed: 0, values_removed: 0, reference: Reference::Exact, details: None, warnings: Vec::new() }
    }
}

impl PassReport {
    /// The details, if the pass reported details of type `T`.
    pub fn details<T: PassDetails>(&self) -> Option<&T> {
        let details: &dyn std::any::Any = self.details.as_deref()?;
        details.downcast_ref()
    }
}

/// One registered pass.
pub struct Registration {
    /// Name in `--passes`.
    pub name: &'static str,
    /// One line for `prunec passes`.
    pub summary: &'static str,
    /// Its options.
    pub options: &'static [OptionSpec],
    /// Builds the pass from `key=value` pairs (the defaults for the keys not given).
    pub build: BuildPass,
}

/// How a registration builds its pass from `key=value` pairs.
pub type BuildPass = fn(&[(String, String)]) -> Result<Box<dyn Pass>, PassError>;

/// Every pass prunec knows, by name.
pub const REGISTRY: &[Registration] = &[
    Registration {
        name: "dce",
        summary: "remove ops and weights that no graph output depends on",
        options: NoOptions::SCHEMA,
        build: |pairs| {
            NoOptions::from_pairs("dce", pairs)?;
            Ok(Box::new(cleanup::DeadCodeElimination))
        },
    },
    Registration {
        name: "fold",
        summary: "fold shape arithmetic whose result is known (Shape of fixed axes, Gather, Concat...) into constants",
        options: NoOptions::SCHEMA,
        build: |pairs| {
            NoOptions::from_pairs("fold", pairs)?;
            Ok(Box::new(cleanup::FoldConstants))
        },
    },
    Registration {
        name: "identity",
        summary: "make the readers of an Identity read its input, and drop it",
        options: NoOptions::SCHEMA,
        build: |pairs| {
            NoOptions::from_pairs("identity", pairs)?;
            Ok(Box::new(cleanup::IdentityElimination))
        },
    },
    Registration {
        name: "fold-bn",
        summary: "fold inference BatchNormalization into the Conv or Gemm before it",
        options: NoOptions::SCHEMA,
        build: |pairs| {
            NoOptions::from_pairs("fold-bn", pairs)?;
            Ok(Box::new(cleanup::FoldBatchNorm))
        },
    },
    Registration {
        name: "dequantize",
        summary: "replace DequantizeLinear of constant weights by the float weights it computes (exact; for NNEF output)",
        options: NoOptions::SCHEMA,
        build: |pairs| {
            NoOptions::from_pairs("dequantize", pairs)?;
            Ok(Box::new(cleanup::Dequantize))
        },
    },
    Registration {
        name: "prune",
        summary: "remove the weakest channels of every prunable dependency group",
        options: prune::PruneOptions::SCHEMA,
        build: |pairs| Ok(Box::new(prune::ChannelPruning { options: prune::PruneOptions::from_pairs("prune", pairs)? })),
    },
    Registration {
        name: "remove-layers",
        summary: "remove the least important residual layers (or their attention or MLP), scored from weights or on --inputs",
        options: layers::RemoveLayersOptions::SCHEMA,
        build: |pairs| Ok(Box::new(layers::RemoveLayers { options: layers::RemoveLayersOptions::from_pairs("remove-layers", pairs)? })),
    },
    Registration {
        name: "single-stream",
        summary: "run the last K (or a range of) dual-stream MMDiT blocks as single-stream blocks, text weights tied to the image branch",
        options: streams::SingleStreamOptions::SCHEMA,
        build: |pairs| Ok(Box::new(streams::SingleStream { options: streams::SingleStreamOptions::from_pairs("single-stream", pairs)? })),
    },
];

/// The pipeline of a bare `prunec MODEL -o OUT`: cleanup, folding of shape arithmetic (which
/// unfreezes groups whose sizes were read at run time), channel pruning at
/// [`prune::DEFAULT_RATIO`] with the `l2` criterion (which removes the code it leaves dead),
/// then identity elimination.
pub const DEFAULT_PIPELINE: &str = "dce,fold,prune,identity";

/// The registration of `name`.
pub fn registration(name: &str) -> Option<&'static Registration> {
    REGISTRY.iter().find(|r| r.name == name)
}

/// Passes to run in order.
#[derive(Default)]
pub struct Pipeline {
    /// The passes.
    pub passes: Vec<Box<dyn Pass>>,
}

impl Pipeline {
    /// Parses the text form (see [`options`]); `none` is the empty pipeline.
    pub fn parse(text: &str) -> Result<Pipeline, PassError> {
        Pipeline::from_specs(&Pipeline::parse_specs(text)?)
    }

    /// The entries of the text form, options as written (not yet checked against the schemas,
    /// apart from telling keys from list elements).
    pub fn parse_specs(text: &str) -> Result<Vec<PassSpec>, PassError> {
        options::parse_specs(text, |name| registration(name).map(|r| r.options.iter().map(|o| o.key).collect()))
    }

    /// Builds each entry through its registration.
    pub fn from_specs(specs: &[PassSpec]) -> Result<Pipeline, PassError> {
        let passes = specs
            .iter()
            .map(|spec| match registration(&spec.name) {
                Some(r) => (r.build)(&spec.options),
                None => Err(PassError::UnknownPass {
                    name: spec.name.clone(),
                    known: REGISTRY.iter().map(|r| r.name).collect::<Vec<_>>().join(", "),
                }),
            })
            .collect::<Result<_, _>>()?;
        Ok(Pipeline { passes })
    }

    /// The effective entries: every pass with every option's value.
    pub fn specs(&self) -> Vec<PassSpec> {
        self.passes
            .iter()
            .map(|p| PassSpec { name: p.name().to_string(), options: p.options().into_iter().map(|(k, v)| (k.to_string(), v)).collect() })
            .collect()
    }

    /// Whether any pass reads value shapes.
    pub fn needs_shapes(&self) -> bool {
        self.passes.iter().any(|p| p.needs_shapes())
    }

    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.passes.is_empty()
    }
}

/// The effective pipeline as text that [`Pipeline::parse`] reads back to the same pipeline.
impl std::fmt::Display for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.passes.is_empty() {
            return f.write_str("none");
        }
        for (i, spec) in self.specs().iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(&spec.name)?;
            if !spec.options.is_empty() {
                let pairs: Vec<String> = spec.options.iter().map(|(k, v)| format!("{k}={}", options::print_value(v))).collect();
                write!(f, "{{{}}}", pairs.join(","))?;
            }
        }
        Ok(())
    }
}

/// Parses a pipeline's text form; `none` is the empty pipeline.
pub fn parse_pipeline(text: &str) -> Result<Pipeline, PassError> {
    Pipeline::parse(text)
}

/// What one pass of a pipeline did, and how long it took.
#[derive(Clone, Debug)]
pub struct PassRun {
    /// The pass.
    pub name: &'static str,
    /// Its options, as it ran.
    pub options: Vec<(&'static str, String)>,
    /// Its report.
    pub report: PassReport,
    /// Wall time.
    pub elapsed: Duration,
}

/// Runs the passes in order, checking the graph after each.
pub fn run_pipeline(model: &mut Model, pipeline: &Pipeline, cx: &mut Context) -> Result<Vec<PassRun>, PassError> {
    run_pipeline_observed(model, pipeline, cx, &mut |_, _| ControlFlow::Continue(()))
}

/// [`run_pipeline`], calling `after` with each finished pass and the model it left; the
/// pipeline stops early when `after` breaks (`--stop-after`).
pub fn run_pipeline_observed(
    model: &mut Model,
    pipeline: &Pipeline,
    cx: &mut Context,
    after: &mut dyn FnMut(&PassRun, &Model) -> ControlFlow<()>,
) -> Result<Vec<PassRun>, PassError> {
    let mut runs = Vec::with_capacity(pipeline.passes.len());
    for pass in &pipeline.passes {
        let start = Instant::now();
        cx.start(&format!("pass {}", pass.name()), 0);
        let mut report = pass.run(model, cx)?;
        cx.finish();
        report.warnings.extend(cx.take_warnings());
        // Recorded shapes are written back as they are; none may contradict what the pass did.
        model.graph.reconcile_records();
        model.graph.topo_order().map_err(|source| PassError::BrokeGraph { pass: pass.name(), source })?;
        // In debug builds and tests, a pass must leave a graph the reader would accept.
        if cfg!(debug_assertions) {
            prunec_ir::validate(&model.graph).map_err(|source| PassError::Invalid { pass: pass.name(), source })?;
        }
        runs.push(PassRun { name: pass.name(), options: pass.options(), report, elapsed: start.elapsed() });
        if after(runs.last().expect("just pushed"), model).is_break() {
            break;
        }
    }
    Ok(runs)
}
