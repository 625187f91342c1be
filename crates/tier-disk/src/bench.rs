//! Bandwidth of the disk tier, measured the way tierlm uses it.
//!
//! For each backend that can run here (io_uring, then the pread/pwrite
//! threads), [`run`] writes `bytes` from a page-aligned host buffer to a disk
//! tensor and reads them back through [`BlockIo`](tier_api::BlockIo),
//! checking the data, once with a buffer of ordinary 4 KiB pages and once
//! with one backed by transparent huge pages ([`HostPages`]). In the
//! same run it measures a baseline: a plain, single-threaded, buffered read
//! of the same amount of data from a named regular file through a memory
//! map, after the file was evicted from the page cache (fsync, then
//! `posix_fadvise(DONTNEED)`) — what FlexGen's numpy-memmap disk tier does.

use crate::config::{human, BackendChoice, DiskConfig};
use crate::device::DiskDevice;
use crate::sys::{self, AlignedBuf};
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::time::Instant;
use tier_api::{Access, Error, IoOp, Result};

/// What to measure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchConfig {
    /// Where the disk arena and the baseline file go (the offload directory).
    pub dir: PathBuf,
    /// Bytes moved in each direction.
    pub bytes: u64,
    /// Bytes per I/O operation (the disk tier's chunk size).
    pub block: usize,
    pub queue_depth: usize,
    /// Backends to measure, in order (io_uring is skipped where unavailable).
    pub backends: Vec<BackendChoice>,
    /// Host buffer kinds to measure each backend with.
    pub host_pages: Vec<HostPages>,
    /// Whether to measure the memory-mapped baseline.
    pub baseline: bool,
}

impl BenchConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        BenchConfig {
            dir: dir.into(),
            bytes: 1 << 30,
            block: 1 << 20,
            queue_depth: 32,
            backends: vec![BackendChoice::IoUring, BackendChoice::Threads],
            host_pages: vec![HostPages::Small, HostPages::Huge],
            baseline: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Host memory to disk, into freshly allocated extents (reserved by
    /// fallocate but never written: the filesystem converts them as it goes).
    HostToDisk,
    /// Host memory to disk again, over the bytes just written (how a KV
    /// cache is rewritten).
    HostToDiskRewrite,
    /// Disk to host memory (a read).
    DiskToHost,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::HostToDisk => "host→disk (write)",
            Direction::HostToDiskRewrite => "host→disk (rewrite)",
            Direction::DiskToHost => "disk→host (read)",
        })
    }
}

/// What backs the host buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostPages {
    /// Ordinary 4 KiB pages (tier-host's pageable memory today, numpy's).
    Small,
    /// Transparent huge pages (`madvise(MADV_HUGEPAGE)`): direct I/O builds
    /// requests of few segments.
    Huge,
}

impl fmt::Display for HostPages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostPages::Small => "4 KiB pages",
            HostPages::Huge => "huge pages",
        })
    }
}

/// One measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchRow {
    /// "io_uring", "pread/pwrite threads" or "mmap baseline".
    pub name: String,
    /// The backend's own description, or how the baseline was run.
    pub detail: String,
    pub direction: Direction,
    /// What backs the host buffer the bytes come from or go to.
    pub host_pages: HostPages,
    pub bytes: u64,
    pub seconds: f64,
    /// 10⁹ bytes per second.
    pub gbps: f64,
}

impl BenchRow {
    fn new(name: &str, detail: String, direction: Direction, host_pages: HostPages, bytes: u64, seconds: f64) -> Self {
        let gbps = if seconds > 0.0 { bytes as f64 / seconds / 1e9 } else { f64::INFINITY };
        BenchRow { name: name.to_string(), detail, direction, host_pages, bytes, seconds, gbps }
    }
}

fn host_buffer(len: usize, pages: HostPages) -> Result<AlignedBuf> {
    let made = match pages {
        HostPages::Small => AlignedBuf::new(len),
        HostPages::Huge => AlignedBuf::new_huge(len),
    };
    let mut buf = made.map_err(|e| Error::AllocationFailed {
        tier: "host (benchmark buffer)".into(),
        asked: len as u64,
        reason: e.to_string(),
    })?;
    fill(buf.as_mut_slice());
    Ok(buf)
}

