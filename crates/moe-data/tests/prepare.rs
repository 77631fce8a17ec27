//! `moe data prepare` and prepared sets: every source kind round-trips, the split and the
//! windows are seeded functions, the cache is reused, and every bad input is an error that
//! names it, with nothing half-written left behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use moe_data::{
    DirectorySettings, EvalWindows, LossOn, PrepareOptions, PreparedSet, Progress, TextTokenizer,
    TokenSplit, TokenizerChoice, TrainWindows, ValidationSplit, WeightedSplit, cached_directory,
    prepare,
};

fn options(inputs: Vec<PathBuf>, out: PathBuf) -> PrepareOptions {
    let mut options = PrepareOptions::new(inputs, out);
    options.tokenizer = TokenizerChoice::Bytes;
    options.validation = ValidationSplit::Documents(1);
    options
}

/// Every document of a split, decoded, without its end-of-text token.
fn documents(split: &TokenSplit, tokenizer: &TextTokenizer) -> Vec<String> {
    (0..split.documents())
        .map(|d| {
            let range = split.document(d);
            let mut ids = split.tokens(range.start, (range.end - range.start) as usize);
            if let Some(eot) = tokenizer.end_of_text() {
                assert_eq!(ids.pop(), Some(eot), "every document ends with end-of-text");
                assert!(!ids.contains(&eot));
            }
            tokenizer.decode(&ids).unwrap()
        })
        .collect()
}

/// All documents of a set, sorted.
fn all_documents(set: &PreparedSet) -> Vec<String> {
    let mut docs = documents(&set.train, &set.tokenizer);
    docs.extend(documents(&set.val, &set.tokenizer));
    docs.sort();
    docs
}

fn sorted(texts: &[&str]) -> Vec<String> {
    let mut texts: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
    texts.sort();
    texts
}

/// Nothing but the listed entries (no partial directory) in `dir`.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_text_directory_round_trips_across_pieces_and_shards() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("corpus");
    std::fs::create_dir_all(data.join("nested")).unwrap();
    // Longer than two pieces, so it is cut (after a newline) and read back whole.
    let long: String = (0..60_000)
        .map(|i| format!("line {i}: the quick brown fox, café\n"))
        .collect();
    let texts = ["first work\n", "second work", long.as_str(), "nested work"];
    std::fs::write(data.join("a.txt"), texts[0]).unwrap();
    std::fs::write(data.join("b.txt"), texts[1]).unwrap();
    std::fs::write(data.join("c.txt"), texts[2]).unwrap();
    std::fs::write(data.join("nested/d.txt"), texts[3]).unwrap();
    std::fs::write(data.join("notes.md"), "not read").unwrap();
    std::fs::write(data.join("empty.txt"), "").unwrap();
    let out = dir.path().join("prepared");
    let mut opts = options(vec![data.clone()], out.clone());
    opts.shard_tokens = 100_000;
    let meta = prepare(&opts, &mut |_| {}).unwrap();

    assert_eq!(meta.train.documents + meta.val.documents, 4);
    assert_eq!(meta.val.documents, 1);
    assert_eq!(
        meta.sources[0].empty, 1,
        "the empty file is counted, not kept"
    );
    assert!(meta.train.shards.len() > 1, "{:?}", meta.train.shards);
    let bytes: u64 = texts.iter().map(|t| t.len() as u64).sum();
    assert_eq!(meta.train.bytes + meta.val.bytes, bytes);
    let set = PreparedSet::open(&out).unwrap();
    assert_eq!(all_documents(&set), sorted(&texts));
    // A window across a shard boundary reads both shards.
    let boundary = meta.train.shards[0].tokens;
    let window = set.train.tokens(boundary - 3, 6);
    assert_eq!(window.len(), 6);
    assert_eq!(entries(dir.path()), ["corpus", "prepared"]);
}

