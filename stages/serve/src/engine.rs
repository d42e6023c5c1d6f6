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
        /// What a stream sends with this token: its text, less what is held back for the
        /// stop sequences (sent with a later token).
        text: String,
        /// The token's own text, held back or not: what `details` lists it with.
        piece: String,
        /// The token is a special one (end, padding, start), whatever text it carries.
        /// Special tokens decode to nothing, but the last one carries the text held back
        /// for the stop sequences: a stream shows it as special only where its `text` is
        /// empty, or clients that skip special tokens' text would lose that text.
        special_id: bool,
        /// The request's last token: its `Done` follows in the same step, so a stream can
        /// wait for that one event to send the summary with this token.
        last: bool,
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
    /// batches side by side. The workers' shares of `max_batch` add up to it exactly (there
    /// are never more workers than `max_batch`), each leaving the rest to the next worker
    /// with room.
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
        let max_batch = max_batch.max(1);
        // A worker with a share of 0 could never take a row; rounding each share up would
        // let them together decode more than `max_batch` rows.
        let workers = workers.clamp(1, max_batch);
        for (n, share) in shares(max_batch, workers).into_iter().enumerate() {
            let decoder = Decoder {
                model: lm.model.clone(),
                tokenizer: lm.tokenizer.clone(),
                specials: lm.card.specials.clone(),
                special_ids: lm
                    .tokenizer
                    .get_added_tokens_decoder()
                    .into_iter()
                    .filter(|(_, t)| t.special)
                    .map(|(id, _)| id)
                    .collect(),
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
        // Counted before it is queued: a worker may take the job (and uncount it) before
        // `try_send` has even returned, and an unsigned count taken below zero wraps.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let refused = match self.queue.try_send(job) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Refused::Busy,
            Err(mpsc::error::TrySendError::Closed(_)) => Refused::Stopped,
        };
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        Err(refused)
    }

    /// Whether a request submitted now would be refused for want of room (a hint: room
    /// may come or go before it is submitted, where `submit` decides).
    pub fn is_full(&self) -> bool {
        self.queue.capacity() == 0
    }

    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Whether any decoder worker is still taking jobs (the last one to stop closes the
    /// queue: at shutdown, or after a failure it could not recover from).
    pub fn alive(&self) -> bool {
        !self.queue.is_closed()
    }
}

/// `max_batch` split between `workers` (at most `max_batch`): as evenly as it goes, every
/// share at least 1, the sum exactly `max_batch`.
fn shares(max_batch: usize, workers: usize) -> Vec<usize> {
    (0..workers)
        .map(|n| max_batch / workers + usize::from(n < max_batch % workers))
        .collect()
}

/// What one worker decodes with: its own handle on the weights (shared storage).
struct Decoder<B: Backend> {
    model: Seq2Seq<B>,
    tokenizer: Tokenizer,
    specials: Specials,
    /// Every control token's id (padding, begin, end, unknown, languages, authors), which
    /// TGI's stream marks `special` and which decode to no text.
    special_ids: std::collections::HashSet<u32>,
}

