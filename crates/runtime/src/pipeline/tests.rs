//! The pipeline on a toy model of the runtime's own (no family): the
//! tokens of every split equal the one-engine schedule's, and a failing
//! stage stops every other one promptly.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ops::cpu::{self as op, KvCache, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tier_api::DType;

use super::*;
use crate::cpu::{DiskLayers, Step};
use crate::sampling::SamplingConfig;
use crate::spec::{Block, KvLayout, ModelSpec, TensorSpec, Widths};

const H: usize = 16;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 4;
const INTER: usize = 32;
const VOCAB: usize = 48;
const POSITIONS: usize = 64;
const LAYERS: usize = 6;

/// A small decoder: learned positions, pre-norm attention over the cache
/// (grouped heads), a ReLU MLP, a final norm and a head.
struct Toy {
    spec: ModelSpec,
    embed: Tensor,
    positions: Tensor,
    norm: Tensor,
    head: Tensor,
    layers: Vec<HostLayer>,
}

fn tensor_spec(name: &str, shape: &[usize]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        shape: shape.to_vec(),
        dtype: DType::F32,
        block: Block::Attention,
        compressible: false,
        packed_as: Vec::new(),
        sources: Vec::new(),
    }
}

impl Toy {
    fn new(seed: u64) -> Toy {
        let kv = KV_HEADS * HEAD_DIM;
        let shapes: [(&str, Vec<usize>); 7] = [
            ("norm", vec![H]),
            ("q", vec![H, H]),
            ("k", vec![kv, H]),
            ("v", vec![kv, H]),
            ("o", vec![H, H]),
            ("up", vec![INTER, H]),
            ("down", vec![H, INTER]),
        ];
        let spec = ModelSpec::new(
            (LAYERS, "layers.{}."),
            shapes.iter().map(|(n, s)| tensor_spec(n, s)).collect(),
            vec![tensor_spec("embed", &[VOCAB, H]), tensor_spec("head", &[VOCAB, H])],
            KvLayout { kv_heads: KV_HEADS, head_dim: HEAD_DIM, dtype: DType::F32 },
            Widths {
                hidden: H,
                heads: HEADS,
                intermediate: INTER,
                dtype: DType::F32,
                scratch_per_row: Widths::plain_scratch(H, H, INTER),
                residual: DType::F32,
                hidden_copy: false,
                scores: crate::spec::Scores::F32_ALL,
            },
        )
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut t = |shape: &[usize], scale: f32, offset: f32| {
            let n = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| offset + scale * (rng.random::<f32>() - 0.5)).collect();
            Tensor::from_f32(op::DType::F32, shape.to_vec(), &v).unwrap()
        };
        let embed = t(&[VOCAB, H], 2.0, 0.0);
        let positions = t(&[POSITIONS, H], 1.0, 0.0);
        let norm = t(&[H], 0.2, 1.0);
        let head = t(&[VOCAB, H], 2.0, 0.0);
        let layers = (0..LAYERS)
            .map(|_| {
                let tensors = shapes
                    .iter()
                    .map(|(n, s)| (n.to_string(), if *n == "norm" { t(s, 0.2, 1.0) } else { t(s, 0.8, 0.0) }))
                    .collect();
                HostLayer::new(&spec, tensors).unwrap()
            })
            .collect();
        Toy { spec, embed, positions, norm, head, layers }
    }
}

impl CpuModel for Toy {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn max_positions(&self) -> usize {
        POSITIONS
    }

    fn embed(&self, tokens: &[u32], positions: &[Option<usize>]) -> Result<Vec<f32>> {
        let mut x = op::embedding(&self.embed, tokens)?;
        for (row, p) in x.chunks_mut(H).zip(positions) {
            if let Some(p) = p {
                let mut pos = vec![0.0; H];
                self.positions.storage().read_f32(p * H, &mut pos);
                row.iter_mut().zip(pos).for_each(|(x, p)| *x += p);
            }
        }
        Ok(x)
    }

    fn layer_forward(&self, layer: &HostLayer, x: &mut [f32], step: &Step<'_>, cache: &mut KvCache) -> Result<()> {
        let n = step.rows();
        let none = op::Activation::None;
        let mut y = x.to_vec();
        op::rms_norm(&mut y, layer.get("norm")?, 1e-5)?;
        let q = op::linear(&y, n, layer.get("q")?, None, none)?;
        let k = op::linear(&y, n, layer.get("k")?, None, none)?;
        let v = op::linear(&y, n, layer.get("v")?, None, none)?;
        cache.append(&k, &v, step.new_len)?;
        let shape = op::AttentionShape { heads: HEADS, kv_heads: KV_HEADS, head_dim: HEAD_DIM };
        let a = op::attention(&q, step.new_len, cache, step.key_mask, shape)?;
        op::add_inplace(x, &op::linear(&a, n, layer.get("o")?, None, none)?)?;
        y.copy_from_slice(x);
        op::rms_norm(&mut y, layer.get("norm")?, 1e-5)?;
        let up = op::linear(&y, n, layer.get("up")?, None, op::Activation::Relu)?;
        op::add_inplace(x, &op::linear(&up, n, layer.get("down")?, None, none)?)?;
        Ok(())
    }

