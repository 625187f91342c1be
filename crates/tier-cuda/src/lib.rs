//! # tier-cuda: the GPU tier
//!
//! This room will hold GPU memory, streams and events through cudarc, and the
//! copy-matrix routes that involve the GPU (DMA, the pinned relay, staged disk
//! paths, device to device). It may depend on `tier-api` and `tier-host`; nothing
//! below the engine depends on it except through the `tier-api` traits.
//!
//! It is empty until the CUDA tier issue lands: the workspace keeps the room so
//! that the architecture is visible from the folder layout.