/// Jobs for an idle worker: the first waiting job, then whatever arrives within 2 ms, up to
/// `room`. Holding the queue meanwhile keeps the other workers out of this group. None once
/// the queue is closed and empty (shutdown). Jobs whose client has gone are dropped as they
/// are taken (see [`live`]).
fn gather(
    rx: &std::sync::Mutex<mpsc::Receiver<Job>>,
    room: usize,
    waiting: &AtomicUsize,
) -> Option<Vec<Job>> {
    let mut rx = rx.lock().unwrap_or_else(|e| e.into_inner());
    let mut jobs = Vec::new();
    while jobs.is_empty() {
        jobs.extend(live(rx.blocking_recv()?, waiting));
    }
    let gather_until = Instant::now() + Duration::from_millis(2);
    while jobs.len() < room {
        match rx.try_recv() {
            Ok(j) => jobs.extend(live(j, waiting)),
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
fn waiting_now(
    rx: &std::sync::Mutex<mpsc::Receiver<Job>>,
    room: usize,
    waiting: &AtomicUsize,
) -> Vec<Job> {
    let mut jobs = Vec::new();
    if let Ok(mut rx) = rx.try_lock() {
        while jobs.len() < room {
            match rx.try_recv() {
                Ok(j) => jobs.extend(live(j, waiting)),
                Err(_) => break,
            }
        }
    }
    jobs
}

/// A job just taken from the queue (no longer `waiting`), or None if its client has gone
/// (a timeout, a retry): such a job is dropped here rather than taking a row of the batch
/// (or the room for one) for a step, and while batches are full the queue is drained of
/// them as fast as live jobs are admitted.
fn live(job: Job, waiting: &AtomicUsize) -> Option<Job> {
    waiting.fetch_sub(1, Ordering::SeqCst);
    (!job.events.is_closed()).then_some(job)
}

/// A request in a worker's batch: its job and what has been streamed so far.
struct Slot {
    job: Job,
    stream: TextStream,
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
    let max_len = lm.model.max_len();
    let mut batch = Batch::new(&lm.model, specials, &device);
    let mut slots: HashMap<usize, Slot> = HashMap::new();
    let mut next_key = 0usize;
    loop {
        let jobs = if batch.is_empty() {
            match gather(&rx, max_batch, &waiting) {
                Some(jobs) => jobs,
                None => break,
            }
        } else {
            waiting_now(&rx, max_batch.saturating_sub(batch.len()), &waiting)
        };
        let mut rows = Vec::with_capacity(jobs.len());
        for job in jobs {
            let key = next_key;
            next_key += 1;
            rows.push((key, job.row.clone()));
            slots.insert(
                key,
                Slot {
                    job,
                    stream: TextStream::default(),
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
                // As `Batch::step` decides after this: the row's budget, or end of text.
                let row = &slot.job.row;
                let last = token.index + 1 >= row.budget(max_len)
                    || (token.id == specials.eos && !row.ignore_eos);
                let Pushed {
                    piece,
                    text,
                    stopped,
                } = slot
                    .stream
                    .push(&lm.tokenizer, token.id, &slot.job.stop, last);
                let special_id = lm.special_ids.contains(&token.id);
                let sent = slot.job.events.send(Event::Token {
                    token,
                    text,
                    piece,
                    special_id,
                    last: last || stopped,
                });
                if sent.is_err() {
                    return Next::Stop(Finish::Cancelled);
                }
                if stopped {
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
            // The text the tokens' events add up to (cut before a stop sequence), so a
            // stream and its final `generated_text` agree to the byte.
            let _ = slot.job.events.send(Event::Done {
                finish,
                tokens,
                text: slot.stream.text,
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
    /// Bytes past the window's `read` text already sent while a character waited for its
    /// next byte: the whole characters before it go out at once.
    partial: usize,
}

impl Detokenizer {
    /// The text `ids`' last token completes. A character still waiting for its bytes
    /// waits, but the whole ones before it in the same token do not (a stop sequence
    /// among them is then seen a token sooner). After the `last` token nothing can
    /// complete a character: it comes out as U+FFFD, as the whole text decodes.
    fn next(&mut self, tok: &Tokenizer, ids: &[u32], last: bool) -> String {
        let decode = |ids: &[u32]| tok.decode(ids, true).unwrap_or_default();
        let before = decode(&ids[self.prefix..self.read]);
        let now = decode(&ids[self.prefix..]);
        if !now.starts_with(&before) {
            return String::new();
        }
        let waiting = now.ends_with('\u{FFFD}') && !last;
        let complete = if waiting {
            now.trim_end_matches('\u{FFFD}')
        } else {
            now.as_str()
        };
        let piece = complete
            .get(before.len() + self.partial..)
            .unwrap_or_default()
            .to_string();
        if waiting {
            self.partial += piece.len();
        } else {
            self.prefix = self.read;
            self.read = ids.len();
            self.partial = 0;
        }
        piece
    }
}

/// A request's text as its tokens come, and how much of it has been sent. While stop
/// sequences are set, the last `longest stop - 1` bytes are held back: they may be the
/// start of a stop sequence, which the reply leaves out, so a stream must not have sent it.
#[derive(Default)]
struct TextStream {
    generated: Vec<u32>,
    /// Cut before the first stop sequence once one has matched.
    text: String,
    /// Bytes of `text` sent.
    sent: usize,
    detok: Detokenizer,
}

/// What [`TextStream::push`] made of a token.
struct Pushed {
    /// The token's own text.
    piece: String,
    /// The text to send with it.
    text: String,
    /// It completed a stop sequence.
    stopped: bool,
}

impl TextStream {
    /// Takes the next token; returns its text, the text to send with it and whether it
    /// completed a stop sequence. After the `last` token (its budget, or end of text)
    /// nothing is held.
    fn push(&mut self, tok: &Tokenizer, id: u32, stops: &[String], last: bool) -> Pushed {
        self.generated.push(id);
        let piece = self.detok.next(tok, &self.generated, last);
        self.text.push_str(&piece);
        let (text, stopped) = self.send(stops, last);
        Pushed {
            piece,
            text,
            stopped,
        }
    }

    /// The text to send after a token, and whether it completed a stop sequence.
    fn send(&mut self, stops: &[String], last: bool) -> (String, bool) {
        // Every byte sent was checked with the held-back bytes after it, so a stop sequence
        // this token completed starts in what is not sent yet: only that is searched.
        let unsent = &self.text[self.sent..];
        let stop = stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| unsent.find(s.as_str()))
            .min();
        if let Some(at) = stop {
            self.text.truncate(self.sent + at);
            return (self.release(self.text.len()), true);
        }
        let hold = match last {
            true => 0,
            false => stops
                .iter()
                .map(String::len)
                .max()
                .unwrap_or(0)
                .saturating_sub(1),
        };
        let mut upto = self.text.len().saturating_sub(hold).max(self.sent);
        while !self.text.is_char_boundary(upto) {
            upto -= 1; // never below `sent`, itself a boundary
        }
        (self.release(upto), false)
    }

    fn release(&mut self, upto: usize) -> String {
        let out = self.text[self.sent..upto].to_string();
        self.sent = upto;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{byte, ids, tokenizer};
    use orchestrate_model::generate::Sampling;

    /// Streams `tokens`, the last one last; returns each token's text, the final text and
    /// whether a stop sequence ended it (the tokens after that are not streamed).
    fn stream(tokens: &[u32], stops: &[&str]) -> (Vec<String>, String, bool) {
        let tok = tokenizer();
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = TextStream::default();
        let mut sent = Vec::new();
        for (i, &id) in tokens.iter().enumerate() {
            let Pushed { text, stopped, .. } = s.push(&tok, id, &stops, i + 1 == tokens.len());
            sent.push(text);
            if stopped {
                return (sent, s.text, true);
            }
        }
        (sent, s.text, false)
    }

    #[test]
    fn a_stream_never_sends_the_stop_sequence() {
        let (sent, text, stopped) = stream(&ids("hello world"), &["lo w"]);
        assert!(stopped);
        assert_eq!(text, "hel");
        assert_eq!(sent.concat(), "hel");
        // Held back while it could still be a stop sequence's start, then released.
        assert_eq!(sent, ["", "", "", "h", "e", "l", ""]);
        // The earliest of several, wherever each began.
        let (sent, text, _) = stream(&ids("hello\nworld"), &["\n", "lo"]);
        assert_eq!((sent.concat().as_str(), text.as_str()), ("hel", "hel"));
    }

    /// Each token's own text (what `details` lists) is its text, while the stream holds
    /// back what may begin a stop sequence.
    #[test]
    fn a_token_s_piece_is_its_own_text_whatever_is_held_back() {
        let tok = tokenizer();
        let stops = vec!["xyz".to_string()];
        let tokens = ids("abc");
        let mut s = TextStream::default();
        let pushed: Vec<(String, String)> = tokens
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let p = s.push(&tok, id, &stops, i + 1 == tokens.len());
                (p.piece, p.text)
            })
            .collect();
        assert_eq!(
            pushed,
            [("a", ""), ("b", ""), ("c", "abc")].map(|(p, t)| (p.to_string(), t.to_string()))
        );
    }

    #[test]
    fn held_back_text_is_sent_when_no_stop_sequence_came() {
        let (sent, text, stopped) = stream(&ids("abc dé"), &["xyz"]);
        assert!(!stopped);
        assert_eq!(text, "abc dé");
        assert_eq!(sent.concat(), text);
        assert_eq!(sent.last().unwrap(), " dé");
        // Held back to a character boundary: of `aé` (3 bytes) with 1 byte to hold, `a`
        // goes (not half of `é`).
        let (sent, _, _) = stream(&ids("aéb"), &["xy"]);
        assert_eq!(sent, ["", "", "a", "éb"]);
        let (sent, text, stopped) = stream(&ids("aéé!"), &["é!"]);
        assert!(stopped);
        assert_eq!((sent.concat().as_str(), text.as_str()), ("aé", "aé"));
        // Without stop sequences nothing waits.
        let (sent, _, _) = stream(&ids("ab"), &[]);
        assert_eq!(sent, ["a", "b"]);
    }

    #[test]
    fn a_character_left_incomplete_at_the_end_is_streamed_as_the_text_has_it() {
        // "é" is C3 A9: the stream ends after its first byte.
        let tokens = [byte(b'a'), byte(0xC3)];
        let whole = tokenizer().decode(&tokens, true).unwrap();
        assert_eq!(whole, "a\u{FFFD}");
        for stops in [&[][..], &["zz"][..]] {
            let (sent, text, _) = stream(&tokens, stops);
            assert_eq!(text, whole);
            assert_eq!(sent.concat(), whole, "{stops:?}");
        }
        // Mid-stream the byte waits for the rest of its character.
        let (sent, _, _) = stream(&[byte(b'a'), byte(0xC3), byte(0xA9)], &[]);
        assert_eq!(sent, ["a", "", "é"]);
    }

    /// A token that ends inside a character sends the whole ones before it at once, so a
    /// stop sequence among them ends the stream at that token, not the next.
    #[test]
    fn whole_characters_before_an_incomplete_one_go_out_with_their_token() {
        // One token of `а` (D0 B0) and the first byte of `б` (D0 B1).
        let tok = crate::testkit::tokenizer_with(&[&[0xD0, 0xB0, 0xD0]]);
        let split = tok.get_vocab_size(true) as u32 - 1;
        assert_eq!(tok.decode(&[split], true).unwrap(), "а\u{FFFD}");
        let tokens = [byte(b'x'), split, byte(0xB1)];
        let mut s = TextStream::default();
        let mut pieces = Vec::new();
        for (i, &id) in tokens.iter().enumerate() {
            pieces.push(s.push(&tok, id, &[], i + 1 == tokens.len()).piece);
        }
        assert_eq!(pieces, ["x", "а", "б"]);
        assert_eq!(s.text, "xаб");
        let stops = vec!["а".to_string()];
        let mut s = TextStream::default();
        assert!(!s.push(&tok, tokens[0], &stops, false).stopped);
        let second = s.push(&tok, tokens[1], &stops, false);
        assert!(second.stopped, "the stop was seen only a token later");
        assert_eq!(s.text, "x");
    }

    fn job() -> Job {
        Job {
            row: Row {
                src: vec![1],
                sampling: Sampling::default(),
                max_new_tokens: 1,
                ignore_eos: false,
            },
            stop: Vec::new(),
            events: mpsc::unbounded_channel().0,
            queued: Instant::now(),
        }
    }

    /// Jobs whose clients left while they queued take no row, nor the room for one, and are
    /// uncounted; the engine is alive until its last worker lets go of the queue.
    #[test]
    fn jobs_whose_client_left_are_dropped_as_they_are_taken() {
        let (tx, rx) = mpsc::channel(8);
        let engine = Engine {
            queue: tx,
            waiting: Arc::new(AtomicUsize::new(0)),
        };
        let (events, _client) = mpsc::unbounded_channel();
        let waiting_client = Job { events, ..job() };
        for j in [job(), job(), waiting_client, job()] {
            assert!(engine.submit(j).is_ok());
        }
        assert_eq!(engine.queue_depth(), 4);
        let rx = std::sync::Mutex::new(rx);
        let taken = gather(&rx, 1, &engine.waiting).expect("a live job");
        assert_eq!(taken.len(), 1);
        assert!(!taken[0].events.is_closed());
        assert_eq!(
            engine.queue_depth(),
            1,
            "the gone clients' jobs are uncounted"
        );
        assert!(waiting_now(&rx, 4, &engine.waiting).is_empty());
        assert_eq!(engine.queue_depth(), 0);
        assert!(engine.alive());
        drop(rx);
        assert!(!engine.alive(), "no worker holds the queue");
    }

    #[test]
    fn workers_shares_add_up_to_max_batch() {
        assert_eq!(shares(5, 2), [3, 2]);
        assert_eq!(shares(4, 4), [1, 1, 1, 1]);
        assert_eq!(shares(32, 3), [11, 11, 10]);
        assert_eq!(shares(1, 1), [1]);
    }

    #[test]
    fn the_queue_depth_counts_a_job_before_a_worker_can_take_it() {
        let (tx, mut rx) = mpsc::channel(1);
        let engine = Engine {
            queue: tx,
            waiting: Arc::new(AtomicUsize::new(0)),
        };
        assert!(engine.submit(job()).is_ok());
        assert!(matches!(engine.submit(job()), Err(Refused::Busy)));
        assert_eq!(engine.queue_depth(), 1, "a refused job is not counted");
        // A worker that takes each job the moment it is queued, and uncounts it as `run`
        // does: the count it finds must never be 0 (it was taken below zero, wrapping,
        // when the job was counted after `try_send`).
        let waiting = engine.waiting.clone();
        let worker = std::thread::spawn(move || {
            let mut taken = 0;
            while taken < 20_000 {
                match rx.try_recv() {
                    Ok(_) => {
                        taken += 1;
                        let before = waiting.fetch_sub(1, Ordering::SeqCst);
                        assert!(before >= 1, "counted after it was taken");
                    }
                    Err(mpsc::error::TryRecvError::Empty) => std::hint::spin_loop(),
                    Err(e) => panic!("{e}"),
                }
            }
            rx
        });
        let mut sent = 1;
        while sent < 20_000 {
            match engine.submit(job()) {
                Ok(()) => sent += 1,
                Err(Refused::Busy) => {}
                Err(Refused::Stopped) => break, // the worker failed
            }
        }
        let rx = worker.join().expect("never below zero");
        assert_eq!(engine.queue_depth(), 0);
        drop(rx);
        assert!(matches!(engine.submit(job()), Err(Refused::Stopped)));
        assert_eq!(engine.queue_depth(), 0);
    }
}
