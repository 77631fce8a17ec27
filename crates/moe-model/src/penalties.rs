//! Adjustments to the logits before a token is picked: OpenAI's presence and frequency
//! penalties, the repetition penalty of Hugging Face transformers and llama.cpp, and a
//! per-token bias.

use std::borrow::Cow;
use std::collections::HashMap;

/// How a sequence's own tokens and the caller's biases move the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Penalties {
    /// Subtracted once from the logit of every token already generated (OpenAI's
    /// `presence_penalty`; the prompt does not count).
    pub presence: f32,
    /// Subtracted from a token's logit once per time it was generated (OpenAI's
    /// `frequency_penalty`).
    pub frequency: f32,
    /// Divides the positive logits and multiplies the negative ones of every token in the
    /// prompt or the answer (CTRL's repetition penalty, as in HF transformers); 1 = off.
    pub repetition: f32,
    /// Added to the logits of these token ids (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for Penalties {
    fn default() -> Self {
        Self {
            presence: 0.0,
            frequency: 0.0,
            repetition: 1.0,
            logit_bias: Vec::new(),
        }
    }
}

/// The penalties of one sequence and the tokens they apply to.
#[derive(Debug, Clone)]
pub(crate) struct PenaltyState {
    penalties: Penalties,
    /// How often each token was generated.
    generated: HashMap<u32, u32>,
    /// Tokens of the prompt (for the repetition penalty).
    prompt: Vec<u32>,
}

impl PenaltyState {
    /// Penalties for a sequence that starts with `prompt`.
    pub(crate) fn new(penalties: Penalties, prompt: &[u32]) -> Self {
        let mut prompt = if penalties.repetition == 1.0 {
            Vec::new()
        } else {
            prompt.to_vec()
        };
        prompt.sort_unstable();
        prompt.dedup();
        Self {
            penalties,
            generated: HashMap::new(),
            prompt,
        }
    }

    /// Counts a generated token.
    pub(crate) fn record(&mut self, token: u32) {
        *self.generated.entry(token).or_default() += 1;
    }

    /// `logits` adjusted (borrowed unchanged when nothing applies).
    pub(crate) fn apply<'a>(&self, logits: &'a [f32]) -> Cow<'a, [f32]> {
        let p = &self.penalties;
        if *p == Penalties::default() {
            return Cow::Borrowed(logits);
        }
        let mut logits = logits.to_vec();
        if p.repetition != 1.0 {
            let seen = self.prompt.iter().chain(self.generated.keys());
            for &token in seen {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition
                    } else {
                        *l * p.repetition
                    };
                }
            }
        }
        for (&token, &count) in &self.generated {
            if let Some(l) = logits.get_mut(token as usize) {
                *l -= p.presence + p.frequency * count as f32;
            }
        }
        for &(token, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(token as usize) {
                *l += bias;
            }
        }
        Cow::Owned(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adjusted(penalties: Penalties, prompt: &[u32], generated: &[u32]) -> Vec<f32> {
        let mut state = PenaltyState::new(penalties, prompt);
        generated.iter().for_each(|&t| state.record(t));
        state.apply(&[2.0, -2.0, 1.0, 0.5]).into_owned()
    }

    #[test]
    fn presence_and_frequency_count_generated_tokens_only() {
        let penalties = Penalties {
            presence: 0.5,
            frequency: 0.25,
            ..Default::default()
        };
        // Token 0 in the prompt only; token 2 generated twice, token 1 once.
        let got = adjusted(penalties, &[0], &[2, 1, 2]);
        assert_eq!(got, [2.0, -2.0 - 0.75, 1.0 - 1.0, 0.5]);
    }

    #[test]
    fn repetition_divides_positive_and_multiplies_negative_logits_of_seen_tokens() {
        let penalties = Penalties {
            repetition: 2.0,
            ..Default::default()
        };
        // Seen: 0 and 1 (prompt, 0 twice), 2 (generated, twice): each penalised once.
        let got = adjusted(penalties, &[0, 1, 0], &[2, 2]);
        assert_eq!(got, [1.0, -4.0, 0.5, 0.5]);
    }

    #[test]
    fn logit_bias_adds_to_its_tokens_and_ignores_ids_past_the_vocabulary() {
        let penalties = Penalties {
            logit_bias: vec![(3, 100.0), (1, -1.0), (99, 5.0)],
            ..Default::default()
        };
        assert_eq!(adjusted(penalties, &[], &[]), [2.0, -3.0, 1.0, 100.5]);
    }

    #[test]
    fn no_penalty_borrows_the_logits() {
        let state = PenaltyState::new(Penalties::default(), &[1, 2]);
        assert!(matches!(state.apply(&[1.0]), Cow::Borrowed(_)));
    }
}
