//! Batched generation: prefill then incremental decoding with a KV cache,
//! over a block of batches in FlexGen's order (for each step, for each
//! layer, for each batch), with per-sequence stopping.

use indicatif::ProgressBar;

use crate::config::OptConfig;
use crate::error::{Error, Result};
use std::sync::Arc;

use crate::cpu_offload::DiskLayers;
use crate::kv_cache::{KvCache, LayerCache};
use crate::model::{DecoderLayer, OptModel, StepContext};
use runtime::sampling::Sampler;
use runtime::schedule::{BatchTokens, ComputeDevice};
use tier_api::{MemAccount, Reservation};

pub use runtime::schedule::{GenerateOptions, GenerationOutput};

/// Options for OPT's ids (`</s>` = 2 ends, `<pad>` = 1 pads), stopping on
/// the end of sequence.
pub fn options(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions::new(max_new_tokens, crate::tokenizer::EOS_TOKEN_ID, crate::tokenizer::PAD_TOKEN_ID)
}

/// The CPU as a [`ComputeDevice`]: caches in host memory, f32 arithmetic;
/// the model's layers in host memory, and with [`CpuDevice::with_disk`]
/// the later ones on disk, read back a layer ahead on a thread of their own.
pub struct CpuDevice<'a> {
    model: &'a OptModel,
    disk: Option<Arc<DiskLayers>>,
    /// With a share of the KV cache on disk: the disk and the share of each
    /// batch's sequences kept in memory (percent).
    cache_disk: Option<(Arc<tier_disk::DiskDevice>, f64)>,
    /// One layer's cache of a whole batch, per batch shape, that the
    /// memory and disk sequences are gathered into around a layer.
    slots: std::collections::HashMap<(usize, usize), (LayerCache, Held)>,
    /// The streamed layer in use.
    current: Option<(usize, DecoderLayer, Vec<Reservation>)>,
    /// The streamed layer being read.
    next: Option<(usize, std::thread::JoinHandle<Result<StreamedLayer>>)>,
    /// Bytes of KV cache allocated on `cache_disk`.
    disk_cache_bytes: u64,
    /// Where the host memory this device allocates is accounted (caches,
    /// gather slots, hidden states, the scratch of a layer and of the
    /// logits; streamed layers through [`DiskLayers`]), if anywhere.
    host: Option<Arc<MemAccount>>,
}

/// A layer read back from disk, with its host memory's reservations.
type StreamedLayer = (DecoderLayer, Vec<Reservation>);

/// Host bytes reserved against the device's account, while they live.
type Held = Option<Reservation>;

impl<'a> CpuDevice<'a> {
    /// The device computing `model` (all its layers in host memory).
    pub fn new(model: &'a OptModel) -> Self {
        CpuDevice {
            model,
            disk: None,
            cache_disk: None,
            slots: Default::default(),
            current: None,
            next: None,
            disk_cache_bytes: 0,
            host: None,
        }
    }

    /// Reserves the host memory this device allocates against `host`.
    pub fn with_host_account(mut self, host: Arc<MemAccount>) -> Self {
        self.host = Some(host);
        self
    }

    fn reserve(&self, bytes: u64) -> Result<Held> {
        self.host.as_ref().map(|h| h.reserve(bytes, bytes)).transpose().map_err(Into::into)
    }

    /// Puts the last `100 − cpu_percent`% of each batch's sequences' KV
    /// cache on `disk` (whole sequences; the rest stays in memory).
    pub fn with_cache_on_disk(mut self, disk: Arc<tier_disk::DiskDevice>, cpu_percent: f64) -> Self {
        self.cache_disk = Some((disk, cpu_percent.clamp(0.0, 100.0)));
        self
    }

    /// The device computing `model`'s resident layers and `disk`'s.
    pub fn with_disk(model: &'a OptModel, disk: Arc<DiskLayers>) -> Result<Self> {
        let layers = model.config.num_hidden_layers;
        if model.layers.len() != disk.first() || !(disk.first()..layers).all(|j| disk.holds(j)) {
            return Err(Error::InvalidArgument(format!(
                "{} resident layers and layers from {} on disk do not make the model's {layers}",
                model.layers.len(),
                disk.first()
            )));
        }
        Ok(CpuDevice {
            model,
            disk: Some(disk),
            cache_disk: None,
            slots: Default::default(),
            current: None,
            next: None,
            disk_cache_bytes: 0,
            host: None,
        })
    }

    /// Starts reading streamed layer `j` on a thread.
    fn read_ahead(&mut self, j: usize) {
        if let Some(disk) = &self.disk {
            let disk = Arc::clone(disk);
            self.next = Some((j, std::thread::spawn(move || disk.load_held(j))));
        }
    }

