//! The Llama family on the runtime's CPU engine: for every fixture under
//! fixtures/llama, the block schedule over `runtime::cpu::CpuEngine` gives
//! the tokens of the family's own greedy loop — with every layer in memory,
//! with the later layers on disk (read back a layer ahead), and with a share
//! of each batch's KV cache on disk — for a block of two left-padded
//! batches. The greedy loop itself is checked against Hugging Face in
//! `hf_reference.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use engine_llama::{generate, GenerateOptions, LlamaModel};
use indicatif::ProgressBar;
use runtime::cpu::{CpuEngine, CpuModel, CpuPlacement, DiskLayers, HostLayer};
use tier_disk::{DiskConfig, DiskDevice};

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llama");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 5, "fixtures missing under {}", root.display());
    dirs
}

const NEW: usize = 8;

fn batches(vocab: u32) -> Vec<Vec<Vec<u32>>> {
    let id = |i: u32| (i * 37 + 11) % vocab;
    vec![
        vec![(0..7).map(id).collect(), (3..5).map(id).collect(), (9..14).map(id).collect()],
        vec![(20..23).map(id).collect(), (30..36).map(id).collect()],
    ]
}

fn run(model: &LlamaModel, resident: &[HostLayer], placement: CpuPlacement, block: &[Vec<Vec<u32>>]) -> Vec<Vec<u32>> {
    let opts = runtime::schedule::GenerateOptions {
        max_new_tokens: NEW,
        stop_on_eos: false,
        eos_token_ids: vec![],
        pad_token_id: 0,
    };
    let mut engine = CpuEngine::new(model, resident, placement).unwrap();
    runtime::schedule::generate(&mut engine, block, &opts, None, &ProgressBar::hidden()).unwrap().tokens
}

#[test]
fn every_placement_gives_the_family_loops_tokens() {
    let scratch = tempfile::tempdir().unwrap();
    let disk = DiskDevice::new(DiskConfig::new(scratch.path())).unwrap();
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let model = LlamaModel::load(&dir).unwrap();
        let block = batches(model.config().vocab_size as u32);
        let mut want = Vec::new();
        for prompts in &block {
            want.extend(generate(&model, prompts, &GenerateOptions::new(NEW)).unwrap());
        }

        let all = run(&model, model.layers(), CpuPlacement::default(), &block);
        assert_eq!(all, want, "{name}: every layer in memory");

        // Layers from 1 on, on disk.
        let mut on_disk = DiskLayers::new(Arc::clone(&disk), model.spec().clone(), 1);
        for (j, layer) in model.layers().iter().enumerate().skip(1) {
            on_disk.put(j, layer).unwrap();
        }
        let placement = CpuPlacement { disk: Some(Arc::new(on_disk)), ..Default::default() };
        assert_eq!(run(&model, &model.layers()[..1], placement, &block), want, "{name}: layers on disk");

        // A third of each batch's sequences' cache in memory, the rest on disk.
        let placement = CpuPlacement { cache_disk: Some((Arc::clone(&disk), 34.0)), ..Default::default() };
        assert_eq!(run(&model, model.layers(), placement, &block), want, "{name}: cache partly on disk");
    }
}

#[test]
fn a_model_loads_with_its_later_layers_streamed_away() {
    let dir = &fixtures()[0];
    let config = engine_llama::LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    let (config, checkpoint) = engine_llama::model::open_checked(dir, config).unwrap();
    let full = LlamaModel::from_checkpoint(config.clone(), &checkpoint).unwrap();
    let mut away = Vec::new();
    let partial = LlamaModel::from_checkpoint_streaming(config, &checkpoint, 1, &mut |j, l| {
        away.push((j, l));
        Ok(())
    })
    .unwrap();
    assert_eq!(partial.layers().len(), 1);
    assert_eq!(away.len(), full.layers().len() - 1);
    for (j, layer) in away {
        assert_eq!(&layer, &full.layers()[j], "layer {j}");
    }
    // An engine missing the streamed layers is refused, not run.
    let err = CpuEngine::new(&partial, partial.layers(), CpuPlacement::default()).err().unwrap().to_string();
    assert!(err.contains("do not make the model's"), "{err}");
}

/// A checkpoint tensor holding NaN (a corrupt file, a diverged run) is
/// refused as it is read, naming the tensor and the file, not turned into
/// garbage tokens.
#[test]
fn a_nan_weight_is_refused_naming_the_tensor() {
    let src = fixtures().into_iter().find(|d| d.ends_with("tiny-qwen2-bias-bf16")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    let file = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    let (start, dtype) = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(name).unwrap();
        let offset = t.data().as_ptr() as usize - bytes.as_ptr() as usize;
        (offset, t.dtype())
    };
    assert_eq!(dtype, safetensors::Dtype::BF16);
    let mut bad = bytes.clone();
    // The third value: a bf16 NaN.
    bad[start + 4..start + 6].copy_from_slice(&0x7fc0u16.to_le_bytes());
    std::fs::write(&file, bad).unwrap();
    let e = LlamaModel::load(tmp.path()).unwrap_err().to_string();
    assert!(e.contains(name) && e.contains("1 value that is NaN or infinite (the first at index 2)"), "{e}");
    assert!(e.contains("model.safetensors"), "{e}");
}
