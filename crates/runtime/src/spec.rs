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
    /// The checkpoint tensors it is made from, stacked by rows in this
    /// order (a q/k/v matrix from the three projections), with their names
    /// relative as [`TensorSpec::name`] is; empty: the tensor `name` itself.
    pub sources: Vec<Source>,
}

/// A checkpoint tensor a held tensor is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub shape: Vec<usize>,
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

    /// The checkpoint tensors it is made from (itself unless
    /// [`TensorSpec::sources`] says otherwise).
    pub fn sources(&self) -> Vec<Source> {
        if self.sources.is_empty() {
            vec![Source { name: self.name.clone(), shape: self.shape.clone() }]
        } else {
            self.sources.clone()
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
    /// Elements (of `dtype`) of one prefill row of the GPU engine's scratch:
    /// the block's input, projections, attention output and the MLP's
    /// inner activations, as the family's engine holds them
    /// ([`Widths::plain_scratch`] for an engine with stacked projections and
    /// one inner activation).
    pub scratch_per_row: usize,
    /// Type the hidden states between layers are kept in (the residual
    /// stream).
    pub residual: DType,
    /// Whether the hidden states between layers also carry a copy in
    /// `dtype` (a post-layer-norm family's block input), which
    /// their homes off the GPU and the GPU buffers they pass through hold.
    pub hidden_copy: bool,
    /// How the GPU engine holds the prefill's attention scores.
    pub scores: Scores,
}

/// The prefill attention scores' buffer, as the family's GPU engine holds
/// it: `heads · prompt_len²` values of `bytes` each per sequence, for all
/// of a GPU batch's sequences at once, or, under a `budget`, for as many
/// as fit it (at least one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scores {
    /// Bytes of one score.
    pub bytes: usize,
    /// Bytes the buffer may take (sequences are taken in chunks under it).
    pub budget: Option<u64>,
}

impl Scores {
    /// Every head's scores in f32 for the whole GPU batch.
    pub const F32_ALL: Scores = Scores { bytes: 4, budget: None };

    /// Sequences the buffer holds at once for a batch of `batch` sequences
    /// whose scores take `per_seq` values each.
    pub fn chunk(&self, per_seq: u64, batch: u64) -> u64 {
        let per_seq_bytes = per_seq.saturating_mul(self.bytes as u64).max(1);
        match self.budget {
            Some(b) => (b / per_seq_bytes).clamp(1, batch.max(1)),
            None => batch.max(1),
        }
    }

    /// Bytes of the buffer for `batch` sequences of `heads · q_len ·
    /// k_len` scores each.
    pub fn buffer_bytes(&self, batch: u64, heads: u64, q_len: u64, k_len: u64) -> u64 {
        let per_seq = heads.saturating_mul(q_len).saturating_mul(k_len);
        self.chunk(per_seq, batch).saturating_mul(per_seq).saturating_mul(self.bytes as u64)
    }
}

impl Widths {
    /// Bytes of one hidden value between layers: the residual's, and its
    /// copy's where there is one.
    pub fn hidden_value_bytes(&self) -> u64 {
        self.residual.size() as u64 + if self.hidden_copy { self.dtype.size() as u64 } else { 0 }
    }

    /// The scratch of a row for q and attention output of `q_width`, keys
    /// and values of `kv_width` and one inner activation: `2·q + 2·kv +
    /// intermediate`.
    pub fn plain_scratch(q_width: usize, kv_width: usize, intermediate: usize) -> usize {
        2 * q_width + 2 * kv_width + intermediate
    }
}

