//! `--emit`: which files a compile run writes.

use super::args::{self, CompileArgs};
use anyhow::{Context, Result};
use prunec::Format;
use prunec::frontend::Loaded;
use std::path::PathBuf;

/// The formats asked for, each with its path: `--output` for the format it names, the sibling
/// path (same stem, that format's ending) for the others.
pub fn outputs(a: &CompileArgs) -> Vec<(Format, PathBuf)> {
    let Some(output) = &a.output else { return Vec::new() };
    let named = Format::of_path(output);
    let mut formats = if a.emit.is_empty() { vec![named] } else { a.emit.clone() };
    formats.sort();
    formats.dedup();
    formats.into_iter().map(|f| (f, if f == named { output.clone() } else { f.sibling(output) })).collect()
}

/// Writes the tract NNEF archive when one is asked for, and returns where the ONNX output goes
/// (`None` when no ONNX is asked for).
pub fn tract_outputs(loaded: &Loaded, a: &CompileArgs) -> Result<Option<PathBuf>> {
    let outputs = outputs(a);
    for (format, path) in &outputs {
        if *format == Format::Nnef {
            let shapes = args::input_shapes(&a.input_shapes, &super::runtime_inputs(&loaded.model.graph))?;
            let (bytes, omitted) = prunec::backends::nnef::write_nnef(&loaded.model, &loaded.dir, &shapes, path)
                .with_context(|| format!("writing the tract NNEF archive `{}`; nothing was written", path.display()))?;
            for key in omitted {
                eprintln!("note: the archive leaves out the property `{key}`: tract's NNEF reader cannot parse its text back");
            }
            eprintln!("wrote {} ({bytes} bytes, tract {} NNEF)", path.display(), prunec::backends::nnef::TRACT_VERSION);
        }
    }
    Ok(outputs.into_iter().find(|(f, _)| *f == Format::Onnx).map(|(_, p)| p))
}