    fn decoder_layer(&self, j: usize) -> Result<&DecoderLayer> {
        if let Some(l) = self.model.layers.get(j) {
            return Ok(l);
        }
        match &self.current {
            Some((i, l, _)) if *i == j => Ok(l),
            _ => Err(Error::InvalidArgument(format!("layer {j} was not brought in (begin_layer)"))),
        }
    }
}

/// One batch on the CPU: its cache, which positions hold real tokens, and
/// the step's hidden states.
pub struct CpuBatch {
    /// The sequences kept in memory (all of them without a disk share).
    cache: KvCache,
    /// The others', on disk.
    on_disk: Option<CpuDiskCache>,
    /// Per sequence, whether each position so far is a real token.
    key_mask: Vec<Vec<bool>>,
    hidden: Vec<f32>,
    new_len: usize,
    /// The cache's and the masks' host memory, reserved.
    _cache_held: Held,
    /// The hidden states', reserved.
    hidden_held: Held,
}

/// The KV cache of a batch's last sequences on disk: per layer, keys and
/// values of sequences `first..` (f32, the memory layout), and the positions
/// stored.
pub struct CpuDiskCache {
    first: usize,
    batch: usize,
    layers: Vec<[tier_api::Tensor; 2]>,
    len: Vec<usize>,
}

/// `values` as bytes, to read into or write from a tier.
fn f32_bytes_mut(values: &mut [f32]) -> &mut [u8] {
    // SAFETY: any byte pattern is a valid f32, u8 has alignment 1, and the
    // byte slice covers exactly the f32 slice's memory, borrowed mutably
    // for the returned slice's lifetime.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

impl CpuDevice<'_> {
    /// Layer `j` of a batch whose last sequences' cache is on disk: memory
    /// and disk sequences gathered into one slot, the layer run, the slot
    /// scattered back (the disk part written whole).
    fn layer_with_disk_cache(&mut self, j: usize, b: &mut CpuBatch) -> Result<()> {
        let dc = b.on_disk.as_mut().ok_or_else(|| Error::InvalidArgument("no disk cache".into()))?;
        let host = b.cache.layers.get_mut(j).ok_or_else(|| Error::InvalidArgument(format!("no cache for {j}")))?;
        let (heads, hd, cap) = host.dims();
        let per_seq = heads * cap * hd;
        let split = dc.first * per_seq;
        let past = dc.len[j];
        let (mut slot, slot_held) = match self.slots.remove(&(dc.batch, cap)) {
            Some(s) => s,
            None => {
                let held = self.reserve((dc.batch * heads * hd * cap * 2 * std::mem::size_of::<f32>()) as u64)?;
                (LayerCache::new(dc.batch, heads, hd, cap), held)
            }
        };
        {
            let (sk, sv) = slot.data_mut();
            let (hk, hv) = host.data();
            sk[..split].copy_from_slice(hk);
            sv[..split].copy_from_slice(hv);
            let [dk, dv] = &dc.layers[j];
            dk.read_bytes(0, f32_bytes_mut(&mut sk[split..]))?;
            dv.read_bytes(0, f32_bytes_mut(&mut sv[split..]))?;
        }
        slot.set_len(past);
        let _scratch = self.reserve(self.layer_scratch_bytes(b.key_mask.len(), b.new_len, past + b.new_len))?;
        let layer = self.decoder_layer(j)?;
        let ctx = StepContext { batch: b.key_mask.len(), new_len: b.new_len, key_mask: &b.key_mask };
        layer.forward(&mut b.hidden, &ctx, &mut slot);
        {
            let (sk, sv) = slot.data_mut();
            let (hk, hv) = host.data_mut();
            hk.copy_from_slice(&sk[..split]);
            hv.copy_from_slice(&sv[..split]);
            let [dk, dv] = &dc.layers[j];
            dk.write_bytes(0, f32_bytes_mut(&mut sk[split..]))?;
            dv.write_bytes(0, f32_bytes_mut(&mut sv[split..]))?;
        }
        host.set_len(past + b.new_len);
        dc.len[j] = past + b.new_len;
        self.slots.insert((dc.batch, cap), (slot, slot_held));
        Ok(())
    }

    /// Host bytes of a batch of `batch` sequences of up to `capacity`
    /// positions, `in_memory` of whose caches are in memory: those caches
    /// (keys and values of every layer, f32) and the key masks.
    fn batch_host_bytes(&self, in_memory: usize, batch: usize, capacity: usize) -> u64 {
        let c = &self.model.config;
        let cache =
            (c.num_hidden_layers * in_memory * c.hidden_size * capacity * 2 * std::mem::size_of::<f32>()) as u64;
        cache + (batch * capacity) as u64
    }

    /// Bytes a layer's forward pass allocates at most besides the hidden
    /// states and the cache, for `batch` sequences of `new_len` new
    /// positions attending to `keys` positions: the layer-normed input,
    /// queries, keys, values, the attention output and its projection
    /// (each `rows × hidden`), the attention scores (`batch × heads ×
    /// new_len × keys`) and the MLP's wide activation (`rows × ffn`), f32.
    fn layer_scratch_bytes(&self, batch: usize, new_len: usize, keys: usize) -> u64 {
        let c = &self.model.config;
        let rows = (batch * new_len) as u64;
        let f32s = rows * c.hidden_size as u64 * 6
            + (batch * c.num_attention_heads * new_len) as u64 * keys as u64
            + rows * c.ffn_dim as u64;
        f32s * std::mem::size_of::<f32>() as u64
    }
}

