//! PyTorch checkpoints as `torch.save` writes them since torch 1.6: a zip
//! archive of stored (uncompressed) entries `<prefix>/data.pkl` (the
//! pickled state dict), `<prefix>/data/<key>` (one per storage, raw
//! little-endian elements), `<prefix>/version`, `<prefix>/byteorder`, ...
//!
//! The file is memory-mapped by the caller; [`read_tensors`] finds the
//! entries (module `zip`), reads the state dict with the restricted
//! unpickler of module `pickle` (which runs nothing and refuses every
//! global outside its allowlist), and places each tensor in the file: the
//! byte range of its elements inside its storage's entry, checked to lie
//! there. Several tensors may share a storage (tied weights, views) at
//! different offsets.
//!
//! Non-contiguous tensors (strides other than row-major) are refused, not
//! gathered: `save_pretrained` and `torch.save(model.state_dict())` write
//! contiguous tensors, and a refusal says what to do. The legacy (pre-1.6)
//! format, a bare pickle stream, is refused with an error that says to
//! re-save the file with a newer torch or convert it to safetensors.

use std::path::Path;

use crate::error::{Error, Result};
pub use crate::pickle::TensorRecord;
use crate::pickle::{self, PickleError};

/// A tensor of a PyTorch file: its record and its bytes' place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedTensor {
    /// The name in the state dict.
    pub name: String,
    /// What the pickle says of it.
    pub record: TensorRecord,
    /// Its shape, as `usize`.
    pub shape: Vec<usize>,
    /// The byte range of its elements in the file.
    pub range: std::ops::Range<usize>,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::PyTorch { path: path.to_path_buf(), reason: reason.into() }
}

/// Reads the state dict of the pickle `data_pkl` (the `data.pkl` entry of
/// a torch.save archive at `path`, named in errors).
pub fn read_pickle(path: &Path, data_pkl: &[u8]) -> Result<Vec<(String, TensorRecord)>> {
    pickle::read_state_dict(data_pkl).map_err(|e| match e {
        PickleError::Forbidden(global) => Error::ForbiddenGlobal { path: path.to_path_buf(), global },
        PickleError::Invalid(reason) => corrupt(path, format!("data.pkl: {reason}")),
    })
}

/// Whether `shape`/`strides` are row-major contiguous (strides of size-1
/// dimensions, and of empty tensors, do not matter, as in torch).
fn contiguous(shape: &[u64], strides: &[u64]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    let mut expected: u64 = 1;
    for (&size, &stride) in shape.iter().zip(strides).rev() {
        if size != 1 && stride != expected {
            return false;
        }
        match expected.checked_mul(size) {
            Some(e) => expected = e,
            None => return false,
        }
    }
    true
}