/// Runs the measurements. Needs `bytes` of host memory and twice `bytes` of
/// free disk at most (the arena and the baseline file are never both there).
pub fn run(config: &BenchConfig) -> Result<Vec<BenchRow>> {
    let len = usize::try_from(config.bytes)
        .ok()
        .filter(|&l| l > 0)
        .ok_or_else(|| Error::Config(format!("benchmark size {} bytes is not usable here", config.bytes)))?;
    let mut rows = Vec::new();
    // One host buffer at a time: the run needs `bytes` of host memory.
    for &pages in &config.host_pages {
        let mut host = host_buffer(len, pages)?;
        for &choice in &config.backends {
            let disk_config = DiskConfig {
                backend: choice,
                queue_depth: config.queue_depth,
                chunk_size: config.block,
                ..DiskConfig::new(&config.dir)
            };
            let disk = match DiskDevice::new(disk_config) {
                Ok(d) => d,
                // The thread pool's row says why io_uring is missing.
                Err(Error::Unsupported { .. }) if choice == BackendChoice::IoUring => continue,
                Err(e) => return Err(e),
            };
            let name = match choice {
                BackendChoice::IoUring => "io_uring",
                BackendChoice::Threads => "pread/pwrite threads",
                BackendChoice::Auto => "auto",
            };
            let detail = disk.backend();
            let tensor = disk.allocate_bytes(len)?;
            let Access::Block { io, base } = tensor.storage().access() else {
                return Err(Error::Config("a disk tensor did not offer block access".into()));
            };
            let t = Instant::now();
            io.write_at(base, host.as_slice())?;
            let seconds = t.elapsed().as_secs_f64();
            rows.push(BenchRow::new(name, detail.clone(), Direction::HostToDisk, pages, len as u64, seconds));
            let t = Instant::now();
            io.write_at(base, host.as_slice())?;
            let seconds = t.elapsed().as_secs_f64();
            rows.push(BenchRow::new(name, detail.clone(), Direction::HostToDiskRewrite, pages, len as u64, seconds));
            host.as_mut_slice().fill(0);
            let t = Instant::now();
            io.read_at(base, host.as_mut_slice())?;
            let seconds = t.elapsed().as_secs_f64();
            rows.push(BenchRow::new(name, detail, Direction::DiskToHost, pages, len as u64, seconds));
            verify(host.as_slice(), &io.tier())?;
        }
    }
    if config.baseline {
        let mut host = host_buffer(len, HostPages::Small)?;
        rows.push(baseline(&config.dir, &mut host)?);
    }
    Ok(rows)
}