#[test]
fn json_lines_plain_and_gzipped_round_trip_with_a_trained_bpe() {
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<String> = (0..40)
        .map(|i| {
            format!(
                "Record {i}: \"quoted\" text with a newline\nand ünïcode {}",
                i * 7
            )
        })
        .collect();
    let lines: Vec<String> = records
        .iter()
        .map(|r| serde_json::json!({ "id": 1, "body": r }).to_string() + "\n")
        .collect();
    let plain = dir.path().join("a.jsonl");
    std::fs::write(&plain, lines[..20].concat()).unwrap();
    let gz = dir.path().join("b.jsonl.gz");
    let mut encoder =
        flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), Default::default());
    encoder.write_all(lines[20..].concat().as_bytes()).unwrap();
    encoder.finish().unwrap();

    let out = dir.path().join("prepared");
    let mut opts = options(vec![plain, gz], out.clone());
    opts.text_field = "body".into();
    opts.tokenizer = TokenizerChoice::TrainBpe { vocab_size: 320 };
    opts.validation = ValidationSplit::Fraction(0.1);
    let meta = prepare(&opts, &mut |_| {}).unwrap();
    assert_eq!(meta.val.documents, 4, "10% of 40 documents");
    assert_eq!(meta.vocab_size, 320);
    assert_eq!(meta.sources.len(), 2);
    assert_eq!(meta.sources[0].documents + meta.sources[1].documents, 40);
    let set = PreparedSet::open(&out).unwrap();
    let texts: Vec<&str> = records.iter().map(String::as_str).collect();
    assert_eq!(all_documents(&set), sorted(&texts));
    assert!(
        set.meta.train.tokens < set.meta.train.bytes,
        "the BPE merges bytes"
    );
}

/// Writes a parquet file with a string column `text` (one null) and an int column `n`.
fn write_parquet(path: &Path, texts: &[Option<&str>]) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message doc { optional binary text (UTF8); required int64 n; }",
        )
        .unwrap(),
    );
    let props = Arc::new(WriterProperties::builder().build());
    let mut writer =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    let values: Vec<ByteArray> = texts
        .iter()
        .flatten()
        .map(|t| ByteArray::from(*t))
        .collect();
    let levels: Vec<i16> = texts.iter().map(|t| i16::from(t.is_some())).collect();
    let mut column = group.next_column().unwrap().unwrap();
    column
        .typed::<ByteArrayType>()
        .write_batch(&values, Some(&levels), None)
        .unwrap();
    column.close().unwrap();
    let mut column = group.next_column().unwrap().unwrap();
    let numbers: Vec<i64> = (0..texts.len() as i64).collect();
    column
        .typed::<Int64Type>()
        .write_batch(&numbers, None, None)
        .unwrap();
    column.close().unwrap();
    group.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn parquet_round_trips_and_skips_nulls() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.parquet");
    let texts = [
        Some("row one"),
        None,
        Some("row two"),
        Some("row three"),
        Some(""),
    ];
    write_parquet(&path, &texts);
    let out = dir.path().join("prepared");
    let meta = prepare(&options(vec![path.clone()], out.clone()), &mut |_| {}).unwrap();
    assert_eq!(meta.sources[0].documents, 3);
    assert_eq!(meta.sources[0].empty, 2, "the null and the empty row");
    let set = PreparedSet::open(&out).unwrap();
    assert_eq!(
        all_documents(&set),
        sorted(&["row one", "row two", "row three"])
    );

    let mut opts = options(vec![path], dir.path().join("by-number"));
    opts.text_field = "n".into();
    let err = format!("{:#}", prepare(&opts, &mut |_| {}).unwrap_err());
    assert!(
        err.contains("rows.parquet") && err.contains("`n`") && err.contains("not a string"),
        "{err}"
    );
    opts.text_field = "missing".into();
    let err = format!("{:#}", prepare(&opts, &mut |_| {}).unwrap_err());
    assert!(
        err.contains("no column `missing`") && err.contains("text, n"),
        "{err}"
    );
}

