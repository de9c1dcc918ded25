//! Recipes: a pipeline with its options, the verification settings and the output settings, in
//! one file (`--recipe FILE.toml`), so a run can be written down, reviewed and replayed.
//!
//! ```toml
//! [[passes]]
//! name = "dce"
//!
//! [[passes]]
//! name = "prune"
//! ratio = 0.4
//! criterion = "l1"
//!
//! [verify]
//! tolerance = 1e-4
//! inputs = "calib.npz"
//!
//! [output]
//! external-data = "1MB"
//! ```
//!
//! Instead of `[[passes]]`, `pipeline = "dce,prune{ratio=0.4}"` gives the pipeline in the
//! `--passes` form. Every `--report` JSON holds the effective recipe under `recipe`, with every
//! default filled in; `--recipe report.json` replays it. Paths are as given (relative to the
//! working directory).

use crate::passes::{PassError, PassSpec, Pipeline};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A whole run's settings, apart from the model and output paths.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Recipe {
    /// The pipeline in its text form (`--passes`); not together with `passes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// The pipeline, one table per pass: `name` and its options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passes: Vec<PassEntry>,
    /// How the result is verified.
    #[serde(default)]
    pub verify: VerifySettings,
    /// How the result is written.
    #[serde(default)]
    pub output: OutputSettings,
}

/// One pass of a recipe.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PassEntry {
    /// The pass.
    pub name: String,
    /// Its options (strings, numbers or booleans; read as in `name{key=value}`).
    #[serde(flatten)]
    pub options: BTreeMap<String, OptionValue>,
}

/// An option's value in a recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OptionValue {
    /// `true` or `false`.
    Bool(bool),
    /// An integer.
    Integer(i64),
    /// A number.
    Float(f64),
    /// Text, as in `--passes`.
    Text(String),
}

impl OptionValue {
    fn text(&self) -> String {
        match self {
            OptionValue::Bool(b) => b.to_string(),
            OptionValue::Integer(i) => i.to_string(),
            OptionValue::Float(f) => f.to_string(),
            OptionValue::Text(t) => t.clone(),
        }
    }
}

/// Verification settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VerifySettings {
    /// Whether to verify (`--no-verify` is `false`).
    pub enabled: bool,
    /// Verify even a model above the size that must be asked for (`--verify`).
    pub force: bool,
    /// The bound on the difference to the reference, relative to each output's scale.
    pub tolerance: f64,
    /// Inputs for the measurements and verification (`--inputs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<PathBuf>,
    /// Concrete input shapes (`--input-shape NAME=DIMS`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input_shapes: Vec<String>,
    /// Keep the inputs' open sizes open in the result although `input_shapes` specialised the
    /// passes, once a second verification at other sizes shows the result works there
    /// (`--open-interface`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub open_interface: bool,
    /// Seed of random inputs.
    pub seed: u64,
}

impl Default for VerifySettings {
    fn default() -> Self {
        VerifySettings {
            enabled: true,
            force: false,
            tolerance: crate::runtime::verify::MASKING_TOLERANCE,
            inputs: None,
            input_shapes: Vec::new(),
            open_interface: false,
            seed: 0,
        }
    }
}

/// Output settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OutputSettings {
    /// `keep`, `inline`, or a size threshold (`1MB`): as `--external-data`.
    pub external_data: String,
    /// `one-file` or `per-tensor`: as `--external-data-layout`.
    pub layout: String,
    /// Formats (`onnx`, `nnef`); empty: the one the output path names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emit: Vec<String>,
}

impl Default for OutputSettings {
    fn default() -> Self {
        OutputSettings { external_data: "keep".into(), layout: "one-file".into(), emit: Vec::new() }
    }
}

/// Why a recipe could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The file could not be read.
    #[error("cannot read the recipe `{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a recipe.
    #[error("the recipe `{}` is not valid: {why}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

impl Recipe {
    /// Reads a recipe: TOML, or a `--report` JSON whose `recipe` it replays.
    pub fn read(path: &Path) -> Result<Recipe, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Io { path: path.to_path_buf(), source })?;
        let invalid = |why: String| RecipeError::Invalid { path: path.to_path_buf(), why };
        let recipe: Recipe = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
            let report: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
            let recipe =
                report.get("recipe").ok_or_else(|| invalid("a JSON recipe is a `--report` file, and this one has no `recipe`".into()))?;
            serde_json::from_value(recipe.clone()).map_err(|e| invalid(e.to_string()))?
        } else {
            toml::from_str(&text).map_err(|e| invalid(e.to_string()))?
        };
        if recipe.pipeline.is_some() && !recipe.passes.is_empty() {
            return Err(invalid("give the pipeline as `pipeline` or as `[[passes]]`, not both".into()));
        }
        Ok(recipe)
    }

    /// The pipeline's entries as written (none given: `None`).
    pub fn specs(&self) -> Result<Option<Vec<PassSpec>>, PassError> {
        if let Some(text) = &self.pipeline {
            return Pipeline::parse_specs(text).map(Some);
        }
        if self.passes.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            self.passes
                .iter()
                .map(|p| PassSpec { name: p.name.clone(), options: p.options.iter().map(|(k, v)| (k.clone(), v.text())).collect() })
                .collect(),
        ))
    }

    /// The recipe with `pipeline` as its passes, every option written out.
    pub fn with_pipeline(mut self, pipeline: &Pipeline) -> Recipe {
        self.pipeline = None;
        self.passes = pipeline
            .specs()
            .into_iter()
            .map(|s| PassEntry { name: s.name, options: s.options.into_iter().map(|(k, v)| (k, OptionValue::Text(v))).collect() })
            .collect();
        self
    }

    /// The recipe as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}
