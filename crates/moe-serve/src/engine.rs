//! The generation engine: one worker thread owns the model and serves requests from a
//! bounded first-in-first-out queue, streaming each answer's text back as it is produced.
//!
//! Requests are batched continuously: up to `max_batch` answers are in progress at once,
//! and each step is one forward pass that gives every one of them its next token (a
//! newly admitted request reads its prompt in the same pass). A finished answer frees its
//! slot for the next queued request at once. A full queue refuses new work (the server
//! answers 429), so overload never turns into unbounded memory or unbounded waiting.
//!
//! Log-probabilities are the model's own: the log-softmax of the raw logits, before
//! temperature, penalties and biases. Echoed prompts are scored by one full forward pass
//! over the prompt, run by the worker when it admits the request.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use moe_data::TextTokenizer;
use moe_model::{
    FinishReason, MoeBackend, SamplingConfig, Sequence, TokenLogprob, Transformer, decode_step,
    prompt_logprobs,
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::detokenizer::Detokenizer;
use crate::metrics::Metrics;
use crate::moa::Refused;

/// Limits of the engine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineOptions {
    /// Requests that may wait for a slot; more are refused.
    pub queue_capacity: usize,
    /// Answers generated together, one token each per forward pass.
    pub max_batch: usize,
    /// Longest time one answer may take; it then ends with finish reason `length`.
    pub time_limit: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            max_batch: 8,
            time_limit: Duration::from_secs(60),
        }
    }
}

/// One answer to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// Prompt token ids; with `max_tokens`, within the context window.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Temperature, top-k, top-p, seed, penalties.
    pub sampling: SamplingConfig,
    /// The answer ends before the first of these.
    pub stop: Vec<String>,
    /// Special tokens that end the answer besides end-of-text: stop strings that are one
    /// special token (a chat template's `<|im_end|>`), which decoded text never shows.
    pub stop_tokens: Vec<u32>,
    /// Send each generated token's log-probability with this many alternatives.
    pub logprobs: Option<usize>,
    /// Send the prompt back first (an `Echo` event), with its log-probabilities when
    /// `logprobs` is set.
    pub echo: bool,
}

/// Why an answer ended, in OpenAI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End of text or a stop string.
    Stop,
    /// `max_tokens`, the context window or the time limit.
    Length,
}

impl Finish {
    /// The `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// What the engine sends back for a request, in order: the echo if asked for, text
/// deltas, then one `Done`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// The prompt is echoed.
    Echo {
        /// Its tokens.
        prompt: Vec<u32>,
        /// The log-probabilities of its tokens after the first (empty without
        /// `logprobs`).
        logprobs: Vec<TokenLogprob>,
    },
    /// More of the answer.
    Text {
        /// The new text.
        text: String,
        /// The log-probabilities of the tokens sampled since the previous `Text` (when
        /// asked for; a stop token that ends the answer included).
        logprobs: Vec<TokenLogprob>,
    },
    /// The answer is complete.
    Done {
        /// Why it ended.
        finish: Finish,
        /// Tokens of the prompt.
        prompt_tokens: usize,
        /// Tokens generated.
        completion_tokens: usize,
    },
    /// The model failed (a decoding error), or a pipeline did; the answer is incomplete.
    Failed(String),
    /// A Mixture-of-Agents pipeline's agents refused the request (HTTP 400): the request
    /// must change. The engine never sends this.
    Refused(Refused),
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full: retry later.
    QueueFull,
    /// The worker thread is gone.
    Stopped,
}

struct Job {
    request: GenerationRequest,
    events: UnboundedSender<GenerationEvent>,
    queued: Instant,
}

/// A handle to the worker; cheap to clone. The worker stops when every handle is gone.
#[derive(Clone)]
pub struct Engine {
    jobs: SyncSender<Job>,
    tokenizer: Arc<TextTokenizer>,
    context_window: usize,
    /// The most bytes of text one token stands for.
    longest_token: usize,
    metrics: Metrics,
}

