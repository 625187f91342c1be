//! What the runtime knows of a model: its layer spec.
//!
//! A model family describes itself once, as a [`ModelSpec`]: every tensor of
//! one decoder layer by name, shape and the type the compute device holds it
//! in, whether the attention block or the MLP block reads it, and whether it
//! may be stored 4-bit compressed; the tensors outside the layers
//! (embeddings, final norm, output head); the per-token KV-cache layout; the
//! widths the compute's scratch space is sized from. The plan
//! ([`crate::plan`]), the weight streaming and the placement check read this
//! and nothing else of the model, so none of them names a tensor of any
//! family.
//!
//! Byte counts are checked: a spec whose bytes do not fit in `u64` is
//! refused when it is made ([`ModelSpec::new`]), so every count read from
//! it afterwards is exact.

use tier_api::DType;

use crate::error::{Error, Result};

/// Which block of a layer reads a tensor: with `--sep-layer`, the MLP
/// block's tensors arrive after the attention block's and are waited for
/// only before the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    Attention,
    Mlp,
}

/// One tensor as the compute device holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The name in the checkpoint: relative to the layer's prefix for a
    /// layer's tensors (`mlp.up.weight` for `layers.3.mlp.up.weight`), whole for the others.
    pub name: String,
    pub shape: Vec<usize>,
    /// The type the compute device holds it in.
    pub dtype: DType,
    pub block: Block,
    /// Whether `--compress-weight` stores it 4-bit (the 2-D matrices of a
    /// layer; vectors and the tensors outside the layers stay as they are).
    pub compressible: bool,
    /// The matrices it is packed as when compressed, if not itself whole
    /// (a stacked q/k/v matrix packed as its three parts); empty: whole.
    pub packed_as: Vec<Vec<usize>>,
}

/// The format of 4-bit weights: FlexGen's groups of 64 along the output
/// dimension (dim 0), an f16 min and scale per group.
pub fn weight_format() -> compression::CompressionConfig {
    compression::CompressionConfig::int4(0)
}

/// Bytes a 4-bit matrix takes in the `compression` crate's format
/// ([`weight_format`], with its header): exactly what the engine allocates
/// for it.
pub fn packed_bytes(shape: &[usize]) -> Result<u64> {
    let layout = compression::CompressedLayout::new(shape, compression::SourceDtype::F16, weight_format())
        .map_err(|e| Error::Spec(format!("a 4-bit layout for shape {shape:?}: {e}")))?;
    Ok(layout.total_bytes() as u64)
}

impl TensorSpec {
    /// Elements, checked.
    pub fn elements(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64))
    }

    /// Bytes as held, checked.
    pub fn bytes(&self) -> Option<u64> {
        self.elements()?.checked_mul(self.dtype.size() as u64)
    }

    /// The matrices it is packed as (itself unless [`TensorSpec::packed_as`]
    /// says otherwise).
    pub fn parts(&self) -> Vec<Vec<usize>> {
        if self.packed_as.is_empty() {
            vec![self.shape.clone()]
        } else {
            self.packed_as.clone()
        }
    }

    /// Bytes as held under `compress` (packed when compressible).
    pub fn stored_bytes(&self, compress: bool) -> Result<u64> {
        if compress && self.compressible {
            self.parts().iter().try_fold(0u64, |sum, p| {
                sum.checked_add(packed_bytes(p)?).ok_or_else(|| Error::Spec(format!("{}: bytes overflow", self.name)))
            })
        } else {
            self.bytes().ok_or_else(|| Error::Spec(format!("{}: {:?} overflows u64 bytes", self.name, self.shape)))
        }
    }
}

/// The key/value cache of one layer, per token of one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Key/value heads (fewer than the query heads under grouped-query
    /// attention).
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
}

impl KvLayout {
    /// Bytes of one token's keys and values in one layer.
    pub fn token_bytes(&self) -> u64 {
        2 * self.kv_heads as u64 * self.head_dim as u64 * self.dtype.size() as u64
    }
}

/// The widths a step's scratch space is sized from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Widths {
    /// The hidden state between layers.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// The MLP's inner width.
    pub intermediate: usize,
    /// Type of the activations the products write.
    pub dtype: DType,
}

/// A model as the runtime sees it (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// Decoder layers.
    pub layers: usize,
    /// The tensors of every decoder layer (the same for each).
    pub layer: Vec<TensorSpec>,
    /// The tensors outside the layers (never streamed: they stay with the
    /// compute device).
    pub outside: Vec<TensorSpec>,
    pub kv: KvLayout,
    pub widths: Widths,
}

