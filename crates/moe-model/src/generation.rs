//! Autoregressive generation with a KV cache, for one answer or many at once.
//!
//! A [`Sequence`] is one answer in progress (its cache, sampler and tokens);
//! [`decode_step`] advances any number of them by one token with a single forward pass,
//! which is how the server batches concurrent requests. [`generate`] is the one-sequence
//! loop on top.

use std::ops::ControlFlow;

use burn::tensor::backend::Backend;

use crate::logprobs::{TokenLogprob, token_logprob};
use crate::sampling::{Sampler, SamplingConfig};
use crate::transformer::{KvCache, Transformer};
use moe_kernels::MoeBackend;

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was produced.
    Stop,
    /// `max_tokens` were produced or the context window is full.
    Length,
    /// The caller asked to stop (a stop string, a time limit, a client gone).
    Interrupted,
}

/// Generated token ids and why generation ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New tokens, not including the prompt.
    pub tokens: Vec<u32>,
    /// Why it stopped.
    pub finish_reason: FinishReason,
}

/// One answer being generated: its KV cache, sampler, the tokens the next step feeds and
/// the tokens produced so far.
#[derive(Debug)]
pub struct Sequence<B: Backend> {
    cache: KvCache<B>,
    sampler: Sampler,
    /// Fed by the next step: the prompt first, then the last new token.
    input: Vec<u32>,
    prompt_len: usize,
    tokens: Vec<u32>,
    max_tokens: usize,
    stop_tokens: Vec<u32>,
    window: usize,
    finish: Option<FinishReason>,
    /// Alternatives to record with each sampled token's log-probability, if recorded.
    logprobs: Option<usize>,
    /// The log-probability of the token the last step sampled.
    last_logprob: Option<TokenLogprob>,
}

impl<B: Backend> Sequence<B> {
    /// An answer of up to `max_tokens` after `prompt` for `model`, ending early at any of
    /// `stop_tokens` or when prompt plus output fill the context window (`max_seq_len`).
    /// A prompt longer than the window keeps its last tokens.
    pub fn new(
        model: &Transformer<B>,
        prompt: &[u32],
        max_tokens: usize,
        stop_tokens: &[u32],
        sampling: SamplingConfig,
    ) -> Self {
        let config = model.model_config();
        let window = config.max_seq_len;
        let prompt = &prompt[prompt.len().saturating_sub(window.saturating_sub(1))..];
        let mut sequence = Self {
            cache: KvCache::new(config.n_layers),
            sampler: Sampler::new(sampling, prompt),
            input: if prompt.is_empty() {
                vec![0]
            } else {
                prompt.to_vec()
            },
            prompt_len: prompt.len(),
            tokens: Vec::new(),
            max_tokens,
            stop_tokens: stop_tokens.to_vec(),
            window,
            finish: None,
            logprobs: None,
            last_logprob: None,
        };
        sequence.check_length();
        sequence
    }

    /// Records the log-probability of every sampled token (a stop token included) and its
    /// `top` most likely alternatives, for [`Sequence::take_logprob`].
    pub fn with_logprobs(mut self, top: usize) -> Self {
        self.logprobs = Some(top);
        self
    }

    /// The log-probability of the token the last step sampled, once, if recorded.
    pub fn take_logprob(&mut self) -> Option<TokenLogprob> {
        self.last_logprob.take()
    }

    /// The tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Why the answer ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Whether the answer has ended.
    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Ends the answer at the caller's request (finish reason `Interrupted`).
    pub fn interrupt(&mut self) {
        self.finish = Some(FinishReason::Interrupted);
    }

    /// The finished answer.
    pub fn into_generation(self) -> Generation {
        Generation {
            tokens: self.tokens,
            finish_reason: self.finish.unwrap_or(FinishReason::Interrupted),
        }
    }

    fn check_length(&mut self) {
        let full = self.prompt_len + self.tokens.len() >= self.window;
        if self.finish.is_none() && (self.tokens.len() >= self.max_tokens || full) {
            self.finish = Some(FinishReason::Length);
        }
    }

    /// Samples the next token from its logits; `None` when it is a stop token.
    fn accept(&mut self, logits: &[f32]) -> Option<u32> {
        let next = self.sampler.sample(logits) as u32;
        if let Some(top) = self.logprobs {
            self.last_logprob = Some(token_logprob(logits, next, top));
        }
        if self.stop_tokens.contains(&next) {
            self.finish = Some(FinishReason::Stop);
            return None;
        }
        self.tokens.push(next);
        self.input = vec![next];
        self.check_length();
        Some(next)
    }
}

/// Advances every unfinished sequence by one token with one forward pass over all of them
/// (a new sequence reads its whole prompt in that pass). Returns each sequence's new
/// token, `None` for one that was already finished or just produced a stop token.
pub fn decode_step<B: MoeBackend>(
    model: &Transformer<B>,
    sequences: &mut [&mut Sequence<B>],
    device: &B::Device,
) -> Vec<Option<u32>> {
    let mut new_tokens = vec![None; sequences.len()];
    let live: Vec<usize> = (0..sequences.len())
        .filter(|&i| !sequences[i].is_finished())
        .collect();
    if live.is_empty() {
        return new_tokens;
    }
    let inputs: Vec<Vec<u32>> = live
        .iter()
        .map(|&i| std::mem::take(&mut sequences[i].input))
        .collect();
    let inputs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    let logits = {
        let mut caches: Vec<&mut KvCache<B>> = sequences
            .iter_mut()
            .filter(|s| !s.is_finished())
            .map(|s| &mut s.cache)
            .collect();
        model.forward_packed(&inputs, &mut caches, device)
    };
    let [_, vocab] = logits.dims();
    let rows: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap_or_default();
    for (row, &i) in live.iter().enumerate() {
        new_tokens[i] = sequences[i].accept(&rows[row * vocab..(row + 1) * vocab]);
    }
    new_tokens
}

/// Generates one answer (see [`Sequence::new`]). `on_token` sees each new token as it is
/// produced and may end generation by returning `ControlFlow::Break`.
pub fn generate<B: MoeBackend>(
    model: &Transformer<B>,
    prompt: &[u32],
    max_tokens: usize,
    stop_tokens: &[u32],
    sampling: SamplingConfig,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    device: &B::Device,
) -> Generation {
    let mut sequence = Sequence::new(model, prompt, max_tokens, stop_tokens, sampling);
    while !sequence.is_finished() {
        if let Some(token) = decode_step(model, &mut [&mut sequence], device)[0]
            && on_token(token).is_break()
        {
            sequence.interrupt();
        }
    }
    sequence.into_generation()
}