impl Engine {
    /// Starts the worker thread that owns `model`.
    pub fn start<B: MoeBackend>(
        model: Transformer<B>,
        tokenizer: TextTokenizer,
        device: B::Device,
        options: EngineOptions,
    ) -> std::io::Result<Self>
    where
        Transformer<B>: Send + 'static,
    {
        let context_window = model.model_config().max_seq_len;
        let longest_token = tokenizer.longest_token_bytes();
        let tokenizer = Arc::new(tokenizer);
        let (jobs, queue) = sync_channel::<Job>(options.queue_capacity.max(1));
        let worker_tokenizer = tokenizer.clone();
        let metrics = Metrics::default();
        let worker_metrics = metrics.clone();
        std::thread::Builder::new()
            .name("moe-engine".into())
            .spawn(move || {
                let tokenizer = &worker_tokenizer;
                serve_queue(&model, tokenizer, &device, options, &worker_metrics, queue)
            })?;
        Ok(Self {
            jobs,
            tokenizer,
            context_window,
            longest_token,
            metrics,
        })
    }

    /// The tokenizer of the served model.
    pub fn tokenizer(&self) -> &Arc<TextTokenizer> {
        &self.tokenizer
    }

    /// Prompt plus answer tokens the model can attend over.
    pub fn context_window(&self) -> usize {
        self.context_window
    }

    /// The fewest tokens `text` can tokenize to, known without tokenizing it.
    pub(crate) fn min_tokens(&self, text: &str) -> usize {
        text.len().div_ceil(self.longest_token)
    }

    /// The engine's metrics (tokens, queue, batch, latencies).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Queues `request`; its events arrive on the returned receiver. Dropping the
    /// receiver cancels the request.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<UnboundedReceiver<GenerationEvent>, SubmitError> {
        let (events, receiver) = unbounded_channel();
        let job = Job {
            request,
            events,
            queued: Instant::now(),
        };
        // Counted before the worker can take it off the queue.
        self.metrics.queue_depth.inc();
        let sent = self.jobs.try_send(job);
        if sent.is_err() {
            self.metrics.queue_depth.dec();
        }
        match sent {
            Ok(()) => Ok(receiver),
            Err(TrySendError::Full(_)) => Err(SubmitError::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }
}

/// An answer in progress: the model's sequence and the text side of the request.
struct Active<'t, B: MoeBackend> {
    sequence: Sequence<B>,
    detokenizer: Detokenizer<'t>,
    events: UnboundedSender<GenerationEvent>,
    queued: Instant,
    started: Instant,
    last_token: Option<Instant>,
    prompt_tokens: usize,
    /// Log-probabilities not yet sent (their tokens' text is held back).
    logprobs: Vec<TokenLogprob>,
    stopped_by_string: bool,
    /// A decoding error was reported; nothing more is sent.
    failed: bool,
}

/// The worker loop: admits queued requests into free slots (in arrival order), advances
/// every answer in progress by one token per forward pass, and reports each answer's end.
/// Returns when every `Engine` handle is gone and no answer is left.
fn serve_queue<B: MoeBackend>(
    model: &Transformer<B>,
    tokenizer: &TextTokenizer,
    device: &B::Device,
    options: EngineOptions,
    metrics: &Metrics,
    queue: Receiver<Job>,
) {
    let mut active: Vec<Active<B>> = Vec::new();
    let mut open = true;
    loop {
        while open && active.len() < options.max_batch.max(1) {
            // Wait for work only when there is nothing else to do.
            let job = if active.is_empty() {
                queue.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                queue.try_recv()
            };
            let job = match job {
                Ok(job) => job,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            };
            metrics.queue_depth.dec();
            // A client that left while queued costs nothing.
            if job.events.is_closed() {
                continue;
            }
            let Job {
                request,
                events,
                queued,
            } = job;
            metrics.prompt_tokens.inc_by(request.prompt.len() as u64);
            if request.echo && !echo(model, &request, device, &events) {
                continue;
            }
            let mut stop_tokens = request.stop_tokens.clone();
            stop_tokens.extend(tokenizer.end_of_text());
            let mut sequence = Sequence::new(
                model,
                &request.prompt,
                request.max_tokens,
                &stop_tokens,
                request.sampling,
            );
            if let Some(top) = request.logprobs {
                sequence = sequence.with_logprobs(top);
            }
            active.push(Active {
                sequence,
                detokenizer: Detokenizer::new(tokenizer, &request.stop),
                events,
                queued,
                started: Instant::now(),
                last_token: None,
                prompt_tokens: request.prompt.len(),
                logprobs: Vec::new(),
                stopped_by_string: false,
                failed: false,
            });
        }
        metrics.batch_size.set(active.len() as i64);
        if active.is_empty() {
            return;
        }
        // A panic inside the model fails the answers of this batch, not the server.
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut batch: Vec<&mut Sequence<B>> =
                active.iter_mut().map(|a| &mut a.sequence).collect();
            decode_step(model, &mut batch, device)
        }));
        let Ok(new_tokens) = step else {
            for answer in active.drain(..) {
                let _ = answer.events.send(GenerationEvent::Failed(PANICKED.into()));
            }
            continue;
        };
        for (answer, token) in active.iter_mut().zip(new_tokens) {
            answer.logprobs.extend(answer.sequence.take_logprob());
            if let Some(token) = token {
                answer.accept(token, options.time_limit, metrics);
            } else if answer.events.is_closed() {
                answer.sequence.interrupt();
            }
        }
        let (done, running) = active
            .into_iter()
            .partition(|answer| answer.sequence.is_finished());
        active = running;
        metrics.batch_size.set(active.len() as i64);
        done.into_iter().for_each(Active::finish);
    }
}

