//! Builds the synthetic test models under `testdata/models/`.

use anyhow::Result;
use std::path::Path;

/// Writes every synthetic test model.
pub fn run(_root: &Path) -> Result<()> {
    Ok(())
}
