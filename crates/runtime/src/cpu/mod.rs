//! The CPU engine, for any model family.
//!
//! A family computes on the CPU by implementing [`CpuModel`] once: its
//! embedding, one layer's forward pass over a [`HostLayer`] (the layer's
//! tensors as its [`ModelSpec`] lists them, by name) and a KV cache, and its
//! logits, all over the op layer's CPU reference (`ops::cpu`). Everything
//! else is here and names no family:
//!
//! - [`HostLayer`]: one layer's weights in host memory, assembled from a
//!   checkpoint's tensors by the spec ([`HostLayer::assemble`]: stacked
//!   tensors concatenated, every tensor converted to the type the spec holds
//!   it in);
//! - [`DiskLayers`]: the layers a policy puts on disk, written as they are
//!   loaded and read back a layer ahead of the compute;
//! - [`CpuEngine`]: the [`crate::schedule::ComputeDevice`] the block
//!   schedule drives: resident layers, streamed layers, the KV cache in host
//!   memory or partly on disk (whole sequences), every host buffer reserved
//!   against the run's host account.

mod disk;
mod engine;
mod layer;

pub use disk::DiskLayers;
pub use engine::{prefill_logits, CpuEngine, CpuPlacement};
pub use layer::{cpu_dtype, HostLayer};

use ops::cpu::KvCache;

use crate::error::Result;
use crate::spec::ModelSpec;

/// What a layer's forward pass knows of the step besides the hidden states.
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// Sequences in the batch.
    pub batch: usize,
    /// New positions per sequence (the prompt's length at prefill, 1 when
    /// decoding).
    pub new_len: usize,
    /// `[batch][keys]`: whether each position so far (cached and new) holds
    /// a real token (`false` for left padding); `keys` is the cache's length
    /// after this step.
    pub key_mask: &'a [bool],
    /// `[batch][new_len]`: the position of each new token counted from its
    /// sequence's first real token, `None` for padding.
    pub positions: &'a [Option<usize>],
}

impl Step<'_> {
    /// Rows of hidden states in the step (`batch × new_len`).
    pub fn rows(&self) -> usize {
        self.batch * self.new_len
    }
}

/// A model family on the CPU: what [`CpuEngine`] needs of it.
///
/// Hidden states are `[rows, hidden]` f32, rows in batch-major order
/// (sequence `b`'s new position `s` is row `b · new_len + s`).
pub trait CpuModel: Sync {
    /// The layer spec: the tensors of every [`HostLayer`], by name, shape
    /// and held type, and the KV layout (the cache is kept in its type).
    fn spec(&self) -> &ModelSpec;

    /// Entries of the output vocabulary.
    fn vocab_size(&self) -> usize;

    /// Positions a sequence may hold (prompt plus generated).
    fn max_positions(&self) -> usize;

    /// Hidden states for `tokens` at `positions` (`None`: padding).
    fn embed(&self, tokens: &[u32], positions: &[Option<usize>]) -> Result<Vec<f32>>;

    /// One layer, in place on `hidden`, appending the step's keys and values
    /// to `cache` (sized for the step's batch).
    fn layer_forward(&self, layer: &HostLayer, hidden: &mut [f32], step: &Step<'_>, cache: &mut KvCache) -> Result<()>;

    /// Logits over the vocabulary for `rows` hidden states: `[rows, vocab]`.
    fn logits(&self, hidden: &[f32], rows: usize) -> Result<Vec<f32>>;

    /// Bytes a layer's forward pass allocates at most besides the hidden
    /// states and the cache, for `batch` sequences of `new_len` new positions
    /// attending to `keys` positions. The default counts, in f32, six
    /// `rows × hidden` buffers (normed input, queries, keys, values, the
    /// attention's output and its projection), the scores of every head and
    /// two `rows × intermediate` buffers of the MLP.
    fn layer_scratch_bytes(&self, batch: usize, new_len: usize, keys: usize) -> u64 {
        let w = &self.spec().widths;
        let rows = (batch as u64).saturating_mul(new_len as u64);
        let scores =
            (batch as u64).saturating_mul(w.heads as u64).saturating_mul(new_len as u64).saturating_mul(keys as u64);
        let values = rows
            .saturating_mul(w.hidden as u64)
            .saturating_mul(6)
            .saturating_add(scores)
            .saturating_add(rows.saturating_mul(w.intermediate as u64).saturating_mul(2));
        values.saturating_mul(4)
    }
}

/// Fails on the first non-finite logit, naming the sequence and token: the
/// weights or activations overflowed and the output would be garbage.
pub fn check_logits(logits: &[f32], vocab: usize) -> Result<()> {
    let Some(i) = logits.iter().position(|x| !x.is_finite()) else {
        return Ok(());
    };
    Err(crate::Error::NonFinite(format!(
        "the model's logits for sequence {} of the batch hold {} (token {}): the weights or activations \
         overflow, so the output would be garbage; check the checkpoint's values",
        i / vocab.max(1),
        logits[i],
        i % vocab.max(1)
    )))
}