/// A model as the runtime sees it (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// Decoder layers.
    pub layers: usize,
    /// The checkpoint names of layer `i`'s tensors start with this, `{}`
    /// standing for `i` (`layers.{}.`).
    pub layer_prefix: String,
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
        (layers, layer_prefix): (usize, &str),
        layer: Vec<TensorSpec>,
        outside: Vec<TensorSpec>,
        kv: KvLayout,
        widths: Widths,
    ) -> Result<Self> {
        let spec = ModelSpec { layers, layer_prefix: layer_prefix.to_string(), layer, outside, kv, widths };
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

    /// The checkpoint name of layer `i`'s tensor `name`.
    pub fn layer_name(&self, i: usize, name: &str) -> String {
        format!("{}{name}", self.layer_prefix.replace("{}", &i.to_string()))
    }

    /// Checks that `ckpt` holds every tensor the spec is made from, in the
    /// shape the spec says and in a type the engine converts from (f16,
    /// bf16, f32), before anything is allocated. A tensor that is missing,
    /// of another shape or of another type is named, with its file and what
    /// was expected. Tensors the spec does not name are left alone.
    pub fn check_checkpoint(&self, ckpt: &checkpoint::Checkpoint) -> Result<()> {
        use checkpoint::Dtype;
        let mut wanted: Vec<Source> = self.outside.iter().flat_map(TensorSpec::sources).collect();
        for i in 0..self.layers {
            for t in &self.layer {
                wanted.extend(
                    t.sources().into_iter().map(|s| Source { name: self.layer_name(i, &s.name), shape: s.shape }),
                );
            }
        }
        for want in wanted {
            let Some(info) = ckpt.info(&want.name) else {
                return Err(Error::Checkpoint(format!(
                    "tensor {} is missing from the checkpoint in {} (expected shape {:?})",
                    want.name,
                    ckpt.dir().display(),
                    want.shape
                )));
            };
            if info.shape != want.shape {
                return Err(Error::Checkpoint(format!(
                    "tensor {} has shape {:?}, expected {:?} (in {}; the shape follows from config.json)",
                    info.stored_name,
                    info.shape,
                    want.shape,
                    info.file.display()
                )));
            }
            if !matches!(info.dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32) {
                return Err(Error::Checkpoint(format!(
                    "tensor {} is stored as {}; only F16, BF16 and F32 are supported (in {})",
                    info.stored_name,
                    info.dtype,
                    info.file.display()
                )));
            }
        }
        Ok(())
    }

    /// The tensor of a layer named `name`.
    pub fn layer_tensor(&self, name: &str) -> Option<&TensorSpec> {
        self.layer.iter().find(|t| t.name == name)
    }
}

