//! Tokenizers of a Hugging Face checkpoint directory, for any model family.
//!
//! [`Tokenizer::from_dir`] reads `tokenizer.json` (any model the
//! `tokenizers` crate knows: byte-level BPE, SentencePiece-style BPE, ...),
//! or, where there is none, a byte-level BPE from `vocab.json` and
//! `merges.txt` (the older GPT-2 layout), and beside it
//! `tokenizer_config.json` ([`TokenizerConfig`]: whether to add the
//! beginning- and end-of-sequence tokens, the special tokens given as
//! strings or as `AddedToken` objects, and the chat templates, a string or
//! a list of named ones, or a `chat_template.jinja` file).
//!
//! [`Tokenizer::encode`] tokenizes as Hugging Face's `tokenizer(text)` does
//! (`add_special_tokens=True`): `tokenizer.json`'s post-processor adds its
//! special tokens; a `vocab.json` tokenizer adds the beginning- and
//! end-of-sequence tokens as `add_bos_token` / `add_eos_token` say. [`Tokenizer::encode_chat`] renders a
//! prompt as one user message in the checkpoint's chat template (with
//! `minijinja`, set up as transformers sets up Jinja: blocks trimmed,
//! `raise_exception`, `strftime_now`, `tojson`, loop controls, Python's
//! string methods) and tokenizes the text without adding special tokens, as
//! `apply_chat_template` does: the template writes the ones it wants.
//!
//! The `tokenizers` crate panics on some malformed files; every call into
//! it runs under [`crate::guard::contain`], and a panic becomes an
//! [`Error::Tokenizer`] naming the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::error::{Error, Result};

/// The file that holds a tokenizer.
pub const TOKENIZER_JSON: &str = "tokenizer.json";
/// The tokenizer's settings and chat templates.
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
/// A chat template in a file of its own (newer checkpoints).
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{}: {e}", path.display()))
}

/// What `tokenizer_config.json` (and `chat_template.jinja`) say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizerConfig {
    /// Add the beginning-of-sequence token in front (`None`: as the
    /// tokenizer's post-processor does).
    pub add_bos_token: Option<bool>,
    /// Add the end-of-sequence token at the end (`None`: as the
    /// post-processor does).
    pub add_eos_token: Option<bool>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// The chat templates by name; a single template is named `default`.
    pub chat_templates: Vec<(String, String)>,
}

/// A special token's text: a string, or an `AddedToken` object's `content`.
fn special_token(path: &Path, field: &str, v: Option<&Json>) -> Result<Option<String>> {
    match v {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(o)) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(tok_err(path, format!("`{field}` is an object without a string `content`"))),
        },
        Some(other) => Err(tok_err(path, format!("`{field}` is {other}; expected a string or an AddedToken object"))),
    }
}

fn flag(path: &Path, field: &str, v: Option<&Json>) -> Result<Option<bool>> {
    match v {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(tok_err(path, format!("`{field}` is {other}; expected true or false"))),
    }
}

