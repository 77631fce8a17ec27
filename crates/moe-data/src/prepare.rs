//! `moe data prepare`: tokenizes documents once into memory-mappable shards.
//!
//! Two passes over the input. The first counts the documents and keeps a bounded, seeded
//! sample of text for training a tokenizer; the validation documents are then drawn with
//! the seed. The second tokenizes in parallel batches and appends each document, followed
//! by the end-of-text token, to its split's shards. Conversations (`--format chat`) are
//! rendered with the tokenizer's chat template and also write a loss mask: 1 on the
//! tokens of the answers, 0 elsewhere. Everything is written under a temporary name
//! beside the output and renamed when complete.

use std::collections::{BinaryHeap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use rayon::prelude::*;

use crate::array_file::{ArrayWriter, Dtype};
use crate::chat::ChatTemplate;
use crate::meta::{
    ChatMeta, ChatSplitMeta, DOCUMENTS_FILE, FORMAT, META_FILE, Meta, ShardMeta, SourceMeta,
    SplitMeta, SplitSource, TOKENIZER_FILE, mask_file,
};
use crate::sources::{
    FileCounts, Piece, Records, SourceFile, SourceKind, expand_inputs, read_pieces,
};
use crate::{TextTokenizer, mix64};

/// Where the tokenizer comes from.
#[derive(Debug, Clone)]
pub enum TokenizerChoice {
    /// A Hugging Face `tokenizer.json`.
    File(PathBuf),
    /// A tokenizer already loaded (a checkpoint's).
    Given(Box<TextTokenizer>),
    /// A byte-level BPE trained on a sample of the training documents.
    TrainBpe {
        /// Tokens in the vocabulary, end-of-text included.
        vocab_size: usize,
    },
    /// One token per byte (vocabulary 256, no end-of-text token).
    Bytes,
}

/// Which documents are held out for validation.
#[derive(Debug, Clone, PartialEq)]
pub enum ValidationSplit {
    /// This fraction of the documents (rounded, at least one), drawn with the seed.
    Fraction(f64),
    /// This many documents, drawn with the seed.
    Documents(u64),
    /// The `.txt` documents with these file stems.
    Named(Vec<String>),
}

/// What happens to a conversation longer than `--max-tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    /// Keep its first tokens.
    Truncate,
    /// Leave it out.
    Drop,
}

impl std::str::FromStr for Overlong {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "truncate" => Ok(Self::Truncate),
            "drop" => Ok(Self::Drop),
            other => Err(format!("`{other}`: expected truncate or drop")),
        }
    }
}

/// What `moe data prepare` does.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Files and directories to read; `-` reads standard input.
    pub inputs: Vec<PathBuf>,
    /// The directory to create (must not exist).
    pub out: PathBuf,
    /// JSON field or parquet column holding the text.
    pub text_field: String,
    /// Standard input is JSON lines (else plain text, one document).
    pub stdin_jsonl: bool,
    /// The inputs are conversations (JSON lines with OpenAI `messages`), rendered with the
    /// tokenizer's chat template and trained on their answers only.
    pub chat: bool,
    /// Conversations longer than this many tokens (end-of-text included) are truncated or
    /// dropped, per `overlong` (chat only; `None`: no limit).
    pub max_tokens: Option<usize>,
    /// What happens to a conversation over `max_tokens`.
    pub overlong: Overlong,
    /// The tokenizer.
    pub tokenizer: TokenizerChoice,
    /// Bytes of training text a tokenizer is trained on at most.
    pub tokenizer_sample_bytes: u64,
    /// The validation split.
    pub validation: ValidationSplit,
    /// Seed of the split and of the tokenizer's sample.
    pub seed: u64,
    /// Tokens per shard file at most.
    pub shard_tokens: u64,
    /// The command line, recorded in `meta.json`.
    pub command: String,
}