impl ModelSpec {
    /// The spec, once every byte count it gives is known to fit in `u64`.
    pub fn new(
        layers: usize,
        layer: Vec<TensorSpec>,
        outside: Vec<TensorSpec>,
        kv: KvLayout,
        widths: Widths,
    ) -> Result<Self> {
        let spec = ModelSpec { layers, layer, outside, kv, widths };
        let layer_bytes = spec.layer_bytes(false)?;
        let outside = spec.outside_bytes()?;
        (layers as u64)
            .checked_mul(layer_bytes)
            .and_then(|b| b.checked_add(outside))
            .ok_or_else(|| Error::Spec(format!("{layers} layers of {layer_bytes} bytes overflow u64")))?;
        Ok(spec)
    }

    /// Bytes of one layer as held (packed where compressed).
    pub fn layer_bytes(&self, compress: bool) -> Result<u64> {
        self.layer.iter().try_fold(0u64, |sum, t| {
            sum.checked_add(t.stored_bytes(compress)?).ok_or_else(|| Error::Spec("a layer's bytes overflow".into()))
        })
    }

    /// Bytes of the tensors outside the layers.
    pub fn outside_bytes(&self) -> Result<u64> {
        self.outside.iter().try_fold(0u64, |sum, t| {
            sum.checked_add(t.stored_bytes(false)?).ok_or_else(|| Error::Spec("the weights' bytes overflow".into()))
        })
    }

    /// Bytes of every weight as held.
    pub fn weight_bytes(&self, compress: bool) -> Result<u64> {
        (self.layers as u64)
            .checked_mul(self.layer_bytes(compress)?)
            .and_then(|b| b.checked_add(self.outside_bytes().ok()?))
            .ok_or_else(|| Error::Spec("the weights' bytes overflow".into()))
    }

    /// Bytes of the KV cache of every layer for `batch` sequences of `seq`
    /// positions (saturating: a count that large never fits anywhere).
    pub fn kv_cache_bytes(&self, batch: usize, seq: usize) -> u64 {
        (self.layers as u64)
            .saturating_mul(batch as u64)
            .saturating_mul(seq as u64)
            .saturating_mul(self.kv.token_bytes())
    }

    /// The tensor of a layer named `name`.
    pub fn layer_tensor(&self, name: &str) -> Option<&TensorSpec> {
        self.layer.iter().find(|t| t.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: &[usize], dtype: DType, block: Block, compressible: bool) -> TensorSpec {
        TensorSpec { name: name.into(), shape: shape.to_vec(), dtype, block, compressible, packed_as: Vec::new() }
    }

    fn small() -> ModelSpec {
        ModelSpec::new(
            3,
            vec![
                t("w1", &[128, 64], DType::F16, Block::Attention, true),
                t("b1", &[128], DType::F32, Block::Attention, false),
                t("w2", &[64, 256], DType::BF16, Block::Mlp, true),
            ],
            vec![t("embed", &[1000, 64], DType::F16, Block::Attention, false)],
            KvLayout { kv_heads: 2, head_dim: 32, dtype: DType::F16 },
            Widths { hidden: 64, heads: 4, intermediate: 256, dtype: DType::F16 },
        )
        .unwrap()
    }

    #[test]
    fn bytes_as_held() {
        let s = small();
        assert_eq!(s.layer_bytes(false).unwrap(), 128 * 64 * 2 + 128 * 4 + 64 * 256 * 2);
        assert_eq!(s.outside_bytes().unwrap(), 1000 * 64 * 2);
        assert_eq!(s.weight_bytes(false).unwrap(), 3 * s.layer_bytes(false).unwrap() + 128_000);
        // 4-bit: half a byte a value, an f16 min and scale per 64 values, a header.
        let packed = s.layer_bytes(true).unwrap();
        assert_eq!(packed, packed_bytes(&[128, 64]).unwrap() + 128 * 4 + packed_bytes(&[64, 256]).unwrap());
        assert_eq!(packed_bytes(&[128, 64]).unwrap(), 64 + 128 * 64 / 2 + 128 * 4);
        assert_eq!(s.kv_cache_bytes(5, 10), 3 * 5 * 10 * 2 * 2 * 32 * 2);
        assert_eq!(s.kv_cache_bytes(usize::MAX, usize::MAX), u64::MAX, "saturates");
    }

    #[test]
    fn sizes_past_u64_are_refused_when_made() {
        let huge = t("w", &[1 << 40, 1 << 30], DType::F16, Block::Mlp, true);
        let err = ModelSpec::new(
            1,
            vec![huge],
            Vec::new(),
            KvLayout { kv_heads: 1, head_dim: 1, dtype: DType::F16 },
            Widths { hidden: 1, heads: 1, intermediate: 1, dtype: DType::F16 },
        )
        .unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
    }
}
