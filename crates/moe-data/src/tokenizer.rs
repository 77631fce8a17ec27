//! Text tokenizers, both stored as a Hugging Face `tokenizer.json`:
//! a byte-level BPE trained on the training works, and a plain byte tokenizer (vocab 256,
//! id = byte value), which is a byte-level BPE with no merges. Beside it, a
//! `tokenizer_config.json` holds the chat template and the special tokens' roles, as
//! Hugging Face stores them.

use std::path::Path;
use std::str::FromStr;

use ahash::AHashMap;
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder, TokenizerImpl};

use crate::chat::{ChatTemplate, IM_END, IM_START, TokenizerConfig};

/// Separates documents in BPE token streams (the byte tokenizer has no special tokens).
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// The special tokens of a BPE that `moe` trains: the document separator and ChatML's
/// turn markers.
const BPE_SPECIAL_TOKENS: [&str; 3] = [END_OF_TEXT, IM_START, IM_END];

/// The file beside `tokenizer.json` that holds the chat template.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// End-of-document tokens of other tokenizers (Llama/Mistral's, Llama 3's, Gemma's), looked
/// for after [`END_OF_TEXT`] in an imported `tokenizer.json`.
const OTHER_END_TOKENS: [&str; 3] = ["</s>", "<|end_of_text|>", "<eos>"];

/// Which tokenizer a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    /// Byte-level BPE trained on the training text (vocab size from the config).
    Bpe,
    /// One token per byte (vocab 256).
    Byte,
}

/// A loaded tokenizer plus what evaluation needs to know about its tokens.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    token_bytes: Vec<u32>,
    end_of_text: Option<u32>,
    /// What `tokenizer_config.json` said (empty for a tokenizer without one).
    config: TokenizerConfig,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("end_of_text", &self.end_of_text)
            .finish()
    }
}

/// GPT-2's reversible map from bytes to printable characters used by byte-level BPE.
fn byte_to_char() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in printable.into_iter().zip(chars) {
        table[b as usize] = char::from_u32(c).expect("valid code point");
    }
    table
}

fn byte_level() -> ByteLevel {
    ByteLevel::new(false, true, true)
}

type BytePipeline = TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>;

/// A byte-level BPE pipeline (no normaliser, no prefix space) around `model`.
fn byte_level_pipeline(model: BPE) -> Result<BytePipeline> {
    TokenizerBuilder::new()
        .with_model(model)
        .with_normalizer(None::<NormalizerWrapper>)
        .with_pre_tokenizer(Some(byte_level()))
        .with_post_processor(Some(byte_level()))
        .with_decoder(Some(byte_level()))
        .build()
        .map_err(|e| anyhow!("building the tokenizer: {e}"))
}

impl TextTokenizer {
    /// Trains a byte-level BPE with `vocab_size` tokens (including `<|endoftext|>` and
    /// ChatML's `<|im_start|>` and `<|im_end|>`) on `texts`.
    pub fn train_bpe(texts: &[&str], vocab_size: usize) -> Result<Self> {
        let least = 256 + BPE_SPECIAL_TOKENS.len();
        if vocab_size <= least {
            bail!(
                "a BPE vocabulary needs more than {least} tokens (256 bytes + end-of-text and the chat markers), got {vocab_size}"
            );
        }
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(
                BPE_SPECIAL_TOKENS
                    .iter()
                    .map(|&t| AddedToken::from(t, true))
                    .collect(),
            )
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut tokenizer = byte_level_pipeline(BPE::default())?;
        tokenizer
            .train(&mut trainer, texts.iter().copied())
            .map_err(|e| anyhow!("training the BPE tokenizer: {e}"))?;
        let mut tokenizer = Self::from_pipeline(&tokenizer)?;
        tokenizer.config.chat_template = Some(crate::chat::CHATML_TEMPLATE.into());
        tokenizer.config.eos_token = Some(IM_END.into());
        tokenizer.config.pad_token = Some(END_OF_TEXT.into());
        Ok(tokenizer)
    }

    /// The byte tokenizer: 256 tokens, token id = byte value.
    pub fn bytes() -> Result<Self> {
        let vocab: AHashMap<String, u32> = byte_to_char()
            .into_iter()
            .enumerate()
            .map(|(b, c)| (c.to_string(), b as u32))
            .collect();
        let model = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .map_err(|e| anyhow!("building the byte tokenizer: {e}"))?;
        Self::from_pipeline(&byte_level_pipeline(model)?)
    }

    fn from_pipeline(pipeline: &BytePipeline) -> Result<Self> {
        let json = pipeline
            .to_string(false)
            .map_err(|e| anyhow!("serialising the tokenizer: {e}"))?;
        Self::from_json(&json)
    }

