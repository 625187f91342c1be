//! Pipeline parallelism: the model's layers split into contiguous stages,
//! each a compute device of its own, the block's micro-batches flowing
//! through them so that every stage works at once.
//!
//! A stage computes layers `first..last` ([`stage_ranges`] splits them
//! evenly) on a [`StageDevice`], which holds the weights, the KV cache and
//! the hidden states of those layers only, on its own tiers. The first
//! stage embeds, the last picks the tokens. Between stages a
//! [`Transport`] carries each micro-batch's hidden states forward and the
//! picked tokens back ([`Message`]: the micro-batch and step it belongs to,
//! checked by the receiver).
//!
//! The schedule ([`generate_stages`]) is FlexGen's across stages: a
//! micro-batch is one GPU batch of the block; each stage runs, step by step
//! and micro-batch by micro-batch, its layers over the micro-batch and
//! hands it on. Stage `s` computes micro-batch `b` while stage `s + 1`
//! computes `b − 1`; once the last stage picked micro-batch `b`'s tokens
//! they go back to the first stage, which starts `b`'s next step. With at
//! least as many micro-batches as stages every stage is busy in the steady
//! state (the pipeline's bubble is the first and last `stages − 1`
//! micro-batches of the run). Every stage keeps each micro-batch's
//! [`BatchTokens`] (masks, positions, which sequences are done), updated
//! from the picked tokens the last stage sends to every stage, so a stage
//! knows which micro-batches run each step without being told; the first
//! stage's copy is the output (gathered on rank 0). The last step's tokens
//! go to the first stage only.
//!
//! Within a stage the order is micro-batch-major (each micro-batch through
//! all of the stage's layers), where the one-device schedule is
//! layer-major; a stage whose layers stream from disk reads them once per
//! micro-batch. Results are the same: each micro-batch's computation does
//! not depend on the order.
//!
//! Failure: a stage whose device fails (out of memory, a disk error), that
//! panics, or whose thread ends early aborts the transport, every other
//! stage's pending send or receive (and its check between layers) fails at
//! once, every stage's thread is joined, and [`generate_stages`] returns
//! [`Error::Stage`] naming the stage that failed first and its layers.
//!
//! Today the stages run as threads of one process over [`InProcess`] with
//! the CPU engine ([`generate_pipelined`], [`generate_staged`]); the GPU
//! transport (NCCL between ranks) implements the same [`Transport`].

mod transport;

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use parking_lot::Mutex;

pub use transport::{InProcess, Message, Payload, Transport};

use crate::cpu::{CpuEngine, CpuModel, CpuPlacement, HostLayer};
use crate::error::{Error, Result};
use crate::sampling::Sampler;
use crate::schedule::{block_tokens, validate_prompts, BatchTokens, ComputeDevice, GenerateOptions, GenerationOutput};

/// `layers` split into `stages` contiguous ranges, as even as can be (the
/// first `layers % stages` one layer longer). Refuses no stage, and more
/// stages than layers.
pub fn stage_ranges(layers: usize, stages: usize) -> Result<Vec<Range<usize>>> {
    if stages == 0 {
        return Err(Error::InvalidArgument("a pipeline needs at least one stage".into()));
    }
    if stages > layers {
        return Err(Error::InvalidArgument(format!(
            "{stages} pipeline stages for a model of {layers} layers: each stage needs at least one layer"
        )));
    }
    let (base, extra) = (layers / stages, layers % stages);
    let mut first = 0;
    Ok((0..stages)
        .map(|s| {
            let last = first + base + usize::from(s < extra);
            let range = first..last;
            first = last;
            range
        })
        .collect())
}

/// A compute device that runs one stage of a pipeline: a
/// [`ComputeDevice`] over a range of the model's layers, whose hidden
/// states can leave for the next stage and arrive from the one before.
pub trait StageDevice: ComputeDevice {
    /// The model's layers this device computes.
    fn layers(&self) -> Range<usize>;

    /// The step's hidden states of a batch from the stage before, in place
    /// of [`ComputeDevice::embed`]: `tokens.rows() × hidden` f32.
    fn receive_hidden(
        &mut self,
        tokens: &BatchTokens,
        batch: &mut Self::Batch,
        hidden: Vec<f32>,
    ) -> Result<(), Self::Error>;

