//! Graph passes: rewrites of a [`prunec_ir::Model`].
//!
//! A pass changes the model only through the IR's API and never touches protobuf. Each pass has
//! one row in [`REGISTRY`]; the CLI's `--passes` list and `--list-passes` read it. The driver
//! ([`run_pipeline`]) checks the graph after every pass, so a pass that breaks it is named.

mod cleanup;
mod error;
pub mod layers;
pub mod prune;

pub use error::PassError;

use prunec_ir::Model;
use std::time::{Duration, Instant};

/// A rewrite of a model.
pub trait Pass {
    /// The kebab-case name used in `--passes`.
    fn name(&self) -> &'static str;
    /// Whether the pass reads value shapes, so the reader must run shape inference first
    /// (which costs a copy of the weights inside tract).
    fn needs_shapes(&self) -> bool;
    /// Rewrites the model.
    fn run(&self, model: &mut Model) -> Result<PassReport, PassError>;
}

/// What a pass did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PassReport {
    /// Ops removed.
    pub ops_removed: usize,
    /// Values removed (weights included).
    pub values_removed: usize,
    /// What channel pruning chose and changed.
    pub prune: Option<prune::PruneReport>,
}

/// One registered pass.
pub struct Registration {
    /// Name in `--passes`.
    pub name: &'static str,
    /// One line for `--list-passes`.
    pub summary: &'static str,
    /// Builds the pass with the pipeline's options.
    pub build: fn(&PipelineOptions) -> Box<dyn Pass>,
}

/// Options of the passes that take any.
#[derive(Clone, Debug, Default)]
pub struct PipelineOptions {
    /// Options of `prune`.
    pub prune: prune::PruneOptions,
}

/// Every pass prunec knows, by name.
pub const REGISTRY: &[Registration] = &[
    Registration {
        name: "dce",
        summary: "remove ops and weights that no graph output depends on",
        build: |_| Box::new(cleanup::DeadCodeElimination),
    },
    Registration {
        name: "fold",
        summary: "fold shape arithmetic whose result is known (Shape of fixed axes, Gather, Concat...) into constants",
        build: |_| Box::new(cleanup::FoldConstants),
    },
    Registration {
        name: "identity",
        summary: "make the readers of an Identity read its input, and drop it",
        build: |_| Box::new(cleanup::IdentityElimination),
    },
    Registration {
        name: "fold-bn",
        summary: "fold inference BatchNormalization into the Conv or Gemm before it",
        build: |_| Box::new(cleanup::FoldBatchNorm),
    },
    Registration {
        name: "dequantize",
        summary: "replace DequantizeLinear of constant weights by the float weights it computes (exact; for NNEF output)",
        build: |_| Box::new(cleanup::Dequantize),
    },
    Registration {
        name: "prune",
        summary: "remove the weakest channels of every prunable dependency group (--ratio, --criterion, --target)",
        build: |o| Box::new(prune::ChannelPruning { options: o.prune.clone() }),
    },
];

/// The pipeline of a bare `prunec MODEL -o OUT`: cleanup, folding of shape arithmetic (which
/// unfreezes groups whose sizes were read at run time), channel pruning at
/// [`prune::DEFAULT_RATIO`] with the `l2` criterion (which removes the code it leaves dead),
/// then identity elimination.
pub const DEFAULT_PIPELINE: &str = "dce,fold,prune,identity";

/// Parses a comma-separated pass list; `none` is the empty pipeline.
pub fn parse_pipeline(list: &str, options: &PipelineOptions) -> Result<Vec<Box<dyn Pass>>, PassError> {
    if list.trim() == "none" {
        return Ok(Vec::new());
    }
    list.split(',')
        .map(str::trim)
        .map(|name| {
            REGISTRY.iter().find(|r| r.name == name).map(|r| (r.build)(options)).ok_or_else(|| PassError::UnknownPass {
                name: name.to_string(),
                known: REGISTRY.iter().map(|r| r.name).collect::<Vec<_>>().join(", "),
            })
        })
        .collect()
}

/// What one pass of a pipeline did, and how long it took.
#[derive(Clone, Debug)]
pub struct PassRun {
    /// The pass.
    pub name: &'static str,
    /// Its report.
    pub report: PassReport,
    /// Wall time.
    pub elapsed: Duration,
}

/// Runs the passes in order, checking the graph after each.
pub fn run_pipeline(model: &mut Model, passes: &[Box<dyn Pass>]) -> Result<Vec<PassRun>, PassError> {
    let mut runs = Vec::with_capacity(passes.len());
    for pass in passes {
        let start = Instant::now();
        let report = pass.run(model)?;
        // Recorded shapes are written back as they are; none may contradict what the pass did.
        model.graph.reconcile_records();
        model.graph.topo_order().map_err(|source| PassError::BrokeGraph { pass: pass.name(), source })?;
        runs.push(PassRun { name: pass.name(), report, elapsed: start.elapsed() });
    }
    Ok(runs)
}
