//! Weights and KV cache on disk for the CPU engine: `--percent 0 W_CPU 0
//! C_CPU 0 100` with `W_CPU` or `C_CPU` below 100 and no GPU (the cache's
//! disk share is [`cache_disk_for_policy`]; the CPU device gathers a
//! batch's memory and disk sequences around each layer).
//!
//! The first `round(n · W_CPU / 100)` decoder layers stay in host memory
//! (the [`crate::model::OptModel`]'s own); every later one is written to a [`DiskDevice`]
//! in `--offload-dir` as it is loaded ([`crate::model::OptModel::load_streaming`]: host
//! memory never holds the whole model) and read back when the schedule
//! reaches it: [`crate::generation::CpuDevice::with_disk`] brings layer `j`
//! in at `begin_layer(j)` and starts reading the next streamed layer on a
//! thread of its own, so the disk reads while the CPU computes. The disk
//! tier's arena is unlinked when opened: nothing is left behind, whatever
//! way the process ends.
//!
//! Each weight is one f16 tensor on disk under its checkpoint name (the
//! model's f32 vectors were f16 in every source, so the round trip is
//! exact).

use std::collections::HashMap;
use std::sync::Arc;

use half::f16;
use tier_api::{DType, Device, MemAccount, Reservation, Shape, Tensor};
use tier_disk::DiskDevice;

use crate::config::OptConfig;
use crate::error::{Error, Result};
use crate::model::{DecoderLayer, ParamRef};
use crate::weights::WeightSource;

/// The streamed decoder layers, on disk.
pub struct DiskLayers {
    disk: Arc<DiskDevice>,
    config: OptConfig,
    /// The first streamed layer; `layers[i]` is layer `first + i`.
    first: usize,
    layers: Vec<HashMap<String, Tensor>>,
    /// Host memory the layers read back (and the one being written) are
    /// reserved against, where the caller accounts host memory.
    host: Option<Arc<MemAccount>>,
}

impl std::fmt::Debug for DiskLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskLayers").field("first", &self.first).field("layers", &self.layers.len()).finish()
    }
}

pub use runtime::plan::resident_layers;

/// The disk tier and an empty layer store for the CPU engine where
/// `policy` puts a share of the weights on disk (`None` otherwise), in
/// `offload_dir` (the system's temporary directory by default).
pub fn for_policy(
    tiers: &runtime::Tiers,
    config: &OptConfig,
    policy: &crate::policy::Policy,
    offload_dir: Option<&std::path::Path>,
) -> Result<Option<DiskLayers>> {
    let resident = resident_layers(config.num_hidden_layers, policy.w_cpu_percent);
    if resident >= config.num_hidden_layers {
        return Ok(None);
    }
    let dir = offload_dir.map_or_else(std::env::temp_dir, std::path::Path::to_path_buf);
    Ok(Some(DiskLayers::new(tiers.disk(&dir)?, config.clone(), resident)))
}

/// The disk and the share of each batch's sequences kept in memory, where
/// `policy` puts a share of the KV cache on disk (`None` otherwise).
pub fn cache_disk_for_policy(
    tiers: &runtime::Tiers,
    policy: &crate::policy::Policy,
    offload_dir: Option<&std::path::Path>,
) -> Result<Option<(Arc<DiskDevice>, f64)>> {
    if policy.cache_cpu_percent >= 100.0 {
        return Ok(None);
    }
    let dir = offload_dir.map_or_else(std::env::temp_dir, std::path::Path::to_path_buf);
    Ok(Some((tiers.disk(&dir)?, policy.cache_cpu_percent)))
}

/// Refuses an `--offload-dir` that names something other than a directory,
/// before any engine starts (it is made later, where a run puts bytes on disk).
pub fn check_offload_dir_arg(offload_dir: Option<&std::path::Path>) -> Result<()> {
    Ok(offload_dir.map_or(Ok(()), tier_disk::check_offload_dir)?)
}

/// Slack per tensor on disk: the arena aligns each extent (4 KiB at least).
const EXTENT_SLACK: u64 = 1 << 16;

/// Bytes of weights the CPU engine puts on disk under `policy`: the
/// streamed layers (f16), with room for the arena's alignment.
pub fn weights_disk_bytes(config: &OptConfig, policy: &crate::policy::Policy) -> u64 {
    let streamed = (config.num_hidden_layers - resident_layers(config.num_hidden_layers, policy.w_cpu_percent)) as u64;
    // 16 tensors a layer at most (4 projections and 2 MLP matrices with
    // their biases, 2 layer norms).
    streamed
        .saturating_mul(config.layer_param_count().saturating_mul(2))
        .saturating_add(streamed.saturating_mul(16 * EXTENT_SLACK))
}

