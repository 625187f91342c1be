//! # checkpoint: Hugging Face checkpoints on disk, memory-mapped
//!
//! This room reads the tensors of a checkpoint directory, whatever model
//! they belong to: safetensors (`model.safetensors`, or shards named by
//! `model.safetensors.index.json`), preferred where present, else PyTorch's
//! `torch.save` format (`pytorch_model.bin`, or shards named by
//! `pytorch_model.bin.index.json`). [`Checkpoint::open`] detects the
//! layout, maps every file and indexes its tensors by [`canonical_name`];
//! bytes are read from the mapping only when a tensor is asked for, and
//! converted there ([`Checkpoint::to_f16`], [`Checkpoint::to_f32`],
//! [`Checkpoint::to_bf16`], in parallel with rayon) or handed out raw
//! ([`Checkpoint::bytes`]).
//!
//! PyTorch files are read without running any pickled code: [`pytorch`]
//! locates the zip entries itself (with ZIP64) and interprets `data.pkl`
//! with a restricted unpickler that only knows tensors, storages and
//! `OrderedDict`, refusing any other Python global by name.
//!
//! What it may touch: the files of the directory it is given, read-only.
//! It knows no model family (names are opaque strings; the only rule on them
//! is that a leading `model.` is dropped) and depends on no other tierlm
//! crate: `memmap2`, `safetensors` (header parsing), `half`, `rayon`,
//! `serde`/`serde_json` (index files) and `thiserror`. Every size and offset
//! read from a file goes through checked arithmetic; the only `unsafe` is
//! the mapping of a file. Every failure is an [`Error`] whose message names
//! the file and the tensor and says what to do.
//!
//! Modules: `error` ([`Error`]), [`pytorch`] (torch.save archives),
//! `pickle` (the restricted unpickler), `zip` (entries of a stored zip),
//! `convert` (dtype conversions).

// The rules above, enforced: the mapping is the one `unsafe` (allowed where
// it is), and nothing input can reach unwraps.
#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod convert;
mod error;
mod pickle;
pub mod pytorch;
mod zip;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use serde::Deserialize;

pub use error::{Error, Result, LOOKED_FOR};
pub use pickle::TensorRecord;

/// The single-file safetensors checkpoint.
pub const SAFETENSORS_SINGLE: &str = "model.safetensors";
/// The index of a sharded safetensors checkpoint.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
/// The single-file PyTorch checkpoint.
pub const PYTORCH_SINGLE: &str = "pytorch_model.bin";
/// The index of a sharded PyTorch checkpoint.
pub const PYTORCH_INDEX: &str = "pytorch_model.bin.index.json";

/// The file format of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// safetensors files.
    Safetensors,
    /// `torch.save` zip archives.
    PyTorch,
}

/// A tensor's element type as stored. Types that neither format's readers
/// name here are kept by the name the file gives them, for messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dtype {
    F16,
    BF16,
    F32,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    /// Another type, by the name the file gives it (`F8_E4M3`, ...).
    Other(String),
}

impl Dtype {
    /// Bytes per element; `None` for [`Dtype::Other`].
    pub fn size(&self) -> Option<usize> {
        Some(match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
            Dtype::Other(_) => return None,
        })
    }

    fn from_safetensors(d: safetensors::Dtype) -> Self {
        use safetensors::Dtype as S;
        match d {
            S::F16 => Dtype::F16,
            S::BF16 => Dtype::BF16,
            S::F32 => Dtype::F32,
            S::F64 => Dtype::F64,
            S::I64 => Dtype::I64,
            S::I32 => Dtype::I32,
            S::I16 => Dtype::I16,
            S::I8 => Dtype::I8,
            S::U8 => Dtype::U8,
            S::BOOL => Dtype::Bool,
            other => Dtype::Other(format!("{other:?}")),
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
            Dtype::Other(name) => name,
        };
        f.write_str(name)
    }
}

/// What a checkpoint says of one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The name as stored (possibly with the `model.` prefix).
    pub stored_name: String,
    /// The element type.
    pub dtype: Dtype,
    /// The shape.
    pub shape: Vec<usize>,
    /// The file that holds it.
    pub file: PathBuf,
}

/// The canonical name: without the `model.` prefix some checkpoints carry.
pub fn canonical_name(name: &str) -> &str {
    name.strip_prefix("model.").unwrap_or(name)
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
}

#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    stored_name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the mapped file.
    start: usize,
    end: usize,
}