    /// The batch's hidden states after this device's last layer, for the
    /// next stage.
    fn send_hidden(&mut self, batch: &mut Self::Batch) -> Result<Vec<f32>, Self::Error>;

    /// Bytes of KV cache held besides the batches' own (gather slots).
    fn extra_cache_bytes(&self) -> u64 {
        0
    }

    /// Bytes of KV cache on disk.
    fn disk_cache_bytes(&self) -> u64 {
        0
    }
}

impl<M: CpuModel> StageDevice for CpuEngine<'_, M> {
    fn layers(&self) -> Range<usize> {
        self.layer_range()
    }

    fn receive_hidden(&mut self, tokens: &BatchTokens, batch: &mut Self::Batch, hidden: Vec<f32>) -> Result<()> {
        CpuEngine::receive_hidden(self, tokens, batch, hidden)
    }

    fn send_hidden(&mut self, batch: &mut Self::Batch) -> Result<Vec<f32>> {
        Ok(self.take_hidden(batch))
    }

    fn extra_cache_bytes(&self) -> u64 {
        self.slot_bytes()
    }

    fn disk_cache_bytes(&self) -> u64 {
        CpuEngine::disk_cache_bytes(self)
    }
}

/// Why a stage stopped.
enum Failure {
    /// Its own device, transport or schedule failed.
    Own(Box<dyn std::error::Error + Send + Sync>),
    /// Ctrl-C.
    Interrupted,
    /// A peer stopped (the transport said so).
    Peer(Error),
}

impl Failure {
    fn own(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Failure {
        Failure::Own(e.into())
    }

    /// A transport's error: a peer's failure, or its own.
    fn link(e: Error) -> Failure {
        match e {
            Error::StageStopped { .. } => Failure::Peer(e),
            Error::Interrupted => Failure::Interrupted,
            other => Failure::own(other),
        }
    }
}

/// What a stage reports when it is done.
#[derive(Default)]
struct StageOut {
    /// The first stage's: every prompt's new tokens.
    tokens: Vec<Vec<u32>>,
    /// The last stage's: when the first step ended, from the run's start.
    prefill: Option<Duration>,
    cache_bytes: u64,
    disk_cache_bytes: u64,
    activation_bytes: u64,
}

/// What every stage is given.
struct Work<'a> {
    batches: &'a [Vec<Vec<u32>>],
    opts: &'a GenerateOptions,
    progress: &'a ProgressBar,
    start: Instant,
}