    fn logits(&self, hidden: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut x = hidden.to_vec();
        op::rms_norm(&mut x, &self.norm, 1e-5)?;
        Ok(op::linear(&x, rows, &self.head, None, op::Activation::None)?)
    }
}

/// How [`Faulty`] fails.
#[derive(Clone, Copy)]
enum Fault {
    Error,
    Panic,
}

/// The toy model, failing on the `call`-th computation of layer `layer`
/// (counted over every micro-batch and step), and counting how many layers
/// compute at once.
struct Faulty<'a> {
    inner: &'a Toy,
    fault: Option<(usize, usize, Fault)>,
    calls: AtomicUsize,
    /// Each layer's computation takes this long, so stages overlap.
    delay: Duration,
    running: AtomicUsize,
    most_at_once: AtomicUsize,
}

impl<'a> Faulty<'a> {
    fn new(inner: &'a Toy, fault: Option<(usize, usize, Fault)>) -> Self {
        Faulty {
            inner,
            fault,
            calls: AtomicUsize::new(0),
            delay: Duration::ZERO,
            running: AtomicUsize::new(0),
            most_at_once: AtomicUsize::new(0),
        }
    }
}

impl CpuModel for Faulty<'_> {
    fn spec(&self) -> &ModelSpec {
        self.inner.spec()
    }

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn max_positions(&self) -> usize {
        POSITIONS
    }

    fn embed(&self, tokens: &[u32], positions: &[Option<usize>]) -> Result<Vec<f32>> {
        self.inner.embed(tokens, positions)
    }

    fn layer_forward(&self, layer: &HostLayer, x: &mut [f32], step: &Step<'_>, cache: &mut KvCache) -> Result<()> {
        if let Some((j, call, fault)) = self.fault {
            if std::ptr::eq(layer, &self.inner.layers[j]) && self.calls.fetch_add(1, Ordering::SeqCst) + 1 == call {
                match fault {
                    Fault::Error => return Err(Error::InvalidArgument(format!("injected failure at layer {j}"))),
                    Fault::Panic => panic!("injected panic at layer {j}"),
                }
            }
        }
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        let out = self.inner.layer_forward(layer, x, step, cache);
        self.running.fetch_sub(1, Ordering::SeqCst);
        out
    }

    fn logits(&self, hidden: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.inner.logits(hidden, rows)
    }
}

/// A block of four micro-batches of left-padded prompts.
fn block() -> Vec<Vec<Vec<u32>>> {
    let id = |i: u32| (i * 29 + 5) % VOCAB as u32;
    vec![
        vec![(0..7).map(id).collect(), (3..5).map(id).collect(), (9..14).map(id).collect()],
        vec![(20..23).map(id).collect(), (30..36).map(id).collect()],
        vec![(40..41).map(id).collect()],
        vec![(50..58).map(id).collect(), (60..62).map(id).collect()],
    ]
}

fn options(eos: Vec<u32>) -> GenerateOptions {
    GenerateOptions { max_new_tokens: 6, stop_on_eos: !eos.is_empty(), eos_token_ids: eos, pad_token_id: 0 }
}

fn one_engine<M: CpuModel>(
    model: &M,
    layers: &[HostLayer],
    opts: &GenerateOptions,
    seed: Option<u64>,
) -> Vec<Vec<u32>> {
    let mut engine = CpuEngine::new(model, layers, CpuPlacement::default()).unwrap();
    let mut sampler = seed.map(|seed| Sampler::new(SamplingConfig { temperature: 0.8, seed, ..Default::default() }));
    crate::schedule::generate(&mut engine, &block(), opts, sampler.as_mut(), &ProgressBar::hidden()).unwrap().tokens
}

fn pipelined<M: CpuModel>(
    model: &M,
    layers: &[HostLayer],
    stages: usize,
    opts: &GenerateOptions,
    seed: Option<u64>,
) -> Result<Vec<Vec<u32>>> {
    let mut sampler = seed.map(|seed| Sampler::new(SamplingConfig { temperature: 0.8, seed, ..Default::default() }));
    Ok(generate_pipelined(model, layers, stages, &block(), opts, sampler.as_mut(), &ProgressBar::hidden())?.tokens)
}