impl TokenizerConfig {
    /// Parses a `tokenizer_config.json` text (`path` names it in errors).
    pub fn from_json(path: &Path, text: &str) -> Result<TokenizerConfig> {
        let v: Json = serde_json::from_str(text).map_err(|e| tok_err(path, format!("invalid JSON: {e}")))?;
        let Json::Object(o) = &v else {
            return Err(tok_err(path, "expected a JSON object"));
        };
        let chat_templates = match o.get("chat_template") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::String(t)) => vec![("default".to_string(), t.clone())],
            Some(Json::Array(items)) => items
                .iter()
                .map(|item| match (item.get("name"), item.get("template")) {
                    (Some(Json::String(n)), Some(Json::String(t))) => Ok((n.clone(), t.clone())),
                    _ => Err(tok_err(path, "`chat_template` lists an entry without a string `name` and `template`")),
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(tok_err(
                    path,
                    format!("`chat_template` is {other}; expected a string or a list of {{name, template}}"),
                ))
            }
        };
        Ok(TokenizerConfig {
            add_bos_token: flag(path, "add_bos_token", o.get("add_bos_token"))?,
            add_eos_token: flag(path, "add_eos_token", o.get("add_eos_token"))?,
            bos_token: special_token(path, "bos_token", o.get("bos_token"))?,
            eos_token: special_token(path, "eos_token", o.get("eos_token"))?,
            pad_token: special_token(path, "pad_token", o.get("pad_token"))?,
            unk_token: special_token(path, "unk_token", o.get("unk_token"))?,
            chat_templates,
        })
    }

    /// `dir`'s `tokenizer_config.json` (default settings without one), with
    /// `chat_template.jinja`, where present, as the default template.
    pub fn from_dir(dir: &Path) -> Result<TokenizerConfig> {
        let path = dir.join(TOKENIZER_CONFIG);
        let mut config = match std::fs::read_to_string(&path) {
            Ok(text) => TokenizerConfig::from_json(&path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => TokenizerConfig::default(),
            Err(e) => return Err(Error::io(path, e)),
        };
        let jinja = dir.join(CHAT_TEMPLATE_FILE);
        match std::fs::read_to_string(&jinja) {
            Ok(text) => {
                config.chat_templates.retain(|(name, _)| name != "default");
                config.chat_templates.insert(0, ("default".to_string(), text));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(jinja, e)),
        }
        Ok(config)
    }

    /// The template `--chat` uses: the one named `default`, or the only
    /// one; `Ok(None)` when there is none.
    pub fn chat_template(&self) -> Result<Option<&str>> {
        if let Some((_, t)) = self.chat_templates.iter().find(|(n, _)| n == "default") {
            return Ok(Some(t));
        }
        match &self.chat_templates[..] {
            [] => Ok(None),
            [(_, t)] => Ok(Some(t)),
            many => Err(Error::ChatTemplate(format!(
                "the tokenizer has several chat templates and none named \"default\": {}",
                many.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

/// A message of a chat.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// A user's message.
    pub fn user(content: &str) -> ChatMessage {
        ChatMessage { role: "user".into(), content: content.into() }
    }
}

/// A tokenizer with its settings.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    config: TokenizerConfig,
    /// The file the tokenizer was read from, for messages.
    source: PathBuf,
    /// Read from a `tokenizer.json` (with its post-processor).
    from_json: bool,
}

impl Tokenizer {
    /// The tokenizer of `dir`: `tokenizer.json`, else `vocab.json` and
    /// `merges.txt`, with `tokenizer_config.json`; `Ok(None)` when the
    /// directory has neither tokenizer.
    pub fn from_dir(dir: &Path) -> Result<Option<Tokenizer>> {
        let config = TokenizerConfig::from_dir(dir)?;
        Tokenizer::from_dir_with(dir, config, &[])
    }

    /// [`Tokenizer::from_dir`] with `config` instead of the directory's
    /// settings, and `specials` marked special in a `vocab.json` tokenizer
    /// (those its vocabulary holds), beside the config's special tokens.
    pub fn from_dir_with(dir: &Path, config: TokenizerConfig, specials: &[&str]) -> Result<Option<Tokenizer>> {
        let json = dir.join(TOKENIZER_JSON);
        if json.is_file() {
            return Tokenizer::from_tokenizer_json(&json, config).map(Some);
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.is_file() && merges.is_file() {
            return Tokenizer::from_vocab_merges(&vocab, &merges, config, specials).map(Some);
        }
        Ok(None)
    }

    /// A Hugging Face `tokenizer.json`.
    pub fn from_tokenizer_json(path: &Path, config: TokenizerConfig) -> Result<Tokenizer> {
        // The tokenizers library panics on some malformed files (found by
        // fuzzing: JSON that does not parse); check the JSON first.
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .map_err(|e| tok_err(path, format!("invalid JSON: {e}")))?;
        // It also panics on some well-formed JSON (a BPE model whose
        // subword prefix is longer than a token, found by fuzzing).
        let inner = crate::guard::contain(|| text.parse::<tokenizers::Tokenizer>())
            .map_err(|e| tok_err(path, format!("malformed tokenizer ({e})")))?
            .map_err(|e| tok_err(path, e))?;
        Ok(Tokenizer { inner, config, source: path.to_path_buf(), from_json: true })
    }

    /// A byte-level BPE from `vocab.json` and `merges.txt`; `specials` and
    /// the config's special tokens that the vocabulary holds are special
    /// (never split, left out when decoding).
    pub fn from_vocab_merges(
        vocab: &Path,
        merges: &Path,
        config: TokenizerConfig,
        specials: &[&str],
    ) -> Result<Tokenizer> {
        let to_str = |p: &Path| -> Result<String> {
            p.to_str().map(str::to_string).ok_or_else(|| tok_err(p, "path is not valid UTF-8"))
        };
        let (v, m) = (to_str(vocab)?, to_str(merges)?);
        let mut names: Vec<&str> = specials.to_vec();
        for t in [&config.bos_token, &config.eos_token, &config.pad_token, &config.unk_token].into_iter().flatten() {
            if !names.contains(&t.as_str()) {
                names.push(t);
            }
        }
        let build = || -> std::result::Result<tokenizers::Tokenizer, String> {
            let bpe = BPE::from_file(&v, &m).build().map_err(|e| e.to_string())?;
            let mut inner = tokenizers::Tokenizer::new(bpe);
            inner
                .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
                .with_decoder(Some(ByteLevelDecoder::default()));
            let added: Vec<AddedToken> = names
                .iter()
                .filter(|t| inner.token_to_id(t).is_some())
                .map(|t| AddedToken::from((*t).to_string(), true))
                .collect();
            inner.add_special_tokens(&added);
            Ok(inner)
        };
        let inner = crate::guard::contain(build)
            .map_err(|e| tok_err(vocab, format!("malformed vocabulary or merges ({e})")))?
            .map_err(|e| tok_err(vocab, e))?;
        Ok(Tokenizer { inner, config, source: vocab.to_path_buf(), from_json: false })
    }

    /// The settings read beside the tokenizer.
    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    /// The file the tokenizer was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The id of a token's text, if the vocabulary holds it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        crate::guard::contain(|| self.inner.token_to_id(token)).ok().flatten()
    }

    /// The beginning-of-sequence token's id, where the config names one the
    /// vocabulary holds.
    pub fn bos_id(&self) -> Option<u32> {
        self.config.bos_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// The end-of-sequence token's id (as [`Tokenizer::bos_id`]).
    pub fn eos_id(&self) -> Option<u32> {
        self.config.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// The padding token's id (as [`Tokenizer::bos_id`]).
    pub fn pad_id(&self) -> Option<u32> {
        self.config.pad_token.as_deref().and_then(|t| self.token_id(t))
    }

    fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = crate::guard::contain(|| self.inner.encode(text, add_special_tokens))
            .map_err(|e| Error::Tokenizer(format!("the tokenizer failed on {text:?}: {e}")))?
            .map_err(|e| Error::Tokenizer(format!("cannot encode {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` alone: no special token added.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false)
    }

    /// Token ids of `text` as Hugging Face's `tokenizer(text)` gives them
    /// (`add_special_tokens=True`). With a `tokenizer.json`, its
    /// post-processor adds the special tokens (transformers 5 drops
    /// `add_bos_token` / `add_eos_token` when there is a tokenizer.json,
    /// and the published files agree with them); a `vocab.json` tokenizer
    /// has no post-processor, and `add_bos_token` / `add_eos_token` (false
    /// when not given) decide.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if self.from_json {
            return self.encode_with(text, true);
        }
        let plain = self.encode_with(text, false)?;
        let mut ids = Vec::with_capacity(plain.len() + 2);
        if let (Some(true), Some(b)) = (self.config.add_bos_token, self.bos_id()) {
            ids.push(b);
        }
        ids.extend_from_slice(&plain);
        if let (Some(true), Some(e)) = (self.config.add_eos_token, self.eos_id()) {
            ids.push(e);
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        crate::guard::contain(|| self.inner.decode(ids, true))
            .map_err(|e| Error::Tokenizer(format!("the tokenizer failed on ids {ids:?}: {e}")))?
            .map_err(|e| Error::Tokenizer(format!("cannot decode {ids:?}: {e}")))
    }

    /// Entries of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        crate::guard::contain(|| self.inner.get_vocab_size(true)).unwrap_or(0)
    }

    /// `messages` rendered in the checkpoint's chat template, with the
    /// prompt for the assistant's turn after them (`add_generation_prompt`).
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self.config.chat_template()?.ok_or_else(|| {
            Error::ChatTemplate(format!(
                "--chat: {} has no chat template (no `chat_template` in {TOKENIZER_CONFIG}, no {CHAT_TEMPLATE_FILE}); \
                 give the prompt without --chat",
                self.source.parent().unwrap_or(&self.source).display()
            ))
        })?;
        render_chat(template, &self.config, messages, true)
    }

    /// The ids of `prompt` as one user message in the chat template,
    /// tokenized without adding special tokens (Hugging Face's
    /// `apply_chat_template(..., tokenize=True)`: the template writes the
    /// beginning-of-sequence token where the model wants one).
    pub fn encode_chat(&self, prompt: &str) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(&[ChatMessage::user(prompt)])?;
        self.encode_plain(&text)
    }
}

fn template_error(e: &minijinja::Error) -> Error {
    // The error's chain holds the line and the cause.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    Error::ChatTemplate(format!("the chat template failed: {message}"))
}

/// Renders `template` as transformers renders chat templates: `messages`,
/// `add_generation_prompt` and the special tokens (`bos_token`,
/// `eos_token`, `pad_token`, `unk_token`, where the config names them) as
/// variables, blocks trimmed (`trim_blocks`, `lstrip_blocks`), with
/// `raise_exception`, `strftime_now`, `tojson` (Python's `json.dumps`
/// output), loop controls and Python's string, list and dict methods.
pub fn render_chat(
    template: &str,
    config: &TokenizerConfig,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |message: String| -> std::result::Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("raise_exception: {message}")))
    });
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    let mut vars: BTreeMap<&str, Value> = BTreeMap::new();
    vars.insert("messages", Value::from_serialize(messages));
    vars.insert("add_generation_prompt", Value::from(add_generation_prompt));
    for (name, token) in [
        ("bos_token", &config.bos_token),
        ("eos_token", &config.eos_token),
        ("pad_token", &config.pad_token),
        ("unk_token", &config.unk_token),
    ] {
        if let Some(t) = token {
            vars.insert(name, Value::from(t.as_str()));
        }
    }
    let compiled = env.template_from_str(template).map_err(|e| template_error(&e))?;
    compiled.render(Value::from_serialize(&vars)).map_err(|e| template_error(&e))
}

