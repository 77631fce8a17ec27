//! Tokenizers and the batcher.

use burn::backend::Flex;
use burn::data::dataloader::batcher::Batcher;
use moe_data::{LmBatch, LmBatcher, TextTokenizer};

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

/// A text of n bytes is at least n / longest_token_bytes tokens, for plain text, special
/// tokens and the byte tokenizer alike.
#[test]
fn no_token_stands_for_more_bytes_than_the_longest_entry() {
    let corpus = "the king and the queen; the kingdom of the king ".repeat(50);
    let bpe = TextTokenizer::train_bpe(&[&corpus], 300).unwrap();
    assert!(bpe.longest_token_bytes() >= "<|endoftext|>".len());
    let texts = [
        corpus.as_str(),
        " the kingdom",
        "<|endoftext|><|endoftext|><|endoftext|>",
        "<|im_start|>user\nthe king<|im_end|>\n",
        TEXT,
    ];
    for tokenizer in [bpe, TextTokenizer::bytes().unwrap()] {
        let longest = tokenizer.longest_token_bytes();
        for text in texts {
            let tokens = tokenizer.encode(text).unwrap().len();
            assert!(
                text.len().div_ceil(longest) <= tokens,
                "{longest}: {text:?}"
            );
        }
    }
}

#[test]
fn batcher_shifts_targets_by_one() {
    let windows: Vec<Vec<u32>> = (0..4u32).map(|w| (w * 20..w * 20 + 11).collect()).collect();
    let batch: LmBatch<Flex> = LmBatcher.batch(windows, &Default::default());
    assert_eq!(batch.inputs.dims(), [4, 10]);
    let inputs: Vec<i64> = batch.inputs.into_data().iter::<i64>().collect();
    let targets: Vec<i64> = batch.targets.into_data().iter::<i64>().collect();
    assert!(
        inputs.iter().zip(&targets).all(|(i, t)| t - i == 1),
        "targets are inputs shifted by one"
    );
}
