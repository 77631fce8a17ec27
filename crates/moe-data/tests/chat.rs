//! Chat data: `moe data prepare --format chat` renders conversations with the tokenizer's
//! template, masks everything but the answers, packs conversations into windows, adds
//! missing template tokens to a given tokenizer, and names every bad record.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moe_data::{
    EvalWindows, IM_END, IM_START, LossOn, Message, Overlong, PrepareOptions, PreparedSet,
    TextTokenizer, TokenizerChoice, TrainWindows, ValidationSplit, WeightedSplit, prepare,
};

fn conversation(question: &str, answer: &str) -> String {
    serde_json::json!({"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]})
    .to_string()
}

fn write_jsonl(dir: &Path, lines: &[String]) -> PathBuf {
    let path = dir.join("chat.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn chat_options(input: PathBuf, out: PathBuf, tokenizer: TokenizerChoice) -> PrepareOptions {
    let mut options = PrepareOptions::new(vec![input], out);
    options.chat = true;
    options.tokenizer = tokenizer;
    options.validation = ValidationSplit::Documents(1);
    options
}

fn qa_lines(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| conversation(&format!("What is {i} plus one?"), &format!("{}", i + 1)))
        .collect()
}

#[test]
fn only_the_answers_and_their_end_of_turn_are_trained_on() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_jsonl(dir.path(), &qa_lines(12));
    let out = dir.path().join("set");
    let tokenizer = TokenizerChoice::TrainBpe { vocab_size: 300 };
    let meta = prepare(&chat_options(input, out.clone(), tokenizer), &mut |_| {}).unwrap();
    let chat = meta.chat.as_ref().expect("chat data says so");
    assert!(
        chat.added_tokens.is_empty(),
        "a trained BPE has the markers"
    );
    let set = PreparedSet::open(&out).unwrap();
    let tokenizer = &set.tokenizer;
    let im_end = tokenizer.token_id(IM_END).expect("<|im_end|> is one token");
    assert!(tokenizer.token_id(IM_START).is_some());

    let split = &set.train;
    let mut trained_total = 0;
    for doc in 0..split.documents() {
        let range = split.document(doc);
        let len = (range.end - range.start) as usize;
        let ids = split.tokens(range.start, len);
        let mask = split.mask(range.start, len).expect("chat data has a mask");
        let trained: Vec<u32> = ids
            .iter()
            .zip(&mask)
            .filter(|&(_, &m)| m == 1)
            .map(|(&id, _)| id)
            .collect();
        trained_total += trained.len() as u64;
        assert_eq!(trained.last(), Some(&im_end), "the end-of-turn is trained");
        let text = tokenizer.decode(&trained).unwrap();
        let whole = tokenizer.decode(&ids).unwrap();
        let question: u32 = whole
            .split("What is ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            text,
            format!("{}", question + 1),
            "only the answer: {whole:?}"
        );
        // The template's rendering, tokenized, is what was written.
        let messages = [
            Message::new("system", "Answer briefly."),
            Message::new("user", &format!("What is {question} plus one?")),
            Message::new("assistant", &format!("{}", question + 1)),
        ];
        let rendered = tokenizer.chat_template().render(&messages, false).unwrap();
        let mut expected = tokenizer.encode(&rendered).unwrap();
        expected.extend(tokenizer.end_of_text());
        assert_eq!(ids, expected);
    }
    assert_eq!(split.chat().unwrap().trained_tokens, trained_total);
    // The set's tokenizer carries the template it was rendered with.
    assert!(out.join("tokenizer_config.json").is_file());
    assert!(set.tokenizer.has_chat_template());
}

#[test]
fn conversations_are_packed_whole_with_padding_masked_out() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_jsonl(dir.path(), &qa_lines(30));
    let out = dir.path().join("set");
    let tokenizer = TokenizerChoice::TrainBpe { vocab_size: 300 };
    prepare(&chat_options(input, out.clone(), tokenizer), &mut |_| {}).unwrap();
    let set = PreparedSet::open(&out).unwrap();
    let longest = (0..set.train.documents())
        .map(|d| set.train.document(d))
        .map(|r| (r.end - r.start) as usize)
        .max()
        .unwrap();
    let seq_len = 2 * longest + 3;
    let split = WeightedSplit {
        split: set.train.clone(),
        weight: 1.0,
    };
    let windows = TrainWindows::with_loss_on(
        std::slice::from_ref(&split),
        seq_len,
        4,
        1,
        LossOn::Assistant,
    )
    .unwrap();
    let all = TrainWindows::with_loss_on(std::slice::from_ref(&split), seq_len, 4, 1, LossOn::All)
        .unwrap();
    let eot = set.tokenizer.end_of_text().unwrap();
    let mut most = 0;
    for (answers, every) in windows.batch(0).into_iter().zip(all.batch(0)) {
        assert_eq!(
            answers.tokens, every.tokens,
            "the same windows whatever the loss"
        );
        assert_eq!(answers.tokens.len(), seq_len + 1);
        // Loss on every token of chat data: all but the padding after the last
        // conversation, which ends with its end-of-text inside the window.
        let every = every.mask.unwrap();
        let used = every.iter().rposition(|&m| m == 1).unwrap() + 1;
        assert!(every[..used].iter().all(|&m| m == 1));
        assert_eq!(answers.tokens[used - 1], eot, "conversations are whole");
        let conversations = answers.tokens[..used].iter().filter(|&&t| t == eot).count();
        most = most.max(conversations);
        let mask = answers.mask.unwrap();
        assert!(mask[used..].iter().all(|&m| m == 0));
        assert!(mask[..used].contains(&1));
    }
    assert!(most >= 2, "several conversations share a window");

    // Evaluation scores the answers of every conversation once.
    let full = EvalWindows::full(std::slice::from_ref(&set.val), seq_len, LossOn::Assistant);
    let (windows, bytes) = full.batch(0..full.len());
    let scored: u32 = windows
        .iter()
        .map(|w| w.mask.as_ref().unwrap()[1..].iter().sum::<u32>())
        .sum();
    assert_eq!(u64::from(scored), set.val.chat().unwrap().trained_tokens);
    let answer_bytes = set.val.chat().unwrap().trained_bytes as f64;
    assert!(
        (bytes - answer_bytes).abs() < 1e-6,
        "{bytes} vs {answer_bytes}"
    );
}

