//! Tensors of a Hugging Face safetensors checkpoint directory: one
//! `model.safetensors`, or shards listed by `model.safetensors.index.json`
//! (its `weight_map`: tensor name → file). Files are memory-mapped; a
//! tensor's bytes are read where they lie.
//!
//! The interface is deliberately narrow ([`Checkpoint::open`],
//! [`Checkpoint::tensor`], [`Checkpoint::file_of`]) so that a shared
//! checkpoint crate can take its place.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use ops::DType;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::error::{Error, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// An open checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(String, Mmap)>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

fn map(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io { path: path.into(), source })?;
    // SAFETY: the map is read-only and private to this process; the
    // checkpoint's files are not written while a model is loaded from them
    // (as every reader of memory-mapped checkpoints assumes).
    unsafe { Mmap::map(&file) }.map_err(|source| Error::Io { path: path.into(), source })
}

fn header<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Checkpoint { path: path.into(), message: format!("not a valid safetensors file: {e}") })
}

impl Checkpoint {
    /// Opens `dir`: its index and shards if it has an index, else its single
    /// file.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let mut files = Vec::new();
        let mut index = HashMap::new();
        if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|source| Error::Io { path: index_path.clone(), source })?;
            let parsed: Index = serde_json::from_str(&text)
                .map_err(|source| Error::Json { what: index_path.display().to_string(), source })?;
            let mut by_file: HashMap<String, usize> = HashMap::new();
            for (name, file) in parsed.weight_map {
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(Error::Checkpoint {
                        path: index_path,
                        message: format!("weight_map names \"{file}\" for `{name}`: expected a file in the directory"),
                    });
                }
                let next = by_file.len();
                let slot = *by_file.entry(file).or_insert(next);
                index.insert(name, slot);
            }
            let mut names: Vec<(String, usize)> = by_file.into_iter().collect();
            names.sort_by_key(|(_, slot)| *slot);
            for (file, _) in names {
                let m = map(&dir.join(&file))?;
                header(&dir.join(&file), &m)?;
                files.push((file, m));
            }
        } else if single.is_file() {
            let m = map(&single)?;
            for name in header(&single, &m)?.names() {
                index.insert(name.clone(), 0);
            }
            files.push((SINGLE_FILE.to_string(), m));
        } else {
            return Err(Error::Checkpoint {
                path: dir.into(),
                message: format!("has neither {SINGLE_FILE} nor {INDEX_FILE}"),
            });
        }
        Ok(Checkpoint { dir: dir.into(), files, index })
    }

    /// The file that holds `name` (as the error messages name it).
    pub fn file_of(&self, name: &str) -> Option<String> {
        self.index.get(name).map(|&i| self.dir.join(&self.files[i].0).display().to_string())
    }

    /// The directory's display name, for tensors in no file.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The dtype, shape and little-endian bytes of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<(DType, Vec<usize>, &[u8])> {
        let missing = || Error::Tensor {
            file: self.dir.display().to_string(),
            tensor: name.into(),
            message: "is not in the checkpoint".into(),
        };
        let &slot = self.index.get(name).ok_or_else(missing)?;
        let (file, bytes) = &self.files[slot];
        let path = self.dir.join(file);
        let view = header(&path, bytes)?.tensor(name).map_err(|e| Error::Tensor {
            file: path.display().to_string(),
            tensor: name.into(),
            message: format!("listed in the index but not readable in this file: {e}"),
        })?;
        let dtype = match view.dtype() {
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F32 => DType::F32,
            other => {
                return Err(Error::Tensor {
                    file: path.display().to_string(),
                    tensor: name.into(),
                    message: format!("has dtype {other:?}; supported: F16, BF16, F32"),
                })
            }
        };
        Ok((dtype, view.shape().to_vec(), view.data()))
    }
}