/// A word pattern that differs in every 8 bytes, cheap to write and check.
fn word(i: usize) -> [u8; 8] {
    ((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes()
}

fn fill(buf: &mut [u8]) {
    for (i, c) in buf.chunks_mut(8).enumerate() {
        let w = word(i);
        c.copy_from_slice(&w[..c.len()]);
    }
}

fn verify(buf: &[u8], tier: &str) -> Result<()> {
    match buf.chunks(8).enumerate().position(|(i, c)| c != &word(i)[..c.len()]) {
        None => Ok(()),
        Some(i) => Err(Error::Io {
            op: IoOp::Read,
            tier: tier.to_string(),
            offset: (i * 8) as u64,
            len: buf.len() as u64,
            source: io::Error::other("the data read back differs from the data written"),
        }),
    }
}

/// A read-only shared mapping of a whole file.
struct Map {
    ptr: NonNull<u8>,
    len: usize,
}

impl Map {
    fn new(file: &File, len: usize) -> io::Result<Map> {
        // SAFETY: a new read-only shared mapping of `len` bytes of an open
        // file at an address of the kernel's choosing.
        let p =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Map { ptr, len })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes while self lives, and
        // the file is not written while mapped.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The fraction of the mapping's pages already in the page cache.
    fn resident_fraction(&self) -> Option<f64> {
        let page = sys::page_size();
        let pages = self.len.div_ceil(page);
        let mut v = vec![0u8; pages];
        // SAFETY: the address is the page-aligned start of a mapping of
        // `len` bytes, and `v` holds one byte per page of it.
        let r = unsafe { libc::mincore(self.ptr.as_ptr().cast(), self.len, v.as_mut_ptr()) };
        (r == 0).then(|| v.iter().filter(|&&b| b & 1 != 0).count() as f64 / pages as f64)
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no slice outlives it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A read-write file in `dir` with no name (O_TMPFILE); where the file
/// system does not offer that, `fallback` made and unlinked at once.
fn unnamed_file(dir: &Path, fallback: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = std::fs::OpenOptions::new().read(true).write(true).mode(0o600).custom_flags(libc::O_TMPFILE).open(dir);
    match tmp {
        Ok(f) => Ok(f),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)) => {
            let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(fallback)?;
            std::fs::remove_file(fallback)?;
            Ok(f)
        }
        Err(e) => Err(e),
    }
}

/// The memory-mapped, buffered, single-threaded read of a file (with no
/// name in the directory, so it is never left behind).
fn baseline(dir: &Path, host: &mut AlignedBuf) -> Result<BenchRow> {
    let len = host.len();
    let path = dir.join(format!("tierlm-bench-baseline-{}.bin", std::process::id()));
    let io_err = |op, e: io::Error| Error::Io {
        op,
        tier: format!("file {}", path.display()),
        offset: 0,
        len: len as u64,
        source: e,
    };
    // A file that never has a name in the directory (O_TMPFILE), or where
    // the file system cannot make one, unlinked as soon as it exists:
    // however the process ends (Ctrl-C, a kill), nothing is left there.
    let f = unnamed_file(dir, &path).map_err(|e| io_err(IoOp::Write, e))?;
    (&f).write_all(host.as_slice()).map_err(|e| io_err(IoOp::Write, e))?;
    sys::evict_page_cache(f.as_raw_fd()).map_err(|e| io_err(IoOp::Write, e))?;
    let map = Map::new(&f, len).map_err(|e| io_err(IoOp::Read, e))?;
    let cached = map.resident_fraction();
    host.as_mut_slice().fill(0);
    let src = map.as_slice();
    let t = Instant::now();
    // Piece by piece, as numpy copies out of a memmap: page faults with
    // the kernel's readahead do the I/O.
    for (d, s) in host.as_mut_slice().chunks_mut(1 << 20).zip(src.chunks(1 << 20)) {
        d.copy_from_slice(s);
    }
    let seconds = t.elapsed().as_secs_f64();
    drop(map);
    verify(host.as_slice(), &format!("file {}", path.display()))?;
    let cached = cached.map(|c| format!(", {:.0}% cached before", c * 100.0)).unwrap_or_default();
    let detail = format!("buffered read through mmap, 1 thread, page cache evicted first{cached}");
    Ok(BenchRow::new("mmap baseline", detail, Direction::DiskToHost, HostPages::Small, len as u64, seconds))
}

/// The rows as a text table.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out = format!(
        "{:<22} {:<20} {:<12} {:>10} {:>9} {:>7}\n",
        "path", "direction", "host buffer", "bytes", "seconds", "GB/s"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<22} {:<20} {:<12} {:>10} {:>9.3} {:>7.2}\n",
            r.name,
            r.direction.to_string(),
            r.host_pages.to_string(),
            human(r.bytes as usize),
            r.seconds,
            r.gbps
        ));
    }
    let mut seen = Vec::new();
    for r in rows {
        if !seen.contains(&&r.name) {
            seen.push(&r.name);
            out.push_str(&format!("  {}: {}\n", r.name, r.detail));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_measures_every_path_and_checks_the_data() {
        let dir = crate::test_dir();
        let config = BenchConfig { bytes: 8 << 20, block: 256 << 10, queue_depth: 8, ..BenchConfig::new(dir.path()) };
        let rows = run(&config).unwrap();
        let names: Vec<_> = rows.iter().map(|r| (r.name.as_str(), r.direction)).collect();
        assert!(names.contains(&("pread/pwrite threads", Direction::HostToDisk)), "{names:?}");
        assert!(names.contains(&("pread/pwrite threads", Direction::DiskToHost)));
        assert_eq!(names.last(), Some(&("mmap baseline", Direction::DiskToHost)));
        assert!(rows.iter().all(|r| r.bytes == 8 << 20 && r.gbps > 0.0));
        assert!(rows.iter().any(|r| r.host_pages == HostPages::Huge));
        let t = table(&rows);
        assert!(t.contains("GB/s") && t.contains("8 MiB") && t.contains("page cache evicted"), "{t}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the baseline file is removed");
    }

    #[test]
    fn the_pattern_catches_a_wrong_byte() {
        let mut b = vec![0u8; 1001];
        fill(&mut b);
        verify(&b, "t").unwrap();
        b[777] ^= 1;
        assert!(matches!(verify(&b, "t"), Err(Error::Io { offset: 776, .. })));
    }
}
