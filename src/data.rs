//! `moe data`: prepare documents into token shards once, and inspect a prepared set.

use std::path::PathBuf;

use anyhow::{Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use moe_data::{
    Meta, Overlong, PrepareOptions, PreparedSet, Progress, TokenizerChoice, ValidationSplit,
    prepare,
};

/// `moe data`.
#[derive(clap::Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(clap::Subcommand, Debug)]
enum DataCommand {
    /// Tokenize text, JSON lines or parquet (or conversations, `--format chat`) once into
    /// memory-mapped token shards.
    Prepare(PrepareArgs),
    /// Print what a prepared set holds.
    Inspect(InspectArgs),
}

#[derive(clap::Args, Debug)]
struct PrepareArgs {
    /// A .txt file (one document), a directory (searched recursively), a .jsonl or
    /// .jsonl.gz file, a .parquet file, or - for standard input. Repeatable; the inputs
    /// are mixed into one set.
    #[arg(long = "input", value_name = "PATH", required = true, num_args = 1..)]
    inputs: Vec<PathBuf>,
    /// The directory to create (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// What the inputs hold: `text` (documents), or `chat`: JSON lines of OpenAI
    /// `messages` (system / user / assistant, optional `"train": false` per message),
    /// rendered with the tokenizer's chat template, with a loss mask on the answers.
    #[arg(long, default_value = "text", value_parser = ["text", "chat"])]
    format: String,
    /// Chat: conversations longer than this many tokens are truncated or dropped
    /// (see --overlong); set it to the training window (data.seq_len + 1).
    #[arg(long, value_name = "N")]
    max_tokens: Option<usize>,
    /// Chat: what happens to a conversation over --max-tokens: `drop` or `truncate`.
    #[arg(long, default_value = "drop", value_parser = parse_overlong)]
    overlong: Overlong,
    /// The JSON field or parquet column that holds the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Standard input holds JSON lines (else it is one plain-text document).
    #[arg(long)]
    stdin_jsonl: bool,
    /// A Hugging Face tokenizer.json to use (e.g. a checkpoint's) instead of training one.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["vocab_size", "byte_tokenizer"])]
    tokenizer: Option<PathBuf>,
    /// Vocabulary of the byte-level BPE trained on the training documents.
    #[arg(long)]
    vocab_size: Option<usize>,
    /// One token per byte (vocabulary 256) instead of a BPE.
    #[arg(long, conflicts_with = "vocab_size")]
    byte_tokenizer: bool,
    /// Bytes of text the BPE is trained on at most: a seeded sample of the input.
    #[arg(long, default_value_t = 100_000_000)]
    tokenizer_sample_bytes: u64,
    /// Share of the documents held out for validation (at least one) [default: 0.01].
    #[arg(long, conflicts_with = "val_docs")]
    val_fraction: Option<f64>,
    /// Number of documents held out for validation.
    #[arg(long)]
    val_docs: Option<u64>,
    /// Seed of the validation split and the tokenizer's sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokens per shard file at most.
    #[arg(long, default_value_t = 1 << 28)]
    shard_tokens: u64,
}

#[derive(clap::Args, Debug)]
struct InspectArgs {
    /// A directory written by `moe data prepare`.
    dir: PathBuf,
    /// Print meta.json instead of a summary.
    #[arg(long)]
    json: bool,
}

/// Runs `moe data ...`.
pub fn run(args: DataArgs) -> Result<()> {
    match args.command {
        DataCommand::Prepare(args) => run_prepare(args),
        DataCommand::Inspect(args) => run_inspect(args),
    }
}

fn run_prepare(args: PrepareArgs) -> Result<()> {
    let mut options = PrepareOptions::new(args.inputs, args.out);
    options.text_field = args.text_field;
    options.stdin_jsonl = args.stdin_jsonl || args.format == "chat";
    options.chat = args.format == "chat";
    options.max_tokens = args.max_tokens;
    options.overlong = args.overlong;
    options.tokenizer = match (args.tokenizer, args.byte_tokenizer, args.vocab_size) {
        (Some(file), _, _) => TokenizerChoice::File(file),
        (None, true, _) => TokenizerChoice::Bytes,
        (None, false, Some(vocab_size)) => TokenizerChoice::TrainBpe { vocab_size },
        (None, false, None) => options.tokenizer,
    };
    if args.tokenizer_sample_bytes == 0 {
        bail!("--tokenizer-sample-bytes must be positive");
    }
    options.tokenizer_sample_bytes = args.tokenizer_sample_bytes;
    options.validation = match (args.val_fraction, args.val_docs) {
        (Some(fraction), _) => ValidationSplit::Fraction(fraction),
        (None, Some(docs)) => ValidationSplit::Documents(docs),
        (None, None) => options.validation,
    };
    options.seed = args.seed;
    if args.shard_tokens == 0 {
        bail!("--shard-tokens must be positive");
    }
    options.shard_tokens = args.shard_tokens;
    options.command = std::env::args().collect::<Vec<_>>().join(" ");

    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {binary_bytes} ({binary_bytes_per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let bytes_style = ProgressStyle::with_template(
        "tokenizing [{bar:30}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, ETA {eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    let started = std::time::Instant::now();
    let meta = prepare(&options, &mut |progress| match progress {
        Progress::Scanning { bytes } => {
            bar.set_message("reading");
            bar.set_position(bytes);
        }
        Progress::TrainingTokenizer { bytes } => {
            bar.set_message(format!("training the tokenizer on {bytes} bytes of text"));
            bar.tick();
        }
        Progress::Tokenizing { done, total } => {
            if bar.length() != Some(total) {
                bar.set_style(bytes_style.clone());
                bar.set_length(total);
                bar.reset_eta();
            }
            bar.set_position(done);
        }
    });
    bar.finish_and_clear();
    let meta = meta?;
    let secs = started.elapsed().as_secs_f64();
    let bytes = meta.train.bytes + meta.val.bytes;
    eprintln!(
        "prepared {} in {secs:.1}s ({:.1} MB/s of text)",
        options.out.display(),
        bytes as f64 / 1e6 / secs.max(1e-9)
    );
    print_summary(&options.out.display().to_string(), &meta);
    Ok(())
}

fn parse_overlong(name: &str) -> Result<Overlong, String> {
    name.parse()
}

fn run_inspect(args: InspectArgs) -> Result<()> {
    let set = PreparedSet::open(&args.dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&set.meta)?);
        return Ok(());
    }
    print_summary(&args.dir.display().to_string(), &set.meta);
    if set.train.documents() > 0 {
        let range = set.train.document(0);
        let len = (range.end - range.start).min(64) as usize;
        let text = set.tokenizer.decode(&set.train.tokens(range.start, len))?;
        println!("first training document begins: {text:?}");
    }
    Ok(())
}

fn print_summary(dir: &str, meta: &Meta) {
    println!("prepared set  {dir}");
    println!(
        "tokenizer     {} tokens (sha256 {}), stored as {:?}, end-of-text {}",
        meta.vocab_size,
        &meta.tokenizer_sha256[..16.min(meta.tokenizer_sha256.len())],
        meta.dtype,
        meta.end_of_text
            .map_or("none".to_string(), |id| format!("id {id}"))
    );
    for (name, split) in [("train", &meta.train), ("val", &meta.val)] {
        println!(
            "{name:<6}        {} tokens, {} documents, {} bytes ({:.2} bytes/token), {} shard(s)",
            split.tokens,
            split.documents,
            split.bytes,
            split.bytes_per_token(),
            split.shards.len()
        );
    }
    if let Some(chat) = &meta.chat {
        let added = match chat.added_tokens.is_empty() {
            true => "none".to_string(),
            false => chat.added_tokens.join(" "),
        };
        println!("chat          conversations, loss on the answers; special tokens added: {added}");
    }
    for (name, split) in [("train", &meta.train), ("val", &meta.val)] {
        if let Some(chat) = &split.chat {
            println!(
                "{name:<6}        {} answer tokens; {} conversations truncated, {} dropped (over --max-tokens)",
                chat.trained_tokens, chat.truncated, chat.dropped
            );
        }
    }
    for source in &meta.sources {
        println!(
            "source        {}: {} documents, {} empty skipped, {} invalid UTF-8 replaced",
            source.input, source.documents, source.empty, source.invalid_utf8
        );
    }
    println!("made by       {}", meta.command);
}