/// Generates for a block of batches (`batches[k]` holds the prompts of
/// micro-batch `k`, unpadded) over a pipeline of `ranges.len()` stages:
/// stage `s` computes layers `ranges[s]` on the device `make(s, range)`
/// makes (on the stage's own thread), talking to the others through
/// `transports[s]`. Greedy without a sampler (the last stage samples).
/// The tokens are those of [`crate::schedule::generate`] on one device.
///
/// Every stage's thread is joined before it returns; a failure is
/// [`Error::Stage`], naming the stage that failed first.
pub fn generate_stages<D, T, F>(
    ranges: &[Range<usize>],
    transports: Vec<T>,
    make: F,
    batches: &[Vec<Vec<u32>>],
    opts: &GenerateOptions,
    sampler: Option<&mut Sampler>,
    progress: &ProgressBar,
) -> Result<GenerationOutput>
where
    D: StageDevice,
    D::Error: std::error::Error + Send + Sync + 'static,
    T: Transport,
    F: Fn(usize, Range<usize>) -> Result<D, D::Error> + Sync,
{
    let stages = ranges.len();
    if stages == 0 || transports.len() != stages {
        return Err(Error::InvalidArgument(format!(
            "{stages} pipeline stages with {} transport endpoints",
            transports.len()
        )));
    }
    if let Some((s, t)) = transports.iter().enumerate().find(|(s, t)| t.stage() != *s || t.stages() != stages) {
        return Err(Error::InvalidArgument(format!(
            "transport endpoint {s} is stage {} of {}, not {s} of {stages}",
            t.stage(),
            t.stages()
        )));
    }
    let work = Work { batches, opts, progress, start: Instant::now() };
    let first_failure: Mutex<Option<usize>> = Mutex::new(None);
    let mut sampler = sampler;
    let results: Vec<std::result::Result<StageOut, Failure>> = std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(stages);
        for (s, mut transport) in transports.into_iter().enumerate() {
            let range = ranges[s].clone();
            let sampler = if s + 1 == stages { sampler.take() } else { None };
            let (work, make, first_failure) = (&work, &make, &first_failure);
            let body = move || {
                let run = catch_unwind(AssertUnwindSafe(|| {
                    let device = make(s, range).map_err(Failure::own)?;
                    run_stage(device, &mut transport, work, sampler)
                }));
                let result = run.unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|m| m.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    Err(Failure::own(format!("panicked: {what}")))
                });
                match &result {
                    Ok(_) => transport.finish(),
                    Err(Failure::Own(e)) => {
                        first_failure.lock().get_or_insert(s);
                        transport.abort(&e.to_string());
                    }
                    Err(Failure::Interrupted) => {
                        first_failure.lock().get_or_insert(s);
                        transport.abort("interrupted");
                    }
                    // The peers know already; the endpoint's drop says this
                    // one stopped too.
                    Err(Failure::Peer(_)) => {}
                }
                result
            };
            // A stage that cannot start drops its endpoint unfinished: the
            // others stop.
            let spawned = std::thread::Builder::new().name(format!("stage-{s}")).spawn_scoped(scope, body);
            handles.push(spawned.map_err(|e| Failure::own(format!("its thread could not start: {e}"))));
        }
        handles
            .into_iter()
            .enumerate()
            .map(|(s, h)| match h {
                Ok(h) => h.join().unwrap_or_else(|_| Err(Failure::own("its thread panicked"))),
                Err(e) => {
                    first_failure.lock().get_or_insert(s);
                    Err(e)
                }
            })
            .collect()
    });
    let total = work.start.elapsed();

    let root = *first_failure.lock();
    if results.iter().any(std::result::Result::is_err) {
        let mut results: Vec<Option<Failure>> = results.into_iter().map(std::result::Result::err).collect();
        let failed = root.and_then(|s| results.get_mut(s).and_then(Option::take).map(|f| (s, f)));
        let failed = failed.or_else(|| results.iter_mut().enumerate().find_map(|(s, f)| f.take().map(|f| (s, f))));
        return Err(match failed {
            Some((_, Failure::Interrupted)) => Error::Interrupted,
            Some((_, Failure::Peer(e))) => e,
            Some((s, Failure::Own(source))) => {
                Error::Stage { stage: s, stages, first: ranges[s].start, last: ranges[s].end, source }
            }
            None => Error::Pipeline("a stage failed without a reason".into()),
        });
    }
    let outs: Vec<StageOut> = results.into_iter().filter_map(std::result::Result::ok).collect();
    let prefill_time = outs.last().and_then(|o| o.prefill).unwrap_or_default();
    Ok(GenerationOutput {
        prefill_time,
        decode_time: total.saturating_sub(prefill_time),
        cache_bytes: outs.iter().map(|o| o.cache_bytes).sum(),
        disk_cache_bytes: outs.iter().map(|o| o.disk_cache_bytes).sum(),
        activation_bytes: outs.iter().map(|o| o.activation_bytes).sum(),
        tokens: outs.into_iter().next().map(|o| o.tokens).unwrap_or_default(),
    })
}

/// The message `m` is for micro-batch `batch` at `step`.
fn expect(m: &Message, from: usize, batch: usize, step: usize) -> std::result::Result<(), Failure> {
    if (m.batch, m.step) == (batch, step) {
        Ok(())
    } else {
        Err(Failure::own(Error::Pipeline(format!(
            "stage {from} sent micro-batch {} of step {} where micro-batch {batch} of step {step} was due",
            m.batch, m.step
        ))))
    }
}

/// The tokens stage `from` sent for micro-batch `k` at `step`.
fn recv_tokens<T: Transport>(
    transport: &mut T,
    from: usize,
    k: usize,
    step: usize,
) -> std::result::Result<Vec<u32>, Failure> {
    let m = transport.recv(from).map_err(Failure::link)?;
    expect(&m, from, k, step)?;
    match m.payload {
        Payload::Tokens(t) => Ok(t),
        Payload::Hidden(_) => {
            Err(Failure::own(Error::Pipeline(format!("stage {from} sent hidden states where tokens were due"))))
        }
    }
}