impl PrepareOptions {
    /// Options with the defaults of `moe data prepare`: field `text`, a 4096-token BPE
    /// trained on at most 100 MB, 1% of the documents for validation, seed 0, shards of
    /// 2^28 tokens.
    pub fn new(inputs: Vec<PathBuf>, out: PathBuf) -> Self {
        Self {
            inputs,
            out,
            text_field: "text".into(),
            stdin_jsonl: false,
            chat: false,
            max_tokens: None,
            overlong: Overlong::Drop,
            tokenizer: TokenizerChoice::TrainBpe { vocab_size: 4096 },
            tokenizer_sample_bytes: 100_000_000,
            validation: ValidationSplit::Fraction(0.01),
            seed: 0,
            shard_tokens: 1 << 28,
            command: String::new(),
        }
    }
}

/// Where preparation is, for a progress display.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Progress {
    /// First pass: bytes of text read so far.
    Scanning {
        /// Text bytes read.
        bytes: u64,
    },
    /// Training the tokenizer on this many bytes of sampled text.
    TrainingTokenizer {
        /// Sampled bytes.
        bytes: u64,
    },
    /// Second pass: bytes of text tokenized out of the total.
    Tokenizing {
        /// Text bytes tokenized.
        done: u64,
        /// Text bytes in all.
        total: u64,
    },
}

/// Text tokenized in one parallel batch.
const BATCH_BYTES: usize = 16 << 20;

/// Prepares `options.inputs` into `options.out`; returns the written `meta.json`.
pub fn prepare(options: &PrepareOptions, progress: &mut dyn FnMut(Progress)) -> Result<Meta> {
    check_options(options)?;
    let staging = Staging::new(&options.out)?;
    let inputs = spool_stdin(options, staging.path())?;
    let files = expand_inputs(&inputs)?;
    // A tokenizer given (or bytes) is loaded once, before the scan; a BPE is trained after.
    let given = given_tokenizer(&options.tokenizer)?;
    // Conversations render with the given tokenizer's template; ChatML for one made here.
    let template = options.chat.then(|| {
        given
            .as_ref()
            .map_or_else(ChatTemplate::chatml, TextTokenizer::chat_template)
    });
    let records = match &template {
        Some(template) => Records::Chat(template),
        None => Records::Text(&options.text_field),
    };

    let mut scan = scan(options, records, &files, progress)?;
    ensure!(
        scan.documents() > 0,
        "no text in {}: every document is empty",
        describe_inputs(&options.inputs)
    );
    let validation = pick_validation(options, &files, &scan)?;
    let tokenizer = match (given, &options.tokenizer) {
        (Some(tokenizer), _) => tokenizer,
        (None, TokenizerChoice::TrainBpe { vocab_size }) => {
            train_tokenizer(*vocab_size, &scan, &validation, progress)?
        }
        (None, choice) => bail!("no tokenizer for {choice:?}"),
    };
    let (tokenizer, chat) = match &template {
        Some(template) => with_chat_tokens(tokenizer, template, options)?,
        None => (tokenizer, None),
    };
    scan.sample = Vec::new();
    let labels: Vec<String> = options
        .inputs
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let pass = Tokenizing {
        options,
        records,
        tokenizer: &tokenizer,
        validation: &validation,
        total_bytes: scan.bytes,
        inputs: labels.len(),
    };
    let (train, val) = pass.run(&files, scan.documents(), staging.path(), progress)?;

    let meta = Meta {
        format: FORMAT,
        vocab_size: tokenizer.vocab_size(),
        dtype: Dtype::for_vocab(tokenizer.vocab_size()),
        end_of_text: tokenizer.end_of_text(),
        tokenizer_sha256: tokenizer.fingerprint()?,
        seed: options.seed,
        text_field: options.text_field.clone(),
        command: options.command.clone(),
        invalid_utf8: scan.per_input.iter().map(|c| c.invalid_utf8).sum(),
        chat,
        train: train.finish(&labels)?,
        val: val.finish(&labels)?,
        sources: source_metas(&labels, &scan.per_input),
    };
    ensure!(
        meta.train.tokens > 0,
        "no training documents: every document went to validation"
    );
    tokenizer.save(&staging.path().join(TOKENIZER_FILE))?;
    let json = serde_json::to_string_pretty(&meta)?;
    std::fs::write(staging.path().join(META_FILE), json + "\n")
        .with_context(|| format!("writing {META_FILE}"))?;
    if inputs != options.inputs {
        std::fs::remove_file(staging.path().join(STDIN_FILE_TEXT)).ok();
        std::fs::remove_file(staging.path().join(STDIN_FILE_JSONL)).ok();
    }
    staging.publish()?;
    Ok(meta)
}

