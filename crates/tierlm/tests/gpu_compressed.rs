//! The GPU engine with `--compress-weight`: every decoder layer's matrices
//! quantized to 4 bits (groups of 64 along the output dim, asymmetric) and
//! held packed on their tier, dequantized on the GPU just before each layer
//! computes. On the fixtures of `fixtures/opt/`, all on the GPU, streamed
//! from pageable host memory, from disk and split 30/30/40:
//!
//! - first-step logits within 2e-2 of a CPU reference built from the SAME
//!   dequantized weights (each 2-D decoder tensor round-tripped through
//!   `compression::quantize_into` / `dequantize_into`), greedy tokens equal
//!   for at least 16 new tokens (near-tie rule of `common`);
//! - logits within a looser bound of the uncompressed CPU reference (see
//!   [`QUANT_BOUND`]), and not equal to it (the weights really are 4-bit);
//! - the bytes each tier holds for the layers are the packed sizes:
//!   0.5625 bytes per matrix value (plus a 64-byte header per matrix, and
//!   padding where a dim is not a multiple of 64) against 2 for f16.
//!
//! Every test that needs a GPU prints "skipped: no CUDA driver" and passes
//! where there is none.

mod common;
use common::*;

use compression::{dequantize_into, quantize_into};
use engine_opt::checkpoint::Checkpoint;
use engine_opt::generation::prefill_logits as cpu_prefill_logits;
use engine_opt::gpu::generation::prefill_logits;
use engine_opt::gpu::offload::{split_layers, OffloadTiers};
use engine_opt::gpu::packed::matrix_layout;
use engine_opt::gpu::{Gpu, GpuModel, WeightOrigin};
use engine_opt::model::OptModel;
use engine_opt::weights::WeightSource;
use engine_opt::OptConfig;
use half::f16;
use tier_api::{Device as _, HostMemKind};

/// First-step logits against the uncompressed CPU reference, as a fraction
/// of the largest |logit|. 4-bit asymmetric groups of 64 move each weight
/// by up to half a step, `(max - min) / 30` of its group (about 1.7% of the
/// group's largest |w| on average for the fixtures' uniform random
/// weights), in every matrix of every layer; with the fixtures' tiny
/// widths nothing averages out, and their logits are small (max 1.5 to
/// 14). The CPU alone measures 9% to 25% ([`quantized_reference_stays_within_bound`],
/// which checks this same bound everywhere). 40% still catches a wrong
/// dequantization (wrong groups, scales or a stale workspace give errors
/// of the logits' own size); exactness is what the 2e-2 check against the
/// same-weights reference is for.
const QUANT_BOUND: f32 = 0.4;

/// A source whose 2-D decoder-layer tensors come back quantized and
/// dequantized, exactly as the GPU engine holds them.
struct Dequantized<'a>(&'a dyn WeightSource);

impl WeightSource for Dequantized<'_> {
    fn load(&self, name: &str, shape: &[usize]) -> engine_opt::Result<Vec<f16>> {
        let v = self.0.load(name, shape)?;
        if shape.len() != 2 || !name.starts_with("decoder.layers.") {
            return Ok(v);
        }
        let layout = matrix_layout(shape[0], shape[1])?;
        let mut bytes = vec![0u8; layout.total_bytes()];
        quantize_into(&v, &layout, &mut bytes).unwrap();
        let mut out = vec![f16::ZERO; v.len()];
        dequantize_into(&bytes, &layout, &mut out).unwrap();
        Ok(out)
    }

    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// `name` with 4-bit weights, layers split by `percent` (GPU, host; the
/// rest on disk).
fn compressed_model(name: &str, percent: (f64, f64), host: HostMemKind) -> (GpuModel, tempfile::TempDir) {
    let dir = fixture(name);
    let config = OptConfig::from_dir(&dir).unwrap();
    let src = Checkpoint::open(&dir).unwrap();
    let split = split_layers(config.num_hidden_layers, percent.0, percent.1);
    let offload = tempfile::tempdir().unwrap();
    let run_tiers = runtime::Tiers::default();
    let tiers = OffloadTiers {
        host: split.uses_host().then(|| run_tiers.host(host).unwrap()),
        disk: split.uses_disk().then(|| run_tiers.disk(offload.path()).unwrap()),
        matrix: run_tiers.matrix().unwrap(),
    };
    let gpu = Gpu::new(0).unwrap_or_else(|e| panic!("{e}"));
    let pb = indicatif::ProgressBar::hidden();
    let model = GpuModel::tiered_with(gpu, config, split, tiers, WeightOrigin::Checkpoint(&src), &pb, true)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    (model, offload)
}