const PANICKED: &str = "the model panicked on this request";

/// Sends the `Echo` event of `request`, scoring its prompt when it asks for log-probs;
/// false when the model failed (the request is then answered with `Failed`).
fn echo<B: MoeBackend>(
    model: &Transformer<B>,
    request: &GenerationRequest,
    device: &B::Device,
    events: &UnboundedSender<GenerationEvent>,
) -> bool {
    let scored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        request.logprobs.map_or_else(Vec::new, |top| {
            prompt_logprobs(model, &request.prompt, top, device)
        })
    }));
    let event = match scored {
        Ok(logprobs) => GenerationEvent::Echo {
            prompt: request.prompt.clone(),
            logprobs,
        },
        Err(_) => GenerationEvent::Failed(PANICKED.into()),
    };
    let scored = matches!(event, GenerationEvent::Echo { .. });
    let _ = events.send(event);
    scored
}

impl<B: MoeBackend> Active<'_, B> {
    /// Streams the text `token` completes; ends the answer on a stop string, a decoding
    /// error, the time limit or a client that left.
    fn accept(&mut self, token: u32, time_limit: Duration, metrics: &Metrics) {
        let now = Instant::now();
        let latency = match self.last_token.replace(now) {
            None => (&metrics.time_to_first_token, now - self.queued),
            Some(last) => (&metrics.time_per_token, now - last),
        };
        latency.0.observe(latency.1.as_secs_f64());
        metrics.generated_tokens.inc();
        match self.detokenizer.push(token) {
            Ok(step) => {
                self.stopped_by_string = step.stopped;
                if !step.delta.is_empty() || step.stopped {
                    self.send_text(step.delta);
                }
            }
            Err(error) => {
                let _ = self.events.send(GenerationEvent::Failed(error.to_string()));
                self.failed = true;
            }
        }
        let over_time = self.started.elapsed() >= time_limit;
        if self.stopped_by_string || self.failed || over_time || self.events.is_closed() {
            self.sequence.interrupt();
        }
    }

    /// Sends `text` and the log-probabilities gathered since the last text, unless both
    /// are empty.
    fn send_text(&mut self, text: String) {
        if text.is_empty() && self.logprobs.is_empty() {
            return;
        }
        let logprobs = std::mem::take(&mut self.logprobs);
        let _ = self.events.send(GenerationEvent::Text { text, logprobs });
    }

    /// Sends the end of a finished answer: the held-back text, then `Done`.
    fn finish(mut self) {
        if self.failed {
            return;
        }
        let finish = match self
            .sequence
            .finish_reason()
            .unwrap_or(FinishReason::Length)
        {
            _ if self.stopped_by_string => Finish::Stop,
            FinishReason::Stop => Finish::Stop,
            FinishReason::Length | FinishReason::Interrupted => Finish::Length,
        };
        let rest = if self.stopped_by_string {
            Ok(String::new())
        } else {
            self.detokenizer.finish()
        };
        match rest {
            Ok(rest) => self.send_text(rest),
            Err(error) => {
                let _ = self.events.send(GenerationEvent::Failed(error.to_string()));
                return;
            }
        }
        let _ = self.events.send(GenerationEvent::Done {
            finish,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.sequence.tokens().len(),
        });
    }
}
