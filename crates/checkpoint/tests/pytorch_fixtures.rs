//! The PyTorch fixtures of `fixtures/pytorch/` (made by
//! `scripts/make_pytorch_fixtures.py` from `fixtures/opt/tiny-opt`) hold the
//! same tensors as the safetensors fixture, and the hostile ones are refused
//! with messages that name the file and what was wrong.
//!
//! `TIERLM_PYTORCH_FIXTURES=<dir>` points the two checkpoint tests at
//! checkpoints the script wrote with real torch (`--real-torch`).

use std::path::{Path, PathBuf};

use checkpoint::{Checkpoint, Dtype, Error, Format};

fn repo_root() -> PathBuf {
    match std::env::var_os("TIERLM_REPO_ROOT") {
        Some(root) => PathBuf::from(root),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

fn pytorch_fixture(name: &str) -> PathBuf {
    match std::env::var_os("TIERLM_PYTORCH_FIXTURES") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => repo_root().join("fixtures/pytorch").join(name),
    }
}

fn reference() -> Checkpoint {
    Checkpoint::open(&repo_root().join("fixtures/opt/tiny-opt")).unwrap()
}

#[test]
fn single_file_f16_holds_the_safetensors_values_and_a_tied_head() {
    let st = reference();
    let pt = Checkpoint::open(&pytorch_fixture("tiny-opt-bin")).unwrap();
    assert_eq!(pt.format(), Format::PyTorch);
    assert_eq!(st.format(), Format::Safetensors);
    let mut want: Vec<&str> = st.tensor_names();
    want.push("lm_head.weight");
    want.sort_unstable();
    assert_eq!(pt.tensor_names(), want);
    for name in st.tensor_names() {
        let info = pt.info(name).unwrap();
        assert_eq!(info.dtype, Dtype::F16, "{name}");
        assert!(info.stored_name.starts_with("model."), "{name}");
        assert!(info.file.ends_with("pytorch_model.bin"));
        let shape = st.shape(name).unwrap();
        assert_eq!(info.shape, shape, "{name}");
        // tiny-opt's values are exact in f16, so nothing is lost.
        assert_eq!(pt.to_f32(name, shape).unwrap(), st.to_f32(name, shape).unwrap(), "{name}");
        assert_eq!(pt.to_f16(name, shape).unwrap(), st.to_f16(name, shape).unwrap(), "{name}");
        assert_eq!(pt.to_bf16(name, shape).unwrap(), st.to_bf16(name, shape).unwrap(), "{name}");
    }
    let embed = "decoder.embed_tokens.weight";
    assert_eq!(pt.bytes("lm_head.weight").unwrap(), pt.bytes(embed).unwrap());
    assert_eq!(pt.bytes("lm_head.weight").unwrap().as_ptr(), pt.bytes(embed).unwrap().as_ptr(), "one storage");
}

#[test]
fn sharded_f32_is_byte_identical_with_fused_qkv_views() {
    let st = reference();
    let dir = pytorch_fixture("tiny-opt-bin-sharded");
    let pt = Checkpoint::open(&dir).unwrap();
    assert_eq!(pt.files().len(), 2);
    assert_eq!(pt.tensor_names(), st.tensor_names());
    for name in st.tensor_names() {
        let info = pt.info(name).unwrap();
        assert_eq!(info.dtype, Dtype::F32, "{name}");
        let want_file = if name.contains(".layers.1.") || name.starts_with("decoder.final_layer_norm.") {
            "pytorch_model-00002-of-00002.bin"
        } else {
            "pytorch_model-00001-of-00002.bin"
        };
        assert!(info.file.ends_with(want_file), "{name} in {}", info.file.display());
        assert_eq!(pt.bytes(name).unwrap(), st.bytes(name).unwrap(), "{name}");
    }
    // q, k and v of a layer are consecutive views of one storage.
    let q = pt.bytes("decoder.layers.0.self_attn.q_proj.weight").unwrap();
    let k = pt.bytes("decoder.layers.0.self_attn.k_proj.weight").unwrap();
    assert_eq!(q.as_ptr().wrapping_add(q.len()), k.as_ptr());
}

#[test]
fn errors_name_the_file_and_the_tensor() {
    let pt = Checkpoint::open(&pytorch_fixture("tiny-opt-bin")).unwrap();
    let err = pt.to_f16("decoder.layers.0.fc1.weight", &[1, 2]).unwrap_err().to_string();
    assert!(err.contains("pytorch_model.bin") && err.contains("model.decoder.layers.0.fc1.weight"), "{err}");
    assert!(err.contains("expected [1, 2]"), "{err}");
    let err = pt.to_f16("decoder.nope", &[1]).unwrap_err().to_string();
    assert!(err.contains("tensor decoder.nope is missing") && err.contains("tiny-opt-bin"), "{err}");
}

fn open_as_pytorch_model(file: &str) -> (tempfile::TempDir, Error) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(repo_root().join("fixtures/pytorch/hostile").join(file), tmp.path().join("pytorch_model.bin"))
        .unwrap();
    let err = Checkpoint::open(tmp.path()).unwrap_err();
    (tmp, err)
}