/// Refuses options that cannot work, before anything is read or written.
fn check_options(options: &PrepareOptions) -> Result<()> {
    ensure!(
        !options.out.exists(),
        "`{}` already exists; choose another --out or delete it",
        options.out.display()
    );
    ensure!(
        !options.inputs.is_empty(),
        "no input: pass --input PATH (or - for standard input)"
    );
    ensure!(
        options.shard_tokens > 0,
        "shards must hold at least one token"
    );
    ensure!(
        options.chat || options.max_tokens.is_none(),
        "--max-tokens limits conversations: it needs --format chat"
    );
    ensure!(
        options.max_tokens != Some(0),
        "--max-tokens must be at least 1"
    );
    Ok(())
}

/// `tokenizer` holding `template` and the special tokens it writes (added after the last
/// id where missing: a model trained with the old tokenizer grows its embeddings to match),
/// and what `meta.json` says of the chat data.
fn with_chat_tokens(
    tokenizer: TextTokenizer,
    template: &ChatTemplate,
    options: &PrepareOptions,
) -> Result<(TextTokenizer, Option<ChatMeta>)> {
    let base = tokenizer.fingerprint()?;
    let (tokenizer, added) = tokenizer.with_special_tokens(&template.special_tokens());
    let meta = ChatMeta {
        max_tokens: options.max_tokens,
        overlong: options.overlong,
        base_tokenizer_sha256: (!added.is_empty()).then_some(base),
        added_tokens: added,
    };
    Ok((tokenizer.with_chat_template(template), Some(meta)))
}

/// The tokenizer `choice` names when it needs no data: a file, a loaded one or bytes;
/// `None` for a BPE to train.
fn given_tokenizer(choice: &TokenizerChoice) -> Result<Option<TextTokenizer>> {
    Ok(match choice {
        TokenizerChoice::File(path) => Some(TextTokenizer::load(path)?),
        TokenizerChoice::Given(tokenizer) => Some(tokenizer.as_ref().clone()),
        TokenizerChoice::Bytes => Some(TextTokenizer::bytes()?),
        TokenizerChoice::TrainBpe { .. } => None,
    })
}

/// A BPE of `vocab_size` tokens trained on the scan's sample less the validation
/// documents.
fn train_tokenizer(
    vocab_size: usize,
    scan: &Scan,
    validation: &HashSet<u64>,
    progress: &mut dyn FnMut(Progress),
) -> Result<TextTokenizer> {
    let sample: Vec<&str> = scan
        .sample
        .iter()
        .filter(|s| !validation.contains(&s.doc))
        .map(|s| s.text.as_str())
        .collect();
    let bytes = sample.iter().map(|t| t.len() as u64).sum();
    progress(Progress::TrainingTokenizer { bytes });
    TextTokenizer::train_bpe(&sample, vocab_size)
}

/// The second pass: every document tokenized, in batches encoded in parallel, into the
/// training or the validation split.
struct Tokenizing<'a> {
    options: &'a PrepareOptions,
    records: Records<'a>,
    tokenizer: &'a TextTokenizer,
    validation: &'a HashSet<u64>,
    /// Text bytes in all, for the progress reports.
    total_bytes: u64,
    /// Number of `--input`s, each counted apart in the splits.
    inputs: usize,
}

