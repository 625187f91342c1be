//! OPT's tokenizer: GPT-2 byte-level BPE from Hugging Face's `tokenizer.json`
//! or from `vocab.json` + `merges.txt`, with OPT's `</s>` prefix, and left
//! padding for batches.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// OPT's beginning-of-sequence token, `</s>`, prepended to every prompt.
pub const BOS_TOKEN_ID: u32 = 2;
/// OPT's end-of-sequence token, `</s>`.
pub const EOS_TOKEN_ID: u32 = 2;
/// OPT's padding token, `<pad>`.
pub const PAD_TOKEN_ID: u32 = 1;

/// The special tokens of OPT's vocabulary (ids 0 to 3 in the published one).
const SPECIAL_TOKENS: [&str; 4] = ["<s>", "<pad>", "</s>", "<unk>"];

/// A byte-level BPE tokenizer that encodes the way OPT's does.
#[derive(Debug, Clone)]
pub struct OptTokenizer {
    inner: Tokenizer,
    bos: u32,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{}: {e}", path.display()))
}

impl OptTokenizer {
    /// The tokenizer files in `dir`: `tokenizer.json`, else `vocab.json` and
    /// `merges.txt`; `Ok(None)` when there are none.
    pub fn from_dir(dir: &Path, bos: u32) -> Result<Option<Self>> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_tokenizer_json(&json, bos).map(Some);
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.is_file() && merges.is_file() {
            return Self::from_vocab_merges(&vocab, &merges, bos).map(Some);
        }
        Ok(None)
    }

    /// A Hugging Face `tokenizer.json`.
    pub fn from_tokenizer_json(path: &Path, bos: u32) -> Result<Self> {
        // The tokenizers library panics on some malformed files (found by
        // fuzzing: JSON that does not parse); check the JSON first.
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .map_err(|e| tok_err(path, format!("invalid JSON: {e}")))?;
        // It also panics on some well-formed JSON (a BPE model whose
        // subword prefix is longer than a token, found by fuzzing).
        let inner = runtime::guard::contain(|| text.parse::<Tokenizer>())
            .map_err(|e| tok_err(path, format!("malformed tokenizer ({e})")))?
            .map_err(|e| tok_err(path, e))?;
        Ok(OptTokenizer { inner, bos })
    }

    /// GPT-2 style `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path, bos: u32) -> Result<Self> {
        let to_str = |p: &Path| -> Result<String> {
            p.to_str().map(str::to_string).ok_or_else(|| tok_err(p, "path is not valid UTF-8"))
        };
        let (v, m) = (to_str(vocab)?, to_str(merges)?);
        let bpe = runtime::guard::contain(|| BPE::from_file(&v, &m).build())
            .map_err(|e| tok_err(vocab, format!("malformed vocabulary or merges ({e})")))?
            .map_err(|e| tok_err(vocab, e))?;
        let mut inner = Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = SPECIAL_TOKENS
            .iter()
            .filter(|t| inner.token_to_id(t).is_some())
            .map(|t| AddedToken::from(*t, true))
            .collect();
        inner.add_special_tokens(&specials);
        Ok(OptTokenizer { inner, bos })
    }

    /// Token ids of `text`, with OPT's `</s>` in front.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = runtime::guard::contain(|| self.inner.encode(text, false))
            .map_err(|e| Error::Tokenizer(format!("the tokenizer failed on {text:?}: {e}")))?
            .map_err(|e| Error::Tokenizer(format!("cannot encode {text:?}: {e}")))?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 1);
        ids.push(self.bos);
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        runtime::guard::contain(|| self.inner.decode(ids, true))
            .map_err(|e| Error::Tokenizer(format!("the tokenizer failed on ids {ids:?}: {e}")))?
            .map_err(|e| Error::Tokenizer(format!("cannot decode {ids:?}: {e}")))
    }

    /// Entries of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

pub use runtime::schedule::left_pad;