/// Bytes of KV cache the CPU engine puts on disk under `policy` for
/// `batches` batches of `batch` sequences of up to `capacity` positions:
/// each batch's disk share (f32), keys and values of every layer, with room
/// for the arena's alignment. Saturates rather than wraps.
pub fn cache_disk_bytes(
    config: &OptConfig,
    policy: &crate::policy::Policy,
    batches: usize,
    batch: usize,
    capacity: usize,
) -> u64 {
    if policy.cache_cpu_percent >= 100.0 {
        return 0;
    }
    let in_memory = ((batch as f64) * policy.cache_cpu_percent.clamp(0.0, 100.0) / 100.0).round() as usize;
    let on_disk = batch.saturating_sub(in_memory.min(batch)) as u64;
    if on_disk == 0 {
        return 0;
    }
    let tensor = [on_disk, capacity as u64, config.hidden_size as u64, 4].into_iter().fold(1, u64::saturating_mul);
    tensor
        .saturating_add(EXTENT_SLACK)
        .saturating_mul(2 * config.num_hidden_layers as u64)
        .saturating_mul(batches as u64)
}

/// Refuses a run whose bytes on disk (`need`: [`weights_disk_bytes`] plus [`cache_disk_bytes`]) do not fit
/// the free space of the offload directory's file system.
pub fn check_disk_space(offload_dir: Option<&std::path::Path>, need: u64, what: &str) -> Result<()> {
    if need == 0 {
        return Ok(());
    }
    let dir = offload_dir.map_or_else(std::env::temp_dir, std::path::Path::to_path_buf);
    Ok(tier_disk::check_free(&dir, need, what)?)
}

impl DiskLayers {
    /// Empty: layers `first..` will be [`DiskLayers::put`] in order.
    pub fn new(disk: Arc<DiskDevice>, config: OptConfig, first: usize) -> Self {
        DiskLayers { disk, config, first, layers: Vec::new(), host: None }
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
        self.layers.iter().flat_map(|l| l.values()).map(|t| t.byte_len() as u64).sum()
    }

    /// Writes layer `i` (the next one) to disk.
    pub fn put(&mut self, i: usize, layer: DecoderLayer) -> Result<()> {
        if i != self.first + self.layers.len() {
            return Err(Error::InvalidArgument(format!(
                "layer {i} written to disk out of order (expected {})",
                self.first + self.layers.len()
            )));
        }
        let mut map = HashMap::new();
        let params = layer.parameters(i);
        // The layer in memory while it is written.
        let _held = self.reserve(params.iter().map(|(_, p)| p.bytes()).sum())?;
        for (name, p) in params {
            let t = match p {
                // Written from the weights' own memory (f16 is its bytes on
                // a little-endian machine), no copy.
                ParamRef::F16(v) => {
                    let t = self.disk.allocate(&Shape::new([v.len()]), DType::F16)?;
                    t.write_bytes(0, f16_bytes(v))?;
                    t
                }
                // Vectors (biases, layer norms): small, converted.
                ParamRef::F32(v) => {
                    let bytes: Vec<u8> = v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect();
                    let t = self.disk.allocate(&Shape::new([v.len()]), DType::F16)?;
                    t.write_bytes(0, &bytes)?;
                    t
                }
            };
            map.insert(name, t);
        }
        self.layers.push(map);
        Ok(())
    }

    /// Layer `j`, read back from disk.
    pub fn load(&self, j: usize) -> Result<DecoderLayer> {
        Ok(self.load_held(j)?.0)
    }

    /// Layer `j`, read back from disk, with its host memory reserved
    /// against the host account (for as long as the reservation lives).
    ///
    /// Each weight is reserved as it is read (the memory fills while the
    /// read runs, on the read-ahead thread beside the layer in use).
    pub fn load_held(&self, j: usize) -> Result<(DecoderLayer, Vec<Reservation>)> {
        let map = self
            .layers
            .get(j.wrapping_sub(self.first))
            .ok_or_else(|| Error::InvalidArgument(format!("layer {j} is not on disk")))?;
        let src = LayerOnDisk { map, host: self.host.as_ref(), held: Default::default() };
        let layer = DecoderLayer::load_from(&src, &self.config, j)?;
        let held = src.held.into_inner();
        debug_assert!(
            self.host.is_none()
                || held.iter().map(Reservation::asked).sum::<u64>()
                    == layer.parameters(j).iter().map(|(_, p)| p.bytes()).sum::<u64>()
        );
        Ok((layer, held))
    }
}