/// One stage of [`generate_stages`]: the block's micro-batches through its
/// layers, step by step.
fn run_stage<D, T>(
    mut device: D,
    transport: &mut T,
    work: &Work<'_>,
    mut sampler: Option<&mut Sampler>,
) -> std::result::Result<StageOut, Failure>
where
    D: StageDevice,
    D::Error: std::error::Error + Send + Sync + 'static,
    T: Transport,
{
    let (s, last) = (transport.stage(), transport.stages() - 1);
    let opts = work.opts;
    let mut first = 0;
    for prompts in work.batches {
        validate_prompts(device.vocab_size(), device.max_positions(), prompts, opts.max_new_tokens, first)
            .map_err(Failure::own)?;
        first += prompts.len();
    }
    let own = Failure::own;
    let layers = device.layers();
    let all = block_tokens(work.batches, opts);
    device.begin_block(&all).map_err(own)?;
    let mut states = Vec::with_capacity(all.len());
    for tokens in all {
        // validate_prompts bounded prompt plus new tokens by the positions.
        let state = device.new_batch(&tokens, tokens.new_len().saturating_add(opts.max_new_tokens)).map_err(own)?;
        states.push((tokens, state));
    }
    device.prepare(&states).map_err(own)?;
    let mut out = StageOut {
        cache_bytes: states.iter().map(|(_, b)| device.cache_bytes(b)).sum(),
        activation_bytes: device.activation_bytes(&states.iter().map(|(_, b)| b).collect::<Vec<_>>()),
        ..Default::default()
    };

    // Per micro-batch: its last step's tokens are due from the last stage.
    let mut pending = vec![false; states.len()];
    for step in 0..opts.max_new_tokens {
        device.begin_step(step == 0).map_err(own)?;
        let mut any = false;
        for (k, (tokens, batch)) in states.iter_mut().enumerate() {
            if pending[k] {
                let picked = recv_tokens(transport, last, k, step - 1)?;
                tokens.advance(&picked, opts);
                pending[k] = false;
            }
            if tokens.all_finished() {
                continue;
            }
            any = true;
            if s == 0 {
                device.embed(tokens, batch).map_err(own)?;
            } else {
                let m = transport.recv(s - 1).map_err(Failure::link)?;
                expect(&m, s - 1, k, step)?;
                let Payload::Hidden(hidden) = m.payload else {
                    return Err(Failure::own(Error::Pipeline(format!(
                        "stage {} sent tokens where hidden states were due",
                        s - 1
                    ))));
                };
                device.receive_hidden(tokens, batch, hidden).map_err(own)?;
            }
            for j in layers.clone() {
                crate::interrupt::check().map_err(|_| Failure::Interrupted)?;
                transport.poll().map_err(Failure::link)?;
                device.begin_layer(j).map_err(own)?;
                device.layer(j, tokens, batch).map_err(own)?;
                device.end_layer(j).map_err(own)?;
            }
            if s < last {
                let hidden = device.send_hidden(batch).map_err(own)?;
                transport
                    .send(s + 1, Message { batch: k, step, payload: Payload::Hidden(hidden) })
                    .map_err(Failure::link)?;
                pending[k] = true;
            } else {
                let picked = device.pick(tokens, batch, sampler.as_deref_mut()).map_err(own)?;
                tokens.advance(&picked, opts);
                // The last step's tokens only to the first stage (the
                // output); every step's to every stage.
                let to = if step + 1 < opts.max_new_tokens { last } else { last.min(1) };
                for r in 0..to {
                    let m = Message { batch: k, step, payload: Payload::Tokens(picked.clone()) };
                    transport.send(r, m).map_err(Failure::link)?;
                }
            }
        }
        let held = device.activation_bytes(&states.iter().map(|(_, b)| b).collect::<Vec<_>>());
        out.activation_bytes = out.activation_bytes.max(held);
        device.end_step().map_err(own)?;
        if !any {
            break;
        }
        if s == last {
            if step == 0 {
                out.prefill = Some(work.start.elapsed());
            }
            work.progress.inc(1);
        }
    }
    // The first stage gathers the last step's tokens.
    if s == 0 {
        let steps = opts.max_new_tokens;
        for (k, (tokens, _)) in states.iter_mut().enumerate() {
            if pending[k] {
                let picked = recv_tokens(transport, last, k, steps.saturating_sub(1))?;
                tokens.advance(&picked, opts);
            }
        }
    }
    device.finish().map_err(own)?;
    out.disk_cache_bytes = device.disk_cache_bytes();
    out.cache_bytes = out.cache_bytes.saturating_add(device.extra_cache_bytes());
    if s == 0 {
        out.tokens = states.into_iter().flat_map(|(t, _)| t.generated).collect();
    }
    Ok(out)
}

