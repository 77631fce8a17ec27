//! The generation engine: one worker thread owns the model and serves requests from a
//! bounded first-in-first-out queue, streaming each answer's text back as it is produced.
//! A full queue refuses new work at once (the server answers 429), so overload never
//! turns into unbounded memory or unbounded waiting.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use moe_data::TextTokenizer;
use moe_model::{FinishReason, MoeBackend, SamplingConfig, Transformer, generate};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::detokenizer::Detokenizer;

/// Limits of the engine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineOptions {
    /// Requests that may wait for the model; more are refused.
    pub queue_capacity: usize,
    /// Longest time one answer may take; it then ends with finish reason `length`.
    pub time_limit: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
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
    /// Temperature, top-k, top-p, seed.
    pub sampling: SamplingConfig,
    /// The answer ends before the first of these.
    pub stop: Vec<String>,
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

/// What the engine sends back for a request, in order: text deltas, then one `Done`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenerationEvent {
    /// More of the answer.
    Text(String),
    /// The answer is complete.
    Done {
        /// Why it ended.
        finish: Finish,
        /// Tokens generated.
        completion_tokens: usize,
    },
    /// The model failed (a decoding error); the answer is incomplete.
    Failed(String),
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
}

/// A handle to the worker; cheap to clone. The worker stops when every handle is gone.
#[derive(Clone)]
pub struct Engine {
    jobs: SyncSender<Job>,
    tokenizer: Arc<TextTokenizer>,
    context_window: usize,
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
        let tokenizer = Arc::new(tokenizer);
        let (jobs, queue) = sync_channel::<Job>(options.queue_capacity.max(1));
        let worker_tokenizer = tokenizer.clone();
        std::thread::Builder::new()
            .name("moe-engine".into())
            .spawn(move || {
                for job in queue {
                    // A client that left while queued costs nothing.
                    if job.events.is_closed() {
                        continue;
                    }
                    // A panic inside the model fails its request, not the server.
                    let events = job.events.clone();
                    let run = std::panic::AssertUnwindSafe(|| {
                        run_job::<B>(&model, &worker_tokenizer, &device, &options, job)
                    });
                    if std::panic::catch_unwind(run).is_err() {
                        let message = "the model panicked on this request".to_string();
                        let _ = events.send(GenerationEvent::Failed(message));
                    }
                }
            })?;
        Ok(Self {
            jobs,
            tokenizer,
            context_window,
        })
    }

    /// The tokenizer of the served model.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Prompt plus answer tokens the model can attend over.
    pub fn context_window(&self) -> usize {
        self.context_window
    }

    /// Queues `request`; its events arrive on the returned receiver. Dropping the
    /// receiver cancels the request.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<UnboundedReceiver<GenerationEvent>, SubmitError> {
        let (events, receiver) = unbounded_channel();
        match self.jobs.try_send(Job { request, events }) {
            Ok(()) => Ok(receiver),
            Err(TrySendError::Full(_)) => Err(SubmitError::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }
}

fn run_job<B: MoeBackend>(
    model: &Transformer<B>,
    tokenizer: &TextTokenizer,
    device: &B::Device,
    options: &EngineOptions,
    job: Job,
) {
    let Job { request, events } = job;
    let started = Instant::now();
    let mut detokenizer = Detokenizer::new(tokenizer, &request.stop);
    let mut stopped_by_string = false;
    let mut failure = None;
    let stop_tokens: Vec<u32> = tokenizer.end_of_text().into_iter().collect();
    let generation = generate(
        model,
        &request.prompt,
        request.max_tokens,
        &stop_tokens,
        request.sampling,
        |token| {
            match detokenizer.push(token) {
                Ok(step) => {
                    if !step.delta.is_empty() {
                        let _ = events.send(GenerationEvent::Text(step.delta));
                    }
                    stopped_by_string = step.stopped;
                }
                Err(error) => failure = Some(error.to_string()),
            }
            let over_time = started.elapsed() >= options.time_limit;
            if stopped_by_string || failure.is_some() || over_time || events.is_closed() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
        device,
    );
    if let Some(message) = failure {
        let _ = events.send(GenerationEvent::Failed(message));
        return;
    }
    let finish = match generation.finish_reason {
        FinishReason::Stop => Finish::Stop,
        FinishReason::Interrupted if stopped_by_string => Finish::Stop,
        FinishReason::Length | FinishReason::Interrupted => Finish::Length,
    };
    if !stopped_by_string {
        match detokenizer.finish() {
            Ok(rest) if !rest.is_empty() => {
                let _ = events.send(GenerationEvent::Text(rest));
            }
            Ok(_) => {}
            Err(error) => {
                let _ = events.send(GenerationEvent::Failed(error.to_string()));
                return;
            }
        }
    }
    let _ = events.send(GenerationEvent::Done {
        finish,
        completion_tokens: generation.tokens.len(),
    });
}