impl Tokenizing<'_> {
    /// Tokenizes `files` (holding `documents` non-empty documents, as the first pass
    /// counted) into the `train` and `val` splits under `dir`.
    fn run(
        &self,
        files: &[SourceFile],
        documents: u64,
        dir: &Path,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(SplitWriter, SplitWriter)> {
        let dtype = Dtype::for_vocab(self.tokenizer.vocab_size());
        let split = |name: &str| {
            SplitWriter::create(
                &dir.join(name),
                dtype,
                self.options.shard_tokens,
                self.inputs,
                self.options.chat,
            )
        };
        let mut splits = (split("train")?, split("val")?);
        let mut batch: Vec<(Piece, usize)> = Vec::new();
        let (mut batch_bytes, mut done, mut first_doc) = (0usize, 0u64, 0u64);
        for file in files {
            let counts = read_pieces(file, self.records, first_doc, &mut |piece| {
                batch_bytes += piece.text.len();
                batch.push((piece, file.input));
                if batch_bytes >= BATCH_BYTES {
                    done += self.encode(&mut batch, &mut splits)?;
                    progress(self.progress(done));
                    batch_bytes = 0;
                }
                Ok(())
            })?;
            first_doc += counts.documents;
        }
        done += self.encode(&mut batch, &mut splits)?;
        progress(self.progress(done));
        ensure!(
            first_doc == documents,
            "the input changed while it was being prepared ({documents} documents, then {first_doc})"
        );
        Ok(splits)
    }

    /// Encodes and empties `batch` into the splits; returns its text bytes.
    fn encode(
        &self,
        batch: &mut Vec<(Piece, usize)>,
        (train, val): &mut (SplitWriter, SplitWriter),
    ) -> Result<u64> {
        let encoded: Vec<Result<Encoded>> = batch
            .par_iter()
            .map(|(piece, _)| self.encode_piece(piece))
            .collect();
        let mut bytes = 0;
        for ((piece, input), encoded) in batch.drain(..).zip(encoded) {
            let split = if self.validation.contains(&piece.doc) {
                &mut *val
            } else {
                &mut *train
            };
            bytes += piece.text.len() as u64;
            let mut encoded = encoded?;
            if !self.fit_limit(&mut encoded, split) {
                continue;
            }
            split.push(&piece, input, &encoded, self.tokenizer)?;
        }
        Ok(bytes)
    }

    /// A piece's tokens, and for a conversation which of them are trained on.
    fn encode_piece(&self, piece: &Piece) -> Result<Encoded> {
        let Some(trained) = &piece.trained else {
            let ids = self.tokenizer.encode(&piece.text)?;
            return Ok(Encoded { ids, mask: None });
        };
        let (ids, starts) = self.tokenizer.encode_with_starts(&piece.text)?;
        let mask = starts
            .iter()
            .map(|start| u8::from(trained.iter().any(|span| span.contains(start))))
            .collect();
        Ok(Encoded {
            ids,
            mask: Some(mask),
        })
    }

    /// Applies `--max-tokens` to a conversation (its end-of-text token included);
    /// false if it is dropped. Counts what it changed in `split`.
    fn fit_limit(&self, encoded: &mut Encoded, split: &mut SplitWriter) -> bool {
        let Some(limit) = self.options.max_tokens else {
            return true;
        };
        let end = usize::from(self.tokenizer.end_of_text().is_some());
        if encoded.ids.len() + end <= limit {
            return true;
        }
        let chat = split.chat.get_or_insert_with(ChatSplitMeta::default);
        match self.options.overlong {
            Overlong::Drop => {
                chat.dropped += 1;
                false
            }
            Overlong::Truncate => {
                chat.truncated += 1;
                let keep = limit.saturating_sub(end).max(1);
                encoded.ids.truncate(keep);
                if let Some(mask) = &mut encoded.mask {
                    mask.truncate(keep);
                }
                true
            }
        }
    }

    fn progress(&self, done: u64) -> Progress {
        Progress::Tokenizing {
            done,
            total: self.total_bytes,
        }
    }
}