/// The tensors of a checkpoint directory, mapped but not yet read.
pub struct Checkpoint {
    dir: PathBuf,
    format: Format,
    files: Vec<MappedFile>,
    tensors: HashMap<String, TensorEntry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("format", &self.format)
            .field("files", &self.files.iter().map(|m| &m.path).collect::<Vec<_>>())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

#[derive(Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

/// The shard names of an index, sorted and checked to be plain file names,
/// and its weight map.
fn read_index(path: &Path) -> Result<(Vec<String>, HashMap<String, String>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let index: Index =
        serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
    let mut names: Vec<String> = Vec::new();
    for file in index.weight_map.values() {
        let plain = matches!(Path::new(file).components().collect::<Vec<_>>()[..], [std::path::Component::Normal(_)]);
        if !plain {
            return Err(Error::Index {
                path: path.to_path_buf(),
                reason: format!("shard {file:?} is not a plain file name"),
            });
        }
        if !names.contains(file) {
            names.push(file.clone());
        }
    }
    names.sort();
    Ok((names, index.weight_map))
}

#[allow(unsafe_code)]
fn map(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the mapping is read-only and lives as long as the `Checkpoint`
    // that owns it. Reading through it is sound as long as no other process
    // truncates or rewrites the file while it is mapped; checkpoints are
    // read-only inputs, and changing one under a running process is not
    // supported.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// The tensors of one safetensors file, with their byte ranges in it.
fn safetensors_tensors(path: &Path, buf: &[u8], file: usize) -> Result<Vec<TensorEntry>> {
    let bad = |reason: String| Error::Safetensors { path: path.to_path_buf(), reason };
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(buf).map_err(|e| bad(e.to_string()))?;
    let data_start = header_len.checked_add(8).ok_or_else(|| bad("header length overflows".into()))?;
    let mut out = Vec::new();
    for (stored_name, info) in metadata.tensors() {
        // `read_metadata` checked the offsets against the file; checked
        // again here, where the ranges are made.
        let range = data_start
            .checked_add(info.data_offsets.0)
            .zip(data_start.checked_add(info.data_offsets.1))
            .filter(|&(s, e)| s <= e && e <= buf.len())
            .ok_or_else(|| bad(format!("tensor {stored_name} lies outside the file")))?;
        out.push(TensorEntry {
            file,
            dtype: Dtype::from_safetensors(info.dtype),
            shape: info.shape.clone(),
            start: range.0,
            end: range.1,
            stored_name,
        });
    }
    Ok(out)
}

/// The tensors of one torch.save archive, with their byte ranges in it.
fn pytorch_tensors(path: &Path, buf: &[u8], file: usize) -> Result<Vec<TensorEntry>> {
    Ok(pytorch::read_tensors(path, buf)?
        .into_iter()
        .map(|t| TensorEntry {
            file,
            dtype: t.record.dtype,
            shape: t.shape,
            start: t.range.start,
            end: t.range.end,
            stored_name: t.name,
        })
        .collect())
}

impl Checkpoint {
    /// Maps the checkpoint in `dir` and indexes its tensors. The layouts,
    /// in order of preference: `model.safetensors.index.json`,
    /// `model.safetensors`, `pytorch_model.bin.index.json`,
    /// `pytorch_model.bin`.
    pub fn open(dir: &Path) -> Result<Self> {
        let (format, file_names, weight_map) = if dir.join(SAFETENSORS_INDEX).is_file() {
            let (names, map) = read_index(&dir.join(SAFETENSORS_INDEX))?;
            (Format::Safetensors, names, Some(map))
        } else if dir.join(SAFETENSORS_SINGLE).is_file() {
            (Format::Safetensors, vec![SAFETENSORS_SINGLE.to_string()], None)
        } else if dir.join(PYTORCH_INDEX).is_file() {
            let (names, map) = read_index(&dir.join(PYTORCH_INDEX))?;
            (Format::PyTorch, names, Some(map))
        } else if dir.join(PYTORCH_SINGLE).is_file() {
            (Format::PyTorch, vec![PYTORCH_SINGLE.to_string()], None)
        } else {
            return Err(Error::NotFound { dir: dir.to_path_buf() });
        };

        let mut files = Vec::with_capacity(file_names.len());
        let mut tensors = HashMap::new();
        for (fi, name) in file_names.iter().enumerate() {
            let path = dir.join(name);
            let mmap = map(&path)?;
            let entries = match format {
                Format::Safetensors => safetensors_tensors(&path, &mmap, fi)?,
                Format::PyTorch => pytorch_tensors(&path, &mmap, fi)?,
            };
            for entry in entries {
                tensors.entry(canonical_name(&entry.stored_name).to_string()).or_insert(entry);
            }
            files.push(MappedFile { path, mmap });
        }

        if let Some(weight_map) = weight_map {
            for (name, file) in &weight_map {
                let found = tensors
                    .get(canonical_name(name))
                    .is_some_and(|t| file_names[t.file] == *file && t.stored_name == *name);
                if !found {
                    return Err(Error::Index {
                        path: dir.join(file),
                        reason: format!("the index places {name} in this file, but it is not there"),
                    });
                }
            }
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), format, files, tensors })
    }