#[test]
fn layers_split_evenly_into_stages() {
    assert_eq!(stage_ranges(6, 4).unwrap(), vec![0..2, 2..4, 4..5, 5..6]);
    assert_eq!(stage_ranges(6, 1).unwrap(), vec![0..6]);
    assert_eq!(stage_ranges(6, 6).unwrap(), (0..6).map(|j| j..j + 1).collect::<Vec<_>>());
    assert_eq!(stage_ranges(7, 3).unwrap(), vec![0..3, 3..5, 5..7]);
    let none = stage_ranges(6, 0).unwrap_err().to_string();
    assert!(none.contains("at least one stage"), "{none}");
    let many = stage_ranges(2, 3).unwrap_err().to_string();
    assert!(many.contains("3 pipeline stages for a model of 2 layers"), "{many}");
}

#[test]
fn every_split_gives_the_one_engine_tokens() {
    let toy = Toy::new(7);
    let greedy = options(Vec::new());
    let want = one_engine(&toy, &toy.layers, &greedy, None);
    // Some sequence's third token as end of sequence: sequences and whole
    // micro-batches finish early, and the stages must agree on which.
    let eos = options(vec![want[3][2]]);
    let want_eos = one_engine(&toy, &toy.layers, &eos, None);
    assert!(want_eos.iter().any(|t| t.len() < 6) && want_eos != want, "{want_eos:?}");
    let want_sampled = one_engine(&toy, &toy.layers, &greedy, Some(3));
    for stages in [1, 2, 3, 4, 6] {
        assert_eq!(pipelined(&toy, &toy.layers, stages, &greedy, None).unwrap(), want, "{stages} stages");
        assert_eq!(pipelined(&toy, &toy.layers, stages, &eos, None).unwrap(), want_eos, "{stages} stages, eos");
        assert_eq!(pipelined(&toy, &toy.layers, stages, &greedy, Some(3)).unwrap(), want_sampled, "{stages}, sampled");
    }
    let none = options(Vec::new());
    let zero = GenerateOptions { max_new_tokens: 0, ..none };
    assert_eq!(pipelined(&toy, &toy.layers, 3, &zero, None).unwrap(), vec![Vec::<u32>::new(); 8]);
}

#[test]
fn stages_with_layers_and_cache_on_disk_give_the_same_tokens() {
    let toy = Toy::new(11);
    let opts = options(Vec::new());
    let want = one_engine(&toy, &toy.layers, &opts, None);
    let dir = tempfile::tempdir().unwrap();
    let disk = tier_disk::DiskDevice::new(tier_disk::DiskConfig::new(dir.path())).unwrap();
    // Stage 0: layers 0..3, layer 0 resident; stage 1: layers 3..6, layer 3
    // resident, half of each micro-batch's cache on disk.
    let mut stages = Vec::new();
    for (range, cache) in [(0..3, None), (3..6, Some(50.0))] {
        let mut on_disk = DiskLayers::new(Arc::clone(&disk), toy.spec.clone(), range.start + 1);
        for j in range.start + 1..range.end {
            on_disk.put(j, &toy.layers[j]).unwrap();
        }
        let placement = CpuPlacement {
            disk: Some(Arc::new(on_disk)),
            cache_disk: cache.map(|pct| (Arc::clone(&disk), pct)),
            host: None,
        };
        stages.push(CpuStage { resident: &toy.layers[range.start..range.start + 1], layers: range, placement });
    }
    let out = generate_staged(&toy, &stages, &block(), &opts, None, &ProgressBar::hidden()).unwrap();
    assert_eq!(out.tokens, want);
    assert!(out.disk_cache_bytes > 0);
}

#[test]
fn every_stage_works_at_once() {
    let toy = Toy::new(5);
    let mut slow = Faulty::new(&toy, None);
    slow.delay = Duration::from_millis(4);
    let opts = GenerateOptions { max_new_tokens: 2, ..options(Vec::new()) };
    pipelined(&slow, &toy.layers, 3, &opts, None).unwrap();
    let most = slow.most_at_once.load(Ordering::SeqCst);
    assert!(most >= 2, "at most {most} layer(s) computed at once over 3 stages");
}

#[test]
fn bad_stage_counts_are_refused() {
    let toy = Toy::new(1);
    let opts = options(Vec::new());
    let zero = pipelined(&toy, &toy.layers, 0, &opts, None).unwrap_err().to_string();
    assert!(zero.contains("at least one stage"), "{zero}");
    let many = pipelined(&toy, &toy.layers, 7, &opts, None).unwrap_err().to_string();
    assert!(many.contains("7 pipeline stages for a model of 6 layers"), "{many}");
    let gap = [
        CpuStage { layers: 0..2, resident: &toy.layers[0..2], placement: CpuPlacement::default() },
        CpuStage { layers: 3..6, resident: &toy.layers[3..6], placement: CpuPlacement::default() },
    ];
    let gap = generate_staged(&toy, &gap, &block(), &opts, None, &ProgressBar::hidden()).unwrap_err().to_string();
    assert!(gap.contains("should start at layer 2"), "{gap}");
    let bad_prompt = vec![vec![vec![VOCAB as u32]]];
    let e = generate_pipelined(&toy, &toy.layers, 2, &bad_prompt, &opts, None, &ProgressBar::hidden());
    assert!(e.unwrap_err().to_string().contains("outside the vocabulary"));
}