#[test]
fn invalid_utf8_is_replaced_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), b"good \xff text \xc3").unwrap();
    std::fs::write(dir.path().join("b.txt"), "clean").unwrap();
    let out = dir.path().join("prepared");
    let meta = prepare(&options(vec![dir.path().into()], out.clone()), &mut |_| {}).unwrap();
    assert_eq!(meta.invalid_utf8, 2, "two invalid sequences");
    let set = PreparedSet::open(&out).unwrap();
    assert_eq!(
        all_documents(&set),
        sorted(&["clean", "good \u{FFFD} text \u{FFFD}"])
    );

    // A NUL byte marks binary data: the file is refused by name, not trained on.
    std::fs::write(dir.path().join("c.txt"), b"looks like text\0\x01\x02").unwrap();
    let again = dir.path().join("again");
    let err = prepare(&options(vec![dir.path().into()], again), &mut |_| {}).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("c.txt") && err.contains("NUL byte at offset 15"),
        "{err}"
    );
}

#[test]
fn named_works_are_held_out_and_a_missing_one_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("works");
    std::fs::create_dir(&data).unwrap();
    for name in ["a", "b", "c"] {
        std::fs::write(data.join(format!("{name}.txt")), format!("text of {name}")).unwrap();
    }
    let mut opts = options(vec![data.clone()], dir.path().join("out"));
    opts.validation = ValidationSplit::Named(vec!["b".into()]);
    prepare(&opts, &mut |_| {}).unwrap();
    let set = PreparedSet::open(&dir.path().join("out")).unwrap();
    assert_eq!(documents(&set.val, &set.tokenizer), ["text of b"]);
    assert_eq!(
        documents(&set.train, &set.tokenizer),
        ["text of a", "text of c"]
    );

    opts.out = dir.path().join("other");
    opts.validation = ValidationSplit::Named(vec!["missing".into()]);
    let err = format!("{:#}", prepare(&opts, &mut |_| {}).unwrap_err());
    assert!(err.contains("`missing`"), "{err}");
    assert_eq!(
        entries(dir.path()),
        ["out", "works"],
        "nothing half-written"
    );
}

#[test]
fn bad_inputs_are_errors_that_name_them() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let good = write("good.jsonl", "{\"text\": \"a\"}\n{\"text\": \"b\"}\n");
    let cases: Vec<(Vec<PathBuf>, &str)> = vec![
        (
            vec![dir.path().join("nope.txt")],
            "nope.txt` does not exist",
        ),
        (
            vec![write("data.csv", "a,b")],
            "data.csv`: unsupported input",
        ),
        (
            vec![write("broken.jsonl", "{\"text\": \"a\"}\n{not json\n")],
            "broken.jsonl:2: not a JSON object",
        ),
        (
            vec![write(
                "other.jsonl",
                "{\"text\": \"a\"}\n\n{\"body\": \"b\"}\n",
            )],
            "other.jsonl:3: no field `text` (fields: body)",
        ),
        (
            vec![write("number.jsonl", "{\"text\": 3}\n")],
            "number.jsonl:1: field `text` is a number, not a string",
        ),
        (
            vec![write("empty1.txt", ""), write("empty2.txt", "")],
            "every document is empty",
        ),
        (
            vec![write("single.txt", "only one document")],
            "1 document(s) cannot give 1 for validation",
        ),
        (
            vec![good.clone(), write("plain.gz", "x")],
            "plain.gz`: unsupported",
        ),
    ];
    for (i, (inputs, expected)) in cases.into_iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        let err = format!(
            "{:#}",
            prepare(&options(inputs, out.clone()), &mut |_| {}).unwrap_err()
        );
        assert!(
            err.contains(expected),
            "case {i}: `{err}` lacks `{expected}`"
        );
        assert!(!out.exists(), "case {i}: half-written output");
    }
    let gz = write("bad.jsonl.gz", "this is not gzip");
    let err = format!(
        "{:#}",
        prepare(&options(vec![gz], dir.path().join("gz")), &mut |_| {}).unwrap_err()
    );
    assert!(err.contains("bad.jsonl.gz"), "{err}");

    // An existing output is never overwritten.
    let out = dir.path().join("exists");
    std::fs::create_dir(&out).unwrap();
    let err = prepare(&options(vec![good], out), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    assert!(
        entries(dir.path()).iter().all(|e| !e.contains("partial")),
        "{:?}",
        entries(dir.path())
    );
}

