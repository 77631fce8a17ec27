//! Incremental detokenization with stop strings: turns generated tokens into text deltas
//! that are safe to send. A delta never ends inside a UTF-8 character (byte-level tokens
//! can split one) and never contains text that might turn out to be the start of a stop
//! string; once a stop string appears, the text before it is the answer.

use anyhow::Result;
use moe_data::TextTokenizer;

/// Text of a growing token sequence, released as it becomes final.
pub struct Detokenizer<'a> {
    tokenizer: &'a TextTokenizer,
    stops: Vec<String>,
    tokens: Vec<u32>,
    sent: usize,
}

/// What one more token released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// New final text (possibly empty).
    pub delta: String,
    /// A stop string was reached: generation should end, `delta` is the last text.
    pub stopped: bool,
}

impl<'a> Detokenizer<'a> {
    /// A detokenizer that ends the text at the first of `stops` (empty strings ignored).
    pub fn new(tokenizer: &'a TextTokenizer, stops: &[String]) -> Self {
        Self {
            tokenizer,
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            tokens: Vec::new(),
            sent: 0,
        }
    }

    /// Adds `token`; returns the text it made final.
    pub fn push(&mut self, token: u32) -> Result<Step> {
        self.tokens.push(token);
        let text = self.tokenizer.decode(&self.tokens)?;
        if let Some(end) = self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            // Text already sent cannot contain a stop (it was held back), so end >= sent.
            let delta = text[self.sent.min(end)..end].to_string();
            self.sent = end;
            return Ok(Step {
                delta,
                stopped: true,
            });
        }
        // Hold back an incomplete character and any suffix that begins a stop string.
        let complete = text.trim_end_matches('\u{FFFD}').len();
        let held = self
            .stops
            .iter()
            .map(|stop| partial_stop_len(&text[..complete], stop))
            .max()
            .unwrap_or(0);
        let end = complete - held;
        let delta = text.get(self.sent..end).unwrap_or_default().to_string();
        self.sent = self.sent.max(end);
        Ok(Step {
            delta,
            stopped: false,
        })
    }

    /// The text held back when generation ends without a stop string (less a character
    /// cut off by the end of generation).
    pub fn finish(&self) -> Result<String> {
        let text = self.tokenizer.decode(&self.tokens)?;
        let text = text.trim_end_matches('\u{FFFD}');
        Ok(text.get(self.sent..).unwrap_or_default().to_string())
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn partial_stop_len(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .filter(|&n| stop.is_char_boundary(n))
        .find(|&n| text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str, stops: &[&str]) -> (Vec<String>, bool, String) {
        let tokenizer = TextTokenizer::bytes().unwrap();
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut detokenizer = Detokenizer::new(&tokenizer, &stops);
        let mut deltas = Vec::new();
        for id in tokenizer.encode(text).unwrap() {
            let step = detokenizer.push(id).unwrap();
            deltas.push(step.delta);
            if step.stopped {
                return (deltas, true, String::new());
            }
        }
        (deltas, false, detokenizer.finish().unwrap())
    }

    #[test]
    fn text_stops_before_the_first_stop_string_and_never_leaks_part_of_it() {
        let (deltas, stopped, rest) = run("Hello <|im_end|> more", &["<|im_end|>"]);
        assert!(stopped);
        assert_eq!(deltas.concat(), "Hello ");
        assert!(rest.is_empty());
        // A partial match is held back, then released when it turns out not to be one.
        let (deltas, stopped, rest) = run("a <|im_x", &["<|im_end|>"]);
        assert!(!stopped);
        assert_eq!(deltas.concat() + &rest, "a <|im_x");
        assert!(deltas.iter().all(|d| !d.contains('<') || d.contains('x')));
        // The earliest of several stops wins.
        let (deltas, _, _) = run("one. two! three", &["!", "."]);
        assert_eq!(deltas.concat(), "one");
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let (deltas, stopped, rest) = run("né → ok", &[]);
        assert!(!stopped);
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')));
        assert_eq!(deltas.concat() + &rest, "né → ok");
    }
}