/// Bytes of one layer as the engine holds it compressed: the vectors in
/// f16 (f32 for the biases of out_proj and fc2), the matrices packed (q, k
/// and v one by one); and the packed matrices' bytes alone, headers
/// excluded, with the f16 bytes of the same matrices.
fn layer_bytes(c: &OptConfig) -> (u64, u64, u64) {
    let (h, f) = (c.hidden_size, c.ffn_dim);
    let shapes = [(h, h), (h, h), (h, h), (h, h), (f, h), (h, f)];
    let packed: u64 = shapes.iter().map(|&(r, k)| matrix_layout(r, k).unwrap().total_bytes() as u64).sum();
    let f16_matrices: u64 = shapes.iter().map(|&(r, k)| (2 * r * k) as u64).sum();
    let norms = if c.layer_norm_elementwise_affine { 2 * 2 * 2 * h } else { 0 } as u64;
    let biases = if c.enable_bias { 2 * (3 * h + f) + 4 * (2 * h) } else { 0 } as u64;
    (packed + norms + biases, packed - 64 * shapes.len() as u64, f16_matrices)
}

/// A tier holds the packed layers: the bytes asked of its account are
/// exactly theirs (what it reserves may round each up to its alignment).
fn check_held(tier: &str, label: &str, stats: tier_api::MemStats, want: u64) {
    eprintln!("{label}: {tier} tier: {} bytes asked, {} held, {want} packed", stats.asked, stats.resident);
    assert_eq!(stats.asked, want, "{label}: {tier} tier bytes");
}

fn check_compressed(model_dir: &str, percent: (f64, f64), host: HostMemKind) {
    let cpu = cpu_model(model_dir);
    let dir = fixture(model_dir);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let pb = indicatif::ProgressBar::hidden();
    let cpu_q = OptModel::load(OptConfig::from_dir(&dir).unwrap(), &Dequantized(&ckpt), &pb).unwrap();
    let (gpu, _offload) = compressed_model(model_dir, percent, host);
    let label = format!("{model_dir} 4-bit, percent {percent:?}");
    assert_plan_matches(&gpu, percent, true);

    // Bytes on each tier: the packed layers.
    let (per_layer, packed_data, f16_data) = layer_bytes(&gpu.config);
    let c = &gpu.config;
    if c.hidden_size % 64 == 0 && c.ffn_dim % 64 == 0 {
        assert_eq!(packed_data as f64 / f16_data as f64, 0.5625 / 2.0, "{label}: packed bytes per f16 byte");
    }
    for (i, l) in gpu.layers.iter().enumerate() {
        assert_eq!(l.bytes(), per_layer, "{label}: GPU layer {i}");
        assert!(l.bytes() < l.f16_bytes() / 2, "{label}: GPU layer {i} not packed");
    }
    if let Some(s) = &gpu.offload {
        let split = s.split();
        assert_eq!(s.slot_bytes(), per_layer, "{label}: slot");
        let (host_bytes, disk_bytes) = s.home_bytes();
        assert_eq!(host_bytes + disk_bytes, per_layer * split.offloaded() as u64, "{label}: streamed layers");
        if let Some(h) = &s.tiers().host {
            check_held("host", &label, h.stats(), host_bytes);
        }
        if let Some(d) = &s.tiers().disk {
            check_held("disk", &label, d.stats(), disk_bytes);
        }
    }

    let vocab = gpu.config.vocab_size;
    for case in &expected(model_dir).cases {
        let what = format!("{label}/{}", case.name);
        let got = prefill_logits(&gpu, &case.input_ids).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got.len(), case.input_ids.len() * vocab);
        let want_q = cpu_prefill_logits(&cpu_q, &case.input_ids).unwrap();
        let want_f = cpu_prefill_logits(&cpu.model, &case.input_ids).unwrap();
        let d_q = max_abs_diff(&got, &want_q);
        let d_f = max_abs_diff(&got, &want_f);
        let scale = max_abs(&want_f);
        eprintln!(
            "{what}: logits differ from the same-weights CPU's by {d_q:.2e}, from the f16 CPU's by {d_f:.2e} \
             (max |logit| {scale:.2})"
        );
        assert!(d_q <= LOGIT_TOLERANCE, "{what}: logits differ from the same-weights CPU's by {d_q}");
        assert!(d_f <= QUANT_BOUND * scale, "{what}: logits differ from the f16 CPU's by {d_f}");
        assert!(max_abs_diff(&want_q, &want_f) > 0.0, "{what}: quantization changed nothing");

        let n = case.max_new_tokens.max(MIN_EQUAL_TOKENS);
        let want = cpu_greedy(&cpu_q, std::slice::from_ref(&case.input_ids), n);
        let got = gpu_greedy(&gpu, std::slice::from_ref(&case.input_ids), n);
        check_tokens(&format!("{what} (one batch)"), &cpu_q, &case.input_ids, &got, &want);
        if case.input_ids.len() > 1 {
            let (a, b) = case.input_ids.split_at(case.input_ids.len() / 2);
            let got = gpu_greedy(&gpu, &[a.to_vec(), b.to_vec()], n);
            check_tokens(&format!("{what} (block of two batches)"), &cpu_q, &case.input_ids, &got, &want);
        }
    }
}