// The disk format is little-endian, as f16's memory is on such a target.
const _: () = assert!(cfg!(target_endian = "little"), "the CPU engine's disk layers assume a little-endian target");

/// `values` as bytes (f16 is stored little-endian on every target tierlm
/// builds for; the disk format is little-endian).
fn f16_bytes(values: &[f16]) -> &[u8] {
    // SAFETY: f16 is 2 plain bytes with no padding; u8 has alignment 1; the
    // byte slice covers exactly the f16 slice's memory, borrowed for its
    // lifetime.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

fn f16_bytes_mut(values: &mut [f16]) -> &mut [u8] {
    // SAFETY: as in `f16_bytes`, and any 2 bytes are a valid f16.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

/// Whether the layer keeps weight `name` as f32 in memory (biases and
/// layer norms; [`crate::model::ParamRef::F32`]) rather than f16.
fn is_f32_in_memory(name: &str) -> bool {
    name.ends_with(".bias") || name.contains("layer_norm")
}

/// One layer's tensors on disk as a weight source, reserving what it reads
/// against `host`.
struct LayerOnDisk<'a> {
    map: &'a HashMap<String, Tensor>,
    host: Option<&'a Arc<MemAccount>>,
    held: std::cell::RefCell<Vec<Reservation>>,
}

impl WeightSource for LayerOnDisk<'_> {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f16>> {
        let t = self.map.get(name).ok_or_else(|| Error::MissingTensor { name: name.to_string() })?;
        let len: usize = shape.iter().product();
        if t.byte_len() != 2 * len {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape().dims().to_vec(),
            });
        }
        if let Some(h) = self.host {
            // What the layer keeps of it: f16, or f32 for a vector.
            let bytes = (len * if is_f32_in_memory(name) { 4 } else { 2 }) as u64;
            self.held.borrow_mut().push(h.reserve(bytes, bytes)?);
        }
        // Read straight into the weights' memory: no bounce copy.
        let mut values = vec![f16::ZERO; len];
        t.read_bytes(0, f16_bytes_mut(&mut values))?;
        Ok(values)
    }

    fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dummy::DummyWeights;
    use crate::model::OptModel;
    use indicatif::ProgressBar;

    fn tiny() -> OptConfig {
        OptConfig::from_json_str(
            r#"{"hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 4, "ffn_dim": 32,
                "vocab_size": 40, "max_position_embeddings": 32}"#,
        )
        .unwrap()
    }

    #[test]
    fn layers_round_trip_through_the_disk_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskDevice::new(tier_disk::DiskConfig::new(dir.path())).unwrap();
        let src = DummyWeights::new(9);
        let full = OptModel::load(tiny(), &src, &ProgressBar::hidden()).unwrap();
        let mut on_disk = DiskLayers::new(disk, tiny(), 1);
        let partial =
            OptModel::load_streaming(tiny(), &src, &ProgressBar::hidden(), 1, &mut |i, l| on_disk.put(i, l)).unwrap();
        assert_eq!(partial.layers.len(), 1);
        assert!(on_disk.holds(3) && !on_disk.holds(0) && !on_disk.holds(4));
        assert!(on_disk.bytes() > 0);
        for j in 1..4 {
            let back = on_disk.load(j).unwrap();
            assert_eq!(back.parameters(j), full.layers[j].parameters(j), "layer {j}");
        }
        assert!(on_disk.load(0).is_err());
        let mut wrong = DiskLayers::new(DiskDevice::new(tier_disk::DiskConfig::new(dir.path())).unwrap(), tiny(), 2);
        let layer = DecoderLayer::load_from(&src, &tiny(), 3).unwrap();
        assert!(wrong.put(3, layer).is_err(), "out of order");
    }

    #[test]
    fn resident_share_rounds_to_layers() {
        assert_eq!(resident_layers(4, 50.0), 2);
        assert_eq!(resident_layers(3, 0.0), 0);
        assert_eq!(resident_layers(3, 100.0), 3);
        assert_eq!(resident_layers(40, 75.0), 30);
    }
}
