//! # tier-api: the device-neutral core of tierlm's memory tiers
//!
//! This room holds the vocabulary every tier speaks and nothing that talks to
//! hardware:
//!
//! - [`DType`] and [`Shape`]: element types and byte sizes.
//! - [`Device`]: a memory tier (a GPU, host memory of one [`HostMemKind`], a
//!   disk) that allocates [`Tensor`]s and accounts for them in a [`MemAccount`]
//!   (bytes asked for, bytes resident, peaks, an optional budget).
//! - [`Tensor`] and [`TensorView`]: a handle owning storage on one device, and
//!   a rectangular window into it (ranges along each dimension).
//! - [`SegmentedTensor`]: one logical tensor split along a dimension into
//!   segments on several devices by percentages (FlexGen's placement).
//! - [`CopyMatrix`]: plans a [`CopyPath`] for every (source, destination) pair
//!   and runs copies asynchronously on a bounded pool of workers.
//!
//! Backends live in their own crates (`tier-host`, `tier-disk`, `tier-cuda`)
//! and plug in through the [`Storage`], [`BlockIo`] and [`CopyRoute`] traits.
//! This crate depends on no other tierlm crate and on no hardware library.

mod account;
mod copy;
mod device;
mod dtype;
mod error;
pub mod fault;
mod segment;
mod storage;
mod tensor;

pub use account::{MemAccount, MemStats, Reservation};
pub use copy::{
    builtin_routes, CopyConfig, CopyHandle, CopyJob, CopyMatrix, CopyPath, CopyPlan, CopyReport, CopyRoute, Run,
};
pub use device::{Device, DeviceKind, HostMemKind};
pub use dtype::{DType, Shape};
pub use error::{Error, IoOp, Result};
pub use segment::{split_points, Segment, SegmentedTensor};
pub use storage::{Access, BlockIo, FixedBuffers, HostSpan, Storage};
pub use tensor::{Tensor, TensorView};
