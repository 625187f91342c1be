//! The one error type of `tier-api`, shared by the tier backends so that a
//! copy across tiers reports failures in one vocabulary.

use crate::device::DeviceKind;
use crate::dtype::{DType, Shape};
use crate::CopyPath;
use std::fmt;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What an I/O request was doing when it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
        })
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "out of memory on {tier}: asked for {asked} bytes ({}), {free} bytes ({}) free of a {budget}-byte budget; \
         lower the batch size, move part of the placement to another tier, or raise the tier's budget",
        gib(*asked), gib(*free)
    )]
    OutOfMemory { tier: String, asked: u64, free: u64, budget: u64 },

    #[error("the system refused {asked} bytes on {tier}: {reason}")]
    AllocationFailed { tier: String, asked: u64, reason: String },

    #[error("tensor of shape {shape}{} is too large to address", dtype.map(|d| format!(" and dtype {d}")).unwrap_or_default())]
    SizeOverflow { shape: Shape, dtype: Option<DType> },

    #[error("dimension {dim} does not exist in a tensor of rank {rank}")]
    DimOutOfRange { dim: usize, rank: usize },

    #[error("view {start}..{end} along dimension {dim} is out of range for shape {shape} (size {size} there)")]
    ViewOutOfRange { dim: usize, start: usize, end: usize, size: usize, shape: Shape },

    #[error("cannot copy {src} into {dst}: the dtypes differ; convert the source first")]
    DTypeMismatch { src: DType, dst: DType },

    #[error("cannot copy a view of shape {src} into a view of shape {dst}: the shapes differ")]
    ShapeMismatch { src: Shape, dst: Shape },

    #[error("cannot copy between the same bytes of one tensor (source and destination views overlap)")]
    OverlappingCopy,

    #[error("{op} of {len} bytes at offset {offset} on {tier} failed: {source}")]
    Io {
        op: IoOp,
        tier: String,
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{op} on {tier} stayed short after {attempts} attempts: {done} of {len} bytes at offset {offset} transferred; \
         the device may be failing or the file was truncated"
    )]
    ShortTransfer { op: IoOp, tier: String, offset: u64, len: u64, done: u64, attempts: u32 },

    #[error(
        "{tier} is full: no space left for {len} bytes at offset {offset}; free space in the offload directory, \
         point --offload-dir at a larger disk, or place less on disk"
    )]
    DiskFull { tier: String, offset: u64, len: u64 },

    #[error("offload directory {}: {reason}", path.display())]
    OffloadDir { path: PathBuf, reason: String },

    #[error("no copy path from {src} to {dst}: {why}")]
    NoRoute { src: DeviceKind, dst: DeviceKind, why: String },

    #[error("{call} on {tier} failed: {reason}")]
    Driver { tier: String, call: String, reason: String },

    #[error("{what} is not available: {hint}")]
    Unsupported { what: String, hint: String },

    #[error("the copy worker running {path} panicked: {message}")]
    WorkerPanicked { path: CopyPath, message: String },

    #[error("the copy worker running {path} went away before finishing the copy")]
    WorkerLost { path: CopyPath },

    #[error("the copy matrix is shut down; no more copies can be submitted")]
    ShutDown,

    #[error("invalid split: {0}")]
    BadSplit(String),

    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("tensor belongs to {found}, not to {expected}")]
    WrongDevice { expected: DeviceKind, found: DeviceKind },

    #[error("{len} bytes given for a {expected}-byte tensor")]
    LengthMismatch { len: usize, expected: usize },
}
