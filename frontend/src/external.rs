//! External data: tensors whose bytes live in files beside the model.

use crate::ReadError;
use bytes::Bytes;
use prunec_ir::{PageRelease, Tensor, proto};
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// Resolves external-data references of one model, mapping each data file once.
pub(crate) struct ExternalData {
    /// The map of the model file itself, whose inline tensors' pages are given back as they
    /// stream (none for a model decoded from memory).
    model_pages: Option<Arc<MappedFile>>,
    dir: PathBuf,
    canonical_dir: Option<PathBuf>,
    files: HashMap<PathBuf, (Bytes, Option<Arc<MappedFile>>)>,
}

/// A read-only memory map of a model or data file.
#[derive(Debug)]
pub(crate) struct MappedFile(pub(crate) memmap2::Mmap);

/// The owner of `Bytes` sliced from a [`MappedFile`], which the tensors share with it.
pub(crate) struct SharedMap(pub(crate) Arc<MappedFile>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        &self.0.0
    }
}

impl PageRelease for MappedFile {
    fn release(&self, bytes: &[u8]) {
        let start = (bytes.as_ptr() as usize).wrapping_sub(self.0.as_ptr() as usize);
        if bytes.is_empty() || start >= self.0.len() || bytes.len() > self.0.len() - start {
            return;
        }
        // SAFETY: the map is read-only and shared with the file, so dropping its pages loses
        // nothing: the next read of the range faults them in again from the page cache or the
        // file. The range lies inside the map (checked above). A failure only means the pages
        // stay resident, so it is ignored.
        let _ = unsafe { self.0.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, bytes.len()) };
    }
}

impl ExternalData {
    /// Resolves external data against `dir`; `model_pages` is the map the model was decoded from.
    pub(crate) fn new(dir: &Path, model_pages: Option<Arc<MappedFile>>) -> ExternalData {
        ExternalData { model_pages, dir: dir.to_path_buf(), canonical_dir: None, files: HashMap::new() }
    }

    /// Turns a stored tensor into a [`Tensor`], reading external bytes when it has any.
    pub(crate) fn tensor(&mut self, t: proto::TensorProto) -> Result<Tensor, ReadError> {
        if t.data_location() != proto::tensor_proto::DataLocation::External {
            return Ok(match &self.model_pages {
                Some(pages) => Tensor::from_mapped_proto(t, pages.clone())?,
                None => Tensor::from_proto(t)?,
            });
        }
        let (bytes, pages) = self.bytes_of(&t)?;
        Ok(match pages {
            Some(pages) => Tensor::from_mapped(t, bytes, pages)?,
            None => Tensor::from_external(t, bytes)?,
        })
    }

    fn bytes_of(&mut self, t: &proto::TensorProto) -> Result<(Bytes, Option<Arc<dyn PageRelease>>), ReadError> {
        let err = |what: String| ReadError::ExternalData { tensor: t.name().to_string(), what };
        let mut location = None;
        let mut offset = 0u64;
        let mut length = None;
        for entry in &t.external_data {
            let parse = |v: &str| v.parse::<u64>().map_err(|_| err(format!("has {} `{v}`, which is not a byte count", entry.key())));
            match entry.key() {
                "location" => location = Some(entry.value()),
                "offset" => offset = parse(entry.value())?,
                "length" => length = Some(parse(entry.value())?),
                _ => {}
            }
        }
        let location = location.filter(|l| !l.is_empty()).ok_or_else(|| err("has no `location`".into()))?;
        let path = self.resolve(location).map_err(err)?;
        if !self.files.contains_key(&path) {
            let mapped = crate::map_file_with_pages(&path).map_err(|e| match e {
                ReadError::Io { source, .. } => err(format!("file `{location}` cannot be read: {source}")),
                e => err(format!("file `{location}` cannot be read: {e}")),
            })?;
            self.files.insert(path.clone(), mapped);
        }
        let (file, pages) = &self.files[&path];
        let size = file.len() as u64;
        let length = length.unwrap_or(size.saturating_sub(offset));
        let end = offset.checked_add(length).filter(|&end| end <= size);
        let Some(end) = end else {
            return Err(err(format!("asks for bytes {offset}..{} of `{location}`, which has {size}", offset as u128 + length as u128)));
        };
        let pages = pages.clone().map(|p| p as Arc<dyn PageRelease>);
        Ok((file.slice(offset as usize..end as usize), pages))
    }

    /// The data file's path, refusing locations that leave the model's folder.
    fn resolve(&mut self, location: &str) -> Result<PathBuf, String> {
        let rel = Path::new(location);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
            return Err(format!("location `{location}` is not a plain relative path inside the model's folder"));
        }
        let canonical_dir = match &self.canonical_dir {
            Some(d) => d.clone(),
            None => {
                let d = self.dir.canonicalize().map_err(|e| format!("folder `{}` cannot be resolved: {e}", self.dir.display()))?;
                self.canonical_dir = Some(d.clone());
                d
            }
        };
        let path = self.dir.join(rel);
        // Canonicalising resolves symlinks, so a link pointing outside the folder is caught too.
        let real = path.canonicalize().map_err(|e| format!("file `{location}` cannot be opened: {e}"))?;
        // Only regular files hold data: a FIFO would block the read, a device stream forever.
        // `metadata` does not open the file, so asking cannot block either.
        let meta = std::fs::metadata(&real).map_err(|e| format!("file `{location}` cannot be opened: {e}"))?;
        if !meta.is_file() {
            return Err(format!("file `{location}` is not a regular file but {}", crate::file_kind(&meta)));
        }
        if !real.starts_with(&canonical_dir) {
            return Err(format!("location `{location}` resolves to `{}`, outside the model's folder", real.display()));
        }
        Ok(real)
    }
}
