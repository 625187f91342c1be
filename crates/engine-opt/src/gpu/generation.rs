//! The GPU as a compute device of the block schedule ([`crate::schedule`]):
//! each batch's KV cache (on the GPU or over the tiers) and hidden states,
//! and the step's embedding, layers and token picks enqueued on the GPU's
//! stream; layer weights brought into slots before a layer's batches and the
//! tiered cache's slots stored after each step. With the activations off
//! the GPU, each batch's hidden states have a home in host memory or on
//! disk and every use (embedding, layer, logits) runs on one of the
//! block's two GPU buffers through the runtime's
//! [`runtime::gpu::activations::ActivationStreamer`].
//!
//! Greedy picks are made on the GPU (only the token ids come back);
//! sampling copies the logits to the host and uses the CPU sampler.

use indicatif::ProgressBar;

use runtime::gpu::activations::Use;

use super::cache::GpuKvCache;
use super::model::{ActivationHome, ActivationStreamer, BatchCache, GpuHidden, GpuModel, GpuStep, Workspace};
use crate::error::{Error, Result};
use crate::generation::{validate_prompts, GenerateOptions, GenerationOutput};
use crate::sampling::Sampler;
use runtime::schedule::{BatchTokens, ComputeDevice};

/// Where a batch's hidden states live between layers.
#[derive(Debug)]
pub enum BatchHidden {
    /// On the GPU, the batch's own buffers.
    Gpu(GpuHidden),
    /// In host memory or on disk ([`GpuModel::activations`]), loaded into
    /// the block's GPU buffers for each use.
    Home(ActivationHome),
}

impl BatchHidden {
    /// Bytes the batch holds on the GPU.
    pub fn gpu_bytes(&self) -> u64 {
        match self {
            BatchHidden::Gpu(h) => h.bytes(),
            BatchHidden::Home(_) => 0,
        }
    }
}

/// One batch's state on the GPU: its KV cache and hidden states.
#[derive(Debug)]
pub struct GpuBatchState {
    pub cache: BatchCache,
    pub hidden: BatchHidden,
}

impl GpuBatchState {
    /// Room for `tokens`' first step and `capacity` positions, the hidden
    /// states on the GPU.
    pub fn new(model: &GpuModel, tokens: &BatchTokens, capacity: usize) -> Result<Self> {
        Ok(GpuBatchState {
            cache: model.new_cache(tokens.batch(), capacity)?,
            hidden: BatchHidden::Gpu(GpuHidden::new(&model.gpu, &model.config, tokens.rows())?),
        })
    }
}

/// The step's embeddings into `act` (and its mask into the cache's key
/// mask).
fn embed_into(
    model: &GpuModel,
    cache: &mut BatchCache,
    tokens: &BatchTokens,
    ws: &mut Workspace,
    act: &GpuHidden,
) -> Result<()> {
    let past = cache.len();
    if let BatchCache::Tiered(c) = cache {
        c.record_mask(tokens.mask(), tokens.new_len(), past)?;
    }
    let step = GpuStep { batch: tokens.batch(), new_len: tokens.new_len(), past, key_mask: cache.key_mask() };
    model.embed(act, ws, tokens.tokens(), tokens.mask(), &tokens.past_real(), &step)
}

/// Layer `j` of the step, in place on `act` and the cache.
fn layer_on(
    model: &GpuModel,
    cache: &mut BatchCache,
    j: usize,
    tokens: &BatchTokens,
    ws: &mut Workspace,
    act: &GpuHidden,
) -> Result<()> {
    let (batch, new_len) = (tokens.batch(), tokens.new_len());
    match cache {
        BatchCache::Gpu(GpuKvCache { layers, key_mask }) => {
            let cache = layers.get_mut(j).ok_or_else(|| Error::Gpu(format!("no cache for layer {j}")))?;
            let step = GpuStep { batch, new_len, past: cache.len(), key_mask };
            model.layer_forward(j, cache, act, ws, &step)
        }
        BatchCache::Tiered(tc) => {
            let streamer = model
                .cache_streamer
                .as_ref()
                .ok_or_else(|| Error::Gpu("a tiered cache without its streamer".into()))?;
            streamer.layer(model, j, tc, act, ws, new_len)
        }
    }
}

