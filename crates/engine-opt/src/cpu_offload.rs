//! Weights and KV cache on disk for the CPU engine: `--percent 0 W_CPU 0
//! C_CPU 0 100` with `W_CPU` or `C_CPU` below 100 and no GPU. The first
//! `round(n · W_CPU / 100)` layers stay in host memory (the
//! [`crate::model::OptModel`]'s own); the later ones go to the runtime's
//! [`DiskLayers`] as they are loaded and are read back a layer ahead of the
//! compute; the cache's disk share is [`cache_disk_for_policy`]. What is
//! here is OPT's side of it: the policy's disk store and the bytes it puts
//! on disk, checked against the offload directory's free space.

use std::sync::Arc;

use tier_disk::DiskDevice;

use crate::config::OptConfig;
use crate::error::Result;

pub use runtime::cpu::DiskLayers;
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
    Ok(Some(DiskLayers::new(tiers.disk(&dir)?, crate::spec::model_spec(config, false)?, resident)))
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
        let spec = crate::spec::model_spec(&tiny(), false).unwrap();
        let mut on_disk = DiskLayers::new(disk, spec.clone(), 1);
        let partial =
            OptModel::load_streaming(tiny(), &src, &ProgressBar::hidden(), 1, &mut |i, l| Ok(on_disk.put(i, &l)?))
                .unwrap();
        assert_eq!(partial.layers.len(), 1);
        assert!(on_disk.holds(3) && !on_disk.holds(0) && !on_disk.holds(4));
        assert!(on_disk.bytes() > 0);
        for j in 1..4 {
            assert_eq!(on_disk.load(j).unwrap(), full.layers[j], "layer {j}");
        }
        assert!(on_disk.load(0).is_err());
        let mut wrong = DiskLayers::new(DiskDevice::new(tier_disk::DiskConfig::new(dir.path())).unwrap(), spec, 2);
        assert!(wrong.put(3, &full.layers[3]).is_err(), "out of order");
    }

    #[test]
    fn resident_share_rounds_to_layers() {
        assert_eq!(resident_layers(4, 50.0), 2);
        assert_eq!(resident_layers(3, 0.0), 0);
        assert_eq!(resident_layers(3, 100.0), 3);
        assert_eq!(resident_layers(40, 75.0), 30);
    }
}
