//! How a disk device is built.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use tier_api::{Error, Result};

/// The deepest queue a device may keep (io_uring rings are sized to it).
pub const MAX_QUEUE_DEPTH: usize = 1024;
/// The largest chunk one I/O operation moves (registered buffers may be at
/// most 1 GiB; this stays far below).
pub const MAX_CHUNK_SIZE: usize = 64 << 20;
/// The smallest chunk: one page, the least the arena aligns extents to.
pub const MIN_CHUNK_SIZE: usize = 4096;
/// Staging buffers per ring or per thread-pool session.
pub const MAX_STAGING_BUFFERS: usize = 64;
/// Rings (or thread-pool sessions) a device keeps for concurrent callers.
pub const MAX_SESSIONS: usize = 64;
/// Threads of the pread/pwrite fallback.
pub const MAX_THREADS: usize = 256;
/// Caller buffers (pieces of registered spans) a device keeps registered
/// with its io_uring rings at once, next to the rings' own staging buffers.
pub const MAX_FIXED_BUFFERS: usize = 256;
/// The largest piece of a registered span one fixed buffer covers (the
/// kernel's limit per buffer); longer spans take several.
pub const MAX_FIXED_BUFFER_BYTES: usize = 1 << 30;

/// Which I/O backend to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BackendChoice {
    /// io_uring where it can be set up, else the thread pool (and say why).
    #[default]
    Auto,
    /// io_uring or an error.
    IoUring,
    /// Positioned reads and writes on a bounded thread pool.
    Threads,
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::IoUring => "io_uring",
            BackendChoice::Threads => "threads",
        })
    }
}

impl FromStr for BackendChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(BackendChoice::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(BackendChoice::IoUring),
            "threads" | "pread" | "thread-pool" => Ok(BackendChoice::Threads),
            other => {
                Err(Error::Config(format!("unknown disk backend {other:?}; expected one of auto, io_uring, threads")))
            }
        }
    }
}

/// How to build a [`DiskDevice`](crate::DiskDevice).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The offload directory; the arena file is created (and at once
    /// unlinked) inside it.
    pub dir: PathBuf,
    /// The device's number: it is `disk:{id}`.
    pub id: u32,
    pub backend: BackendChoice,
    /// I/O operations kept in flight per request (1..=1024).
    pub queue_depth: usize,
    /// Bytes per I/O operation: large requests are split into chunks of this
    /// size, kept in flight together. A multiple of 4096, 4 KiB..=64 MiB.
    pub chunk_size: usize,
    /// Resident bytes (extent bytes) the device may hold; `None` for no limit.
    pub budget: Option<u64>,
    /// Staging (bounce) buffers of `chunk_size` bytes per ring or session,
    /// used for unaligned heads, tails and buffers (2..=64).
    pub staging_buffers: usize,
    /// Rings (or thread-pool sessions) for callers running at the same time;
    /// a caller beyond them waits for one to come back (1..=64).
    pub max_sessions: usize,
    /// Threads of the pread/pwrite backend; `None` for `queue_depth` (at most 64).
    pub threads: Option<usize>,
    /// Use O_DIRECT where the filesystem allows it (the default). Off, the
    /// arena goes through the page cache, which competes with the host tier
    /// for memory.
    pub direct_io: bool,
}

impl DiskConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DiskConfig {
            dir: dir.into(),
            id: 0,
            backend: BackendChoice::Auto,
            queue_depth: 32,
            chunk_size: 1 << 20,
            budget: None,
            staging_buffers: 8,
            max_sessions: 4,
            threads: None,
            direct_io: true,
        }
    }

    /// Threads the pread/pwrite backend would start.
    pub fn thread_count(&self) -> usize {
        self.threads.unwrap_or(self.queue_depth.min(64))
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Config(what));
        if !(1..=MAX_QUEUE_DEPTH).contains(&self.queue_depth) {
            return bad(format!("disk queue depth {} is outside 1..={MAX_QUEUE_DEPTH}", self.queue_depth));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
            || !self.chunk_size.is_multiple_of(MIN_CHUNK_SIZE)
        {
            return bad(format!(
                "disk chunk size {} must be a multiple of {MIN_CHUNK_SIZE} between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes",
                self.chunk_size
            ));
        }
        if !(2..=MAX_STAGING_BUFFERS).contains(&self.staging_buffers) {
            return bad(format!("disk staging buffers {} is outside 2..={MAX_STAGING_BUFFERS}", self.staging_buffers));
        }
        if !(1..=MAX_SESSIONS).contains(&self.max_sessions) {
            return bad(format!("disk sessions {} is outside 1..={MAX_SESSIONS}", self.max_sessions));
        }
        let threads = self.thread_count();
        if !(1..=MAX_THREADS).contains(&threads) {
            return bad(format!("disk I/O threads {threads} is outside 1..={MAX_THREADS}"));
        }
        Ok(())
    }
}

/// `1 MiB`, `512 KiB`, `4096 B`: sizes for users.
pub(crate) fn human(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = DiskConfig::new("/x");
        assert_eq!((c.queue_depth, c.chunk_size), (32, 1 << 20));
        c.validate().unwrap();
        assert_eq!(c.thread_count(), 32);
    }

    #[test]
    fn limits_are_checked() {
        let base = DiskConfig::new("/x");
        for c in [
            DiskConfig { queue_depth: 0, ..base.clone() },
            DiskConfig { queue_depth: 5000, ..base.clone() },
            DiskConfig { chunk_size: 1000, ..base.clone() },
            DiskConfig { chunk_size: 128 << 20, ..base.clone() },
            DiskConfig { staging_buffers: 1, ..base.clone() },
            DiskConfig { max_sessions: 0, ..base.clone() },
            DiskConfig { threads: Some(0), ..base.clone() },
        ] {
            assert!(matches!(c.validate(), Err(Error::Config(_))), "{c:?}");
        }
    }

    #[test]
    fn backend_names_parse() {
        assert_eq!("io-uring".parse::<BackendChoice>().unwrap(), BackendChoice::IoUring);
        assert_eq!("Threads".parse::<BackendChoice>().unwrap(), BackendChoice::Threads);
        assert!("spdk".parse::<BackendChoice>().is_err());
        assert_eq!(human(1 << 20), "1 MiB");
        assert_eq!(human(6 << 10), "6 KiB");
        assert_eq!(human(100), "100 B");
    }
}
