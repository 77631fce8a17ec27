//! `moe data prepare`: tokenizes documents once into memory-mappable shards.
//!
//! Two passes over the input. The first counts the documents and keeps a bounded, seeded
//! sample of text for training a tokenizer; the validation documents are then drawn with
//! the seed. The second tokenizes in parallel batches and appends each document, followed
//! by the end-of-text token, to its split's shards. Everything is written under a
//! temporary name beside the output and renamed when complete.

use std::collections::{BinaryHeap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use rayon::prelude::*;

use crate::array_file::{ArrayWriter, Dtype};
use crate::meta::{
    DOCUMENTS_FILE, FORMAT, META_FILE, Meta, ShardMeta, SourceMeta, SplitMeta, SplitSource,
    TOKENIZER_FILE,
};
use crate::sources::{FileCounts, Piece, SourceFile, SourceKind, expand_inputs, read_pieces};
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

    let mut scan = scan(options, &files, progress)?;
    ensure!(
        scan.documents() > 0,
        "no text in {}: every document is empty",
        describe_inputs(&options.inputs)
    );
    let validation = pick_validation(options, &files, &scan)?;
    let tokenizer = build_tokenizer(&options.tokenizer, &scan, &validation, progress)?;
    scan.sample = Vec::new();
    let labels: Vec<String> = options
        .inputs
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let pass = Tokenizing {
        options,
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
    Ok(())
}

/// The tokenizer `choice` names; a BPE is trained on the scan's sample less the
/// validation documents.
fn build_tokenizer(
    choice: &TokenizerChoice,
    scan: &Scan,
    validation: &HashSet<u64>,
    progress: &mut dyn FnMut(Progress),
) -> Result<TextTokenizer> {
    match choice {
        TokenizerChoice::File(path) => TextTokenizer::load(path),
        TokenizerChoice::Given(tokenizer) => Ok(tokenizer.as_ref().clone()),
        TokenizerChoice::Bytes => TextTokenizer::bytes(),
        TokenizerChoice::TrainBpe { vocab_size } => {
            let sample: Vec<&str> = scan
                .sample
                .iter()
                .filter(|s| !validation.contains(&s.doc))
                .map(|s| s.text.as_str())
                .collect();
            let bytes = sample.iter().map(|t| t.len() as u64).sum();
            progress(Progress::TrainingTokenizer { bytes });
            TextTokenizer::train_bpe(&sample, *vocab_size)
        }
    }
}

/// The second pass: every document tokenized, in batches encoded in parallel, into the
/// training or the validation split.
struct Tokenizing<'a> {
    options: &'a PrepareOptions,
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
            )
        };
        let mut splits = (split("train")?, split("val")?);
        let mut batch: Vec<(Piece, usize)> = Vec::new();
        let (mut batch_bytes, mut done, mut first_doc) = (0usize, 0u64, 0u64);
        for file in files {
            let counts = read_pieces(file, &self.options.text_field, first_doc, &mut |piece| {
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
        let encoded: Vec<Result<Vec<u32>>> = batch
            .par_iter()
            .map(|(piece, _)| self.tokenizer.encode(&piece.text))
            .collect();
        let mut bytes = 0;
        for ((piece, input), ids) in batch.drain(..).zip(encoded) {
            let split = if self.validation.contains(&piece.doc) {
                &mut *val
            } else {
                &mut *train
            };
            split.push(&piece, input, &ids?, self.tokenizer.end_of_text())?;
            bytes += piece.text.len() as u64;
        }
        Ok(bytes)
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

fn scan(
    options: &PrepareOptions,
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
        let counts = read_pieces(file, &options.text_field, first_doc, &mut |piece| {
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
    shards: Vec<ShardMeta>,
    documents: ArrayWriter,
    tokens: u64,
    bytes: u64,
    per_input: Vec<SplitSource>,
}

impl SplitWriter {
    fn create(dir: &Path, dtype: Dtype, shard_tokens: u64, inputs: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            dtype,
            shard_tokens,
            shard: None,
            shards: Vec::new(),
            documents: ArrayWriter::create(&dir.join(DOCUMENTS_FILE), Dtype::U64)?,
            tokens: 0,
            bytes: 0,
            per_input: vec![SplitSource::default(); inputs],
        })
    }

    /// Appends a piece's tokens (and end-of-text after a document's last piece).
    fn push(&mut self, piece: &Piece, input: usize, ids: &[u32], eot: Option<u32>) -> Result<()> {
        let counts = &mut self.per_input[input];
        if piece.first {
            self.documents.extend([self.tokens])?;
            counts.documents += 1;
        }
        counts.bytes += piece.text.len() as u64;
        self.bytes += piece.text.len() as u64;
        let eot = eot.filter(|_| piece.last);
        let added = ids.len() as u64 + u64::from(eot.is_some());
        counts.tokens += added;
        self.write(ids.iter().copied().chain(eot))
    }

    fn write(&mut self, ids: impl Iterator<Item = u32>) -> Result<()> {
        for id in ids {
            let shard = match &mut self.shard {
                Some(shard) if shard.len() < self.shard_tokens => shard,
                _ => {
                    self.close_shard()?;
                    let file = format!("{:05}.bin", self.shards.len());
                    self.shards.push(ShardMeta {
                        file: file.clone(),
                        tokens: 0,
                    });
                    self.shard
                        .insert(ArrayWriter::create(&self.dir.join(file), self.dtype)?)
                }
            };
            shard.extend([u64::from(id)])?;
            self.tokens += 1;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let (Some(shard), Some(meta)) = (self.shard.take(), self.shards.last_mut()) {
            meta.tokens = shard.finish()?;
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