/// `compute` over the batch's hidden states: its own GPU buffers, or the
/// block's, loaded from and stored to its home by `streamer` as `how` says.
fn on_hidden<R>(
    model: &GpuModel,
    streamer: Option<&mut ActivationStreamer>,
    hidden: &BatchHidden,
    rows: usize,
    how: Use,
    compute: impl FnOnce(&GpuHidden) -> Result<R>,
) -> Result<R> {
    match hidden {
        BatchHidden::Gpu(act) => compute(act),
        BatchHidden::Home(home) => {
            let s = streamer.ok_or_else(|| Error::Gpu("hidden states off the GPU without their GPU buffers".into()))?;
            s.run(&model.gpu, home, rows, how, |act| {
                // The host stored and loaded the hidden states: profiled as
                // its own part.
                model.mark("wait for activations")?;
                compute(act)
            })
        }
    }
}

/// A batch with its tokens, stepped by hand (tests, [`prefill_logits`]),
/// its hidden states on the GPU.
#[derive(Debug)]
pub struct GpuBatch {
    pub tokens: BatchTokens,
    pub state: GpuBatchState,
    /// The hidden states (the same buffers as `state`'s).
    act: GpuHidden,
}

impl GpuBatch {
    /// Left-pads `prompts` into one batch with room for `max_new_tokens`
    /// more positions.
    pub fn new(model: &GpuModel, prompts: &[Vec<u32>], max_new_tokens: usize, pad: u32) -> Result<Self> {
        let tokens = BatchTokens::new(prompts, pad);
        let act = GpuHidden::new(&model.gpu, &model.config, tokens.rows())?;
        let cache = model.new_cache(tokens.batch(), tokens.new_len() + max_new_tokens)?;
        let state = GpuBatchState { cache, hidden: BatchHidden::Gpu(act.share()) };
        Ok(GpuBatch { tokens, state, act })
    }

    /// Rows (sequences × new tokens) of the next step.
    pub fn rows(&self) -> usize {
        self.tokens.rows()
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.tokens.batch()
    }

    /// The hidden states.
    pub fn act(&self) -> &GpuHidden {
        &self.act
    }

    /// The step's embeddings.
    pub fn embed(&mut self, model: &GpuModel, ws: &mut Workspace) -> Result<()> {
        embed_into(model, &mut self.state.cache, &self.tokens, ws, &self.act)
    }

    /// Layer `j` of the step (its weights brought in around it).
    pub fn layer(&mut self, model: &GpuModel, j: usize, ws: &mut Workspace) -> Result<()> {
        model.begin_layer(j)?;
        layer_on(model, &mut self.state.cache, j, &self.tokens, ws, &self.act)?;
        model.end_layer(j)
    }

    /// The logits of the step's last positions into `ws.logits`.
    pub fn logits(&self, model: &GpuModel, ws: &mut Workspace) -> Result<()> {
        model.logits(&self.act, ws, self.tokens.batch(), self.tokens.new_len())
    }

    /// The whole step for this batch alone: embeddings, every layer, logits.
    pub fn step(&mut self, model: &GpuModel, ws: &mut Workspace) -> Result<()> {
        self.embed(model, ws)?;
        for j in 0..model.num_layers() {
            self.layer(model, j, ws)?;
        }
        model.end_step()?;
        self.logits(model, ws)
    }

    /// Records the picked tokens and sets up the next one-token step.
    pub fn advance(&mut self, picked: &[u32], opts: &GenerateOptions) {
        self.tokens.advance(picked, opts);
    }
}