/// The tensors of the torch.save archive `buf` (the file at `path`), each
/// with its bytes' range in `buf`.
pub fn read_tensors(path: &Path, buf: &[u8]) -> Result<Vec<PlacedTensor>> {
    if !buf.starts_with(b"PK\x03\x04") && !buf.starts_with(b"PK\x05\x06") {
        return Err(Error::LegacyPyTorch { path: path.to_path_buf() });
    }
    let entries = crate::zip::parse(buf).map_err(|r| corrupt(path, r))?;
    // The archive's one top-level folder holds data.pkl (its name is the
    // file's stem in older torch, `archive` in newer).
    let pkl = entries.iter().find(|e| e.name.ends_with("/data.pkl") && e.name.matches('/').count() == 1).ok_or_else(
        || {
            corrupt(
                path,
                "no <folder>/data.pkl entry in the zip, so not a torch.save archive (a TorchScript archive or \
                 another zip?)",
            )
        },
    )?;
    let prefix = &pkl.name[..pkl.name.len() - "data.pkl".len()];
    let read = |e: &crate::zip::Entry| e.stored_range().map(|r| &buf[r]).map_err(|r| corrupt(path, r));
    if let Some(order) = entries.iter().find(|e| e.name == format!("{prefix}byteorder")) {
        let order = read(order)?;
        if order.trim_ascii() != b"little" {
            return Err(corrupt(
                path,
                format!(
                    "the tensors are stored {:?}-endian; only little-endian is read (re-save it on a little-endian \
                     machine)",
                    String::from_utf8_lossy(order.trim_ascii())
                ),
            ));
        }
    }
    let records = read_pickle(path, read(pkl)?)?;

    let storages: std::collections::HashMap<&str, &crate::zip::Entry> =
        entries.iter().filter_map(|e| Some((e.name.strip_prefix(prefix)?.strip_prefix("data/")?, e))).collect();
    let mut out = Vec::with_capacity(records.len());
    for (name, record) in records {
        let bad = |reason: String| Error::Tensor { path: path.to_path_buf(), name: name.clone(), reason };
        let entry = storages.get(record.storage_key.as_str()).ok_or_else(|| {
            bad(format!(
                "its storage {prefix}data/{} is not in the archive (the file is truncated?)",
                record.storage_key
            ))
        })?;
        let storage = entry.stored_range().map_err(|r| corrupt(path, r))?;
        if !contiguous(&record.shape, &record.strides) {
            return Err(bad(format!(
                "it is not contiguous (size {:?}, stride {:?}); save it with .contiguous() or convert the \
                 checkpoint to safetensors",
                record.shape, record.strides
            )));
        }
        let elem = record.dtype.size().unwrap_or(1) as u64;
        let numel = record.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let start = record.storage_offset.checked_mul(elem);
        let range = numel
            .and_then(|n| n.checked_mul(elem))
            .zip(start)
            .and_then(|(bytes, start)| Some((start, start.checked_add(bytes)?)));
        let storage_len = storage.len() as u64;
        let claimed = record.storage_numel.checked_mul(elem);
        if claimed.is_none_or(|c| c > storage_len) {
            return Err(bad(format!(
                "its storage {prefix}data/{} claims {} elements of {}, but the entry holds {storage_len} bytes (the \
                 file is truncated or corrupt)",
                record.storage_key, record.storage_numel, record.dtype
            )));
        }
        let (start, end) = match range {
            Some((s, e)) if e <= storage_len => (s, e),
            _ => {
                return Err(bad(format!(
                    "size {:?} at offset {} does not fit in its storage {prefix}data/{} of {storage_len} bytes",
                    record.shape, record.storage_offset, record.storage_key
                )))
            }
        };
        // Both are within the storage's range, which is within `buf`.
        let range = storage.start + start as usize..storage.start + end as usize;
        let shape = record
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| bad("a dimension does not fit in usize".into()))?;
        out.push(PlacedTensor { name, record, shape, range });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pickle::tests::P;
    use crate::zip::tests::build_zip;

    fn archive(pkl: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
        archive_with(pkl, storages, false)
    }

    fn archive_with(pkl: &[u8], storages: &[(&str, &[u8])], zip64: bool) -> Vec<u8> {
        let names: Vec<String> = storages.iter().map(|(k, _)| format!("archive/data/{k}")).collect();
        let mut entries: Vec<(&str, &[u8])> = vec![("archive/data.pkl", pkl), ("archive/byteorder", b"little")];
        entries.extend(names.iter().map(String::as_str).zip(storages.iter().map(|(_, d)| *d)));
        entries.push(("archive/version", b"3\n"));
        build_zip(&entries, zip64, 64)
    }

    /// name, storage key, storage class, storage numel, offset, shape, stride
    type Spec<'a> = (&'a str, &'a str, &'a str, u8, u8, &'a [u8], &'a [u8]);

    fn sd(tensors: &[Spec]) -> Vec<u8> {
        let mut p = P::default().state_dict().op(b'(');
        for &(name, key, class, numel, offset, shape, stride) in tensors {
            p = p.s(name).tensor(key, class, numel, offset, shape, stride);
        }
        p.op(b'u').op(b'.').0
    }

    #[test]
    fn places_tensors_with_shared_storages() {
        let data: Vec<u8> = (0..24).collect();
        let pkl = sd(&[
            ("a", "0", "HalfStorage", 12, 0, &[2, 2], &[2, 1]),
            ("b", "0", "HalfStorage", 12, 4, &[4, 2], &[2, 1]),
            ("c", "1", "ByteStorage", 3, 1, &[2], &[1]),
        ]);
        for zip64 in [false, true] {
            let buf = archive_with(&pkl, &[("0", &data), ("1", b"xyz")], zip64);
            let t = read_tensors(Path::new("x.bin"), &buf).unwrap();
            assert_eq!(t.len(), 3);
            assert_eq!(&buf[t[0].range.clone()], &data[0..8]);
            assert_eq!(&buf[t[1].range.clone()], &data[8..24]);
            assert_eq!(&buf[t[2].range.clone()], b"yz");
            assert_eq!(t[1].shape, [4, 2]);
            assert_eq!(t[0].range.start % 64, 0, "torch's alignment kept");
        }
    }

    #[test]
    fn refuses_what_does_not_fit_or_is_not_contiguous() {
        let data = [0u8; 24];
        let path = Path::new("x.bin");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (sd(&[("a", "0", "HalfStorage", 12, 8, &[3, 2], &[2, 1])]), "does not fit"),
            (sd(&[("a", "0", "FloatStorage", 12, 0, &[2], &[1])]), "claims 12 elements"),
            (sd(&[("a", "0", "HalfStorage", 12, 0, &[2, 3], &[1, 2])]), "not contiguous"),
            (sd(&[("a", "9", "HalfStorage", 1, 0, &[1], &[1])]), "not in the archive"),
        ];
        for (pkl, want) in cases {
            let err = read_tensors(path, &archive(&pkl, &[("0", &data)])).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("x.bin") && err.contains("tensor a"), "{err}");
        }
        // Size-1 dimensions may have any stride.
        let pkl = sd(&[("a", "0", "HalfStorage", 12, 0, &[1, 3], &[7, 1])]);
        assert!(read_tensors(path, &archive(&pkl, &[("0", &data)])).is_ok());
    }

    #[test]
    fn refuses_legacy_big_endian_and_foreign_archives() {
        let path = Path::new("old.bin");
        let legacy = [&[0x80u8, 0x02, 0x8a, 0x0a][..], &[0; 10]].concat();
        let err = read_tensors(path, &legacy).unwrap_err().to_string();
        assert!(err.contains("old.bin") && err.contains("legacy") && err.contains("safetensors"), "{err}");

        let pkl = sd(&[]);
        let big = build_zip(&[("archive/data.pkl", &pkl), ("archive/byteorder", b"big")], false, 0);
        assert!(read_tensors(path, &big).unwrap_err().to_string().contains("\"big\"-endian"));
        let other = build_zip(&[("model/weights.pkl", &pkl)], false, 0);
        assert!(read_tensors(path, &other).unwrap_err().to_string().contains("no <folder>/data.pkl"));
    }

    #[test]
    fn forbidden_global_names_the_file_and_the_global() {
        let pkl = P::default().op(0x80).raw(&[2]).global("os", "system").s("id").op(0x85).op(b'R').op(b'.').0;
        let err = read_tensors(Path::new("evil.bin"), &archive(&pkl, &[])).unwrap_err();
        assert!(matches!(&err, Error::ForbiddenGlobal { global, .. } if global == "os.system"));
        let msg = err.to_string();
        assert!(msg.contains("evil.bin") && msg.contains("os.system"), "{msg}");
    }

    #[test]
    fn contiguity() {
        assert!(contiguous(&[], &[]));
        assert!(contiguous(&[2, 3, 4], &[12, 4, 1]));
        assert!(contiguous(&[2, 1, 4], &[4, 99, 1]));
        assert!(!contiguous(&[2, 3], &[1, 2]));
        assert!(contiguous(&[0, 3], &[3, 1]));
        assert!(contiguous(&[0, 3], &[1, 7]));
    }
}
