//! Benchmarks recorded in BENCHMARKS.md.

use anyhow::Result;
use std::path::Path;

/// Runs the benchmarks.
pub fn run(_root: &Path, _args: &[String]) -> Result<()> {
    Ok(())
}
