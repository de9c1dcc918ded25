//! The tract backend: a model as a tract NNEF archive, or as a ready tract plan in-process.
//!
//! tract reads the ONNX encoding of the IR (the same bytes the ONNX writer produces), types it
//! at the declared input shapes (or the ones given) and declutters it. The decluttered graph is
//! what NNEF stores: tract cannot serialise its optimised, codegen-level ops (tract#1313), and
//! decluttering is the expensive part of loading, so a runtime that loads the archive only has
//! to optimise it. The archive enables every tract extension registry prunec knows
//! (`tract_core`, `tract_onnx`, `tract_transformers`, `tract_extra`); tract names in the
//! archive's header only the ones the graph uses, and the reader must enable the same ones.
//!
//! Archives are byte-identical for the same model: the tar entries are sorted, carry a fixed
//! timestamp, and the gzip header has no time or name.

use crate::WriteError;
use prost::Message;
use prunec_ir::Model;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// The version of tract that writes the archives; a reader should be the same version, since
/// the archive format (tract's "beta1" NNEF extensions) records it and may change between them.
pub const TRACT_VERSION: &str = "0.23.9";

/// Why a model cannot become a tract NNEF archive or plan.
#[derive(Debug, thiserror::Error)]
pub enum NnefError {
    /// The IR could not be encoded for tract.
    #[error(transparent)]
    Encode(#[from] WriteError),
    /// tract cannot load, type or declutter the model.
    #[error("tract cannot type the model: {0}")]
    Tract(String),
    /// A graph input has no concrete type or rank, which NNEF needs.
    #[error("input `{input}` has no known {what}; give it with --input-shape {input}=DIMS")]
    OpenInput {
        /// The input.
        input: String,
        /// What is missing: "type" or "shape".
        what: &'static str,
    },
    /// An op of the decluttered model has no NNEF serialiser in tract.
    #[error("tract {TRACT_VERSION} has no NNEF serialiser for `{op}` (node `{node}`){}", hint.as_ref().map(|h| format!("; {h}")).unwrap_or_default())]
    Unserializable {
        /// tract's name of the op (`DequantizeLinearF32`, `QuantizeLinearI8`, ...).
        op: String,
        /// The node, named after the ONNX node it came from.
        node: String,
        /// What the user can do about it, when something can be done.
        hint: Option<String>,
    },
    /// The archive could not be written.
    #[error("cannot write `{}`", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Concrete shapes for some graph inputs, by name; inputs not listed keep their declared shape
/// (symbolic dims stay symbolic in the archive and the plan).
pub type InputShapes = BTreeMap<String, Vec<u64>>;

/// The NNEF framework with every extension registry prunec writes and reads archives with.
pub fn framework() -> tract_nnef::framework::Nnef {
    use tract_extra::WithTractExtra;
    use tract_onnx_opl::WithOnnx;
    use tract_transformers::WithTractTransformers;
    tract_nnef::nnef().with_onnx().with_tract_transformers().with_tract_extra()
}

/// The model as tract's decluttered typed model: what an NNEF archive stores. External data is
/// looked up relative to `dir`.
pub fn decluttered(model: &Model, dir: &Path, shapes: &InputShapes) -> Result<TypedModel, NnefError> {
    let bytes = crate::onnx::to_bytes(model)?;
    prunec_ir::catch_quietly(|| decluttered_from_bytes(&bytes, dir, shapes))
        .map_err(|m| NnefError::Tract(format!("internal failure: {m}")))?
}

fn decluttered_from_bytes(bytes: &[u8], dir: &Path, shapes: &InputShapes) -> Result<TypedModel, NnefError> {
    let tract = |e: TractError| NnefError::Tract(format!("{e:#}"));
    let pb = tract_onnx::pb::ModelProto::decode(bytes).map_err(|e| NnefError::Tract(e.to_string()))?;
    let mut model = tract_onnx::onnx().parse(&pb, dir.to_str()).map_err(tract)?.model;
    for ix in 0..model.inputs.len() {
        let outlet = model.inputs[ix];
        let name = model.node(outlet.node).name.clone();
        let fact = model.outlet_fact(outlet).map_err(tract)?.clone();
        let datum_type = fact.datum_type.concretize().ok_or_else(|| NnefError::OpenInput { input: name.clone(), what: "type" })?;
        if let Some(dims) = shapes.get(&name) {
            let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
            model.set_input_fact(ix, InferenceFact::dt_shape(datum_type, dims)).map_err(tract)?;
        } else if fact.shape.rank().concretize().is_none() {
            return Err(NnefError::OpenInput { input: name, what: "shape" });
        }
    }
    let typed = model.into_typed().map_err(tract)?;
    typed.into_decluttered().map_err(tract)
}

/// tract's decluttering fuses the ONNX expansion of the exact GELU (`0.5·x·(1 + erf(x/√2))`)
/// into its `GeluExact` op, for which tract 0.23.9 has no NNEF serialiser; the archive stores
/// the expansion the ONNX model had instead (each op of it serialisable), which the loading
/// tract fuses again when it optimises.
fn expand_gelu_exact(typed: &TypedModel) -> TractResult<TypedModel> {
    use tract_onnx::tract_core::ops::change_axes::wire_with_rank_broadcast;
    use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
    use tract_onnx::tract_core::ops::math::{add, erf, mul};
    use tract_onnx::tract_core::ops::nn::GeluExact;
    let is_gelu = |n: &TypedNode| n.op_as::<ElementWiseOp>().is_some_and(|ew| ew.0.is::<GeluExact>());
    if !typed.nodes().iter().any(is_gelu) {
        return Ok(typed.clone());
    }
    let mut model = typed.clone();
    let gelus: Vec<usize> = model.nodes().iter().filter(|n| is_gelu(n)).map(|n| n.id).collect();
    for id in gelus {
        let node = model.node(id).clone();
        let dt = model.outlet_fact(node.inputs[0])?.datum_type;
        let mut patch = TypedModelPatch::default();
        let x = patch.taps(&model, &node.inputs)?[0];
        let mut constant = |suffix: &str, v: f32| -> TractResult<OutletId> {
            patch.add_const(format!("{}.{suffix}", node.name), tensor0(v).cast_to_dt(dt)?.into_owned())
        };
        let (inv_sqrt2, one, half) = (constant("inv_sqrt2", 2f32.sqrt().recip())?, constant("one", 1.0)?, constant("half", 0.5)?);
        let scaled = wire_with_rank_broadcast(format!("{}.scaled", node.name), &mut patch, mul(), &[x, inv_sqrt2])?[0];
        let e = patch.wire_node(format!("{}.erf", node.name), erf(), &[scaled])?[0];
        let one_plus = wire_with_rank_broadcast(format!("{}.one_plus_erf", node.name), &mut patch, add(), &[e, one])?[0];
        let half_x = wire_with_rank_broadcast(format!("{}.half_x", node.name), &mut patch, mul(), &[x, half])?[0];
        let y = wire_with_rank_broadcast(format!("{}.gelu", node.name), &mut patch, mul(), &[half_x, one_plus])?[0];
        patch.shunt_outside(&model, id.into(), y)?;
        patch.apply(&mut model)?;
    }
    model.into_compact()
}

/// An optimised, ready-to-run tract plan of the model, built in-process without writing any
/// file: what a service that prunes and serves in one binary runs. Inputs keep their declared
/// shapes unless `shapes` gives them; symbolic dims are resolved by tract at each run.
///
/// `prunec::tract_plan` shows it from a file to outputs.
pub fn runnable(model: &Model, dir: &Path, shapes: &InputShapes) -> Result<Arc<TypedSimplePlan>, NnefError> {
    let typed = decluttered(model, dir, shapes)?;
    prunec_ir::catch_quietly(|| typed.into_optimized()?.into_runnable())
        .map_err(|m| NnefError::Tract(format!("internal failure: {m}")))?
        .map_err(|e| NnefError::Tract(format!("{e:#}")))
}

/// Loads a tract NNEF archive (`.nnef.tgz`, `.nnef.tar` or a folder) with the extensions prunec
/// writes with, and optimises it into a ready plan: what a runtime does with an archive.
pub fn load_archive(path: &Path) -> Result<Arc<TypedSimplePlan>, NnefError> {
    let load = || -> TractResult<Arc<TypedSimplePlan>> { framework().model_for_path(path)?.into_optimized()?.into_runnable() };
    prunec_ir::catch_quietly(load)
        .map_err(|m| NnefError::Tract(format!("internal failure: {m}")))?
        .map_err(|e| NnefError::Tract(format!("loading `{}`: {e:#}", path.display())))
}

/// Makes the node names independent of the order tract's declutter happened to visit nodes in.
///
/// When two nodes want the same name, tract suffixes the later one (`name.1`, `name.2`), and
/// which one is later depends on hash-map order inside some rewrites (the NNEF serialiser's
/// einsum to matmul one), so the same model can give archives that differ only by swapped names. Each
/// base name with a suffixed member is handed out again, `name`, `name.1`, ... in evaluation
/// order, which depends only on the graph; the model's inputs and outputs keep theirs.
fn canonical_names(typed: &mut TypedModel) -> TractResult<()> {
    // The serialiser's own rewrites (einsum to matmul among them) are where the names race;
    // run them first (running them again inside the serialiser finds nothing left to do), and
    // drop what they left dead, whose names would otherwise count.
    tract_nnef::ser::rewrite_model(typed)?;
    *typed = std::mem::take(typed).into_compact()?;
    fn split(name: &str) -> (&str, bool) {
        match name.rsplit_once('.') {
            Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => (base, true),
            _ => (name, false),
        }
    }
    let fixed: std::collections::BTreeSet<usize> = typed.inputs.iter().chain(typed.outputs.iter()).map(|o| o.node).collect();
    let held: std::collections::BTreeSet<String> = fixed.iter().map(|&id| typed.node(id).name.clone()).collect();
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for id in typed.eval_order()? {
        groups.entry(split(&typed.node(id).name).0.to_string()).or_default().push(id);
    }
    for (base, ids) in groups {
        if !ids.iter().any(|&id| split(&typed.node(id).name).1) {
            continue;
        }
        let mut free = std::iter::once(base.clone()).chain((1..).map(|i| format!("{base}.{i}"))).filter(|n| !held.contains(n));
        for id in ids.into_iter().filter(|id| !fixed.contains(id)) {
            typed.node_mut(id).name = free.next().unwrap_or_default();
        }
    }
    Ok(())
}

/// An archive as bytes, and the model properties it leaves out.
#[derive(Clone, Debug)]
pub struct Archive {
    /// The `.nnef.tgz` bytes.
    pub bytes: Vec<u8>,
    /// Properties (ONNX metadata, as tract names them: `onnx.metadata_props.KEY`) whose text
    /// tract 0.23.9's NNEF reader cannot parse back (it has no escape for `'`, and reads `\n`
    /// as `n`), left out so that the archive loads; sorted.
    pub omitted_properties: Vec<String>,
}

/// Removes the string properties that tract's NNEF writer would make unreadable: it prints
/// strings with Rust's `{:?}`, whose escapes (and unescaped `'`) its parser does not read back.
fn drop_unreadable_properties(typed: &mut TypedModel) -> Vec<String> {
    let readable = |s: &String| !s.contains(['\'', '"', '\\']) && format!("{s:?}").len() == s.len() + 2;
    let mut omitted: Vec<String> = typed
        .properties
        .iter()
        .filter(|(_, t)| {
            t.datum_type() == String::datum_type()
                && t.try_as_plain_ram().ok().and_then(|v| v.as_slice::<String>().ok().map(|s| !s.iter().all(readable))).unwrap_or(true)
        })
        .map(|(k, _)| k.clone())
        .collect();
    omitted.sort();
    for key in &omitted {
        typed.properties.remove(key);
    }
    omitted
}

/// The archive of a decluttered model: a deterministic tar, gzip-compressed.
pub fn archive(typed: &TypedModel) -> Result<Archive, NnefError> {
    let mut typed = expand_gelu_exact(typed).map_err(|e| NnefError::Tract(format!("{e:#}")))?;
    canonical_names(&mut typed).map_err(|e| NnefError::Tract(format!("{e:#}")))?;
    let omitted_properties = drop_unreadable_properties(&mut typed);
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let encoder = match framework().write_to_tar_with_config(&typed, encoder, false, true) {
        Ok(encoder) => encoder,
        Err(e) => return Err(serialise_error(e)),
    };
    let bytes = encoder.finish().map_err(|e| NnefError::Tract(format!("compressing the archive: {e}")))?;
    Ok(Archive { bytes, omitted_properties })
}

/// The `graph.nnef` text of a decluttered model (what the archive holds beside the tensors).
pub fn graph_text(typed: &TypedModel) -> Result<String, NnefError> {
    let fw = framework();
    let mut typed = expand_gelu_exact(typed).map_err(|e| NnefError::Tract(format!("{e:#}")))?;
    canonical_names(&mut typed).map_err(|e| NnefError::Tract(format!("{e:#}")))?;
    drop_unreadable_properties(&mut typed);
    let proto = tract_nnef::ser::to_proto_model(&fw, &typed).map_err(serialise_error)?;
    let mut text = Vec::new();
    tract_nnef::ast::dump::Dumper::new(&fw, &mut text).document(&proto.doc).map_err(|e| NnefError::Tract(format!("{e:#}")))?;
    String::from_utf8(text).map_err(|e| NnefError::Tract(e.to_string()))
}

/// Writes the model as a tract NNEF archive (`.nnef.tgz`) at `path`, atomically: the archive is
/// complete before it replaces anything. Returns its size in bytes and the properties left out
/// (see [`Archive::omitted_properties`]).
pub fn write_nnef(model: &Model, dir: &Path, shapes: &InputShapes, path: &Path) -> Result<(u64, Vec<String>), NnefError> {
    let typed = decluttered(model, dir, shapes)?;
    let Archive { bytes, omitted_properties } =
        prunec_ir::catch_quietly(|| archive(&typed)).map_err(|m| NnefError::Tract(format!("internal failure: {m}")))??;
    let io = |source| NnefError::Io { path: path.to_path_buf(), source };
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(folder).map_err(io)?;
    tmp.write_all(&bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok((bytes.len() as u64, omitted_properties))
}

/// Turns tract's "no serializer" failure into the op and node at fault; other failures pass.
fn serialise_error(e: TractError) -> NnefError {
    let message = format!("{e:#}");
    // tract names the node in its Display form, `#id "name" Op`, the only trace of which node
    // failed (the serialiser works on its own copy of the graph, so ids do not match ours).
    const MARK: &str = "No serializer found for node #";
    if let Some(at) = message.rfind(MARK) {
        let rest = &message[at + MARK.len()..];
        if let Some((name, op)) = rest.split_once('"').and_then(|(_, r)| r.split_once('"')) {
            let op = op.split_whitespace().next().unwrap_or("?").to_string();
            return NnefError::Unserializable { hint: unserializable_hint(&op), op, node: name.to_string() };
        }
    }
    NnefError::Tract(message)
}

fn unserializable_hint(op: &str) -> Option<String> {
    if op.starts_with("DequantizeLinear") || op.starts_with("QuantizeLinear") {
        Some(
            "tract stores no quantised activations in NNEF, and their float form is not exact (Quantize rounds and clamps), so \
             prunec offers none: emit ONNX for this model. DequantizeLinear of constant weights is folded exactly \
             (by tract here, by the `dequantize` pass in ONNX output)"
                .into(),
        )
    } else {
        None
    }
}
