//! The decoding engine: decoder threads own the model and run batches. Requests wait in a
//! bounded queue; a worker keeps one running batch and, before every decoding step, admits
//! whatever is waiting into it (up to its share of `max_batch`): continuous batching, so a
//! new request starts at the next step instead of waiting for the longest one in flight. A
//! request whose client went away (its event receiver dropped) leaves at the next step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::prelude::Backend;
use orchestrate_model::artifact::LoadedModel;
use orchestrate_model::data::Specials;
use orchestrate_model::generate::{Batch, Finish, Next, Row, Token};
use orchestrate_model::model::Seq2Seq;
use orchestrate_model::Tokenizer;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// What a request's handler hears from the engine.
#[derive(Debug)]
pub enum Event {
    Token {
        token: Token,
        text: String,
        special: bool,
    },
    Done {
        finish: Finish,
        tokens: Vec<u32>,
        text: String,
    },
}

pub struct Job {
    pub row: Row,
    pub stop: Vec<String>,
    pub events: mpsc::UnboundedSender<Event>,
    pub queued: Instant,
}

/// The handle request handlers hold.
#[derive(Clone)]
pub struct Engine {
    queue: mpsc::Sender<Job>,
    waiting: Arc<AtomicUsize>,
}

#[derive(Debug)]
pub enum Refused {
    /// The queue is full: the client should retry later.
    Busy,
    /// The engine thread is gone (it only stops at shutdown).
    Stopped,
}

impl Engine {
    /// Starts `workers` decoder threads sharing one queue; they stop when every `Engine`
    /// handle is dropped and what they hold is finished. Each worker decodes its own batch
    /// on one core (a rayon pool of one thread): at these sizes one core per batch beats
    /// two cores sharing every small operation (measured: 32 rows took 637 ms on one
    /// thread, 689 ms on two), so on a CPU the cores serve more rows by decoding different
    /// batches side by side. A worker holds at most `max_batch / workers` rows, leaving the
    /// rest to the next worker with room.
    pub fn start<B: Backend>(
        lm: LoadedModel<B>,
        device: B::Device,
        workers: usize,
        max_batch: usize,
        queue: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Engine, String> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let waiting = Arc::new(AtomicUsize::new(0));
        let workers = workers.max(1);
        let share = max_batch.max(1).div_ceil(workers);
        for n in 0..workers {
            let decoder = Decoder {
                model: lm.model.clone(),
                tokenizer: lm.tokenizer.clone(),
                specials: lm.card.specials.clone(),
            };
            let (device, rx, waiting, metrics) =
                (device.clone(), rx.clone(), waiting.clone(), metrics.clone());
            // One worker keeps the process's pool (all cores for its operations).
            let pool = match workers {
                1 => None,
                _ => Some(
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .thread_name(move |_| format!("decoder-{n}-ops"))
                        .build()
                        .map_err(|e| format!("cannot start decoder {n}: {e}"))?,
                ),
            };
            std::thread::Builder::new()
                .name(format!("decoder-{n}"))
                .spawn(move || {
                    let work = || run(decoder, device, rx, share, waiting, metrics);
                    match pool {
                        Some(pool) => pool.install(work),
                        None => work(),
                    }
                })
                .map_err(|e| format!("cannot start decoder {n}: {e}"))?;
        }
        Ok(Engine { queue: tx, waiting })
    }

    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        match self.queue.try_send(job) {
            Ok(()) => {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(Refused::Busy),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Refused::Stopped),
        }
    }

    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

/// What one worker decodes with: its own handle on the weights (shared storage).
struct Decoder<B: Backend> {
    model: Seq2Seq<B>,
    tokenizer: Tokenizer,
    specials: Specials,
}

/// Jobs for an idle worker: the first waiting job, then whatever arrives within 2 ms, up to
/// `room`. Holding the queue meanwhile keeps the other workers out of this group. None once
/// the queue is closed and empty (shutdown).
fn gather(rx: &std::sync::Mutex<mpsc::Receiver<Job>>, room: usize) -> Option<Vec<Job>> {
    let mut rx = rx.lock().unwrap_or_else(|e| e.into_inner());
    let mut jobs = vec![rx.blocking_recv()?];
    let gather_until = Instant::now() + Duration::from_millis(2);
    while jobs.len() < room {
        match rx.try_recv() {
            Ok(j) => jobs.push(j),
            Err(_) if Instant::now() < gather_until => {
                std::thread::sleep(Duration::from_micros(200))
            }
            Err(_) => break,
        }
    }
    Some(jobs)
}

