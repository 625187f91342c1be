//! The layers a policy puts on disk, for the CPU engine.
//!
//! The first layers a policy keeps in host memory stay with the caller;
//! every later one is written to a [`DiskDevice`] in the offload directory
//! as it is loaded (host memory never holds the whole model) and read back
//! when the schedule reaches it: [`super::CpuEngine`] brings layer `j` in at
//! `begin_layer(j)` and starts reading the next one on a thread of its own,
//! so the disk reads while the CPU computes. The disk tier's arena is
//! unlinked when opened: nothing is left behind, whatever way the process
//! ends. Each tensor is stored in its held type, byte for byte, so the
//! round trip is exact.

use std::sync::Arc;

use ops::cpu::Tensor as HostTensor;
use tier_api::{DType, Device, MemAccount, Reservation, Shape, Tensor};
use tier_disk::DiskDevice;

use super::layer::{cpu_dtype, HostLayer};
use crate::error::{Error, Result};
use crate::spec::ModelSpec;

/// The layers from [`DiskLayers::first`] on, on disk.
pub struct DiskLayers {
    disk: Arc<DiskDevice>,
    spec: ModelSpec,
    /// The first streamed layer; `layers[i]` is layer `first + i`.
    first: usize,
    /// Per layer, its tensors in the spec's order.
    layers: Vec<Vec<Tensor>>,
    /// Host memory the layers read back (and the one being written) are
    /// reserved against, where the caller accounts host memory.
    host: Option<Arc<MemAccount>>,
}

impl std::fmt::Debug for DiskLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskLayers").field("first", &self.first).field("layers", &self.layers.len()).finish()
    }
}

impl DiskLayers {
    /// Empty: layers `first..` of `spec` will be [`DiskLayers::put`] in order.
    pub fn new(disk: Arc<DiskDevice>, spec: ModelSpec, first: usize) -> Self {
        DiskLayers { disk, spec, first, layers: Vec::new(), host: None }
    }

    /// Reserves the host memory of every layer read back
    /// ([`DiskLayers::load_held`]) or being written against `host`.
    pub fn with_host_account(mut self, host: Arc<MemAccount>) -> Self {
        self.host = Some(host);
        self
    }

    fn reserve(&self, bytes: u64) -> Result<Option<Reservation>> {
        self.host.as_ref().map(|h| h.reserve(bytes, bytes)).transpose().map_err(Into::into)
    }

    /// The first streamed layer.
    pub fn first(&self) -> usize {
        self.first
    }

    /// Whether layer `j` is one of these.
    pub fn holds(&self, j: usize) -> bool {
        j >= self.first && j < self.first + self.layers.len()
    }

    /// Bytes on disk (asked of the tier).
    pub fn bytes(&self) -> u64 {
        self.layers.iter().flatten().map(|t| t.byte_len() as u64).sum()
    }

    /// Writes layer `i` (the next one) to disk.
    pub fn put(&mut self, i: usize, layer: &HostLayer) -> Result<()> {
        if i != self.first + self.layers.len() {
            return Err(Error::InvalidArgument(format!(
                "layer {i} written to disk out of order (expected {})",
                self.first + self.layers.len()
            )));
        }
        // The layer in memory while it is written.
        let _held = self.reserve(layer.bytes())?;
        let mut tensors = Vec::with_capacity(layer.tensors().len());
        for (_, t) in layer.tensors() {
            let bytes = t.as_bytes();
            let dtype = match t.dtype() {
                ops::cpu::DType::F16 => DType::F16,
                ops::cpu::DType::BF16 => DType::BF16,
                ops::cpu::DType::F32 => DType::F32,
            };
            let on_disk = self.disk.allocate(&Shape::new([t.len()]), dtype)?;
            // Written from the weights' own memory, no copy.
            on_disk.write_bytes(0, bytes)?;
            tensors.push(on_disk);
        }
        self.layers.push(tensors);
        Ok(())
    }

    /// Layer `j`, read back from disk.
    pub fn load(&self, j: usize) -> Result<HostLayer> {
        Ok(self.load_held(j)?.0)
    }

    /// Layer `j`, read back from disk, with its host memory reserved
    /// against the host account (for as long as the reservations live).
    /// Each tensor is reserved as it is read (the memory fills while the
    /// read runs, on the read-ahead thread beside the layer in use).
    pub fn load_held(&self, j: usize) -> Result<(HostLayer, Vec<Reservation>)> {
        let on_disk = self
            .layers
            .get(j.wrapping_sub(self.first))
            .ok_or_else(|| Error::InvalidArgument(format!("layer {j} is not on disk")))?;
        let mut held = Vec::with_capacity(on_disk.len());
        let mut tensors = Vec::with_capacity(on_disk.len());
        for (ts, t) in self.spec.layer.iter().zip(on_disk) {
            let bytes = t.byte_len() as u64;
            if let Some(r) = self.reserve(bytes)? {
                held.push(r);
            }
            let mut back = HostTensor::try_zeros(cpu_dtype(ts.dtype)?, ts.shape.clone(), &ts.name)?;
            // Read straight into the weights' memory: no bounce copy.
            t.read_bytes(0, back.as_bytes_mut())?;
            tensors.push((ts.name.clone(), back));
        }
        Ok((HostLayer::new(&self.spec, tensors)?, held))
    }
}
