//! The memory tiers of a run, built once per process.
//!
//! Weights, the KV cache and the activations each ask [`Tiers`] for the
//! tier they live on: one host device per kind of host memory (page-locked
//! weight homes, a pageable cache), one disk device per offload directory
//! (one arena file, one I/O backend), and one copy matrix (one bounded pool
//! of workers) that every move goes through. Each is made the first time it
//! is asked for and shared from then on, so a run never holds two arenas in
//! one directory or two worker pools; [`Tiers::peaks`] reads what every one
//! of them held at its most.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use tier_api::{CopyConfig, CopyMatrix, Device, HostMemKind};
use tier_disk::{DiskConfig, DiskDevice};
use tier_host::{HostConfig, HostDevice};

use crate::error::{Error, Result};

/// Workers of the shared copy matrix: the weights keep two layers in
/// flight (a layer's host and disk rows at once), the cache a batch's load
/// and the previous one's store; eight keep both links busy together.
pub const COPY_WORKERS: usize = 8;
/// Copies queued at most before `submit` blocks.
pub const COPY_QUEUE: usize = 128;

/// The tiers of one run (see the module's documentation).
pub struct Tiers {
    copy: CopyConfig,
    matrix: OnceLock<Arc<CopyMatrix>>,
    hosts: Mutex<Vec<Arc<HostDevice>>>,
    disks: Mutex<Vec<(PathBuf, Arc<DiskDevice>)>>,
}

impl std::fmt::Debug for Tiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tiers")
            .field("hosts", &self.hosts.lock().iter().map(|h| h.mem_kind()).collect::<Vec<_>>())
            .field("disks", &self.disks.lock().iter().map(|(p, _)| p.clone()).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Default for Tiers {
    fn default() -> Self {
        Tiers::new(CopyConfig { workers: COPY_WORKERS, queue_capacity: COPY_QUEUE })
    }
}

impl Tiers {
    /// No tier made yet; the copy matrix will have `copy`'s workers.
    pub fn new(copy: CopyConfig) -> Self {
        Tiers { copy, matrix: OnceLock::new(), hosts: Mutex::new(Vec::new()), disks: Mutex::new(Vec::new()) }
    }

    /// The copy matrix, with the GPU's routes (which accept nothing where
    /// there is no GPU).
    pub fn matrix(&self) -> Result<Arc<CopyMatrix>> {
        if let Some(m) = self.matrix.get() {
            return Ok(m.clone());
        }
        let made = Arc::new(tier_cuda::copy_matrix(self.copy)?);
        // A second thread may have made one meanwhile: keep the first.
        Ok(self.matrix.get_or_init(|| made).clone())
    }

    /// The host device of `kind`.
    pub fn host(&self, kind: HostMemKind) -> Result<Arc<HostDevice>> {
        let mut hosts = self.hosts.lock();
        if let Some(h) = hosts.iter().find(|h| h.mem_kind() == kind) {
            return Ok(h.clone());
        }
        let h = HostDevice::new(HostConfig { kind, ..HostConfig::default() })?;
        hosts.push(h.clone());
        Ok(h)
    }

    /// The disk device whose arena lives in `dir` (made, with `dir`, the
    /// first time). A path that exists and is not a directory is refused.
    pub fn disk(&self, dir: &Path) -> Result<Arc<DiskDevice>> {
        tier_disk::prepare_offload_dir(dir)?;
        let key = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        let mut disks = self.disks.lock();
        if let Some((_, d)) = disks.iter().find(|(p, _)| *p == key) {
            return Ok(d.clone());
        }
        let d = DiskDevice::new(DiskConfig::new(dir))?;
        disks.push((key, d.clone()));
        Ok(d)
    }

    /// The host devices made so far.
    pub fn hosts(&self) -> Vec<Arc<HostDevice>> {
        self.hosts.lock().clone()
    }

    /// The disk devices made so far.
    pub fn disks(&self) -> Vec<Arc<DiskDevice>> {
        self.disks.lock().iter().map(|(_, d)| d.clone()).collect()
    }

    /// The most each tier held so far: host memory by kind and disk from
    /// the devices made here, with `gpu` the GPU tier's buffers and its
    /// page-locked staging ring.
    pub fn peaks(&self, gpu: Option<&tier_cuda::GpuDevice>) -> TierPeaks {
        let mut peaks = TierPeaks::default();
        if let Some(gpu) = gpu {
            peaks.gpu = gpu.account().stats().peak_resident;
            peaks.pinned = gpu.staging_stats().map_or(0, |s| s.peak_resident);
        }
        for h in self.hosts() {
            let bytes = h.stats().peak_resident;
            if h.mem_kind().is_page_locked() {
                peaks.pinned += bytes;
            } else {
                peaks.pageable += bytes;
            }
        }
        peaks.disk = self.disks().iter().map(|d| d.stats().peak_resident).sum();
        peaks
    }
}

/// The most each memory tier held during a run, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TierPeaks {
    pub gpu: u64,
    /// Page-locked host memory (pinned or registered).
    pub pinned: u64,
    pub pageable: u64,
    pub disk: u64,
}

impl std::fmt::Display for TierPeaks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gb = |b: u64| b as f64 / 1e9;
        write!(
            f,
            "GPU {:.2} GB, pinned host {:.2} GB, pageable host {:.2} GB, disk {:.2} GB",
            gb(self.gpu),
            gb(self.pinned),
            gb(self.pageable),
            gb(self.disk)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tier_api::{DType, Shape};

    #[test]
    fn each_tier_is_made_once_and_shared() {
        let dir = tempfile::tempdir().unwrap();
        let tiers = Tiers::default();
        let a = tiers.disk(dir.path()).unwrap();
        let b = tiers.disk(&dir.path().join(".")).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "one arena per offload directory");
        let h1 = tiers.host(HostMemKind::Pageable).unwrap();
        let h2 = tiers.host(HostMemKind::Pageable).unwrap();
        assert!(Arc::ptr_eq(&h1, &h2));
        assert!(Arc::ptr_eq(&tiers.matrix().unwrap(), &tiers.matrix().unwrap()));
        assert_eq!((tiers.hosts().len(), tiers.disks().len()), (1, 1));
    }

    #[test]
    fn peaks_add_up_what_the_devices_held() {
        let dir = tempfile::tempdir().unwrap();
        let tiers = Tiers::default();
        let host = tiers.host(HostMemKind::Pageable).unwrap();
        let disk = tiers.disk(dir.path()).unwrap();
        let t = host.allocate(&Shape::new([1000]), DType::F32).unwrap();
        let d = disk.allocate(&Shape::new([4096]), DType::U8).unwrap();
        let p = tiers.peaks(None);
        assert!(p.pageable >= 4000, "{p:?}");
        assert!(p.disk >= 4096, "{p:?}");
        assert_eq!((p.gpu, p.pinned), (0, 0));
        drop((t, d));
        assert_eq!(tiers.peaks(None), p, "peaks stay after the bytes go");
    }

    #[test]
    fn a_file_is_not_an_offload_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let err = Tiers::default().disk(&file).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("is a file, not a directory"), "{err}");
    }

    #[test]
    fn tier_peaks_print_every_tier() {
        let p = TierPeaks { gpu: 2_500_000_000, pinned: 0, pageable: 1_000_000, disk: 6_290_000_000 };
        assert_eq!(p.to_string(), "GPU 2.50 GB, pinned host 0.00 GB, pageable host 0.00 GB, disk 6.29 GB");
    }
}