/// Jobs waiting now, up to `room`, for a worker with a batch running: it never waits. If an
/// idle worker holds the queue (it is waiting for the next job), that worker takes it.
fn waiting_now(rx: &std::sync::Mutex<mpsc::Receiver<Job>>, room: usize) -> Vec<Job> {
    let mut jobs = Vec::new();
    if let Ok(mut rx) = rx.try_lock() {
        while jobs.len() < room {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
    }
    jobs
}

/// A request in a worker's batch: its job and what has been streamed so far.
struct Slot {
    job: Job,
    generated: Vec<u32>,
    text: String,
    detok: Detokenizer,
}

fn run<B: Backend>(
    lm: Decoder<B>,
    device: B::Device,
    rx: Arc<std::sync::Mutex<mpsc::Receiver<Job>>>,
    max_batch: usize,
    waiting: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
) {
    let specials = &lm.specials;
    let mut batch = Batch::new(&lm.model, specials, &device);
    let mut slots: HashMap<usize, Slot> = HashMap::new();
    let mut next_key = 0usize;
    loop {
        let jobs = if batch.is_empty() {
            match gather(&rx, max_batch) {
                Some(jobs) => jobs,
                None => break,
            }
        } else {
            waiting_now(&rx, max_batch.saturating_sub(batch.len()))
        };
        waiting.fetch_sub(jobs.len(), Ordering::SeqCst);
        let mut rows = Vec::with_capacity(jobs.len());
        // Rows whose client is already gone are not decoded at all.
        for job in jobs.into_iter().filter(|j| !j.events.is_closed()) {
            let key = next_key;
            next_key += 1;
            rows.push((key, job.row.clone()));
            slots.insert(
                key,
                Slot {
                    job,
                    generated: Vec::new(),
                    text: String::new(),
                    detok: Detokenizer::default(),
                },
            );
        }
        // A failing step (a bug, not an input: inputs are checked before they queue) must
        // not take the worker down with it and leave the queue unserved: its requests are
        // answered 503 (their event channels close) and the worker starts a new batch.
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            batch.admit(rows);
            if batch.is_empty() {
                return Vec::new();
            }
            metrics.batch(batch.len());
            let started = Instant::now();
            let finished = batch.step(|key, token| {
                let Some(slot) = slots.get_mut(&key) else {
                    return Next::Stop(Finish::Cancelled);
                };
                if token.index == 0 {
                    metrics.first_token(slot.job.queued.elapsed());
                }
                metrics.tokens(1);
                let special = token.id == specials.eos
                    || token.id == specials.pad
                    || token.id == specials.bos;
                slot.generated.push(token.id);
                let piece = slot.detok.next(&lm.tokenizer, &slot.generated);
                slot.text.push_str(&piece);
                let piece_len = piece.len();
                let sent = slot.job.events.send(Event::Token {
                    token,
                    text: if special { String::new() } else { piece },
                    special,
                });
                if sent.is_err() {
                    return Next::Stop(Finish::Cancelled);
                }
                // Only the text the new piece can have completed a stop sequence in.
                let stop = &slot.job.stop;
                let longest = stop.iter().map(String::len).max().unwrap_or(0);
                let mut from = slot.text.len().saturating_sub(piece_len + longest);
                while !slot.text.is_char_boundary(from) {
                    from -= 1;
                }
                let tail = &slot.text[from..];
                if stop
                    .iter()
                    .any(|s| !s.is_empty() && tail.contains(s.as_str()))
                {
                    return Next::Stop(Finish::StopSequence);
                }
                Next::Continue
            });
            metrics.decode_step(started.elapsed());
            finished
        }));
        let finished = match stepped {
            Ok(finished) => finished,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown");
                eprintln!(
                    "error: a decoding step failed ({what}); its {} requests are answered 503",
                    slots.len()
                );
                slots.clear();
                batch = Batch::new(&lm.model, specials, &device);
                continue;
            }
        };
        for (key, tokens, finish) in finished {
            let Some(slot) = slots.remove(&key) else {
                continue;
            };
            // Decoded whole once: it includes bytes still waiting to complete a character.
            let text = lm.tokenizer.decode(&tokens, true).unwrap_or(slot.text);
            let text = match finish {
                Finish::StopSequence => cut_at_stop(&text, &slot.job.stop),
                _ => text,
            };
            let _ = slot.job.events.send(Event::Done {
                finish,
                tokens,
                text,
            });
        }
    }
}

/// Streams text token by token without decoding the whole text each time (that is
/// quadratic in the length). Byte-level tokens make characters only together, so each step
/// decodes a short window: from one piece back (`prefix`) to what was already sent (`read`)
/// and to the end, and sends the difference once it ends in a whole character.
#[derive(Clone, Default)]
struct Detokenizer {
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    fn next(&mut self, tok: &Tokenizer, ids: &[u32]) -> String {
        let decode = |ids: &[u32]| tok.decode(ids, true).unwrap_or_default();
        let before = decode(&ids[self.prefix..self.read]);
        let now = decode(&ids[self.prefix..]);
        if now.ends_with('\u{FFFD}') {
            return String::new(); // a character still incomplete: wait for its next byte
        }
        match now.get(before.len()..) {
            Some(piece) if now.starts_with(&before) => {
                let piece = piece.to_string();
                self.prefix = self.read;
                self.read = ids.len();
                piece
            }
            _ => String::new(),
        }
    }
}

/// The text up to (without) the first stop sequence it contains.
pub fn cut_at_stop(text: &str, stops: &[String]) -> String {
    let cut = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
        .unwrap_or(text.len());
    text[..cut].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_cut_before_the_earliest_stop() {
        let stops = vec!["\n".to_string(), "lo".to_string()];
        assert_eq!(cut_at_stop("hello\nworld", &stops), "hel");
        assert_eq!(cut_at_stop("abc", &stops), "abc");
    }
}