/// A model-shaped spec for the runtime's own tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Block, KvLayout, ModelSpec, TensorSpec, Widths};
    use tier_api::DType;

    /// `layers` layers of hidden `h` (an MLP of `4h`, heads of `head_dim`),
    /// with an f32 bias after the MLP if `bias`, and a 50,000-row embedding.
    pub(crate) fn spec(layers: usize, h: usize, head_dim: usize, bias: bool) -> ModelSpec {
        let t = |name: &str, shape: &[usize], dtype, block, c| TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            block,
            compressible: c,
            packed_as: Vec::new(),
            sources: Vec::new(),
        };
        let mut layer = vec![
            t("norm1", &[h], DType::F16, Block::Attention, false),
            t("qkv", &[3 * h, h], DType::F16, Block::Attention, true),
            t("out", &[h, h], DType::F16, Block::Attention, true),
            t("up", &[4 * h, h], DType::F16, Block::Mlp, true),
            t("down", &[h, 4 * h], DType::F16, Block::Mlp, true),
        ];
        if bias {
            layer.push(t("down_bias", &[h], DType::F32, Block::Mlp, false));
        }
        let heads = h / head_dim;
        ModelSpec::new(
            (layers, "layers.{}."),
            layer,
            vec![t("embed", &[50_000, h], DType::F16, Block::Attention, false)],
            KvLayout { kv_heads: heads, head_dim, dtype: DType::F16 },
            Widths {
                hidden: h,
                heads,
                intermediate: 4 * h,
                dtype: DType::F16,
                scratch_per_row: Widths::plain_scratch(h, h, 4 * h),
                residual: DType::F16,
                hidden_copy: false,
                scores: super::Scores::F32_ALL,
            },
        )
        .expect("a valid test spec")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: &[usize], dtype: DType, block: Block, compressible: bool) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            block,
            compressible,
            packed_as: Vec::new(),
            sources: Vec::new(),
        }
    }

    fn small() -> ModelSpec {
        ModelSpec::new(
            (3, "layers.{}."),
            vec![
                t("w1", &[128, 64], DType::F16, Block::Attention, true),
                t("b1", &[128], DType::F32, Block::Attention, false),
                t("w2", &[64, 256], DType::BF16, Block::Mlp, true),
            ],
            vec![t("embed", &[1000, 64], DType::F16, Block::Attention, false)],
            KvLayout { kv_heads: 2, head_dim: 32, dtype: DType::F16 },
            Widths {
                hidden: 64,
                heads: 4,
                intermediate: 256,
                dtype: DType::F16,
                scratch_per_row: Widths::plain_scratch(64, 64, 256),
                residual: DType::F16,
                hidden_copy: false,
                scores: super::Scores::F32_ALL,
            },
        )
        .unwrap()
    }

    #[test]
    fn scores_are_counted_whole_or_in_chunks_under_their_budget() {
        // 4 sequences of 2 heads x 8 x 8 scores.
        assert_eq!(Scores::F32_ALL.buffer_bytes(4, 2, 8, 8), 4 * 2 * 64 * 4);
        let chunked = Scores { bytes: 2, budget: Some(600) };
        // One sequence's scores take 256 bytes: two fit the budget.
        assert_eq!(chunked.chunk(128, 4), 2);
        assert_eq!(chunked.buffer_bytes(4, 2, 8, 8), 512);
        // Never fewer than one sequence, never more than the batch.
        assert_eq!(Scores { bytes: 2, budget: Some(10) }.buffer_bytes(4, 2, 8, 8), 256);
        assert_eq!(Scores { bytes: 2, budget: Some(1 << 40) }.buffer_bytes(4, 2, 8, 8), 1024);
        // Sizes near 2^64 saturate rather than wrap.
        assert_eq!(Scores::F32_ALL.buffer_bytes(u64::MAX, 2, 8, 8), u64::MAX);
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

    /// A safetensors file of zeros with `tensors` (name, dtype, shape).
    fn write_safetensors(dir: &std::path::Path, tensors: &[(&str, &str, &[usize])]) {
        let mut header = String::from("{");
        let mut offset = 0usize;
        for (k, (name, dtype, shape)) in tensors.iter().enumerate() {
            let size = if *dtype == "F32" { 4 } else { 2 };
            let bytes = shape.iter().product::<usize>() * size;
            let comma = if k == 0 { "" } else { "," };
            header += &format!(
                r#"{comma}"{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{offset},{}]}}"#,
                offset + bytes
            );
            offset += bytes;
        }
        header += "}";
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header.as_bytes());
        file.resize(file.len() + offset, 0);
        std::fs::write(dir.join("model.safetensors"), file).unwrap();
    }

    #[test]
    fn a_checkpoint_is_checked_against_the_spec_by_name_shape_and_type() {
        let mut spec = small();
        spec.layers = 1;
        spec.layer[0].sources = vec![
            Source { name: "a.weight".into(), shape: vec![64, 64] },
            Source { name: "b.weight".into(), shape: vec![64, 64] },
        ];
        let dir = tempfile::tempdir().unwrap();
        let good: Vec<(&str, &str, &[usize])> = vec![
            ("layers.0.a.weight", "BF16", &[64, 64]),
            ("layers.0.b.weight", "F16", &[64, 64]),
            ("layers.0.b1", "F32", &[128]),
            ("layers.0.w2", "F32", &[64, 256]),
            ("embed", "F16", &[1000, 64]),
            ("unrelated", "F16", &[3]),
        ];
        write_safetensors(dir.path(), &good);
        spec.check_checkpoint(&checkpoint::Checkpoint::open(dir.path()).unwrap()).unwrap();

        let mut missing = good.clone();
        missing.remove(1);
        write_safetensors(dir.path(), &missing);
        let err = spec.check_checkpoint(&checkpoint::Checkpoint::open(dir.path()).unwrap()).unwrap_err().to_string();
        assert!(err.contains("layers.0.b.weight is missing") && err.contains("[64, 64]"), "{err}");

        let mut wrong = good.clone();
        wrong[4] = ("embed", "F16", &[999, 64]);
        write_safetensors(dir.path(), &wrong);
        let err = spec.check_checkpoint(&checkpoint::Checkpoint::open(dir.path()).unwrap()).unwrap_err().to_string();
        assert!(err.contains("tensor embed has shape [999, 64], expected [1000, 64]"), "{err}");
        assert!(err.contains("model.safetensors"), "{err}");

        let mut ints = good.clone();
        ints[2] = ("layers.0.b1", "I16", &[128]);
        write_safetensors(dir.path(), &ints);
        let err = spec.check_checkpoint(&checkpoint::Checkpoint::open(dir.path()).unwrap()).unwrap_err().to_string();
        assert!(err.contains("layers.0.b1 is stored as") && err.contains("only F16, BF16 and F32"), "{err}");
    }

    #[test]
    fn sizes_past_u64_are_refused_when_made() {
        let huge = t("w", &[1 << 40, 1 << 30], DType::F16, Block::Mlp, true);
        let err = ModelSpec::new(
            (1, "layers.{}."),
            vec![huge],
            Vec::new(),
            KvLayout { kv_heads: 1, head_dim: 1, dtype: DType::F16 },
            Widths {
                hidden: 1,
                heads: 1,
                intermediate: 1,
                dtype: DType::F16,
                scratch_per_row: 4,
                residual: DType::F16,
                hidden_copy: false,
                scores: super::Scores::F32_ALL,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
    }
}
