//! Checkpoints on disk, as the model's weight source: the model-neutral
//! [`checkpoint`] crate reads them (safetensors, single-file or sharded,
//! preferred; else PyTorch's `pytorch_model.bin`, single-file or sharded,
//! read without running pickled code), memory-mapped; this module makes its
//! [`Checkpoint`] a [`WeightSource`] and its errors this crate's.

use half::f16;

use crate::error::{Error, Result};
use crate::weights::WeightSource;

pub use checkpoint::{canonical_name, Checkpoint, Dtype, Format, TensorInfo};

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = checkpoint::SAFETENSORS_SINGLE;
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = checkpoint::SAFETENSORS_INDEX;

impl WeightSource for Checkpoint {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f16>> {
        Ok(self.to_f16(name, shape)?)
    }

    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }
}

impl From<checkpoint::Error> for Error {
    fn from(e: checkpoint::Error) -> Self {
        match e {
            checkpoint::Error::NotFound { dir } => Error::MissingWeights { dir },
            other => Error::Checkpoint(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_directory_is_missing_weights_listing_every_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Checkpoint::open(tmp.path()).map_err(Error::from).unwrap_err();
        assert!(matches!(err, Error::MissingWeights { .. }), "{err:?}");
        let msg = err.to_string();
        for name in
            ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
        {
            assert!(msg.contains(name), "{msg}");
        }
    }
}
