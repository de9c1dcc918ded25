//! `--emit`: which files a compile run writes.

use super::args;
use anyhow::{Context, Result};
use prunec::Format;
use prunec::backends::onnx::WriteOptions;
use prunec::frontend::Loaded;
use std::path::{Path, PathBuf};

/// The formats asked for (`emit`: their names; empty: the one `output` names), each with its
/// path: `output` for the format it names, the sibling path (same stem, that format's ending)
/// for the others.
pub fn outputs(output: &Path, emit: &[String]) -> Vec<(Format, PathBuf)> {
    let named = Format::of_path(output);
    let mut formats: Vec<Format> =
        if emit.is_empty() { vec![named] } else { emit.iter().filter_map(|f| args::parse_format(f).ok()).collect() };
    formats.sort();
    formats.dedup();
    formats.into_iter().map(|f| (f, if f == named { output.to_path_buf() } else { f.sibling(output) })).collect()
}

/// Writes the tract NNEF archive when one is asked for, and returns where the ONNX output goes
/// (`None` when no ONNX is asked for).
pub fn tract_outputs(loaded: &Loaded, outputs: &[(Format, PathBuf)], input_shapes: &[String]) -> Result<Option<PathBuf>> {
    for (format, path) in outputs {
        if *format == Format::Nnef {
            let shapes = args::input_shapes(input_shapes, &prunec::runtime::inputs::runtime_inputs(&loaded.model.graph))?;
            let (bytes, omitted) = prunec::backends::nnef::write_nnef(&loaded.model, &loaded.dir, &shapes, path)
                .with_context(|| format!("writing the tract NNEF archive `{}`; nothing was written", path.display()))?;
            for key in omitted {
                eprintln!("note: the archive leaves out the property `{key}`: tract's NNEF reader cannot parse its text back");
            }
            eprintln!("wrote {} ({bytes} bytes, tract {} NNEF)", path.display(), prunec::backends::nnef::TRACT_VERSION);
        }
    }
    Ok(outputs.iter().find(|(f, _)| *f == Format::Onnx).map(|(_, p)| p.clone()))
}

/// `-o -`: the ONNX model on standard output. It has to be self-contained, so a model with
/// external data is refused unless `--external-data inline` brings its weights in.
pub fn to_stdout(loaded: &Loaded, write: &WriteOptions) -> Result<()> {
    use prunec::backends::onnx::ExternalData;
    let keeps_external = match write.external_data {
        ExternalData::Inline => false,
        ExternalData::Threshold(_) => true,
        ExternalData::KeepLayout => prunec::ir::model_stats(&loaded.model).external_bytes > 0,
    };
    if keeps_external {
        anyhow::bail!(
            "`-o -` writes one self-contained model to standard output, and this one would keep external data; pass --external-data inline"
        );
    }
    let bytes = prunec::backends::onnx::to_bytes(&loaded.model).context("serialising the model for standard output")?;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes).and_then(|()| out.flush()).context("writing the model to standard output")
}