#[test]
fn a_given_tokenizer_gains_the_template_tokens_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_jsonl(dir.path(), &qa_lines(6));
    let bytes = TextTokenizer::bytes().unwrap();
    let out = dir.path().join("set");
    let meta = prepare(
        &chat_options(
            input,
            out.clone(),
            TokenizerChoice::Given(Box::new(bytes.clone())),
        ),
        &mut |_| {},
    )
    .unwrap();
    let chat = meta.chat.unwrap();
    assert_eq!(chat.added_tokens, [IM_START, IM_END]);
    assert_eq!(
        chat.base_tokenizer_sha256,
        Some(bytes.fingerprint().unwrap())
    );
    assert_eq!(meta.vocab_size, 258);
    let set = PreparedSet::open(&out).unwrap();
    assert_eq!(set.tokenizer.token_id(IM_START), Some(256));
    assert_eq!(set.tokenizer.token_id(IM_END), Some(257));
    assert_eq!(
        set.tokenizer.encode("A").unwrap(),
        [65],
        "old ids unchanged"
    );
}

#[test]
fn overlong_conversations_are_dropped_or_truncated_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = qa_lines(6);
    lines.push(conversation("Say a long thing.", &"very ".repeat(200)));
    let input = write_jsonl(dir.path(), &lines);
    for (overlong, kept) in [(Overlong::Drop, 6), (Overlong::Truncate, 7)] {
        let out = dir.path().join(format!("{overlong:?}"));
        let mut options = chat_options(input.clone(), out.clone(), TokenizerChoice::Bytes);
        options.validation = ValidationSplit::Fraction(0.01);
        options.max_tokens = Some(120);
        options.overlong = overlong;
        let meta = prepare(&options, &mut |_| {}).unwrap();
        let counts = [meta.train.chat.unwrap(), meta.val.chat.unwrap()];
        let (dropped, truncated): (u64, u64) = (
            counts.iter().map(|c| c.dropped).sum(),
            counts.iter().map(|c| c.truncated).sum(),
        );
        assert_eq!(
            meta.train.documents + meta.val.documents,
            kept,
            "{overlong:?}"
        );
        assert_eq!((dropped, truncated), (7 - kept, kept - 6), "{overlong:?}");
        let set = PreparedSet::open(&out).unwrap();
        for doc in 0..set.train.documents() {
            let range = set.train.document(doc);
            assert!(range.end - range.start <= 120);
        }
    }
}