/// What `meta.json` says of each input.
fn source_metas(labels: &[String], per_input: &[FileCounts]) -> Vec<SourceMeta> {
    labels
        .iter()
        .zip(per_input)
        .map(|(input, counts)| SourceMeta {
            input: input.clone(),
            documents: counts.documents,
            empty: counts.empty,
            invalid_utf8: counts.invalid_utf8,
        })
        .collect()
}

fn describe_inputs(inputs: &[PathBuf]) -> String {
    let names: Vec<String> = inputs
        .iter()
        .map(|p| format!("`{}`", p.display()))
        .collect();
    names.join(", ")
}

const STDIN_FILE_TEXT: &str = "stdin.txt";
const STDIN_FILE_JSONL: &str = "stdin.jsonl";

/// The inputs with `-` replaced by a copy of standard input in the staging directory
/// (both passes read it).
fn spool_stdin(options: &PrepareOptions, staging: &Path) -> Result<Vec<PathBuf>> {
    let mut spooled = false;
    options
        .inputs
        .iter()
        .map(|input| {
            if input.as_os_str() != "-" {
                return Ok(input.clone());
            }
            ensure!(!spooled, "standard input (-) is named twice");
            spooled = true;
            let name = if options.stdin_jsonl {
                STDIN_FILE_JSONL
            } else {
                STDIN_FILE_TEXT
            };
            let path = staging.join(name);
            let mut file = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            std::io::copy(&mut std::io::stdin().lock(), &mut file)
                .context("reading standard input")?;
            file.flush()?;
            Ok(path)
        })
        .collect()
}

/// A sampled piece of text for the tokenizer, ordered by its random key.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Sampled {
    key: u64,
    doc: u64,
    text: String,
}

/// What the first pass found.
struct Scan {
    /// Counts per `--input`.
    per_input: Vec<FileCounts>,
    /// Non-empty documents of each file, in order.
    per_file: Vec<u64>,
    /// Text bytes in all.
    bytes: u64,
    /// The pieces with the smallest keys that fit the sample budget.
    sample: Vec<Sampled>,
}

impl Scan {
    fn documents(&self) -> u64 {
        self.per_file.iter().sum()
    }
}

/// A piece's token ids and, for a conversation, its loss mask (1 = trained on).
struct Encoded {
    ids: Vec<u32>,
    mask: Option<Vec<u8>>,
}

fn scan(
    options: &PrepareOptions,
    records: Records<'_>,
    files: &[SourceFile],
    progress: &mut dyn FnMut(Progress),
) -> Result<Scan> {
    let sampling = matches!(options.tokenizer, TokenizerChoice::TrainBpe { .. });
    let budget = options.tokenizer_sample_bytes;
    let mut per_input = vec![FileCounts::default(); options.inputs.len()];
    let mut per_file = Vec::with_capacity(files.len());
    let mut heap = BinaryHeap::<Sampled>::new();
    let (mut bytes, mut sampled_bytes, mut pieces, mut reported) = (0u64, 0u64, 0u64, 0u64);
    let mut first_doc = 0;
    for file in files {
        let counts = read_pieces(file, records, first_doc, &mut |piece| {
            bytes += piece.text.len() as u64;
            pieces += 1;
            if sampling {
                sampled_bytes += piece.text.len() as u64;
                let key = mix64(options.seed ^ mix64(pieces));
                heap.push(Sampled {
                    key,
                    doc: piece.doc,
                    text: piece.text,
                });
                while sampled_bytes > budget && heap.len() > 1 {
                    if let Some(dropped) = heap.pop() {
                        sampled_bytes -= dropped.text.len() as u64;
                    }
                }
            }
            if bytes - reported >= 1 << 24 {
                reported = bytes;
                progress(Progress::Scanning { bytes });
            }
            Ok(())
        })?;
        let total = &mut per_input[file.input];
        total.documents += counts.documents;
        total.empty += counts.empty;
        total.invalid_utf8 += counts.invalid_utf8;
        per_file.push(counts.documents);
        first_doc += counts.documents;
    }
    progress(Progress::Scanning { bytes });
    Ok(Scan {
        per_input,
        per_file,
        bytes,
        sample: heap.into_vec(),
    })
}

