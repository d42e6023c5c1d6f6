//! Prometheus metrics, rendered in the text exposition format. Small and fixed: a handful
//! of families, so a registry crate would be more code to configure than this is to read.
//! Names are the ones deploy/grafana/dashboards/orchestrate.json queries (a test checks).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

#[derive(Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, buckets: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; buckets.len()];
        }
        for (i, b) in buckets.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, buckets: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in buckets.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
struct State {
    requests: BTreeMap<(String, u16), u64>,
    /// By route and whether the answer was a stream: a stream lasts as long as its
    /// generation, so alerts on latency leave streams out by this label.
    durations: BTreeMap<(String, bool), Histogram>,
    ttft: Histogram,
    batch: Histogram,
    tokens: u64,
    decode_seconds: f64,
}

/// Static facts about the served model, exported as `orchestrate_model_info`.
#[derive(Clone, Debug, Default)]
pub struct ModelInfo {
    pub model: String,
    pub quantization: String,
    pub parameters: usize,
}

pub struct Metrics {
    state: Mutex<State>,
    info: ModelInfo,
    gpu: Option<nvml_wrapper::Nvml>,
}

impl Metrics {
    pub fn new(info: ModelInfo) -> Metrics {
        Metrics {
            state: Mutex::new(State::default()),
            info,
            // No GPU (or no driver) is normal: the GPU families are then declared empty.
            gpu: nvml_wrapper::Nvml::init().ok(),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s)
    }

    /// A request answered: `took` is to its last byte (a stream's last event).
    pub fn request(&self, route: &str, status: u16, stream: bool, took: Duration) {
        self.with(|s| {
            *s.requests.entry((route.to_string(), status)).or_default() += 1;
            s.durations
                .entry((route.to_string(), stream))
                .or_default()
                .observe(LATENCY_BUCKETS, took.as_secs_f64());
        });
    }

    pub fn first_token(&self, after: Duration) {
        self.with(|s| s.ttft.observe(LATENCY_BUCKETS, after.as_secs_f64()));
    }

    pub fn tokens(&self, n: u64) {
        self.with(|s| s.tokens += n);
    }

    pub fn batch(&self, rows: usize) {
        self.with(|s| s.batch.observe(BATCH_BUCKETS, rows as f64));
    }

    pub fn decode_step(&self, took: Duration) {
        self.with(|s| s.decode_seconds += took.as_secs_f64());
    }

    pub fn render(&self, queue_depth: usize) -> String {
        let mut out = String::new();
        // NVML calls can take milliseconds (more on a busy driver): made before the lock,
        // which every decoding step and every request takes to count.
        let gpus = self.gpu_samples();
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            &mut out,
            "orchestrate_http_requests_total",
            "counter",
            "HTTP requests by route and status.",
        );
        for ((route, status), n) in &s.requests {
            let _ = writeln!(
                out,
                "orchestrate_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        head(
            &mut out,
            "orchestrate_http_request_duration_seconds",
            "histogram",
            "Time to answer, by route; stream=\"true\": a stream, to its last event.",
        );
        for ((route, stream), h) in &s.durations {
            h.render(
                &mut out,
                "orchestrate_http_request_duration_seconds",
                &format!("route=\"{route}\",stream=\"{stream}\""),
                LATENCY_BUCKETS,
            );
        }
        head(
            &mut out,
            "orchestrate_time_to_first_token_seconds",
            "histogram",
            "From a request's entry into the decoder's queue (its body read and tokenized) to its first generated token.",
        );
        s.ttft.render(
            &mut out,
            "orchestrate_time_to_first_token_seconds",
            "",
            LATENCY_BUCKETS,
        );
        head(
            &mut out,
            "orchestrate_generated_tokens_total",
            "counter",
            "Tokens generated; rate() of it is tokens per second.",
        );
        let _ = writeln!(out, "orchestrate_generated_tokens_total {}", s.tokens);
        head(
            &mut out,
            "orchestrate_decode_seconds_total",
            "counter",
            "Time the decoder spent in batches.",
        );
        let _ = writeln!(out, "orchestrate_decode_seconds_total {}", s.decode_seconds);
        head(
            &mut out,
            "orchestrate_queue_depth",
            "gauge",
            "Requests waiting for a batch.",
        );
        let _ = writeln!(out, "orchestrate_queue_depth {queue_depth}");
        head(
            &mut out,
            "orchestrate_batch_size",
            "histogram",
            "Rows per decoding step.",
        );
        s.batch
            .render(&mut out, "orchestrate_batch_size", "", BATCH_BUCKETS);
        head(
            &mut out,
            "orchestrate_model_info",
            "gauge",
            "The served model (always 1).",
        );
        let _ = writeln!(
            out,
            "orchestrate_model_info{{model=\"{}\",quantization=\"{}\",parameters=\"{}\"}} 1",
            escape(&self.info.model),
            self.info.quantization,
            self.info.parameters
        );
        head(
            &mut out,
            "orchestrate_gpu_memory_used_bytes",
            "gauge",
            "GPU memory in use (NVML; no samples without a GPU).",
        );
        for (i, used, _) in &gpus {
            let _ = writeln!(
                out,
                "orchestrate_gpu_memory_used_bytes{{gpu=\"{i}\"}} {used}"
            );
        }
        head(
            &mut out,
            "orchestrate_gpu_utilization_ratio",
            "gauge",
            "GPU busy fraction, 0 to 1 (NVML; no samples without a GPU).",
        );
        for (i, _, util) in &gpus {
            let _ = writeln!(
                out,
                "orchestrate_gpu_utilization_ratio{{gpu=\"{i}\"}} {util}"
            );
        }
        out
    }

    fn gpu_samples(&self) -> Vec<(u32, u64, f64)> {
        let Some(nvml) = &self.gpu else {
            return Vec::new();
        };
        let n = nvml.device_count().unwrap_or(0);
        (0..n)
            .filter_map(|i| {
                let d = nvml.device_by_index(i).ok()?;
                let mem = d.memory_info().ok()?.used;
                let util = d.utilization_rates().ok()?.gpu as f64 / 100.0;
                Some((i, mem, util))
            })
            .collect()
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_families_always_declared() {
        let m = Metrics::new(ModelInfo::default());
        m.request("/generate", 200, false, Duration::from_millis(30));
        m.request("/generate", 200, false, Duration::from_millis(300));
        let text = m.render(0);
        assert!(text.contains(
            "orchestrate_http_request_duration_seconds_bucket{route=\"/generate\",stream=\"false\",le=\"0.05\"} 1"
        ));
        assert!(text.contains(
            "orchestrate_http_request_duration_seconds_bucket{route=\"/generate\",stream=\"false\",le=\"0.5\"} 2"
        ));
        assert!(
            text.contains("orchestrate_http_requests_total{route=\"/generate\",status=\"200\"} 2")
        );
        assert!(text.contains("# TYPE orchestrate_gpu_utilization_ratio gauge"));
    }
}