    /// Parses a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        let inner =
            Tokenizer::from_str(json).map_err(|e| anyhow!("invalid tokenizer.json: {e}"))?;
        Ok(Self::from_tokenizer(inner, TokenizerConfig::default()))
    }

    fn from_tokenizer(inner: Tokenizer, config: TokenizerConfig) -> Self {
        let vocab_size = inner.get_vocab_size(true);
        let special = inner.get_added_tokens_decoder();
        let token_bytes = (0..vocab_size as u32)
            .map(
                |id| match (special.contains_key(&id), inner.id_to_token(id)) {
                    (false, Some(token)) => token.chars().count() as u32,
                    _ => 0,
                },
            )
            .collect();
        let end_of_text = std::iter::once(END_OF_TEXT)
            .chain(OTHER_END_TOKENS)
            .find_map(|token| inner.token_to_id(token));
        Self {
            inner,
            token_bytes,
            end_of_text,
            config,
        }
    }

    /// Loads `tokenizer.json` from `path`, and the `tokenizer_config.json` beside it if
    /// there is one.
    pub fn load(path: &Path) -> Result<Self> {
        let json = std::fs::read_to_string(path)
            .with_context(|| format!("reading tokenizer {}", path.display()))?;
        let mut tokenizer = Self::from_json(&json)
            .with_context(|| format!("loading tokenizer {}", path.display()))?;
        let config_path = path.with_file_name(TOKENIZER_CONFIG_FILE);
        if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            tokenizer.config = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", config_path.display()))?;
        }
        Ok(tokenizer)
    }

    /// Writes `tokenizer.json` to `path` and `tokenizer_config.json` beside it.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| anyhow!("serialising the tokenizer: {e}"))?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        let config_path = path.with_file_name(TOKENIZER_CONFIG_FILE);
        let config = serde_json::to_string_pretty(&self.hugging_face_config())?;
        std::fs::write(&config_path, config + "\n")
            .with_context(|| format!("writing {}", config_path.display()))
    }

    /// `tokenizer_config.json` as transformers reads it: the fields read, with the
    /// tokenizer class and the end-of-sequence token filled in when missing.
    pub fn hugging_face_config(&self) -> TokenizerConfig {
        let mut config = self.config.clone();
        let token = |id: Option<u32>| id.and_then(|id| self.inner.id_to_token(id));
        if config.eos_token.is_none() {
            config.eos_token = token(self.end_of_text);
        }
        config
            .other
            .entry("tokenizer_class")
            .or_insert_with(|| "PreTrainedTokenizerFast".into());
        config
            .other
            .entry("clean_up_tokenization_spaces")
            .or_insert(false.into());
        config
    }

    /// The tokenizer's chat template, or ChatML for one that has none.
    pub fn chat_template(&self) -> ChatTemplate {
        self.config.template().unwrap_or_else(ChatTemplate::chatml)
    }

    /// Whether `tokenizer_config.json` brought a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.config.chat_template.is_some()
    }

    /// This tokenizer with `template` as its chat template.
    pub fn with_chat_template(mut self, template: &ChatTemplate) -> Self {
        self.config.chat_template = Some(template.source().into());
        self.config.bos_token = template.bos_token().map(String::from);
        self.config.eos_token = template.eos_token().map(String::from);
        self
    }

    /// This tokenizer with `tokens` added as special tokens (new ids after the last), and
    /// the tokens that were not there before.
    pub fn with_special_tokens(&self, tokens: &[&str]) -> (Self, Vec<String>) {
        let missing: Vec<String> = tokens
            .iter()
            .filter(|t| self.inner.token_to_id(t).is_none())
            .map(|t| t.to_string())
            .collect();
        let mut inner = self.inner.clone();
        let added: Vec<AddedToken> = missing
            .iter()
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        inner.add_special_tokens(&added);
        (Self::from_tokenizer(inner, self.config.clone()), missing)
    }

    /// The id of `token`, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id of `token` if it is one special token (an added token such as `<|im_end|>`,
    /// which decoding skips).
    pub fn special_token_id(&self, token: &str) -> Option<u32> {
        let id = self.inner.token_to_id(token)?;
        self.inner
            .get_added_tokens_decoder()
            .contains_key(&id)
            .then_some(id)
    }

    /// Number of token ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// The document separator, if the tokenizer has one.
    pub fn end_of_text(&self) -> Option<u32> {
        self.end_of_text
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` with the byte offset in `text` where each starts.
    pub fn encode_with_starts(&self, text: &str) -> Result<(Vec<u32>, Vec<usize>)> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let starts = encoding.get_offsets().iter().map(|&(start, _)| start);
        Ok((encoding.get_ids().to_vec(), starts.collect()))
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("decoding: {e}"))
    }

    /// A SHA-256 of the tokenizer's compact JSON: equal for tokenizers that encode alike,
    /// whatever file formatting they were saved with.
    pub fn fingerprint(&self) -> Result<String> {
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| anyhow!("serialising the tokenizer: {e}"))?;
        Ok(crate::hex_sha256(json.as_bytes()))
    }

    /// UTF-8 bytes each token id stands for (0 for special tokens), for bits per byte.
    pub fn token_bytes(&self) -> &[u32] {
        &self.token_bytes
    }

    /// The longest vocabulary entry in UTF-8 bytes (special tokens included): no token
    /// stands for more bytes of input text, as entries spell their text at least as long
    /// as it is (byte-level BPE writes one byte as one or two, SentencePiece a space as
    /// `▁`, byte fallback as `<0xNN>`). So a text of `n` bytes is at least `n / longest`
    /// tokens, known without tokenizing it.
    pub fn longest_token_bytes(&self) -> usize {
        (0..self.inner.get_vocab_size(true) as u32)
            .filter_map(|id| self.inner.id_to_token(id))
            .map(|token| token.len())
            .max()
            .unwrap_or(1)
            .max(1)
    }
}