/// One stage of the CPU engine: its layers, those of them resident (the
/// first ones, in order), and where the rest and its KV cache go.
#[derive(Clone)]
pub struct CpuStage<'a> {
    pub layers: Range<usize>,
    /// Layers `layers.start..layers.start + resident.len()`.
    pub resident: &'a [HostLayer],
    pub placement: CpuPlacement,
}

/// The stages of `stages` even ranges of `layers` (every layer of the
/// model, in order), each resident.
pub fn resident_stages(layers: &[HostLayer], stages: usize) -> Result<Vec<CpuStage<'_>>> {
    Ok(stage_ranges(layers.len(), stages)?
        .into_iter()
        .map(|r| CpuStage { resident: &layers[r.clone()], layers: r, placement: CpuPlacement::default() })
        .collect())
}

/// [`crate::schedule::generate`] for `model` (every layer resident in
/// `layers`) split into `stages` even stages on the CPU engine, one thread
/// each, over an in-process transport.
pub fn generate_pipelined<M: CpuModel>(
    model: &M,
    layers: &[HostLayer],
    stages: usize,
    batches: &[Vec<Vec<u32>>],
    opts: &GenerateOptions,
    sampler: Option<&mut Sampler>,
    progress: &ProgressBar,
) -> Result<GenerationOutput> {
    if layers.len() != model.spec().layers {
        return Err(Error::InvalidArgument(format!(
            "{} resident layers do not make the model's {}",
            layers.len(),
            model.spec().layers
        )));
    }
    generate_staged(model, &resident_stages(layers, stages)?, batches, opts, sampler, progress)
}

/// [`generate_pipelined`] over stages placed by the caller: each stage's
/// CPU engine computes its layers with its resident layers and its
/// placement (layers streamed from disk, a KV cache share on disk, a host
/// account). The stages must cover the model's layers in order.
pub fn generate_staged<M: CpuModel>(
    model: &M,
    stages: &[CpuStage<'_>],
    batches: &[Vec<Vec<u32>>],
    opts: &GenerateOptions,
    sampler: Option<&mut Sampler>,
    progress: &ProgressBar,
) -> Result<GenerationOutput> {
    let layers = model.spec().layers;
    let mut next = 0;
    for (s, stage) in stages.iter().enumerate() {
        if stage.layers.start != next || stage.layers.end <= stage.layers.start {
            return Err(Error::InvalidArgument(format!(
                "pipeline stage {s} computes layers {}..{}; it should start at layer {next} and hold at least one",
                stage.layers.start, stage.layers.end
            )));
        }
        next = stage.layers.end;
    }
    if stages.is_empty() || next != layers {
        return Err(Error::InvalidArgument(format!(
            "{} pipeline stages cover layers 0..{next} of the model's {layers}",
            stages.len()
        )));
    }
    // The block's prompts checked once, before any stage starts.
    let mut first = 0;
    for prompts in batches {
        validate_prompts(model.vocab_size(), model.max_positions(), prompts, opts.max_new_tokens, first)?;
        first += prompts.len();
    }
    let ranges: Vec<Range<usize>> = stages.iter().map(|s| s.layers.clone()).collect();
    // Each link holds at most a block's micro-batches at once.
    let mesh = InProcess::mesh(stages.len(), batches.len().saturating_add(1));
    generate_stages(
        &ranges,
        mesh,
        |s, range| {
            let stage = stages.get(s).ok_or_else(|| Error::InvalidArgument(format!("no stage {s}")))?;
            CpuEngine::for_layers(model, range, stage.resident, stage.placement.clone())
        },
        batches,
        opts,
        sampler,
        progress,
    )
}

#[cfg(test)]
mod tests;
