//! Deterministic random weights for any configuration (`--dummy`), for
//! benchmarks without a checkpoint, as FlexGen's `_DUMMY_` path.
//!
//! Each tensor's values depend only on the seed and the tensor's name (never
//! on the thread count): matrices and embeddings are uniform in
//! ±[`DummyWeights::SCALE`], biases in ±`SCALE / 2`, layer-norm weights 1 and
//! layer-norm biases 0, small enough that activations stay finite through
//! any number of layers.

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::Result;
use crate::weights::WeightSource;

/// Random weights, made on demand.
#[derive(Debug, Clone)]
pub struct DummyWeights {
    seed: u64,
}

impl DummyWeights {
    /// Magnitude bound of matrix entries.
    pub const SCALE: f32 = 0.02;

    /// Weights derived from `seed`.
    pub fn new(seed: u64) -> Self {
        DummyWeights { seed }
    }

    fn name_seed(&self, name: &str) -> u64 {
        // FNV-1a over the name, mixed with the seed: stable across runs and
        // platforms, unlike std's randomly keyed hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

impl WeightSource for DummyWeights {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f16>> {
        const CHUNK: usize = 1 << 16;
        let len: usize = shape.iter().product();
        let is_norm = name.contains("layer_norm");
        if is_norm && name.ends_with(".weight") {
            return Ok(vec![f16::ONE; len]);
        }
        if is_norm && name.ends_with(".bias") {
            return Ok(vec![f16::ZERO; len]);
        }
        let scale = if shape.len() == 1 { Self::SCALE / 2.0 } else { Self::SCALE };
        let seed = self.name_seed(name);
        let mut out = vec![f16::ZERO; len];
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i as u64);
            for v in chunk {
                *v = f16::from_f32(rng.random_range(-scale..scale));
            }
        });
        Ok(out)
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_small() {
        let a = DummyWeights::new(7).load("decoder.layers.0.fc1.weight", &[300, 400]).unwrap();
        let b = DummyWeights::new(7).load("decoder.layers.0.fc1.weight", &[300, 400]).unwrap();
        let c = DummyWeights::new(8).load("decoder.layers.0.fc1.weight", &[300, 400]).unwrap();
        let d = DummyWeights::new(7).load("decoder.layers.0.fc2.weight", &[300, 400]).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert!(a.iter().all(|v| v.to_f32().abs() <= DummyWeights::SCALE * 1.001));
        let ln = DummyWeights::new(7).load("decoder.final_layer_norm.weight", &[4]).unwrap();
        assert_eq!(ln, vec![f16::ONE; 4]);
    }
}
