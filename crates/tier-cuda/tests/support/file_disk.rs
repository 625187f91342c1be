//! A small disk tier over one file, for tier-cuda's tests and bench example
//! while `tier-disk` is written: aligned requests (offset, length and buffer
//! on 4 KiB) go through an `O_DIRECT` descriptor, in parallel 4 MiB pieces
//! for large ones; the rest through the page cache. Allocation is a bump
//! pointer; space is never reused.

#![allow(dead_code)]

use std::any::Any;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tier_api::{
    Access, BlockIo, DType, Device, DeviceKind, Error, IoOp, MemAccount, Reservation, Result, Shape, Storage, Tensor,
};

const ALIGN: u64 = 4096;
const PIECE: usize = 4 << 20;
const PARALLEL: usize = 4;

pub struct FileDisk {
    io: Arc<FileIo>,
    account: Arc<MemAccount>,
    next: AtomicU64,
}

pub struct FileIo {
    id: u32,
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
}

impl FileDisk {
    /// A disk over a new file `dir/tier-cuda-disk-<id>-<pid>.bin`, removed on drop.
    pub fn create(dir: &Path, id: u32) -> Result<Arc<Self>> {
        let path = dir.join(format!("tier-cuda-disk-{id}-{}.bin", std::process::id()));
        let io_err = |e: std::io::Error| Error::OffloadDir { path: path.clone(), reason: e.to_string() };
        let buffered =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).map_err(io_err)?;
        let direct = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&path).ok();
        let tier = DeviceKind::Disk { id }.to_string();
        Ok(Arc::new(FileDisk {
            io: Arc::new(FileIo { id, path, buffered, direct }),
            account: MemAccount::new(tier, None),
            next: AtomicU64::new(0),
        }))
    }

    pub fn direct(&self) -> bool {
        self.io.direct.is_some()
    }
}

impl Drop for FileIo {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Device for FileDisk {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Disk { id: self.io.id }
    }

    fn describe(&self) -> String {
        format!("test disk over {} (O_DIRECT: {})", self.io.path.display(), self.direct())
    }

    fn allocate(&self, shape: &Shape, dtype: DType) -> Result<Tensor> {
        let len = shape.byte_size(dtype)? as u64;
        let resident = len.div_ceil(ALIGN) * ALIGN;
        let reservation = self.account.reserve(len, resident)?;
        let base = self.next.fetch_add(resident, Ordering::Relaxed);
        self.io.buffered.set_len(base + resident).map_err(|e| self.io.err(IoOp::Write, base, len, e))?;
        let storage = DiskStorage { io: Arc::clone(&self.io), base, len, _reservation: reservation };
        // Contents are zero: the file was extended with holes.
        Tensor::from_storage(Arc::new(storage), shape.clone(), dtype)
    }

    fn account(&self) -> &Arc<MemAccount> {
        &self.account
    }
}

impl FileIo {
    fn err(&self, op: IoOp, offset: u64, len: u64, source: std::io::Error) -> Error {
        Error::Io { op, tier: DeviceKind::Disk { id: self.id }.to_string(), offset, len, source }
    }

    fn aligned(&self, offset: u64, ptr: usize, len: usize) -> Option<&File> {
        let ok = (offset | ptr as u64 | len as u64) & (ALIGN - 1) == 0;
        if ok {
            self.direct.as_ref()
        } else {
            None
        }
    }
}

impl BlockIo for FileIo {
    fn tier(&self) -> String {
        DeviceKind::Disk { id: self.id }.to_string()
    }

    fn backend(&self) -> String {
        "pread/pwrite".into()
    }

    fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let len = dst.len();
        let file = self.aligned(offset, dst.as_ptr() as usize, len).unwrap_or(&self.buffered);
        if len <= PIECE {
            return file.read_exact_at(dst, offset).map_err(|e| self.err(IoOp::Read, offset, len as u64, e));
        }
        let pieces: Vec<(usize, &mut [u8])> = dst.chunks_mut(PIECE).enumerate().collect();
        let mut lanes: Vec<Vec<(usize, &mut [u8])>> = (0..PARALLEL).map(|_| Vec::new()).collect();
        for (i, p) in pieces {
            lanes[i % PARALLEL].push((i, p));
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = lanes
                .into_iter()
                .map(|lane| {
                    s.spawn(move || {
                        for (i, p) in lane {
                            let at = offset + (i * PIECE) as u64;
                            file.read_exact_at(p, at).map_err(|e| self.err(IoOp::Read, at, PIECE as u64, e))?;
                        }
                        Ok::<(), Error>(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().unwrap_or_else(|_| Err(Error::Config("reader panicked".into()))))
        })
    }

    fn write_at(&self, offset: u64, src: &[u8]) -> Result<()> {
        let len = src.len();
        let file = self.aligned(offset, src.as_ptr() as usize, len).unwrap_or(&self.buffered);
        if len <= PIECE {
            return file.write_all_at(src, offset).map_err(|e| self.err(IoOp::Write, offset, len as u64, e));
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..PARALLEL)
                .map(|lane| {
                    s.spawn(move || {
                        for (i, p) in src.chunks(PIECE).enumerate().filter(|(i, _)| i % PARALLEL == lane) {
                            let at = offset + (i * PIECE) as u64;
                            file.write_all_at(p, at).map_err(|e| self.err(IoOp::Write, at, PIECE as u64, e))?;
                        }
                        Ok::<(), Error>(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().unwrap_or_else(|_| Err(Error::Config("writer panicked".into()))))
        })
    }
}

#[derive(Debug)]
struct DiskStorage {
    io: Arc<FileIo>,
    base: u64,
    len: u64,
    _reservation: Reservation,
}

impl std::fmt::Debug for FileIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileIo({})", self.path.display())
    }
}

impl Storage for DiskStorage {
    fn device(&self) -> DeviceKind {
        DeviceKind::Disk { id: self.io.id }
    }

    fn len(&self) -> usize {
        self.len as usize
    }

    fn access(&self) -> Access<'_> {
        Access::Block { io: self.io.as_ref(), base: self.base }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