/// The GPU as a [`ComputeDevice`]: `model`, and the scratch space shared by
/// the block's batches.
pub struct GpuCompute<'a> {
    model: &'a GpuModel,
    ws: Option<Workspace>,
    /// With the activations in host memory or on disk: the two GPU buffers
    /// the block's batches load their hidden states into, and the loads
    /// and stores around each use.
    activations: Option<ActivationStreamer>,
}

impl<'a> GpuCompute<'a> {
    /// The device computing `model`.
    pub fn new(model: &'a GpuModel) -> Self {
        GpuCompute { model, ws: None, activations: None }
    }

    /// Bytes loaded and stored between the hidden states' homes and the
    /// GPU so far (0 with them on the GPU).
    pub fn activation_bytes_moved(&self) -> u64 {
        self.activations.as_ref().map_or(0, ActivationStreamer::bytes_moved)
    }
}

impl Drop for GpuCompute<'_> {
    fn drop(&mut self) {
        // A run that stopped early (an error, Ctrl-C) may leave work on the
        // stream that reads the workspace: let it finish before the
        // workspace is freed.
        let _ = self.model.gpu.synchronize();
    }
}

impl ComputeDevice for GpuCompute<'_> {
    type Batch = GpuBatchState;

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

    fn begin_block(&mut self, tokens: &[BatchTokens]) -> Result<()> {
        self.activations = None;
        if let Some(tier) = &self.model.activations {
            let (gpu, config) = (&self.model.gpu, &self.model.config);
            let rows = tokens.iter().map(BatchTokens::rows).max().unwrap_or(0).max(1);
            let bufs = [GpuHidden::new(gpu, config, rows)?, GpuHidden::new(gpu, config, rows)?];
            let parts = super::model::activation_parts(config);
            self.activations = Some(ActivationStreamer::new(gpu, tier, &parts, rows, bufs)?);
        }
        Ok(())
    }

    fn new_batch(&mut self, tokens: &BatchTokens, capacity: usize) -> Result<GpuBatchState> {
        match &self.activations {
            Some(s) => Ok(GpuBatchState {
                cache: self.model.new_cache(tokens.batch(), capacity)?,
                hidden: BatchHidden::Home(s.home(tokens.rows())?),
            }),
            None => GpuBatchState::new(self.model, tokens, capacity),
        }
    }

    fn prepare(&mut self, batches: &[(BatchTokens, GpuBatchState)]) -> Result<()> {
        let rows = batches.iter().map(|(t, _)| t.rows()).max().unwrap_or(0);
        let batch = batches.iter().map(|(t, _)| t.batch()).max().unwrap_or(0);
        self.ws = Some(Workspace::new(&self.model.gpu, &self.model.config, rows.max(1), batch.max(1))?);
        Ok(self.model.gpu.synchronize()?)
    }

    fn begin_step(&mut self, prefill: bool) -> Result<()> {
        match &self.model.profiler {
            Some(p) => Ok(p.phase(&self.model.gpu, if prefill { "prefill" } else { "decode" })?),
            None => Ok(()),
        }
    }

    fn embed(&mut self, tokens: &BatchTokens, b: &mut GpuBatchState) -> Result<()> {
        let GpuCompute { model, ws, activations } = self;
        let ws = ws.as_mut().ok_or_else(|| Error::Gpu("the GPU workspace was not prepared".into()))?;
        let GpuBatchState { cache, hidden } = b;
        on_hidden(model, activations.as_mut(), hidden, tokens.rows(), Use::Write, |act| {
            embed_into(model, cache, tokens, ws, act)
        })
    }

    fn begin_layer(&mut self, j: usize) -> Result<()> {
        // Layer j's weights are in a GPU slot before its batches are
        // enqueued; the next streamed layers copy while they compute.
        self.model.begin_layer(j)
    }

    fn layer(&mut self, j: usize, tokens: &BatchTokens, b: &mut GpuBatchState) -> Result<()> {
        let GpuCompute { model, ws, activations } = self;
        let ws = ws.as_mut().ok_or_else(|| Error::Gpu("the GPU workspace was not prepared".into()))?;
        let GpuBatchState { cache, hidden } = b;
        on_hidden(model, activations.as_mut(), hidden, tokens.rows(), Use::Update, |act| {
            layer_on(model, cache, j, tokens, ws, act)
        })
    }

    fn end_layer(&mut self, j: usize) -> Result<()> {
        self.model.end_layer(j)
    }

    fn end_step(&mut self) -> Result<()> {
        // Keys and values left in the tiered cache's GPU slots go home.
        self.model.end_step()
    }

    fn pick(&mut self, tokens: &BatchTokens, b: &mut GpuBatchState, sampler: Option<&mut Sampler>) -> Result<Vec<u32>> {
        let GpuCompute { model, ws, activations } = self;
        let model = *model;
        let ws = ws.as_mut().ok_or_else(|| Error::Gpu("the GPU workspace was not prepared".into()))?;
        on_hidden(model, activations.as_mut(), &b.hidden, tokens.rows(), Use::Read, |act| {
            model.logits(act, ws, tokens.batch(), tokens.new_len())
        })?;
        let vocab = model.config.vocab_size;
        match sampler {
            None => {
                // The first step's logits are looked at once on the host:
                // weights or activations out of f16's range show up there.
                if tokens.generated.iter().all(Vec::is_empty) {
                    crate::finite::check_logits(&model.logits_to_host(ws, tokens.batch())?, vocab)?;
                }
                model.argmax(ws, tokens.batch())
            }
            Some(sampler) => {
                let logits = model.logits_to_host(ws, tokens.batch())?;
                crate::finite::check_logits(&logits, vocab)?;
                Ok(logits.chunks(vocab).map(|row| sampler.sample(row)).collect())
            }
        }
    }

    fn finish(&mut self) -> Result<()> {
        Ok(self.model.gpu.synchronize()?)
    }

    fn cache_bytes(&self, b: &GpuBatchState) -> u64 {
        b.cache.bytes().0
    }

    fn activation_bytes(&self, batches: &[&GpuBatchState]) -> u64 {
        // Off the GPU, the block's two buffers (loaded beside the compute).
        let act = match &self.activations {
            Some(s) => s.gpu_bytes(),
            None => batches.iter().map(|b| b.hidden.gpu_bytes()).sum::<u64>(),
        };
        act + self.ws.as_ref().map_or(0, Workspace::bytes)
    }
}

