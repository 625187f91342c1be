//! The op layer's CPU reference.
//!
//! The operations a decoder-only transformer is written over: a plain host
//! [`Tensor`] (shape, dtype, data) for weights; linear layers
//! `y = x·Wᵀ (+ bias)` with an optional fused activation ([`linear`]);
//! RMSNorm and LayerNorm ([`rms_norm`], [`layer_norm`]); rotary position
//! embeddings in Hugging Face's rotate-half convention with the scaling
//! rules checkpoints use ([`Rope`], [`RopeScaling`]); the SwiGLU product,
//! ReLU and embedding lookup; and attention over a key/value cache
//! ([`KvCache`], [`attention`]) with grouped-query heads (the number of
//! key/value heads and the head dimension are parameters), a causal mask and
//! a key padding mask.
//!
//! Weights are stored in the checkpoint's dtype (f16 or bf16, or f32) and
//! converted to f32 a tile at a time just before use: every sum, product and
//! norm is computed in f32, matrix products through the `gemm` crate, and
//! work is spread over threads with rayon. The KV cache is stored in the
//! dtype it is made with.

mod attention;
mod linear;
mod norm;
mod rope;
pub(crate) mod tensor;

pub use attention::{
    attention, attention_sparse, keep_top_past, softmax_masked, sparse_top_k, AttentionShape, KvCache,
};
pub use linear::{add_inplace, embedding, linear, relu_inplace, silu_mul_inplace, Activation};
pub use norm::{layer_norm, rms_norm};
pub use rope::{Rope, RopeScaling};
pub use tensor::{f16_to_f32, DType, Storage, Tensor};
