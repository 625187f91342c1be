//! # tierlm-tests: integration and property tests across crates
//!
//! This room holds tests that need more than one crate: copies between every
//! pair of tiers, the copy matrix's failure handling, and end-to-end runs of
//! the `tierlm` command. The library part is only shared test helpers: byte
//! images of tensors, random fills and view arithmetic. It may depend on any
//! tierlm crate; nothing depends on it.

use std::path::PathBuf;
use tier_api::{Tensor, TensorView};

/// A small deterministic generator (SplitMix64) so that test data is
/// reproducible from a seed without another dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// Writes random bytes over the whole tensor and returns them: the tensor's
/// byte image. Disk tests must write before reading, since direct I/O over
/// never-written holes succeeds even when misaligned and hides bugs.
pub fn fill_random(tensor: &Tensor, seed: u64) -> Vec<u8> {
    let data = Rng::new(seed).bytes(tensor.byte_len());
    if let Err(e) = tensor.write_bytes(0, &data) {
        panic!("cannot fill a test tensor on {}: {e}", tensor.device());
    }
    data
}

/// The bytes a view covers, gathered in row-major order from the byte image
/// of its whole tensor.
pub fn gather(image: &[u8], view: &TensorView) -> Vec<u8> {
    let mut out = Vec::with_capacity(view.byte_len());
    for (offset, len) in view.byte_runs() {
        out.extend_from_slice(&image[offset as usize..(offset + len) as usize]);
    }
    out
}

/// Writes `data` into the byte image of a view's tensor where the view lies.
pub fn scatter(image: &mut [u8], view: &TensorView, data: &[u8]) {
    let mut at = 0usize;
    for (offset, len) in view.byte_runs() {
        let (offset, len) = (offset as usize, len as usize);
        image[offset..offset + len].copy_from_slice(&data[at..at + len]);
        at += len;
    }
    assert_eq!(at, data.len(), "data covers the view exactly");
}

/// A scratch directory on the real disk (not tmpfs), unique per call, for
/// tests that need an offload directory. Removed when dropped.
pub fn scratch_dir(base: &str) -> tempfile_dir::TempDir {
    let root = PathBuf::from(base);
    if let Err(e) = std::fs::create_dir_all(&root) {
        panic!("cannot create {}: {e}", root.display());
    }
    tempfile_dir::TempDir::new_in(&root)
}

/// A tiny self-removing directory, so the helpers need no dev-dependency.
pub mod tempfile_dir {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    pub struct TempDir(PathBuf);

    static COUNTER: AtomicU64 = AtomicU64::new(0);

    impl TempDir {
        pub fn new_in(root: &Path) -> Self {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let p = root.join(format!("scratch-{}-{n}", std::process::id()));
            if let Err(e) = std::fs::create_dir_all(&p) {
                panic!("cannot create {}: {e}", p.display());
            }
            TempDir(p)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