#[test]
fn hostile_files_are_refused() {
    let (_t, err) = open_as_pytorch_model("global-os-system.bin");
    assert!(matches!(&err, Error::ForbiddenGlobal { global, .. } if global == "os.system"), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("pytorch_model.bin") && msg.contains("os.system") && msg.contains("safetensors"), "{msg}");

    let (_t, err) = open_as_pytorch_model("truncated.bin");
    let msg = err.to_string();
    assert!(matches!(err, Error::PyTorch { .. }) && msg.contains("truncated"), "{msg}");

    let (_t, err) = open_as_pytorch_model("short-storage.bin");
    let msg = err.to_string();
    assert!(msg.contains("tensor w") && msg.contains("claims 8 elements of F16") && msg.contains("6 bytes"), "{msg}");

    let (_t, err) = open_as_pytorch_model("legacy.bin");
    let msg = err.to_string();
    assert!(matches!(err, Error::LegacyPyTorch { .. }), "{msg}");
    assert!(msg.contains("pytorch_model.bin") && msg.contains("legacy") && msg.contains("safetensors"), "{msg}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn an_index_must_match_its_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    copy_dir(&repo_root().join("fixtures/pytorch/tiny-opt-bin-sharded"), &dir);
    let index_path = dir.join("pytorch_model.bin.index.json");
    let index = std::fs::read_to_string(&index_path).unwrap();
    // Place a tensor of the first shard in the second.
    let moved = index.replace(
        "\"model.decoder.embed_tokens.weight\": \"pytorch_model-00001-of-00002.bin\"",
        "\"model.decoder.embed_tokens.weight\": \"pytorch_model-00002-of-00002.bin\"",
    );
    assert_ne!(moved, index);
    std::fs::write(&index_path, moved).unwrap();
    let err = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(err.contains("pytorch_model-00002-of-00002.bin") && err.contains("embed_tokens"), "{err}");

    // A shard that is not there.
    std::fs::write(&index_path, index.replace("00002-of-00002", "00003-of-00002")).unwrap();
    let err = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(err.contains("pytorch_model-00003-of-00002.bin"), "{err}");
}

#[test]
fn safetensors_is_preferred_when_both_are_there() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("both");
    copy_dir(&repo_root().join("fixtures/pytorch/tiny-opt-bin"), &dir);
    assert_eq!(Checkpoint::open(&dir).unwrap().format(), Format::PyTorch);
    std::fs::copy(repo_root().join("fixtures/opt/tiny-opt/model.safetensors"), dir.join("model.safetensors")).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.format(), Format::Safetensors);
    assert!(!ck.contains("lm_head.weight"));
}