/// Generates for a block of batches (`batches[k]` holds the prompts of batch
/// `k`, unpadded) on the GPU, in FlexGen's order ([`crate::schedule`]).
/// Without a sampler, picks greedily on the GPU.
pub fn generate(
    model: &GpuModel,
    batches: &[Vec<Vec<u32>>],
    opts: &GenerateOptions,
    sampler: Option<&mut Sampler>,
    progress: &ProgressBar,
) -> Result<GenerationOutput> {
    let mut device = GpuCompute::new(model);
    let mut out = runtime::schedule::generate(&mut device, batches, opts, sampler, progress)?;
    // The cache's GPU slots are the GPU's share of a tiered cache.
    out.cache_bytes += model.cache_streamer.as_ref().map_or(0, |c| c.slot_bytes());
    Ok(out)
}

/// Logits at the last position of each prompt after the prompts (left
/// padded into one batch) go through the model: `[batch, vocab]`.
pub fn prefill_logits(model: &GpuModel, prompts: &[Vec<u32>]) -> Result<Vec<f32>> {
    validate_prompts(&model.config, prompts, 0, 0)?;
    let mut st = GpuBatch::new(model, prompts, 0, crate::tokenizer::PAD_TOKEN_ID)?;
    let mut ws = Workspace::new(&model.gpu, &model.config, st.rows().max(1), st.batch().max(1))?;
    st.step(model, &mut ws)?;
    model.logits_to_host(&ws, st.batch())
}