/// A prepared set of `docs` documents of bytes, for the corruption and window tests.
fn small_set(dir: &Path, docs: usize, len: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let data = dir.join("docs.jsonl");
    let lines: String = (0..docs)
        .map(|d| {
            let text: String = (0..len)
                .map(|i| (b'a' + ((d + i) % 26) as u8) as char)
                .collect();
            serde_json::json!({ "text": text }).to_string() + "\n"
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let out = dir.join("set");
    let mut opts = options(vec![data], out.clone());
    opts.validation = ValidationSplit::Documents(2);
    opts.shard_tokens = 1000;
    prepare(&opts, &mut |_| {}).unwrap();
    out
}

#[test]
fn a_corrupted_set_is_refused_on_open_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let set = small_set(dir.path(), 10, 300);
    let shard = set.join("train/00001.bin");
    let bytes = std::fs::read(&shard).unwrap();
    let copy = |name: &str| {
        let to = dir.path().join(name);
        let status = std::process::Command::new("cp")
            .arg("-r")
            .arg(&set)
            .arg(&to)
            .status()
            .unwrap();
        assert!(status.success());
        to
    };

    let truncated = copy("truncated");
    std::fs::write(
        truncated.join("train/00001.bin"),
        &bytes[..bytes.len() - 10],
    )
    .unwrap();
    let err = format!("{:#}", PreparedSet::open(&truncated).unwrap_err());
    assert!(err.contains("00001.bin is truncated"), "{err}");

    let foreign = copy("foreign");
    let mut wrong = bytes.clone();
    wrong[..8].copy_from_slice(b"NOTMAGIC");
    std::fs::write(foreign.join("train/00001.bin"), wrong).unwrap();
    let err = format!("{:#}", PreparedSet::open(&foreign).unwrap_err());
    assert!(err.contains("00001.bin is not a token file"), "{err}");

    let retokenized = copy("retokenized");
    let other = TextTokenizer::train_bpe(&["some other text to train on"], 270).unwrap();
    other.save(&retokenized.join("tokenizer.json")).unwrap();
    let err = format!("{:#}", PreparedSet::open(&retokenized).unwrap_err());
    assert!(
        err.contains("does not match the tokenizer recorded"),
        "{err}"
    );

    let err = format!(
        "{:#}",
        PreparedSet::open(&dir.path().join("absent")).unwrap_err()
    );
    assert!(err.contains("does not exist"), "{err}");
    PreparedSet::open(&set).expect("the original still opens");
}

#[test]
fn training_windows_are_a_seeded_function_of_the_batch_index() {
    let dir = tempfile::tempdir().unwrap();
    let set = PreparedSet::open(&small_set(dir.path(), 20, 500)).unwrap();
    let split = WeightedSplit {
        split: set.train.clone(),
        weight: 1.0,
    };
    let seq_len = 16;
    let windows = TrainWindows::new(std::slice::from_ref(&split), seq_len, 4, 7).unwrap();
    let again = TrainWindows::new(std::slice::from_ref(&split), seq_len, 4, 7).unwrap();
    let other_seed = TrainWindows::new(std::slice::from_ref(&split), seq_len, 4, 8).unwrap();
    assert_eq!(
        windows.batch(123),
        again.batch(123),
        "same seed, same batch"
    );
    assert_ne!(windows.batch(0), other_seed.batch(0));
    // Within an epoch no window repeats, and each is a run of the split's tokens.
    let per_epoch = (set.train.len() as usize - seq_len) / seq_len;
    let mut starts: Vec<u64> = (0..per_epoch as u64).map(|g| windows.locate(g).1).collect();
    for &start in &starts {
        assert_eq!(start % seq_len as u64, 0, "epoch 0 reads aligned windows");
    }
    starts.sort_unstable();
    starts.dedup();
    assert_eq!(starts.len(), per_epoch);
    let (_, start) = windows.locate(5);
    let batch = windows.batch(1);
    assert_eq!(batch[1].tokens, set.train.tokens(start, seq_len + 1));
    assert!(
        batch
            .iter()
            .all(|w| w.tokens.len() == seq_len + 1 && w.mask.is_none())
    );
    // The next epoch reads at another offset.
    assert_ne!(windows.locate(per_epoch as u64).1 % seq_len as u64, 0);
}

#[test]
fn a_mixture_draws_its_sources_by_weight() {
    let dir = tempfile::tempdir().unwrap();
    let a = PreparedSet::open(&small_set(&dir.path().join("a"), 10, 400)).unwrap();
    let b = PreparedSet::open(&small_set(&dir.path().join("b"), 10, 400)).unwrap();
    let splits = [
        WeightedSplit {
            split: a.train.clone(),
            weight: 0.7,
        },
        WeightedSplit {
            split: b.train.clone(),
            weight: 0.3,
        },
    ];
    let windows = TrainWindows::new(&splits, 16, 8, 1).unwrap();
    let shares = windows.proportions(2000);
    assert!((shares[0] - 0.7).abs() < 0.02, "{shares:?}");
    assert!((shares[1] - 0.3).abs() < 0.02, "{shares:?}");
    let err = TrainWindows::new(
        &[WeightedSplit {
            split: a.train.clone(),
            weight: 0.0,
        }],
        16,
        8,
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("weight 0 must be positive"), "{err}");
}

#[test]
fn fixed_eval_windows_spread_over_the_split_and_full_covers_it() {
    let dir = tempfile::tempdir().unwrap();
    let set = PreparedSet::open(&small_set(dir.path(), 12, 2000)).unwrap();
    let seq_len = 32;
    let all = (set.val.len() as usize - 1) / seq_len;
    let full = EvalWindows::full(std::slice::from_ref(&set.val), seq_len, LossOn::All);
    assert_eq!(full.len(), all);
    let weighted = WeightedSplit {
        split: set.val.clone(),
        weight: 1.0,
    };
    let fixed = EvalWindows::fixed(
        std::slice::from_ref(&weighted),
        seq_len,
        10 * seq_len,
        LossOn::All,
    );
    assert_eq!(fixed.len(), 10);
    let (windows, bytes) = fixed.batch(0..10);
    assert_eq!(windows[0].tokens, set.val.tokens(0, seq_len + 1));
    let last_start = (9 * all / 10 * seq_len) as u64;
    assert_eq!(windows[9].tokens, set.val.tokens(last_start, seq_len + 1));
    assert!(
        last_start > set.val.len() * 8 / 10,
        "the windows reach the end"
    );
    let expected = 10.0 * seq_len as f64 * set.meta.val.bytes_per_token();
    assert!((bytes - expected).abs() < 1e-6, "{bytes} vs {expected}");
    assert_eq!(
        fixed.batch(0..10).0,
        EvalWindows::fixed(&[weighted], seq_len, 10 * seq_len, LossOn::All)
            .batch(0..10)
            .0,
        "the same windows every time"
    );
}

#[test]
fn a_cached_directory_is_prepared_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("works");
    std::fs::create_dir(&data).unwrap();
    for (name, text) in [("a", "to be or not to be "), ("b", "that is the question ")] {
        std::fs::write(data.join(format!("{name}.txt")), text.repeat(50)).unwrap();
    }
    let cache = dir.path().join("cache");
    let settings = DirectorySettings {
        dir: data.clone(),
        tokenizer: TokenizerChoice::TrainBpe { vocab_size: 300 },
        validation: ValidationSplit::Named(vec!["b".into()]),
        seed: 0,
    };
    let trained = std::cell::Cell::new(0);
    let mut count = |p: Progress| {
        if matches!(p, Progress::TrainingTokenizer { .. }) {
            trained.set(trained.get() + 1);
        }
    };
    let first = cached_directory(&settings, &cache, &mut count).unwrap();
    let second = cached_directory(&settings, &cache, &mut count).unwrap();
    assert_eq!(trained.get(), 1, "the second run trains no tokenizer");
    assert_eq!(first.dir, second.dir);
    assert_eq!(entries(&cache).len(), 1);
    // Other content is another entry.
    std::fs::write(data.join("a.txt"), "changed ".repeat(60)).unwrap();
    let third = cached_directory(&settings, &cache, &mut count).unwrap();
    assert_ne!(third.dir, first.dir);
    assert_eq!(trained.get(), 2);
}