    /// The directory the checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The format of its files.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The files it is read from, in index order.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// Canonical names of every tensor, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Whether the checkpoint holds `name` (canonical or stored).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(canonical_name(name))
    }

    /// What the checkpoint says of `name` (canonical or stored).
    pub fn info(&self, name: &str) -> Option<TensorInfo> {
        self.tensors.get(canonical_name(name)).map(|t| TensorInfo {
            stored_name: t.stored_name.clone(),
            dtype: t.dtype.clone(),
            shape: t.shape.clone(),
            file: self.files[t.file].path.clone(),
        })
    }

    /// Shape of a tensor, by canonical or stored name.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(canonical_name(name)).map(|t| t.shape.as_slice())
    }

    /// Stored type of a tensor, by canonical or stored name.
    pub fn dtype(&self, name: &str) -> Option<&Dtype> {
        self.tensors.get(canonical_name(name)).map(|t| &t.dtype)
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors
            .get(canonical_name(name))
            .ok_or_else(|| Error::MissingTensor { name: name.to_string(), dir: self.dir.clone() })
    }

    /// The raw little-endian bytes of tensor `name`, contiguous, row-major,
    /// straight from the mapping.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.entry(name)?;
        Ok(&self.files[t.file].mmap[t.start..t.end])
    }

    /// Tensor `name`, checked to have shape `expected_shape`.
    fn checked(&self, name: &str, expected_shape: &[usize]) -> Result<(&TensorEntry, &[u8])> {
        let t = self.entry(name)?;
        if t.shape != expected_shape {
            return Err(Error::TensorShape {
                path: self.files[t.file].path.clone(),
                name: t.stored_name.clone(),
                expected: expected_shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        Ok((t, &self.files[t.file].mmap[t.start..t.end]))
    }

    fn convert<T: convert::Element>(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<T>> {
        let (t, bytes) = self.checked(name, expected_shape)?;
        convert::convert::<T>(bytes, &t.dtype).ok_or_else(|| Error::UnsupportedDtype {
            path: self.files[t.file].path.clone(),
            name: t.stored_name.clone(),
            dtype: t.dtype.to_string(),
            target: T::NAME,
        })
    }

    /// Tensor `name` (checked to have shape `expected_shape`) as f16, from
    /// F16, BF16 or F32.
    pub fn to_f16(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f16>> {
        self.convert(name, expected_shape)
    }

    /// Tensor `name` (checked to have shape `expected_shape`) as f32, from
    /// F16, BF16 or F32.
    pub fn to_f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        self.convert(name, expected_shape)
    }

    /// Tensor `name` (checked to have shape `expected_shape`) as bf16, from
    /// F16, BF16 or F32.
    pub fn to_bf16(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<bf16>> {
        self.convert(name, expected_shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names() {
        assert_eq!(canonical_name("model.decoder.layers.0.fc1.weight"), "decoder.layers.0.fc1.weight");
        assert_eq!(canonical_name("decoder.embed_tokens.weight"), "decoder.embed_tokens.weight");
        assert_eq!(canonical_name("lm_head.weight"), "lm_head.weight");
    }

    #[test]
    fn an_empty_directory_lists_what_was_looked_for() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Checkpoint::open(tmp.path()).unwrap_err().to_string();
        for name in [SAFETENSORS_SINGLE, SAFETENSORS_INDEX, PYTORCH_SINGLE, PYTORCH_INDEX] {
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn shard_names_must_be_plain_file_names() {
        let tmp = tempfile::tempdir().unwrap();
        for bad in ["../x.bin", "/etc/passwd", "a/b.bin", "..", "."] {
            let index = format!(r#"{{"weight_map": {{"w": {bad:?}}}}}"#);
            std::fs::write(tmp.path().join(PYTORCH_INDEX), index).unwrap();
            let err = Checkpoint::open(tmp.path()).unwrap_err().to_string();
            assert!(err.contains("not a plain file name"), "{bad}: {err}");
        }
    }
}
