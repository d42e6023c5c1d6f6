//! The decoding engine: one thread owns the model and runs batches. Requests wait in a
//! bounded queue; each wave takes every waiting request (up to `max_batch`) and decodes
//! them together, one batched decoder step per token. A request whose client went away
//! (its event receiver dropped) leaves the batch at the next step.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::prelude::Backend;
use orchestrate_model::artifact::LoadedModel;
use orchestrate_model::data::Specials;
use orchestrate_model::generate::{self, Finish, Next, Row, Token};
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
    /// handle is dropped. Each worker decodes its own waves on one core (a rayon pool of
    /// one thread): at these sizes one core per wave beats two cores sharing every small
    /// operation (measured: a 32-row wave took 637 ms on one thread, 689 ms on two), so
    /// on a CPU the cores serve more rows by decoding different waves side by side. A
    /// worker takes at most `max_batch / workers` rows per wave, leaving the rest to the
    /// next idle worker.
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
        let wave = max_batch.max(1).div_ceil(workers);
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
                    let work = || run(decoder, device, rx, wave, waiting, metrics);
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

/// The next wave: the first waiting job, then whatever arrives within 2 ms, up to
/// `max_batch`. Holding the queue meanwhile keeps the other workers out of this wave.
fn gather(rx: &std::sync::Mutex<mpsc::Receiver<Job>>, max_batch: usize) -> Option<Vec<Job>> {
    let mut rx = rx.lock().unwrap_or_else(|e| e.into_inner());
    let mut jobs = vec![rx.blocking_recv()?];
    let gather_until = Instant::now() + Duration::from_millis(2);
    while jobs.len() < max_batch {
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

fn run<B: Backend>(
    lm: Decoder<B>,
    device: B::Device,
    rx: Arc<std::sync::Mutex<mpsc::Receiver<Job>>>,
    max_batch: usize,
    waiting: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
) {
    let specials = &lm.specials;
    while let Some(mut jobs) = gather(&rx, max_batch) {
        waiting.fetch_sub(jobs.len(), Ordering::SeqCst);
        metrics.batch(jobs.len());
        // Rows whose client is already gone are not decoded at all.
        jobs.retain(|j| !j.events.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let rows: Vec<Row> = jobs.iter().map(|j| j.row.clone()).collect();
        let mut generated: Vec<Vec<u32>> = vec![Vec::new(); jobs.len()];
        let mut texts: Vec<String> = vec![String::new(); jobs.len()];
        let mut detok: Vec<Detokenizer> = vec![Detokenizer::default(); jobs.len()];
        let started = Instant::now();
        let results = generate::generate(&lm.model, specials, &rows, &device, |i, token| {
            let job = &jobs[i];
            if token.index == 0 {
                metrics.first_token(job.queued.elapsed());
            }
            metrics.tokens(1);
            let special =
                token.id == specials.eos || token.id == specials.pad || token.id == specials.bos;
            generated[i].push(token.id);
            let piece = detok[i].next(&lm.tokenizer, &generated[i]);
            texts[i].push_str(&piece);
            let piece_len = piece.len();
            let sent = job.events.send(Event::Token {
                token,
                text: if special { String::new() } else { piece },
                special,
            });
            if sent.is_err() {
                return Next::Stop(Finish::Cancelled);
            }
            // Only the text the new piece can have completed a stop sequence in.
            let longest = job.stop.iter().map(String::len).max().unwrap_or(0);
            let mut from = texts[i].len().saturating_sub(piece_len + longest);
            while !texts[i].is_char_boundary(from) {
                from -= 1;
            }
            let tail = &texts[i][from..];
            if job
                .stop
                .iter()
                .any(|s| !s.is_empty() && tail.contains(s.as_str()))
            {
                return Next::Stop(Finish::StopSequence);
            }
            Next::Continue
        });
        metrics.wave(started.elapsed());
        for ((job, (tokens, finish)), streamed) in jobs.iter().zip(results).zip(texts) {
            // Decoded whole once: it includes bytes still waiting to complete a character.
            let text = lm.tokenizer.decode(&tokens, true).unwrap_or(streamed);
            let text = match finish {
                Finish::StopSequence => cut_at_stop(&text, &job.stop),
                _ => text,
            };
            let _ = job.events.send(Event::Done {
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
