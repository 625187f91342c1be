//! OPT's tokenizer: the runtime's [`runtime::tokenizer::Tokenizer`] over
//! Hugging Face's `tokenizer.json` or GPT-2 style `vocab.json` +
//! `merges.txt`, with OPT's `</s>` prefix, and left padding for batches.
//!
//! OPT always encodes the same way, whatever `tokenizer_config.json` says:
//! the text's tokens with no special token added, after its `</s>`.

use std::path::Path;

use runtime::tokenizer::{Tokenizer, TokenizerConfig};

use crate::error::Result;

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

impl OptTokenizer {
    /// The tokenizer files in `dir`: `tokenizer.json`, else `vocab.json` and
    /// `merges.txt`; `Ok(None)` when there are none.
    pub fn from_dir(dir: &Path, bos: u32) -> Result<Option<Self>> {
        Ok(Tokenizer::from_dir_with(dir, TokenizerConfig::default(), &SPECIAL_TOKENS)?
            .map(|inner| OptTokenizer { inner, bos }))
    }

    /// A Hugging Face `tokenizer.json`.
    pub fn from_tokenizer_json(path: &Path, bos: u32) -> Result<Self> {
        Ok(OptTokenizer { inner: Tokenizer::from_tokenizer_json(path, TokenizerConfig::default())?, bos })
    }

    /// GPT-2 style `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path, bos: u32) -> Result<Self> {
        let inner = Tokenizer::from_vocab_merges(vocab, merges, TokenizerConfig::default(), &SPECIAL_TOKENS)?;
        Ok(OptTokenizer { inner, bos })
    }

    /// Token ids of `text`, with OPT's `</s>` in front.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let plain = self.inner.encode_plain(text)?;
        let mut ids = Vec::with_capacity(plain.len() + 1);
        ids.push(self.bos);
        ids.extend_from_slice(&plain);
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(self.inner.decode(ids)?)
    }

    /// Entries of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// The runtime's tokenizer underneath (for decoding beside other
    /// families).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner
    }
}

pub use runtime::schedule::left_pad;