/// The validation documents' indices.
fn pick_validation(
    options: &PrepareOptions,
    files: &[SourceFile],
    scan: &Scan,
) -> Result<HashSet<u64>> {
    let documents = scan.documents();
    let count = match &options.validation {
        ValidationSplit::Named(names) => return named_documents(names, files, scan),
        ValidationSplit::Fraction(f) => {
            ensure!(
                f.is_finite() && *f > 0.0 && *f < 1.0,
                "the validation fraction must be in (0, 1), got {f}"
            );
            ((f * documents as f64).round() as u64).max(1)
        }
        ValidationSplit::Documents(n) => {
            ensure!(*n > 0, "--val-docs must be at least 1");
            *n
        }
    };
    ensure!(
        count < documents,
        "{documents} document(s) cannot give {count} for validation and keep some for training: a .txt file is one document; use more files, JSON lines or parquet rows"
    );
    // The `count` documents whose seeded keys are smallest.
    let mut heap = BinaryHeap::with_capacity(count as usize + 1);
    for doc in 0..documents {
        heap.push((mix64(options.seed.wrapping_add(mix64(doc ^ 0x5eed))), doc));
        if heap.len() as u64 > count {
            heap.pop();
        }
    }
    Ok(heap.into_iter().map(|(_, doc)| doc).collect())
}

/// The documents of the `.txt` files whose stems are `names`.
fn named_documents(names: &[String], files: &[SourceFile], scan: &Scan) -> Result<HashSet<u64>> {
    let mut found = HashSet::new();
    let mut first_doc = 0;
    for (file, &docs) in files.iter().zip(&scan.per_file) {
        let stem = file.path.file_stem().map(|s| s.to_string_lossy());
        if file.kind == SourceKind::Text
            && docs == 1
            && stem.is_some_and(|stem| names.iter().any(|n| *n == stem))
        {
            found.insert(first_doc);
        }
        first_doc += docs;
    }
    for name in names {
        let present = files.iter().any(|f| {
            f.kind == SourceKind::Text && f.path.file_stem().is_some_and(|s| s == name.as_str())
        });
        ensure!(
            present,
            "validation work `{name}` not found (expected a non-empty {name}.txt among the inputs)"
        );
    }
    ensure!(
        !found.is_empty(),
        "no validation documents: name at least one work"
    );
    Ok(found)
}

/// Appends one split's documents to its shards and document offsets.
struct SplitWriter {
    dir: PathBuf,
    dtype: Dtype,
    shard_tokens: u64,
    shard: Option<ArrayWriter>,
    /// The current shard's loss mask (chat data only).
    mask: Option<ArrayWriter>,
    /// Chat data: its counts (`None` for prose).
    chat: Option<ChatSplitMeta>,
    shards: Vec<ShardMeta>,
    documents: ArrayWriter,
    tokens: u64,
    bytes: u64,
    per_input: Vec<SplitSource>,
}