#[test]
fn bad_records_are_named_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (r#"{"messages": []}"#, "empty conversation"),
        (
            r#"{"messages": [{"role": "wizard", "content": "hi"}]}"#,
            "unknown role `wizard`",
        ),
        (
            r#"{"messages": [{"role": "user", "content": ["a"]}]}"#,
            "`content` must be a string",
        ),
        (r#"{"prompt": "hi"}"#, "no `messages` field"),
    ];
    for (i, (bad, expected)) in cases.into_iter().enumerate() {
        let mut lines = qa_lines(3);
        lines.push(bad.to_string());
        let case = dir.path().join(format!("case{i}"));
        std::fs::create_dir(&case).unwrap();
        let input = write_jsonl(&case, &lines);
        let options = chat_options(input, case.join("out"), TokenizerChoice::Bytes);
        let error = format!("{:#}", prepare(&options, &mut |_| {}).unwrap_err());
        assert!(error.contains("chat.jsonl:4"), "{error}");
        assert!(error.contains(expected), "{error}");
        assert!(!case.join("out").exists(), "nothing is left behind");
    }
    // Chat data comes as JSON lines only.
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "hello").unwrap();
    let options = chat_options(text, dir.path().join("t"), TokenizerChoice::Bytes);
    let error = format!("{:#}", prepare(&options, &mut |_| {}).unwrap_err());
    assert!(error.contains("JSON lines"), "{error}");
}

#[test]
fn prose_cannot_be_trained_on_answers() {
    let dir = tempfile::tempdir().unwrap();
    let docs: Vec<String> = (0..4)
        .map(|i| serde_json::json!({"text": "word ".repeat(50 + i)}).to_string())
        .collect();
    let input = write_jsonl(dir.path(), &docs);
    let mut options = PrepareOptions::new(vec![input], dir.path().join("prose"));
    options.tokenizer = TokenizerChoice::Bytes;
    options.validation = ValidationSplit::Documents(1);
    prepare(&options, &mut |_| {}).unwrap();
    let set = PreparedSet::open(&dir.path().join("prose")).unwrap();
    let split = WeightedSplit {
        split: Arc::clone(&set.train),
        weight: 1.0,
    };
    let error = TrainWindows::with_loss_on(&[split], 16, 2, 0, LossOn::Assistant)
        .unwrap_err()
        .to_string();
    assert!(error.contains("needs chat data"), "{error}");
}

/// transformers' `apply_chat_template` on a tokenizer `moe` wrote (ChatML) and on the
/// same tokenizer with another model's template gives the text and ids we render
/// (fixture written by `tests/fixtures/chat-template/make_fixture.py`).
#[test]
fn rendering_equals_transformers_apply_chat_template() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat-template");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("expected.json")).unwrap())
            .unwrap();
    for (name, dir) in [
        ("chatml", fixture.clone()),
        ("zephyr", fixture.join("zephyr")),
    ] {
        let tokenizer = TextTokenizer::load(&dir.join("tokenizer.json")).unwrap();
        assert!(tokenizer.has_chat_template(), "{name}");
        let template = tokenizer.chat_template();
        let cases = expected[name].as_array().unwrap();
        assert!(cases.len() >= 4);
        for case in cases {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let prompt = case["add_generation_prompt"].as_bool().unwrap();
            let text = template.render(&messages, prompt).unwrap();
            assert_eq!(text, case["text"].as_str().unwrap(), "{name}");
            let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(tokenizer.encode(&text).unwrap(), ids, "{name}: {text:?}");
        }
    }
}