/// Hidden states of the last position of each of `batch` sequences.
fn last_rows(hidden: &[f32], batch: usize, new_len: usize, dim: usize) -> Vec<f32> {
    (0..batch)
        .flat_map(|b| {
            let row = b * new_len + new_len - 1;
            hidden[row * dim..(row + 1) * dim].iter().copied()
        })
        .collect()
}

impl ComputeDevice for CpuDevice<'_> {
    type Batch = CpuBatch;
    type Error = Error;

    fn num_layers(&self) -> usize {
        self.model.config.num_hidden_layers
    }

    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.model.config.max_sequence_len()
    }

    fn begin_layer(&mut self, j: usize) -> Result<()> {
        let Some(disk) = self.disk.clone() else { return Ok(()) };
        if !disk.holds(j) || self.current.as_ref().is_some_and(|(i, _, _)| *i == j) {
            return Ok(());
        }
        self.current = None;
        let layer = match self.next.take() {
            Some((i, handle)) if i == j => {
                handle.join().map_err(|_| Error::Worker(format!("reading layer {j} from disk panicked")))??
            }
            other => {
                if let Some((_, handle)) = other {
                    // Read ahead for another order: let it finish, unused.
                    let _ = handle.join();
                }
                disk.load_held(j)?
            }
        };
        self.current = Some((j, layer.0, layer.1));
        // The next streamed layer (the first again after the last).
        let next = if disk.holds(j + 1) { j + 1 } else { disk.first() };
        if next != j {
            self.read_ahead(next);
        }
        Ok(())
    }

    fn new_batch(&mut self, tokens: &BatchTokens, capacity: usize) -> Result<CpuBatch> {
        let batch = tokens.batch();
        let (in_memory, on_disk) = match &self.cache_disk {
            Some((disk, cpu_percent)) => {
                let first = ((batch as f64) * cpu_percent / 100.0).round() as usize;
                let first = first.min(batch);
                if first == batch {
                    return Ok(CpuBatch {
                        cache: self.model.new_cache(batch, capacity),
                        on_disk: None,
                        key_mask: vec![Vec::with_capacity(capacity); batch],
                        hidden: Vec::new(),
                        new_len: 0,
                        _cache_held: self.reserve(self.batch_host_bytes(batch, batch, capacity))?,
                        hidden_held: None,
                    });
                }
                let c = &self.model.config;
                let len = (batch - first) * c.num_attention_heads * capacity * c.head_dim();
                let layers = (0..c.num_hidden_layers)
                    .map(|_| -> Result<[tier_api::Tensor; 2]> {
                        let t = || {
                            tier_api::Device::allocate(
                                disk.as_ref(),
                                &tier_api::Shape::new([len]),
                                tier_api::DType::F32,
                            )
                        };
                        Ok([t()?, t()?])
                    })
                    .collect::<Result<Vec<_>>>()?;
                let bytes: u64 = layers.iter().flatten().map(|t| t.byte_len() as u64).sum();
                self.disk_cache_bytes = self.disk_cache_bytes.saturating_add(bytes);
                let len = vec![0; c.num_hidden_layers];
                (first, Some(CpuDiskCache { first, batch, layers, len }))
            }
            None => (batch, None),
        };
        Ok(CpuBatch {
            cache: self.model.new_cache(in_memory, capacity),
            on_disk,
            key_mask: vec![Vec::with_capacity(capacity); tokens.batch()],
            hidden: Vec::new(),
            new_len: 0,
            _cache_held: self.reserve(self.batch_host_bytes(in_memory, batch, capacity))?,
            hidden_held: None,
        })
    }

    fn embed(&mut self, tokens: &BatchTokens, b: &mut CpuBatch) -> Result<()> {
        let n = tokens.new_len();
        for (seq, mask) in b.key_mask.iter_mut().enumerate() {
            mask.extend(tokens.mask()[seq * n..(seq + 1) * n].iter().map(|&m| m != 0));
        }
        b.hidden_held = None;
        b.hidden = self.model.embed(tokens.tokens(), &tokens.positions());
        b.hidden_held = self.reserve(std::mem::size_of_val(b.hidden.as_slice()) as u64)?;
        b.new_len = n;
        Ok(())
    }

    fn layer(&mut self, j: usize, _tokens: &BatchTokens, b: &mut CpuBatch) -> Result<()> {
        if b.on_disk.is_some() {
            return self.layer_with_disk_cache(j, b);
        }
        let keys = b.key_mask.first().map_or(0, Vec::len);
        let _scratch = self.reserve(self.layer_scratch_bytes(b.key_mask.len(), b.new_len, keys))?;
        let layer = self.decoder_layer(j)?;
        let cache = b.cache.layers.get_mut(j).ok_or_else(|| Error::InvalidArgument(format!("no cache for {j}")))?;
        let ctx = StepContext { batch: b.key_mask.len(), new_len: b.new_len, key_mask: &b.key_mask };
        layer.forward(&mut b.hidden, &ctx, cache);
        Ok(())
    }

    fn pick(&mut self, tokens: &BatchTokens, b: &mut CpuBatch, sampler: Option<&mut Sampler>) -> Result<Vec<u32>> {
        let c = &self.model.config;
        // The last rows and the logits (f32).
        let _scratch = self.reserve((tokens.batch() * (c.hidden_size + c.vocab_size) * 4) as u64)?;
        let last = last_rows(&b.hidden, tokens.batch(), b.new_len, c.hidden_size);
        let logits = self.model.logits(&last, tokens.batch());
        crate::finite::check_logits(&logits, c.vocab_size)?;
        Ok(match sampler {
            Some(s) => logits.chunks(c.vocab_size).map(|row| s.sample(row)).collect(),
            None => logits.chunks(c.vocab_size).map(runtime::sampling::argmax).collect(),
        })
    }

    fn cache_bytes(&self, b: &CpuBatch) -> u64 {
        b.cache.bytes()
    }

    fn activation_bytes(&self, batches: &[&CpuBatch]) -> u64 {
        batches.iter().map(|b| (b.hidden.len() * std::mem::size_of::<f32>()) as u64).sum()
    }
}