/// Runs `f`, which must fail within a few seconds (every stage joined).
fn fails_promptly(f: impl FnOnce() -> Result<Vec<Vec<u32>>>) -> String {
    let start = Instant::now();
    let err = f().unwrap_err().to_string();
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}: {err}", start.elapsed());
    err
}

#[test]
fn a_stage_that_fails_stops_the_others() {
    let toy = Toy::new(2);
    let opts = options(Vec::new());
    // Layer 4 is stage 2's (0..2, 2..4, 4..6); its 6th computation is in the
    // second step, with micro-batches in flight on every stage.
    let failing = Faulty::new(&toy, Some((4, 6, Fault::Error)));
    let err = fails_promptly(|| pipelined(&failing, &toy.layers, 3, &opts, None));
    assert!(err.contains("stage 2 of 3 (layers 4..6)") && err.contains("injected failure at layer 4"), "{err}");
    // In the prefill, in the first stage.
    let failing = Faulty::new(&toy, Some((0, 1, Fault::Error)));
    let err = fails_promptly(|| pipelined(&failing, &toy.layers, 4, &opts, None));
    assert!(err.contains("stage 0 of 4 (layers 0..2)") && err.contains("injected failure at layer 0"), "{err}");
}

#[test]
fn a_stage_that_panics_stops_the_others() {
    let toy = Toy::new(2);
    let opts = options(Vec::new());
    let failing = Faulty::new(&toy, Some((3, 9, Fault::Panic)));
    let err = fails_promptly(|| pipelined(&failing, &toy.layers, 2, &opts, None));
    assert!(err.contains("stage 1 of 2 (layers 3..6)") && err.contains("panicked: injected panic at layer 3"), "{err}");
}

/// An in-process endpoint whose `n`-th send fails, as a broken link would.
struct BrokenLink {
    inner: InProcess,
    sends_left: Option<usize>,
}

impl Transport for BrokenLink {
    fn stage(&self) -> usize {
        self.inner.stage()
    }
    fn stages(&self) -> usize {
        self.inner.stages()
    }
    fn send(&mut self, to: usize, message: Message) -> Result<()> {
        if let Some(n) = self.sends_left.as_mut() {
            if *n == 0 {
                return Err(Error::Pipeline(format!("link to stage {to} broke")));
            }
            *n -= 1;
        }
        self.inner.send(to, message)
    }
    fn recv(&mut self, from: usize) -> Result<Message> {
        self.inner.recv(from)
    }
    fn poll(&mut self) -> Result<()> {
        self.inner.poll()
    }
    fn abort(&mut self, reason: &str) {
        self.inner.abort(reason)
    }
    fn finish(&mut self) {
        self.inner.finish()
    }
}

#[test]
fn a_broken_link_stops_every_stage() {
    let toy = Toy::new(2);
    let opts = options(Vec::new());
    let ranges = stage_ranges(LAYERS, 3).unwrap();
    let links: Vec<BrokenLink> = InProcess::mesh(3, 5)
        .into_iter()
        .map(|inner| {
            let sends_left = (inner.stage() == 1).then_some(5);
            BrokenLink { inner, sends_left }
        })
        .collect();
    let err = fails_promptly(|| {
        let make = |_, range: Range<usize>| {
            let resident = &toy.layers[range.clone()];
            CpuEngine::for_layers(&toy, range, resident, CpuPlacement::default())
        };
        Ok(generate_stages(&ranges, links, make, &block(), &opts, None, &ProgressBar::hidden())?.tokens)
    });
    assert!(err.contains("stage 1 of 3 (layers 2..4)") && err.contains("link to stage 2 broke"), "{err}");
}

#[test]
fn a_stage_engine_that_cannot_be_made_stops_the_others() {
    let toy = Toy::new(2);
    let opts = options(Vec::new());
    let ranges = stage_ranges(LAYERS, 2).unwrap();
    let err = fails_promptly(|| {
        let make = |s, range: Range<usize>| {
            // Stage 1 is given one layer too few.
            let resident = &toy.layers[range.start..range.end - s];
            CpuEngine::for_layers(&toy, range, resident, CpuPlacement::default())
        };
        Ok(generate_stages(&ranges, InProcess::mesh(2, 5), make, &block(), &opts, None, &ProgressBar::hidden())?.tokens)
    });
    assert!(err.contains("stage 1 of 2 (layers 3..6)") && err.contains("2 resident layers"), "{err}");
}