#[test]
fn compressed_all_on_gpu_matches_cpu() {
    if gpu_here("4-bit weights, all on the GPU") {
        for name in ["tiny-opt", "tiny-opt-sharded", "tiny-opt-350m-style"] {
            check_compressed(name, (100.0, 0.0), HostMemKind::Pageable);
        }
    }
}

#[test]
fn compressed_on_host_matches_cpu() {
    if gpu_here("4-bit weights on the host") {
        check_compressed("tiny-opt", (0.0, 100.0), HostMemKind::Pageable);
        check_compressed("tiny-opt-350m-style", (0.0, 100.0), HostMemKind::Pageable);
    }
}

#[test]
fn compressed_on_disk_and_split_match_cpu() {
    if gpu_here("4-bit weights on disk, split 30/30/40") {
        check_compressed("tiny-opt-sharded", (0.0, 0.0), HostMemKind::Pageable);
        check_compressed("tiny-opt-sharded", (30.0, 30.0), HostMemKind::Pageable);
    }
}

#[test]
fn tierlm_bench_compress_weight() {
    if !gpu_here("tierlm bench --compress-weight") {
        return;
    }
    let Some(exe) = tierlm() else {
        println!("skipped: no tierlm executable");
        return;
    };
    let offload = tempfile::tempdir().unwrap();
    let model = fixture("tiny-opt-sharded");
    for percent in [["100", "0"], ["30", "30"]] {
        let out = std::process::Command::new(&exe)
            .args(["bench", "--model", model.to_str().unwrap(), "--percent", percent[0], percent[1]])
            .args(["100", "0", "100", "0", "--compress-weight"])
            .args(["--gpu-batch-size", "2", "--num-gpu-batches", "2", "--prompt-len", "16", "--gen-len", "4"])
            .arg("--offload-dir")
            .arg(offload.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        println!("{stdout}");
        assert!(stdout.contains("4-bit weights"), "{stdout}");
    }
}

/// On the CPU alone (runs everywhere): the quantized weights move the
/// logits, by less than [`QUANT_BOUND`] of their size, on every fixture.
#[test]
fn quantized_reference_stays_within_bound() {
    for name in ["tiny-opt", "tiny-opt-sharded", "tiny-opt-350m-style"] {
        let cpu = cpu_model(name);
        let dir = fixture(name);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let pb = indicatif::ProgressBar::hidden();
        let cpu_q = OptModel::load(OptConfig::from_dir(&dir).unwrap(), &Dequantized(&ckpt), &pb).unwrap();
        for case in &expected(name).cases {
            let q = cpu_prefill_logits(&cpu_q, &case.input_ids).unwrap();
            let f = cpu_prefill_logits(&cpu.model, &case.input_ids).unwrap();
            let (d, scale) = (max_abs_diff(&q, &f), max_abs(&f));
            eprintln!("{name}/{}: 4-bit logits differ by {d:.3e}, max |logit| {scale:.2}", case.name);
            assert!(d > 0.0 && d <= QUANT_BOUND * scale, "{name}/{}: {d} against {scale}", case.name);
        }
    }
}