/// Checks prompts against the vocabulary and the positions of a model of
/// configuration `c` (both engines use it; see
/// [`runtime::schedule::validate_prompts`]). `first_index` numbers the
/// prompts in messages.
pub fn validate_prompts(c: &OptConfig, prompts: &[Vec<u32>], max_new_tokens: usize, first_index: usize) -> Result<()> {
    Ok(runtime::schedule::validate_prompts(c.vocab_size, c.max_sequence_len(), prompts, max_new_tokens, first_index)?)
}

/// Generates for a block of batches (`batches[k]` holds the prompts of batch
/// `k`, unpadded) on the CPU, in FlexGen's order ([`crate::schedule`]):
/// each step runs every layer over every unfinished batch before the next
/// layer.
pub fn generate(
    model: &OptModel,
    batches: &[Vec<Vec<u32>>],
    opts: &GenerateOptions,
    sampler: &mut Sampler,
    progress: &ProgressBar,
) -> Result<GenerationOutput> {
    runtime::schedule::generate(&mut CpuDevice::new(model), batches, opts, Some(sampler), progress)
}

/// Where the CPU engine keeps what it does not hold in host memory, and
/// where it accounts what it does.
#[derive(Clone, Default)]
pub struct CpuPlacement {
    /// The layers from `disk.first()` on, read back from disk a layer
    /// ahead ([`CpuDevice::with_disk`]).
    pub disk: Option<Arc<DiskLayers>>,
    /// A disk and the share of each batch's sequences kept in memory: the
    /// others' KV cache on disk ([`CpuDevice::with_cache_on_disk`]).
    pub cache_disk: Option<(Arc<tier_disk::DiskDevice>, f64)>,
    /// The account the host memory the device allocates is reserved
    /// against ([`CpuDevice::with_host_account`]).
    pub host: Option<Arc<MemAccount>>,
}

