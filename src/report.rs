//! How a run shows progress: bars on a terminal, plain timestamped lines otherwise (CI logs,
//! files), so nothing depends on cursor tricks when nobody is watching.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::record::StageRecord;

pub trait Reporter: Send + Sync {
    fn started(&self, stage: &str, kind: &str);
    fn progress(&self, stage: &str, done: u64, total: Option<u64>, unit: &str);
    fn log(&self, stage: &str, line: &str);
    fn finished(&self, record: &StageRecord);
    /// Engine messages: waiting on a lock, retrying, stopping.
    fn note(&self, message: &str);
}

pub fn for_stderr(quiet: bool) -> Box<dyn Reporter> {
    use std::io::IsTerminal;
    if !quiet && std::io::stderr().is_terminal() {
        Box::new(Bars::new())
    } else {
        Box::new(Lines::new(quiet))
    }
}

/// One line per event; progress at most every 10% or 5 s per stage.
pub struct Lines {
    quiet: bool,
    start: Instant,
    last: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Lines {
    pub fn new(quiet: bool) -> Self {
        Lines {
            quiet,
            start: Instant::now(),
            last: Mutex::new(HashMap::new()),
        }
    }

    fn line(&self, stage: &str, msg: &str) {
        if self.quiet {
            return;
        }
        self.write(stage, msg);
    }

    fn write(&self, stage: &str, msg: &str) {
        let t = self.start.elapsed().as_secs_f64();
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "[{t:7.2}s] {stage:<12} {msg}");
    }
}

impl Reporter for Lines {
    fn started(&self, stage: &str, kind: &str) {
        self.line(stage, &format!("started ({kind})"));
    }

    fn progress(&self, stage: &str, done: u64, total: Option<u64>, unit: &str) {
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let now = Instant::now();
        let entry = last.entry(stage.to_string()).or_insert((self.start, 0));
        let step = total.map(|t| (t / 10).max(1)).unwrap_or(u64::MAX);
        let due = now.duration_since(entry.0) >= Duration::from_secs(5)
            || done.saturating_sub(entry.1) >= step
            || Some(done) == total;
        if due {
            *entry = (now, done);
            drop(last);
            match total {
                Some(t) => self.line(stage, &format!("{done}/{t} {unit}")),
                None => self.line(stage, &format!("{done} {unit}")),
            }
        }
    }

    fn log(&self, stage: &str, line: &str) {
        self.line(stage, &format!("| {line}"));
    }

    fn finished(&self, r: &StageRecord) {
        let mut msg = format!("{} in {}", r.status.as_str(), fmt_ms(r.duration_ms));
        if let Some(a) = &r.artifact {
            msg.push_str(&format!(" → {}", crate::plan::short_digest(a)));
        }
        if let Some(e) = &r.error {
            msg.push_str(&format!(": {}", e.lines().next().unwrap_or("")));
        }
        self.line(&r.stage, &msg);
    }

    /// Shown under `--quiet` too: a note is something to act on (a retry, a stage that is
    /// not deterministic, records left in the spool, an interruption), and an Argo task's
    /// log, run quiet, was the only place to read it.
    fn note(&self, message: &str) {
        self.write("orchestrate", message);
    }
}

/// A bar per running stage.
pub struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    fn new() -> Self {
        Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: Mutex::new(HashMap::new()),
        }
    }
}

impl Reporter for Bars {
    fn started(&self, stage: &str, kind: &str) {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix:<12} {msg} {elapsed}")
                .expect("valid template"),
        );
        bar.set_prefix(stage.to_string());
        bar.set_message(kind.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        if let Ok(mut b) = self.bars.lock() {
            b.insert(stage.to_string(), bar);
        }
    }

    fn progress(&self, stage: &str, done: u64, total: Option<u64>, unit: &str) {
        let Ok(b) = self.bars.lock() else { return };
        let Some(bar) = b.get(stage) else { return };
        if let Some(t) = total {
            if bar.length() != Some(t) {
                bar.set_length(t);
                bar.set_style(
                    ProgressStyle::with_template(
                        "  {prefix:<12} [{bar:30}] {pos}/{len} {msg} {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                bar.set_message(unit.to_string());
            }
        } else {
            bar.set_message(format!("{done} {unit}"));
        }
        bar.set_position(done);
    }

    fn log(&self, stage: &str, line: &str) {
        let _ = self.multi.println(format!("  {stage:<12} | {line}"));
    }

    fn finished(&self, r: &StageRecord) {
        if let Ok(mut b) = self.bars.lock() {
            if let Some(bar) = b.remove(&r.stage) {
                bar.finish_and_clear();
                self.multi.remove(&bar);
            }
        }
        let mark = match r.status {
            crate::record::StageStatus::Ran | crate::record::StageStatus::Cached => "✓",
            _ => "✗",
        };
        let mut msg = format!(
            "{mark} {:<12} {} in {}",
            r.stage,
            r.status.as_str(),
            fmt_ms(r.duration_ms)
        );
        if let Some(e) = &r.error {
            msg.push_str(&format!(": {}", e.lines().next().unwrap_or("")));
        }
        let _ = self.multi.println(msg);
    }

    fn note(&self, message: &str) {
        let _ = self.multi.println(format!("  {message}"));
    }
}

pub fn fmt_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}
