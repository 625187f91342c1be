//! The runtime knows no model family: no file of it names a family, a
//! family's configuration type or one of its tensors. A new family is a
//! crate of its own; if this test fails, the name belongs in that crate.

use std::path::Path;

/// Names that belong to a family's room, matched case-insensitively as
/// whole words or path pieces.
const FAMILY_NAMES: &[&str] = &[
    "opt",
    "optconfig",
    "engine-opt",
    "engine_opt",
    "llama",
    "mistral",
    "qwen",
    "qwen2",
    "qwen3",
    "gpt",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "out_proj",
    "qkv_proj",
    "fc1",
    "fc2",
    "gate_proj",
    "up_proj",
    "down_proj",
    "self_attn",
    "embed_tokens",
    "embed_positions",
    "lm_head",
    "project_in",
    "project_out",
    "final_layer_norm",
    "self_attn_layer_norm",
    "input_layernorm",
    "post_attention_layernorm",
];

fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')).map(str::to_ascii_lowercase)
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_file_of_the_runtime_names_a_model_family() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.push(root.join("Cargo.toml"));
    assert!(files.len() > 5, "the runtime's sources were not found");
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            for w in words(line) {
                if FAMILY_NAMES.contains(&w.as_str()) {
                    found.push(format!("{}:{}: {w}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(found.is_empty(), "family names in the runtime:\n{}", found.join("\n"));
}

#[test]
fn the_check_sees_a_family_name() {
    let names: Vec<String> = words("let c: OptConfig = x.fc1; // Llama's q_proj").collect();
    for want in ["optconfig", "fc1", "llama", "q_proj"] {
        assert!(names.iter().any(|w| w == want), "{want} in {names:?}");
    }
}