/// Jinja's `strftime_now(format)`: the local time now, formatted by the C
/// library's `strftime`.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let bad = |m: &str| minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: {m}"));
    let c = std::ffi::CString::new(format).map_err(|_| bad("the format holds a NUL byte"))?;
    // SAFETY: `time` with a null pointer only returns the time; `tm` is a
    // plain C struct that `localtime_r` fills; `strftime` writes at most
    // `buf.len()` bytes into `buf` and reads the NUL-terminated `c`.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let now = unsafe { libc::time(std::ptr::null_mut()) };
    if unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
        return Err(bad("the local time is not available"));
    }
    let mut buf = vec![0u8; 512];
    let n = unsafe { libc::strftime(buf.as_mut_ptr().cast(), buf.len(), c.as_ptr(), &tm) };
    buf.truncate(n);
    String::from_utf8(buf).map_err(|_| bad("the formatted time is not UTF-8"))
}

/// Jinja's `tojson` as transformers defines it: Python's `json.dumps`
/// (`ensure_ascii=False`, separators `", "` and `": "`, or with `indent`
/// one item a line), in the values' own order.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    py_json(value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn py_json(
    v: &Value,
    indent: Option<usize>,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let json_err = |e: serde_json::Error| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string());
    let open = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n.saturating_mul(depth)));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let n = serde_json::to_value(v).map_err(json_err)?;
            out.push_str(&n.to_string());
        }
        ValueKind::String => {
            out.push_str(&serde_json::to_string(v.as_str().unwrap_or_default()).map_err(json_err)?);
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                open(out, level + 1);
                let name = key.as_str().map_or_else(|| key.to_string(), str::to_string);
                out.push_str(&serde_json::to_string(&name).map_err(json_err)?);
                out.push_str(": ");
                py_json(&v.get_item(key)?, indent, level + 1, out)?;
            }
            open(out, level);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                open(out, level + 1);
                py_json(item, indent, level + 1, out)?;
            }
            open(out, level);
            out.push(']');
        }
        other => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of kind {other:?} has no JSON form"),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER_STYLE: &str = "{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + \
        message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}\
        {% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

    fn config(json: &str) -> TokenizerConfig {
        TokenizerConfig::from_json(Path::new("tokenizer_config.json"), json).unwrap()
    }

    #[test]
    fn special_tokens_may_be_strings_or_added_token_objects() {
        let c = config(
            r#"{"add_bos_token": true, "add_eos_token": false, "bos_token": "<s>",
            "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": false}, "pad_token": null,
            "chat_template": "x"}"#,
        );
        assert_eq!((c.add_bos_token, c.add_eos_token), (Some(true), Some(false)));
        assert_eq!(
            (c.bos_token.as_deref(), c.eos_token.as_deref(), c.pad_token.as_deref()),
            (Some("<s>"), Some("</s>"), None)
        );
        assert_eq!(c.chat_template().unwrap(), Some("x"));
        let e = TokenizerConfig::from_json(Path::new("t.json"), r#"{"bos_token": 5}"#).unwrap_err().to_string();
        assert!(e.contains("t.json") && e.contains("bos_token") && e.contains("AddedToken"), "{e}");
        let e = TokenizerConfig::from_json(Path::new("t.json"), r#"{"add_bos_token": "yes"}"#).unwrap_err().to_string();
        assert!(e.contains("add_bos_token"), "{e}");
        assert!(TokenizerConfig::from_json(Path::new("t.json"), "[1]").is_err());
    }

    #[test]
    fn named_templates_pick_default_or_the_only_one() {
        let c = config(
            r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
        );
        assert_eq!(c.chat_template().unwrap(), Some("D"));
        let c = config(r#"{"chat_template": [{"name": "rag", "template": "R"}]}"#);
        assert_eq!(c.chat_template().unwrap(), Some("R"));
        let c = config(r#"{"chat_template": [{"name": "rag", "template": "R"}, {"name": "tools", "template": "T"}]}"#);
        let e = c.chat_template().unwrap_err().to_string();
        assert!(e.contains("rag, tools"), "{e}");
        assert_eq!(config("{}").chat_template().unwrap(), None);
        let e = TokenizerConfig::from_json(Path::new("t.json"), r#"{"chat_template": 3}"#).unwrap_err().to_string();
        assert!(e.contains("chat_template"), "{e}");
    }

    #[test]
    fn a_jinja_file_is_the_default_template() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKENIZER_CONFIG), r#"{"chat_template": "old", "eos_token": "E"}"#).unwrap();
        assert_eq!(TokenizerConfig::from_dir(dir.path()).unwrap().chat_template().unwrap(), Some("old"));
        std::fs::write(dir.path().join(CHAT_TEMPLATE_FILE), "new").unwrap();
        let c = TokenizerConfig::from_dir(dir.path()).unwrap();
        assert_eq!((c.chat_template().unwrap(), c.eos_token.as_deref()), (Some("new"), Some("E")));
        // Neither file: defaults.
        assert_eq!(TokenizerConfig::from_dir(&dir.path().join("none")).unwrap(), TokenizerConfig::default());
    }

    #[test]
    fn chat_templates_render_as_transformers_renders_them() {
        let c = config(r#"{"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}"#);
        let text = render_chat(HEADER_STYLE, &c, &[ChatMessage::user("  Hi there ")], true).unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let no_prompt = render_chat(HEADER_STYLE, &c, &[ChatMessage::user("a")], false).unwrap();
        assert!(no_prompt.ends_with("a<|eot_id|>"), "{no_prompt}");
        // trim_blocks and lstrip_blocks, loop controls, Python's methods.
        let t = "{% for m in messages %}\n    {% if m.role == 'system' %}{% continue %}{% endif %}\n\
                 {{ m.content.strip().upper() }}|{{ m.content.startswith(' h') }}\n{% endfor %}";
        let msgs = [ChatMessage { role: "system".into(), content: "s".into() }, ChatMessage::user(" hello ")];
        assert_eq!(render_chat(t, &c, &msgs, true).unwrap(), "HELLO|True\n");
        // An undefined special token renders empty, as in transformers.
        assert_eq!(render_chat("[{{ pad_token }}]", &c, &[], true).unwrap(), "[]");
    }

    #[test]
    fn raise_exception_and_tojson() {
        let c = TokenizerConfig::default();
        let t = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}";
        let e = render_chat(t, &c, &[ChatMessage::user("x")], true).unwrap_err().to_string();
        assert!(e.contains("Conversation roles must alternate"), "{e}");
        let t = "{{ messages | tojson }}|{{ {'b': [1, 2.5, none, true], 'a': 'é\"'} | tojson }}";
        assert_eq!(
            render_chat(t, &c, &[ChatMessage::user("<x>")], true).unwrap(),
            r#"[{"role": "user", "content": "<x>"}]|{"b": [1, 2.5, null, true], "a": "é\""}"#
        );
        let t = "{{ {'a': [1]} | tojson(indent=2) }}";
        assert_eq!(render_chat(t, &c, &[], true).unwrap(), "{\n  \"a\": [\n    1\n  ]\n}");
        let e = render_chat("{% for %}", &c, &[], true).unwrap_err().to_string();
        assert!(e.contains("chat template"), "{e}");
    }

    #[test]
    fn strftime_now_formats_the_local_time() {
        let year = render_chat("{{ strftime_now('%Y') }}", &TokenizerConfig::default(), &[], true).unwrap();
        let y: u32 = year.parse().unwrap();
        assert!((2020..3000).contains(&y), "{year}");
        let day = render_chat("{{ strftime_now('%d %b %Y') }}", &TokenizerConfig::default(), &[], true).unwrap();
        assert!(day.ends_with(&year) && day.len() == 11, "{day}");
    }

    /// A tokenizer.json of a word-level vocabulary, with a post-processor
    /// that puts `<s>` in front.
    fn word_level(dir: &Path) -> PathBuf {
        let json = r#"{"version": "1.0", "truncation": null, "padding": null,
          "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
          "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
          "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
          "decoder": null,
          "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}, "unk_token": "<unk>"}}"#;
        let path = dir.join(TOKENIZER_JSON);
        std::fs::write(&path, json).unwrap();
        path
    }

    #[test]
    fn the_post_processor_adds_the_special_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = word_level(dir.path());
        let with = |c: TokenizerConfig| Tokenizer::from_tokenizer_json(&path, c).unwrap();
        let specials =
            TokenizerConfig { bos_token: Some("<s>".into()), eos_token: Some("</s>".into()), ..Default::default() };
        let t = with(specials.clone());
        assert_eq!(t.encode("hello world").unwrap(), vec![1, 3, 4], "the post-processor's <s>");
        assert_eq!(t.encode_plain("hello world").unwrap(), vec![3, 4]);
        assert_eq!((t.bos_id(), t.eos_id(), t.pad_id()), (Some(1), Some(2), None));
        // As in transformers 5: the flags do not override tokenizer.json.
        let t = with(TokenizerConfig { add_bos_token: Some(false), add_eos_token: Some(true), ..specials });
        assert_eq!(t.encode("hello world").unwrap(), vec![1, 3, 4]);
        assert_eq!(t.decode(&[1, 3, 4, 2]).unwrap(), "hello world");
        assert_eq!(t.vocab_size(), 5);
        // Through the directory, with its config and chat template.
        std::fs::write(
            dir.path().join(TOKENIZER_CONFIG),
            r#"{"bos_token": "<s>", "chat_template": "{{ bos_token }}{{ messages[0].content }}"}"#,
        )
        .unwrap();
        let t = Tokenizer::from_dir(dir.path()).unwrap().unwrap();
        assert_eq!(t.encode("world").unwrap(), vec![1, 4]);
        assert_eq!(t.apply_chat_template(&[ChatMessage::user("hello")]).unwrap(), "<s>hello");
        assert_eq!(t.encode_chat("hello").unwrap(), vec![1, 3], "<s> once: the template's");
        std::fs::write(dir.path().join(TOKENIZER_CONFIG), "{}").unwrap();
        let e = Tokenizer::from_dir(dir.path()).unwrap().unwrap().encode_chat("x").unwrap_err().to_string();
        assert!(e.contains("--chat") && e.contains("no chat template"), "{e}");
        assert!(Tokenizer::from_dir(&dir.path().join("missing")).unwrap().is_none());
    }

    #[test]
    fn a_vocab_json_tokenizer_adds_what_the_config_says() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vocab.json"), r#"{"<s>": 0, "</s>": 1, "h": 2, "i": 3, "hi": 4}"#).unwrap();
        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\nh i\n").unwrap();
        let t = Tokenizer::from_dir(dir.path()).unwrap().unwrap();
        assert_eq!(t.encode("hi").unwrap(), vec![4], "no config: nothing added");
        std::fs::write(
            dir.path().join(TOKENIZER_CONFIG),
            r#"{"add_bos_token": true, "add_eos_token": true, "bos_token": "<s>", "eos_token": {"content": "</s>"}}"#,
        )
        .unwrap();
        let t = Tokenizer::from_dir(dir.path()).unwrap().unwrap();
        assert_eq!(t.encode("hi").unwrap(), vec![0, 4, 1]);
        // The config's special tokens are never split and are left out of text.
        assert_eq!(t.encode_plain("hi</s>").unwrap(), vec![4, 1]);
        assert_eq!(t.decode(&[0, 4, 1]).unwrap(), "hi");
    }

    #[test]
    fn malformed_tokenizer_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKENIZER_JSON);
        std::fs::write(&path, "{not json").unwrap();
        let e = Tokenizer::from_tokenizer_json(&path, TokenizerConfig::default()).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json") && e.contains("invalid JSON"), "{e}");
        std::fs::write(&path, r#"{"model": {"type": "Nope"}}"#).unwrap();
        let e = Tokenizer::from_tokenizer_json(&path, TokenizerConfig::default()).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }
}