/// [`generate`] with weights and KV cache placed as `placement` says
/// (`Default`: all in memory, unaccounted).
pub fn generate_with(
    model: &OptModel,
    placement: CpuPlacement,
    batches: &[Vec<Vec<u32>>],
    opts: &GenerateOptions,
    sampler: &mut Sampler,
    progress: &ProgressBar,
) -> Result<GenerationOutput> {
    let CpuPlacement { disk, cache_disk, host } = placement;
    let mut device = match disk {
        Some(d) => CpuDevice::with_disk(model, d)?,
        None => CpuDevice::new(model),
    };
    if let Some(h) = host {
        device = device.with_host_account(h);
    }
    if let Some((d, cpu_percent)) = cache_disk {
        device = device.with_cache_on_disk(d, cpu_percent);
    }
    let mut out = runtime::schedule::generate(&mut device, batches, opts, Some(sampler), progress)?;
    out.disk_cache_bytes = device.disk_cache_bytes;
    out.cache_bytes += device.slots.values().map(|(s, _)| s.bytes()).sum::<u64>();
    Ok(out)
}

/// Logits at the last position of each prompt after the prompts (left
/// padded into one batch) go through the model: `[batch, vocab]`.
pub fn prefill_logits(model: &OptModel, prompts: &[Vec<u32>]) -> Result<Vec<f32>> {
    validate_prompts(&model.config, prompts, 0, 0)?;
    let tokens = BatchTokens::new(prompts, crate::tokenizer::PAD_TOKEN_ID);
    let mut device = CpuDevice::new(model);
    let mut b = device.new_batch(&tokens, tokens.new_len())?;
    device.embed(&tokens, &mut b)?;
    for j in 0..model.layers.len() {
        device.layer(j, &tokens, &mut b)?;
    }
    Ok(model.logits(&last_rows(&b.hidden, tokens.batch(), b.new_len, model.config.hidden_size), tokens.batch()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OptConfig;
    use crate::dummy::DummyWeights;
    use crate::sampling::SamplingConfig;
    use crate::weights::WeightSource;
    use half::f16;

    /// Dummy weights, except that every final hidden state is the same
    /// vector `c` (final layer norm weight 0, bias `c`) and the embedding of
    /// `</s>` is `c` too: `</s>` wins every step.
    struct AlwaysEos(DummyWeights);

    fn c(i: usize) -> f32 {
        if i.is_multiple_of(2) {
            1.0
        } else {
            -1.0
        }
    }

    impl WeightSource for AlwaysEos {
        fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f16>> {
            let mut t = self.0.load(name, shape)?;
            match name {
                "decoder.final_layer_norm.weight" => t.fill(f16::ZERO),
                "decoder.final_layer_norm.bias" => t.iter_mut().enumerate().for_each(|(i, v)| *v = f16::from_f32(c(i))),
                "decoder.embed_tokens.weight" => {
                    let e = shape[1];
                    t[2 * e..3 * e].iter_mut().enumerate().for_each(|(i, v)| *v = f16::from_f32(c(i)));
                }
                _ => {}
            }
            Ok(t)
        }
        fn contains(&self, name: &str) -> bool {
            self.0.contains(name)
        }
    }

    fn tiny() -> OptConfig {
        OptConfig::from_json_str(
            r#"{"hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 2, "ffn_dim": 32,
                "vocab_size": 40, "max_position_embeddings": 32}"#,
        )
        .unwrap()
    }

    fn run(src: &dyn WeightSource, opts: &GenerateOptions, batches: &[Vec<Vec<u32>>]) -> GenerationOutput {
        let model = OptModel::load(tiny(), src, &ProgressBar::hidden()).unwrap();
        let mut sampler = Sampler::new(SamplingConfig::default());
        generate(&model, batches, opts, &mut sampler, &ProgressBar::hidden()).unwrap()
    }

    #[test]
    fn stops_on_eos_unless_told_not_to() {
        let src = AlwaysEos(DummyWeights::new(1));
        let prompts = vec![vec![vec![2, 5, 6], vec![2, 7]]];
        let out = run(&src, &crate::generation::options(6), &prompts);
        assert_eq!(out.tokens, vec![vec![2], vec![2]]);
        let no_stop = GenerateOptions { stop_on_eos: false, ..crate::generation::options(6) };
        let out = run(&src, &no_stop, &prompts);
        assert_eq!(out.tokens, vec![vec![2; 6], vec![2; 6]]);
    }

    #[test]
    fn dummy_model_stays_finite() {
        let model = OptModel::load(tiny(), &DummyWeights::new(5), &ProgressBar::hidden()).unwrap();
        let logits = prefill_logits(&model, &[vec![2, 3, 4, 5], vec![2]]).unwrap();
        assert_eq!(logits.len(), 2 * 40);
        assert!(logits.iter().all(|v| v.is_finite()));
    }
}
