//! Hugging Face safetensors checkpoints, memory-mapped.
//!
//! A directory holds either one `model.safetensors` or several shards named
//! by `model.safetensors.index.json`. Each file is mapped with `memmap2` and
//! its header parsed (and validated against the file's length) by the
//! `safetensors` crate; tensor bytes are read from the mapping only when the
//! model asks for that tensor, and converted to f16 there.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::weights::WeightSource;

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

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
    files: Vec<MappedFile>,
    tensors: HashMap<String, TensorEntry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files.iter().map(|m| &m.path).collect::<Vec<_>>())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

#[derive(Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

/// The canonical name: without the `model.` prefix some checkpoints carry.
pub fn canonical_name(name: &str) -> &str {
    name.strip_prefix("model.").unwrap_or(name)
}

impl Checkpoint {
    /// Maps the checkpoint in `dir` and indexes its tensors.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let (file_names, weight_map) = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let index: Index =
                serde_json::from_str(&text).map_err(|source| Error::Json { path: index_path.clone(), source })?;
            let mut names: Vec<String> = Vec::new();
            for file in index.weight_map.values() {
                if Path::new(file).components().count() != 1 || file == ".." {
                    return Err(Error::Safetensors {
                        path: index_path.clone(),
                        reason: format!("shard {file:?} is not a plain file name"),
                    });
                }
                if !names.contains(file) {
                    names.push(file.clone());
                }
            }
            names.sort();
            (names, Some(index.weight_map))
        } else if single_path.is_file() {
            (vec![SINGLE_FILE.to_string()], None)
        } else {
            return Err(Error::MissingWeights { dir: dir.to_path_buf() });
        };

        let mut files = Vec::with_capacity(file_names.len());
        let mut tensors = HashMap::new();
        for (fi, name) in file_names.iter().enumerate() {
            let path = dir.join(name);
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the mapping is read-only and lives as long as this
            // `Checkpoint`. Reading through it is sound as long as no other
            // process truncates or rewrites the file while it is mapped;
            // checkpoints are read-only inputs, and changing one under a
            // running process is not supported.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::Safetensors { path: path.clone(), reason: e.to_string() })?;
            let data_start = 8 + header_len;
            for (stored_name, info) in metadata.tensors() {
                let canonical = canonical_name(&stored_name).to_string();
                tensors.entry(canonical).or_insert(TensorEntry {
                    file: fi,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                    stored_name,
                });
            }
            files.push(MappedFile { path, mmap });
        }

        if let Some(weight_map) = weight_map {
            for (name, file) in &weight_map {
                let found = tensors
                    .get(canonical_name(name))
                    .is_some_and(|t| file_names[t.file] == *file && t.stored_name == *name);
                if !found {
                    return Err(Error::Safetensors {
                        path: dir.join(file),
                        reason: format!("the index places {name} in this file, but it is not there"),
                    });
                }
            }
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), files, tensors })
    }

    /// The directory the checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Canonical names of every tensor, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Shape of a tensor, by canonical or stored name.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(canonical_name(name)).map(|t| t.shape.as_slice())
    }

    /// Stored type of a tensor, by canonical or stored name.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.tensors.get(canonical_name(name)).map(|t| t.dtype)
    }
}

impl WeightSource for Checkpoint {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f16>> {
        let t =
            self.tensors.get(canonical_name(name)).ok_or_else(|| Error::MissingTensor { name: name.to_string() })?;
        if t.shape != shape {
            return Err(Error::TensorShape {
                name: t.stored_name.clone(),
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        let bytes = &self.files[t.file].mmap[t.start..t.end];
        convert_to_f16(bytes, t.dtype)
            .ok_or_else(|| Error::UnsupportedDtype { name: t.stored_name.clone(), dtype: format!("{:?}", t.dtype) })
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(canonical_name(name))
    }
}

/// Little-endian F16, BF16 or F32 bytes to f16; `None` for other types.
fn convert_to_f16(bytes: &[u8], dtype: Dtype) -> Option<Vec<f16>> {
    const CHUNK: usize = 1 << 16;
    let (size, convert): (usize, fn(&[u8]) -> f16) = match dtype {
        Dtype::F16 => (2, |b| f16::from_le_bytes([b[0], b[1]])),
        Dtype::BF16 => (2, |b| f16::from_f32(bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        Dtype::F32 => (4, |b| f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        _ => return None,
    };
    let mut out = vec![f16::ZERO; bytes.len() / size];
    out.par_chunks_mut(CHUNK).zip(bytes.par_chunks(CHUNK * size)).for_each(|(dst, src)| {
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(size)) {
            *d = convert(s);
        }
    });
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_each_stored_type() {
        let vals = [0.5f32, -1.25, 3.0e-3];
        let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16_bytes: Vec<u8> = vals.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
        let bf16_bytes: Vec<u8> = vals.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
        let want: Vec<f16> = vals.iter().map(|v| f16::from_f32(*v)).collect();
        assert_eq!(convert_to_f16(&f32_bytes, Dtype::F32).unwrap(), want);
        assert_eq!(convert_to_f16(&f16_bytes, Dtype::F16).unwrap(), want);
        let from_bf16: Vec<f16> = vals.iter().map(|v| f16::from_f32(bf16::from_f32(*v).to_f32())).collect();
        assert_eq!(convert_to_f16(&bf16_bytes, Dtype::BF16).unwrap(), from_bf16);
        assert!(convert_to_f16(&f32_bytes, Dtype::I32).is_none());
    }

    #[test]
    fn canonical_names() {
        assert_eq!(canonical_name("model.decoder.layers.0.fc1.weight"), "decoder.layers.0.fc1.weight");
        assert_eq!(canonical_name("decoder.embed_tokens.weight"), "decoder.embed_tokens.weight");
        assert_eq!(canonical_name("lm_head.weight"), "lm_head.weight");
    }
}
