//! Tokenizers, corpus split and batches.

use std::sync::Arc;

use burn::backend::Flex;
use burn::data::dataloader::batcher::Batcher;
use moe_data::{EpochBatches, LmBatch, LmBatcher, TextTokenizer, load_corpus, tokenize_works};

const TEXT: &str = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\nThe slings and arrows of outrageous fortune, café ünïcode.\n";

#[test]
fn byte_tokenizer_maps_each_byte_to_its_value() {
    let tokenizer = TextTokenizer::bytes().unwrap();
    assert_eq!(tokenizer.vocab_size(), 256);
    assert_eq!(tokenizer.end_of_text(), None);
    let ids = tokenizer.encode(TEXT).unwrap();
    let bytes: Vec<u32> = TEXT.bytes().map(u32::from).collect();
    assert_eq!(ids, bytes);
    assert_eq!(tokenizer.decode(&ids).unwrap(), TEXT);
    assert!(tokenizer.token_bytes().iter().all(|&b| b == 1));
}

#[test]
fn bpe_round_trips_and_counts_bytes() {
    let corpus = TEXT.repeat(20);
    let tokenizer = TextTokenizer::train_bpe(&[corpus.as_str()], 300).unwrap();
    assert!(tokenizer.vocab_size() <= 300 && tokenizer.vocab_size() > 257);
    let ids = tokenizer.encode(TEXT).unwrap();
    assert!(ids.len() < TEXT.len(), "merges shorten the sequence");
    assert_eq!(tokenizer.decode(&ids).unwrap(), TEXT);
    let bytes: u32 = ids
        .iter()
        .map(|&id| tokenizer.token_bytes()[id as usize])
        .sum();
    assert_eq!(
        bytes as usize,
        TEXT.len(),
        "token byte lengths add up to the text's bytes"
    );
    let eot = tokenizer
        .end_of_text()
        .expect("BPE has an end-of-text token");
    assert_eq!(tokenizer.token_bytes()[eot as usize], 0);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    tokenizer.save(&path).unwrap();
    let loaded = TextTokenizer::load(&path).unwrap();
    assert_eq!(loaded.encode(TEXT).unwrap(), ids);
    assert!(
        TextTokenizer::train_bpe(&[corpus.as_str()], 100).is_err(),
        "too small a vocab is an error"
    );
}

#[test]
fn corpus_holds_out_named_works() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a", "b", "c"] {
        std::fs::write(
            dir.path().join(format!("{name}.txt")),
            format!("text of {name}"),
        )
        .unwrap();
    }
    std::fs::write(dir.path().join("notes.md"), "ignored").unwrap();
    let corpus = load_corpus(dir.path(), &["b".to_string()]).unwrap();
    let names: Vec<&str> = corpus.train.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["a", "c"]);
    assert_eq!(corpus.validation[0].text, "text of b");
    let err = load_corpus(dir.path(), &["missing".to_string()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
    let err = load_corpus(&dir.path().join("nope"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn epoch_batches_are_deterministic_and_shift_per_epoch() {
    let tokens = Arc::new((0..1000u32).collect::<Vec<_>>());
    let batches = EpochBatches::new(tokens.clone(), 10, 4, 7);
    let per_epoch = batches.batches_per_epoch();
    assert_eq!(
        per_epoch, 24,
        "99 windows at the largest offset, 4 per batch"
    );
    assert_eq!(
        batches.batch(3),
        EpochBatches::new(tokens, 10, 4, 7).batch(3)
    );
    // Every window is 11 consecutive tokens.
    for window in batches.batch(0) {
        assert_eq!(window.len(), 11);
        assert!(window.windows(2).all(|w| w[1] == w[0] + 1));
    }
    // Within an epoch no window repeats.
    let mut starts: Vec<u32> = (0..per_epoch)
        .flat_map(|i| batches.batch(i))
        .map(|w| w[0])
        .collect();
    starts.sort();
    starts.dedup();
    assert_eq!(starts.len(), per_epoch * 4);
    // The next epoch starts its windows at another offset.
    assert!(batches.batch(per_epoch).iter().all(|w| w[0] % 10 != 0));

    let batch: LmBatch<Flex> = LmBatcher.batch(batches.batch(0), &Default::default());
    assert_eq!(batch.inputs.dims(), [4, 10]);
    let inputs: Vec<i64> = batch.inputs.into_data().iter::<i64>().collect();
    let targets: Vec<i64> = batch.targets.into_data().iter::<i64>().collect();
    assert!(
        inputs.iter().zip(&targets).all(|(i, t)| t - i == 1),
        "targets are inputs shifted by one"
    );
}

#[test]
fn works_are_joined_with_end_of_text() {
    let corpus = TEXT.repeat(10);
    let tokenizer = TextTokenizer::train_bpe(&[corpus.as_str()], 280).unwrap();
    let works = vec![
        moe_data::Work {
            name: "a".into(),
            text: "ab".into(),
        },
        moe_data::Work {
            name: "b".into(),
            text: "cd".into(),
        },
    ];
    let ids = tokenize_works(&tokenizer, &works).unwrap();
    let eot = tokenizer.end_of_text().unwrap();
    assert_eq!(ids.iter().filter(|&&t| t == eot).count(), 1);
    assert_eq!(tokenizer.decode(&ids).unwrap(), "abcd");
}
