//! Where a model's weights come from: a checkpoint on disk or deterministic
//! random numbers. Both give tensors by their canonical name (the Hugging
//! Face name without the leading `model.`), converted to f16.

use half::f16;

use crate::error::Result;

/// A source of named f16 tensors.
pub trait WeightSource {
    /// The tensor `name`, checked to have shape `shape`, as f16.
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f16>>;

    /// Whether the source holds `name` (for optional tensors).
    fn contains(&self, name: &str) -> bool;
}
