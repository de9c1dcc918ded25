//! Command-line arguments (clap).

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// prunec: prune ONNX models structurally, from the exported file alone.
#[derive(Debug, Parser)]
#[command(name = "prunec", version, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub compile: CompileArgs,
}

/// `prunec MODEL -o OUT`: run a pass pipeline and write the result.
#[derive(Debug, Args)]
pub struct CompileArgs {
    /// The ONNX model to read.
    #[arg(required = true)]
    pub model: Option<PathBuf>,
    /// Where to write the result (its external data, if any, goes to `<OUT>.data`).
    #[arg(short, long, required = true)]
    pub output: Option<PathBuf>,
    /// Comma-separated passes to run, or `none` to write the model back untouched
    /// (`prunec passes` lists them).
    #[arg(long, default_value = prunec::passes::DEFAULT_PIPELINE)]
    pub passes: String,
    /// External data of the output: `keep` (the input's layout), `inline`, or a size threshold
    /// such as `1024`, `64KB`, `16MB`: tensors at least that large go to `<OUT>.data`.
    #[arg(long, default_value = "keep", value_parser = parse_external_data)]
    pub external_data: prunec::backends::onnx::ExternalData,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Summarise a model: inputs, outputs, op histogram, parameters, MACs, weight storage.
    Inspect(InspectArgs),
    /// Print the IR text dump (the format of snapshot tests).
    Dump(DumpArgs),
    /// List the dependency groups: the sets of channels that must be removed together.
    Groups(GroupsArgs),
    /// List the passes `--passes` accepts.
    Passes,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Concrete shape of an input, as `NAME=1,3,224,224` (or `1,3,224,224` for a model with
    /// one input); repeatable. Shapes of the rest of the graph are inferred from it.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DumpArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Concrete shape of an input, as for `inspect`.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
}

#[derive(Debug, Args)]
pub struct GroupsArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Print JSON (`{"groups": [{"id", "channels", "prunable", "frozen_reason", "members", ...}]}`).
    #[arg(long)]
    pub json: bool,
    /// Concrete shape of an input, as for `inspect`.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
}

/// Parses the process arguments; exits with code 2 on a usage error.
pub fn parse() -> Cli {
    Cli::parse()
}

fn parse_external_data(s: &str) -> Result<prunec::backends::onnx::ExternalData, String> {
    use prunec::backends::onnx::ExternalData;
    match s {
        "keep" => return Ok(ExternalData::KeepLayout),
        "inline" | "none" => return Ok(ExternalData::Inline),
        _ => {}
    }
    let upper = s.to_ascii_uppercase();
    let (digits, scale) = [("GB", 1u64 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)]
        .iter()
        .find_map(|(suffix, scale)| upper.strip_suffix(suffix).map(|d| (d.to_string(), *scale)))
        .unwrap_or((upper.clone(), 1));
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .map(ExternalData::Threshold)
        .ok_or_else(|| format!("`{s}` is not `keep`, `inline` or a size such as 1024, 64KB or 16MB"))
}

/// Resolves `--input-shape` values against the model's input names.
pub fn input_shapes(specs: &[String], input_names: &[String]) -> anyhow::Result<BTreeMap<String, Vec<u64>>> {
    let mut shapes = BTreeMap::new();
    for spec in specs {
        let (name, dims) = match spec.split_once('=') {
            Some((n, d)) => (n.to_string(), d),
            None if input_names.len() == 1 => (input_names[0].clone(), spec.as_str()),
            None => bail!("--input-shape `{spec}` needs a name (NAME=DIMS): the model has {} inputs", input_names.len()),
        };
        if !input_names.contains(&name) {
            bail!("--input-shape names `{name}`, which is not a graph input (inputs: {})", input_names.join(", "));
        }
        let dims = dims
            .split(',')
            .map(|d| d.trim().parse::<u64>())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("--input-shape `{spec}`: dims must be non-negative integers separated by commas"))?;
        shapes.insert(name, dims);
    }
    Ok(shapes)
}