impl SplitWriter {
    fn create(
        dir: &Path,
        dtype: Dtype,
        shard_tokens: u64,
        inputs: usize,
        chat: bool,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            dtype,
            shard_tokens,
            shard: None,
            mask: None,
            chat: chat.then(ChatSplitMeta::default),
            shards: Vec::new(),
            documents: ArrayWriter::create(&dir.join(DOCUMENTS_FILE), Dtype::U64)?,
            tokens: 0,
            bytes: 0,
            per_input: vec![SplitSource::default(); inputs],
        })
    }

    /// Appends a piece's tokens (and end-of-text, never trained on, after a document's
    /// last piece).
    fn push(
        &mut self,
        piece: &Piece,
        input: usize,
        encoded: &Encoded,
        tokenizer: &TextTokenizer,
    ) -> Result<()> {
        let counts = &mut self.per_input[input];
        if piece.first {
            self.documents.extend([self.tokens])?;
            counts.documents += 1;
        }
        counts.bytes += piece.text.len() as u64;
        self.bytes += piece.text.len() as u64;
        let eot = tokenizer.end_of_text().filter(|_| piece.last);
        let added = encoded.ids.len() as u64 + u64::from(eot.is_some());
        counts.tokens += added;
        let mask = encoded.mask.as_deref().unwrap_or_default();
        if let Some(chat) = &mut self.chat {
            let trained = encoded.ids.iter().zip(mask).filter(|&(_, &m)| m == 1);
            for (&id, _) in trained {
                chat.trained_tokens += 1;
                chat.trained_bytes += u64::from(tokenizer.token_bytes()[id as usize]);
            }
        }
        let masks = mask.iter().copied().chain(std::iter::repeat(0));
        self.write(encoded.ids.iter().copied().chain(eot).zip(masks))
    }

    /// Appends `(token, mask)` pairs; the mask is written for chat data only.
    fn write(&mut self, tokens: impl Iterator<Item = (u32, u8)>) -> Result<()> {
        for (id, mask) in tokens {
            if self
                .shard
                .as_ref()
                .is_none_or(|s| s.len() >= self.shard_tokens)
            {
                self.open_shard()?;
            }
            if let Some(shard) = &mut self.shard {
                shard.extend([u64::from(id)])?;
            }
            if let Some(mask_file) = &mut self.mask {
                mask_file.extend([u64::from(mask)])?;
            }
            self.tokens += 1;
        }
        Ok(())
    }

    fn open_shard(&mut self) -> Result<()> {
        self.close_shard()?;
        let file = format!("{:05}.bin", self.shards.len());
        if self.chat.is_some() {
            let path = self.dir.join(mask_file(&file));
            self.mask = Some(ArrayWriter::create(&path, Dtype::U8)?);
        }
        self.shard = Some(ArrayWriter::create(&self.dir.join(&file), self.dtype)?);
        self.shards.push(ShardMeta { file, tokens: 0 });
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let (Some(shard), Some(meta)) = (self.shard.take(), self.shards.last_mut()) {
            meta.tokens = shard.finish()?;
        }
        if let Some(mask) = self.mask.take() {
            mask.finish()?;
        }
        Ok(())
    }

    fn finish(mut self, labels: &[String]) -> Result<SplitMeta> {
        self.close_shard()?;
        let documents = self.documents.finish()?;
        let sources = self
            .per_input
            .into_iter()
            .zip(labels)
            .map(|(counts, input)| SplitSource {
                input: input.clone(),
                ..counts
            })
            .collect();
        Ok(SplitMeta {
            chat: self.chat,
            tokens: self.tokens,
            documents,
            bytes: self.bytes,
            shards: self.shards,
            sources,
        })
    }
}

/// The output directory while it is written: `.<name>.partial-<pid>` beside it, removed
/// unless [`Staging::publish`] renames it into place.
struct Staging {
    path: PathBuf,
    target: PathBuf,
    published: bool,
}

impl Staging {
    fn new(target: &Path) -> Result<Self> {
        let name = target
            .file_name()
            .with_context(|| format!("`{}` has no directory name", target.display()))?;
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let path = parent.join(format!(
            ".{}.partial-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        if path.exists() {
            std::fs::remove_dir_all(&path).ok();
        }
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            path,
            target: target.to_path_buf(),
            published: false,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn publish(mut self) -> Result<()> {
        if self.target.exists() {
            bail!(
                "`{}` appeared while it was being prepared",
                self.target.display()
            );
        }
        std::fs::rename(&self.path, &self.target).with_context(|| {
            format!(
                "renaming {} to {}",
                self.path.display(),
                self.target.display()
            )
        })?;
        self.published = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            std::fs::remove_dir_all(&self.path).ok();
        }
    }
}
