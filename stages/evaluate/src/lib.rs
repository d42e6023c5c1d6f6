//! The `evaluate` stage: every model given, on the corpus's test split, per language:
//! perplexity and token accuracy (teacher forcing, split at the middle as in training's
//! validation), chrF of greedy continuations of fixed prompts, latency of `new_tokens` new
//! tokens (50 by default) at batch 1 (p50 / p95) and throughput at batch 1 and `batch`. Writes JSON, Markdown and a PNG
//! chart, and applies the gate from YAML: a variant that fails it fails the stage, naming
//! the variant, the metric and both values, so nothing downstream (deploy) runs.

mod chart;

use std::collections::BTreeMap;
use std::time::Instant;

use burn::prelude::*;
use orchestrate_stage::{
    canonical_params, ArtifactKind, InputArtifact, InputDecl, Inputs, ParamError, StageContext,
    StageDescriptor, StageError, StageOutput,
};
use serde::{Deserialize, Serialize};

use orchestrate_model::artifact::{self, LoadedModel};
use orchestrate_model::compute::{self, Compute, OnDevice};
use orchestrate_model::data::{self, Example, Padding, Rounding, Specials};
use orchestrate_model::generate::{self, Next, Row, Sampling};
use orchestrate_model::weights::Scheme;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    /// Largest relative perplexity increase over the baseline model (0.05 = 5%).
    #[serde(default)]
    pub max_ppl_increase: Option<f64>,
    /// Largest p95 latency of `new_tokens` new tokens at batch 1, in milliseconds.
    #[serde(default)]
    pub max_p95_ms: Option<f64>,
    /// Largest test perplexity, for every model.
    #[serde(default)]
    pub max_ppl: Option<f64>,
    /// Smallest chrF of the fixed prompts, for every model.
    #[serde(default)]
    pub min_chrf: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateParams {
    /// The input stage others are compared with; by default the first fp32 model listed
    /// (the first model where none is).
    #[serde(default)]
    pub baseline: Option<String>,
    /// Test records per language for perplexity and accuracy (all when absent).
    #[serde(default)]
    pub max_records: Option<usize>,
    /// Fixed prompts per language for chrF.
    #[serde(default = "default_prompts")]
    pub prompts: usize,
    /// New tokens per latency run.
    #[serde(default = "default_new_tokens")]
    pub new_tokens: usize,
    /// Timed runs at batch 1 (after two untimed ones).
    #[serde(default = "default_latency_runs")]
    pub latency_runs: usize,
    /// Rows of the throughput batch.
    #[serde(default = "default_batch")]
    pub batch: usize,
    #[serde(default)]
    pub gate: Gate,
    /// Measure latency and throughput. Off, the report holds only what is reproducible
    /// byte for byte (CI retraining compares digests), and `max_p95_ms` cannot be gated.
    #[serde(default = "yes")]
    pub timings: bool,
    /// CPU threads (all when absent); `1` makes perplexities reproducible to the last bit.
    #[serde(default)]
    pub threads: Option<usize>,
}

fn yes() -> bool {
    true
}

fn default_prompts() -> usize {
    16
}
fn default_new_tokens() -> usize {
    50
}
fn default_latency_runs() -> usize {
    20
}
fn default_batch() -> usize {
    16
}

pub const DESCRIPTOR: StageDescriptor = StageDescriptor {
    kind: "evaluate",
    about: "measures models on the test split (perplexity, accuracy, chrF, latency) and gates them",
    inputs: Inputs::Typed(&[
        InputDecl {
            name: "corpus",
            kind: ArtifactKind::Corpus,
            many: false,
            required: true,
            reads: &["test"],
        },
        InputDecl {
            name: "tokenizer",
            kind: ArtifactKind::Tokenizer,
            many: false,
            required: false,
            reads: &[],
        },
        InputDecl {
            name: "models",
            kind: ArtifactKind::Model,
            many: true,
            required: true,
            reads: &[],
        },
    ]),
    output: ArtifactKind::EvalReport,
    // Latencies depend on the machine, but the cache key does not pretend to pin them.
    device_dependent: true,
    names_in_output: true,
    code_hash: env!("STAGE_CODE_HASH"),
    tracked_files: &["report.json", "report.md", "chart.png"],
    canonical_params: canonical,
    file_deps: orchestrate_stage::no_file_deps,
    empty_part: orchestrate_stage::no_empty_parts,
    unkeyed: &[],
};

/// Rows of the throughput batch, at most.
const MAX_BATCH: usize = 1024;
/// New tokens per latency run, at most (a model's `max_len` usually stops it sooner).
const MAX_NEW_TOKENS: usize = 4096;
/// Timed latency runs, at most.
const MAX_LATENCY_RUNS: usize = 10_000;

fn canonical(v: serde_json::Value) -> Result<serde_json::Value, ParamError> {
    let v = canonical_params::<EvaluateParams>(v)?;
    let p: EvaluateParams = serde_json::from_value(v.clone()).expect("just canonicalised");
    let invalid = |path: &[&str], msg: String| ParamError {
        path: path
            .iter()
            .map(|k| orchestrate_stage::PathSegment::Key(k.to_string()))
            .collect(),
        problem: orchestrate_stage::ParamProblem::Invalid(msg),
    };
    // Every problem at once, each at its key.
    let mut problems = Vec::new();
    if !p.timings && p.gate.max_p95_ms.is_some() {
        problems.push(invalid(
            &["gate", "max_p95_ms"],
            "gate.max_p95_ms needs timings: true".into(),
        ));
    }
    // Zero would measure nothing and report a number anyway (perplexity 1 over no
    // records, a p95 of no runs), which a gate would then pass.
    for (key, value) in [
        ("max_records", p.max_records.unwrap_or(1)),
        ("prompts", p.prompts),
        ("new_tokens", p.new_tokens),
        ("latency_runs", p.latency_runs),
        ("batch", p.batch),
        ("threads", p.threads.unwrap_or(1)),
    ] {
        if value == 0 {
            problems.push(invalid(&[key], format!("`{key}` must be at least 1")));
        }
    }
    // Upper bounds where a large value would take the machine's memory (a batch's rows are
    // generated at once, each with its cache of keys and values) or hours, and fail no sooner.
    for (key, value, most) in [
        ("batch", p.batch, MAX_BATCH),
        ("new_tokens", p.new_tokens, MAX_NEW_TOKENS),
        ("latency_runs", p.latency_runs, MAX_LATENCY_RUNS),
        (
            "threads",
            p.threads.unwrap_or(1),
            orchestrate_model::MAX_THREADS,
        ),
    ] {
        if value > most {
            problems.push(invalid(
                &[key],
                format!("`{key}` must be at most {most}, got {value}"),
            ));
        }
    }
    // A bound no model can meet fails the gate after every training it follows: refused
    // before any. (Perplexity is at least 1, chrF a score from 0 to 100.)
    let g = &p.gate;
    for (key, value, ok, range) in [
        (
            "max_ppl",
            g.max_ppl,
            (|v: f64| v >= 1.0) as fn(f64) -> bool,
            "a perplexity of at least 1",
        ),
        (
            "max_ppl_increase",
            g.max_ppl_increase,
            |v| v >= 0.0,
            "a share of at least 0 (0.05 is 5%)",
        ),
        (
            "max_p95_ms",
            g.max_p95_ms,
            |v| v > 0.0,
            "milliseconds above 0",
        ),
        (
            "min_chrf",
            g.min_chrf,
            |v| (0.0..=100.0).contains(&v),
            "a chrF from 0 to 100",
        ),
    ] {
        if let Some(v) = value.filter(|v| !(v.is_finite() && ok(*v))) {
            problems.push(invalid(
                &["gate", key],
                format!("gate.{key} {v} can never be met: it must be {range}"),
            ));
        }
    }
    orchestrate_stage::param_problems(problems)?;
    Ok(v)
}

/// Measurements of one model on one language.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LangScores {
    pub records: usize,
    pub tokens: usize,
    pub perplexity: f64,
    pub token_accuracy: f64,
    pub chrf: f64,
    pub prompts: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VariantReport {
    pub name: String,
    /// The scored Model artifact's digest: what `deploy` checks its model against, so that
    /// the gate this report passed covers the model it deploys.
    #[serde(default)]
    pub model_digest: String,
    pub quantization: String,
    pub artifact_bytes: u64,
    pub stored_param_bytes: u64,
    pub resident_param_bytes: u64,
    pub load_ms: f64,
    pub perplexity: f64,
    pub token_accuracy: f64,
    pub chrf: f64,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub tokens_per_second_batch1: f64,
    pub tokens_per_second_batch: f64,
    pub languages: BTreeMap<String, LangScores>,
    /// Relative to the baseline (0 for the baseline itself).
    pub ppl_increase: f64,
    /// The tokens each timed batch-1 run generated: `new_tokens`, or fewer where the
    /// model's `max_len` stops it (its latency is then that of fewer tokens).
    #[serde(default)]
    pub latency_tokens: usize,
}

pub fn run(ctx: &StageContext<'_>) -> Result<StageOutput, StageError> {
    let p: EvaluateParams = ctx.params()?;
    orchestrate_model::with_threads(p.threads, || evaluate_all(ctx, p))
}

fn evaluate_all(ctx: &StageContext<'_>, p: EvaluateParams) -> Result<StageOutput, StageError> {
    let corpus = ctx.input("corpus")?;
    let models = ctx
        .inputs
        .get("models")
        .filter(|m| !m.is_empty())
        .ok_or_else(|| StageError::Failed("input `models` names no model".into()))?;
    let baseline = match &p.baseline {
        Some(b) => models.iter().position(|m| &m.stage == b).ok_or_else(|| {
            let names: Vec<&str> = models.iter().map(|m| m.stage.as_str()).collect();
            StageError::Failed(format!(
                "with.baseline is `{b}`, which is not among the models ({})",
                names.join(", ")
            ))
        })?,
        // The gate's increases are over fp32: the first model trained in fp32 (a `quantize`
        // of `scheme: fp32` too), whatever order the models are listed in; the first model
        // where none is.
        None => models
            .iter()
            .position(|m| {
                artifact::read_card(&m.dir).is_ok_and(|card| card.quantization == Scheme::Fp32)
            })
            .unwrap_or(0),
    };
    let compute = Compute::parse(ctx.device)?;
    let job = Score {
        ctx,
        p: &p,
        models,
        corpus_dir: &corpus.dir,
        rounding: Rounding::for_compute(compute),
    };
    let mut reports = compute::run_on(compute, job)??;
    for (r, m) in reports.iter_mut().zip(models) {
        r.model_digest = m.digest.clone();
    }
    let base_ppl = reports[baseline].perplexity;
    for r in &mut reports {
        r.ppl_increase = r.perplexity / base_ppl - 1.0;
        for (name, v) in [
            ("perplexity", r.perplexity),
            ("ppl_increase", r.ppl_increase),
            ("token_accuracy", r.token_accuracy),
            ("chrf", r.chrf),
            ("latency_p50_ms", r.latency_p50_ms),
            ("latency_p95_ms", r.latency_p95_ms),
            ("tokens_per_second_batch1", r.tokens_per_second_batch1),
            ("tokens_per_second_batch", r.tokens_per_second_batch),
            ("artifact_bytes", r.artifact_bytes as f64),
        ] {
            ctx.events.metric(&format!("{}.{name}", r.name), v, None);
        }
    }
    let out = ctx.out_dir;
    let json = serde_json::json!({
        "baseline": reports[baseline].name,
        "batch": p.batch,
        "new_tokens": p.new_tokens,
        "gate": p.gate,
        "variants": reports,
    });
    std::fs::write(
        out.join("report.json"),
        serde_json::to_vec_pretty(&json).expect("plain JSON"),
    )
    .map_err(|e| StageError::io("cannot write report.json", e))?;
    let md = markdown(&reports, &reports[baseline].name, p.batch);
    std::fs::write(out.join("report.md"), &md)
        .map_err(|e| StageError::io("cannot write report.md", e))?;
    chart::draw(&out.join("chart.png"), &reports).map_err(StageError::Failed)?;
    for line in md.lines() {
        ctx.events.log(line);
    }
    gate(&p.gate, &reports, baseline)?;
    let mut output = StageOutput::default();
    output
        .metadata
        .insert("baseline".into(), reports[baseline].name.clone().into());
    // Under a key of their own: a model stage may be named `baseline`.
    let variants: serde_json::Map<String, serde_json::Value> = reports
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                serde_json::json!({"perplexity": r.perplexity, "chrf": r.chrf, "latency_p95_ms": r.latency_p95_ms, "artifact_bytes": r.artifact_bytes}),
            )
        })
        .collect();
    output.metadata.insert("variants".into(), variants.into());
    Ok(output)
}

/// What scoring the models needs, handed to whichever backend the device picks.
struct Score<'a> {
    ctx: &'a StageContext<'a>,
    p: &'a EvaluateParams,
    models: &'a [InputArtifact],
    corpus_dir: &'a std::path::Path,
    rounding: Rounding,
}

impl OnDevice for Score<'_> {
    type Output = Result<Vec<VariantReport>, StageError>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        score::<B>(self, &device)
    }
}

/// Loads and scores each model in turn (one in memory at a time).
fn score<B: Backend>(job: Score<'_>, device: &B::Device) -> Result<Vec<VariantReport>, StageError> {
    let Score {
        ctx,
        p,
        models,
        corpus_dir,
        rounding,
    } = job;
    let mut reports = Vec::new();
    // The models carry their tokenizer; a `tokenizer` input, when given, must be theirs.
    let mut digest = ctx
        .inputs
        .get("tokenizer")
        .and_then(|t| t.first())
        .map(|t| t.digest.clone());
    // Every model scores the same targets: the test records are cut to the shortest length
    // limit among the models (cut to each model's own, a longer-context model would be
    // scored on longer, harder targets, and the comparison and the gate would be off).
    let mut max_len = usize::MAX;
    for m in models {
        max_len = max_len.min(artifact::read_card(&m.dir)?.config.max_len);
    }
    let mut examples: Option<Vec<Example>> = None;
    for m in models {
        ctx.checkpoint()?;
        let lm = artifact::load::<B>(&m.dir, device)?;
        // Every model must read the same tokens, or their perplexities are not comparable.
        match &digest {
            None => digest = Some(lm.card.tokenizer_digest.clone()),
            Some(d) if *d != lm.card.tokenizer_digest => {
                return Err(StageError::Failed(format!(
                    "model `{}` was trained with another tokenizer than the other inputs: their scores would not compare",
                    m.stage
                )))
            }
            Some(_) => {}
        }
        // The models share one tokenizer (checked above): the split is tokenized once.
        if examples.is_none() {
            let loaded = data::load_examples(
                corpus_dir,
                "test",
                &lm.tokenizer,
                &lm.card.specials,
                max_len,
                None,
            )?;
            if loaded.is_empty() {
                return Err(StageError::Failed(format!(
                    "the corpus's test split has no record of {} tokens or more to score (it is empty, or its records are that short)",
                    data::MIN_EXAMPLE_TOKENS
                )));
            }
            examples = Some(loaded);
        }
        let examples = examples.as_deref().unwrap_or_default();
        ctx.events.log(&format!(
            "evaluating `{}` ({})",
            m.stage,
            lm.card.quantization.as_str()
        ));
        let padding = rounding.within(lm.card.config.max_len);
        let r = evaluate_model(ctx, &m.stage, &lm, examples, p, padding, device)?;
        reports.push(r);
    }
    Ok(reports)
}

/// The first failure of the gate, as the error the pipeline stops with.
///
/// Each bound is written as "within it or fail", so that a value that is not a number (a
/// diverged model's perplexity) fails every bound it meets instead of passing them all.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub fn gate(g: &Gate, reports: &[VariantReport], baseline: usize) -> Result<(), StageError> {
    let base = &reports[baseline];
    // Every variant's increase is measured against the baseline's perplexity: an infinite
    // one (mean loss above 709 nats) made every finite variant's increase -100%, a pass.
    if g.max_ppl_increase.is_some() && !base.perplexity.is_finite() {
        return Err(StageError::Gate(format!(
            "baseline `{}`: perplexity {} is not finite, so max_ppl_increase has nothing to compare with",
            base.name, base.perplexity
        )));
    }
    for (i, r) in reports.iter().enumerate() {
        let fail = |metric: &str, value: f64, op: &str, limit: &str, bound: f64, extra: String| {
            Err(StageError::Gate(format!(
                "variant `{}`: {metric} {value:.4} {op} {limit} {bound}{extra}",
                r.name
            )))
        };
        if let Some(max) = g.max_ppl_increase {
            if i != baseline && !(r.ppl_increase <= max) {
                return fail(
                    "ppl_increase",
                    r.ppl_increase,
                    "exceeds",
                    "max_ppl_increase",
                    max,
                    format!(
                        " (perplexity {:.3} against baseline `{}` {:.3})",
                        r.perplexity, base.name, base.perplexity
                    ),
                );
            }
        }
        if let Some(max) = g.max_ppl {
            if !(r.perplexity <= max) {
                return fail(
                    "perplexity",
                    r.perplexity,
                    "exceeds",
                    "max_ppl",
                    max,
                    String::new(),
                );
            }
        }
        // Each language too: pooled over tokens, one language's doubled perplexity hides
        // behind another with nine times the tokens (en 20 → 20.2, ru 30 → 60: +8%).
        for (lang, scores) in &r.languages {
            let in_lang = |what: &str| format!(" in language `{lang}`{what}");
            if let Some(max) = g.max_ppl {
                if !(scores.perplexity <= max) {
                    return fail(
                        "perplexity",
                        scores.perplexity,
                        "exceeds",
                        "max_ppl",
                        max,
                        in_lang(""),
                    );
                }
            }
            let base_ppl = base.languages.get(lang).map(|b| b.perplexity);
            if let (Some(max), Some(base_ppl)) = (g.max_ppl_increase, base_ppl) {
                // As pooled (above): an infinite baseline would pass every variant.
                if !base_ppl.is_finite() {
                    return Err(StageError::Gate(format!(
                        "baseline `{}`: perplexity {base_ppl} on language `{lang}` is not finite, so max_ppl_increase has nothing to compare with there",
                        base.name
                    )));
                }
                let increase = scores.perplexity / base_ppl - 1.0;
                if i != baseline && !(increase <= max) {
                    return fail(
                        "ppl_increase",
                        increase,
                        "exceeds",
                        "max_ppl_increase",
                        max,
                        in_lang(&format!(
                            " (perplexity {:.3} against baseline `{}` {base_ppl:.3})",
                            scores.perplexity, base.name
                        )),
                    );
                }
            }
        }
        if let Some(max) = g.max_p95_ms {
            if !(r.latency_p95_ms <= max) {
                return fail(
                    "latency_p95_ms",
                    r.latency_p95_ms,
                    "exceeds",
                    "max_p95_ms",
                    max,
                    format!(" (generating {} tokens)", r.latency_tokens),
                );
            }
        }
        if let Some(min) = g.min_chrf {
            if !(r.chrf >= min) {
                return fail("chrf", r.chrf, "is below", "min_chrf", min, String::new());
            }
        }
    }
    Ok(())
}

fn lang_names(s: &Specials) -> BTreeMap<u32, String> {
    s.langs.iter().map(|(k, v)| (*v, k.clone())).collect()
}

fn evaluate_model<B: Backend>(
    ctx: &StageContext<'_>,
    name: &str,
    lm: &LoadedModel<B>,
    examples: &[Example],
    p: &EvaluateParams,
    padding: Padding,
    device: &B::Device,
) -> Result<VariantReport, StageError> {
    let specials = &lm.card.specials;
    let names = lang_names(specials);
    let mut by_lang: BTreeMap<String, Vec<&Example>> = BTreeMap::new();
    for e in examples {
        let lang = names
            .get(&e.control[0])
            .cloned()
            .unwrap_or_else(|| "other".into());
        by_lang.entry(lang).or_default().push(e);
    }
    let mut languages = BTreeMap::new();
    let (mut nll_all, mut right_all, mut tokens_all) = (0.0, 0usize, 0usize);
    let mut chrf_all = ChrfStats::default();
    for (lang, mut rows) in by_lang {
        if let Some(n) = p.max_records {
            rows.truncate(n);
        }
        let (mut nll, mut right, mut tokens) = (0.0, 0usize, 0usize);
        for chunk in rows.chunks(32) {
            ctx.checkpoint()?;
            let b = data::make_batch(chunk, specials, padding, |_, len| len / 2);
            let (n, r) = teacher_forced(&lm.model, &b, device);
            nll += n;
            right += r;
            tokens += b.tokens;
        }
        // Fixed prompts: the first records of the split, cut at their middle.
        let prompts: Vec<&Example> = rows.iter().take(p.prompts).copied().collect();
        let gen_rows: Vec<Row> = prompts
            .iter()
            .map(|e| {
                let k = e.ids.len() / 2;
                let mut src = e.control.to_vec();
                src.extend_from_slice(&e.ids[..k]);
                Row {
                    src,
                    sampling: Sampling::default(),
                    // As long as the reference it is scored against may be (chrF weighs
                    // recall twice: a reply cut shorter would score lower for it).
                    max_new_tokens: e.ids.len() - k + 1,
                    ignore_eos: false,
                }
            })
            .collect();
        // At most `MAX_BATCH` rows at once, as `batch` is bounded: each holds its cache of
        // keys and values while it generates, and `prompts` has no bound of its own.
        let mut outs = Vec::with_capacity(gen_rows.len());
        for rows in gen_rows.chunks(MAX_BATCH) {
            ctx.checkpoint()?;
            outs.extend(generate::generate(
                &lm.model,
                specials,
                rows,
                device,
                |_, _| Next::Continue,
            ));
        }
        let mut chrf_lang = ChrfStats::default();
        for (e, (ids, _)) in prompts.iter().zip(&outs) {
            let k = e.ids.len() / 2;
            let reference = lm.tokenizer.decode(&e.ids[k..], true).unwrap_or_default();
            let ids: Vec<u32> = ids.iter().copied().filter(|t| *t != specials.eos).collect();
            let hyp = lm.tokenizer.decode(&ids, true).unwrap_or_default();
            chrf_lang.add(&hyp, &reference);
        }
        chrf_all.merge(&chrf_lang);
        languages.insert(
            lang,
            LangScores {
                records: rows.len(),
                tokens,
                perplexity: (nll / tokens.max(1) as f64).exp(),
                token_accuracy: right as f64 / tokens.max(1) as f64,
                chrf: chrf_lang.score(),
                prompts: prompts.len(),
            },
        );
        nll_all += nll;
        right_all += right;
        tokens_all += tokens;
    }

    let mut report = VariantReport {
        name: name.to_string(),
        model_digest: String::new(),
        quantization: lm.card.quantization.as_str().to_string(),
        artifact_bytes: lm.artifact_bytes,
        stored_param_bytes: lm.stored_param_bytes,
        resident_param_bytes: lm.resident_param_bytes,
        load_ms: f64::NAN,
        perplexity: (nll_all / tokens_all.max(1) as f64).exp(),
        token_accuracy: right_all as f64 / tokens_all.max(1) as f64,
        chrf: chrf_all.score(),
        latency_p50_ms: f64::NAN,
        latency_p95_ms: f64::NAN,
        tokens_per_second_batch1: f64::NAN,
        tokens_per_second_batch: f64::NAN,
        languages,
        ppl_increase: 0.0,
        latency_tokens: 0,
    };
    if !p.timings {
        return Ok(report);
    }
    report.load_ms = lm.load_ms;
    // Latency: a fixed-length continuation of one prompt, after two untimed runs.
    let prompt = &examples[0];
    let src: Vec<u32> = prompt
        .control
        .iter()
        .chain(&prompt.ids[..prompt.ids.len() / 2])
        .copied()
        .collect();
    let fixed = |src: Vec<u32>| Row {
        src,
        sampling: Sampling::default(),
        max_new_tokens: p.new_tokens,
        ignore_eos: true,
    };
    let mut times = Vec::new();
    // Tokens counted as generated, not as asked: the position table caps a run
    // (`max_len`), and throughput over tokens never made would be overstated.
    let mut made = 0;
    for i in 0..p.latency_runs + 2 {
        ctx.checkpoint()?;
        let t = Instant::now();
        let out = generate::generate(
            &lm.model,
            specials,
            &[fixed(src.clone())],
            device,
            |_, _| Next::Continue,
        );
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        made = out.iter().map(|(ids, _)| ids.len()).sum::<usize>();
    }
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let batch_rows: Vec<Row> = examples
        .iter()
        .cycle()
        .take(p.batch)
        .map(|e| {
            fixed(
                e.control
                    .iter()
                    .chain(&e.ids[..e.ids.len() / 2])
                    .copied()
                    .collect(),
            )
        })
        .collect();
    ctx.checkpoint()?;
    let (out, batch_secs) = timed_after_warm_up(|| {
        generate::generate(&lm.model, specials, &batch_rows, device, |_, _| {
            Next::Continue
        })
    });
    let batch_made: usize = out.iter().map(|(ids, _)| ids.len()).sum();
    if made < p.new_tokens {
        ctx.events.log(&format!(
            "model `{}` generates {made} of new_tokens {} tokens (its max_len {} stops it): its latency is of {made} tokens, not {}",
            report.name, p.new_tokens, lm.card.config.max_len, p.new_tokens
        ));
    }
    report.latency_tokens = made;
    report.latency_p50_ms = quantile(&times, 0.5);
    report.latency_p95_ms = quantile(&times, 0.95);
    report.tokens_per_second_batch1 = made as f64 / (mean / 1e3).max(1e-9);
    report.tokens_per_second_batch = batch_made as f64 / batch_secs.max(1e-9);
    Ok(report)
}

/// `run`'s result and seconds on its second call. The first meets the batch's tensor
/// shapes for the first time: on a GPU it compiles and autotunes kernels for them (seconds
/// per shape), which is not what a throughput measures.
fn timed_after_warm_up<R>(mut run: impl FnMut() -> R) -> (R, f64) {
    run();
    let t = Instant::now();
    let out = run();
    (out, t.elapsed().as_secs_f64())
}

/// Summed negative log-likelihood and correctly predicted tokens of one batch.
fn teacher_forced<B: Backend>(
    model: &orchestrate_model::model::Seq2Seq<B>,
    b: &data::Batch,
    device: &B::Device,
) -> (f64, usize) {
    let [src, tgt_in, targets] = orchestrate_model::train::tensors::<B>(b, device);
    let [src_pad, tgt_pad] = orchestrate_model::train::masks::<B>(b, device);
    let memory = model.encode(src, src_pad.clone());
    let logits = model.decode(tgt_in, tgt_pad.clone(), memory, src_pad);
    let [rows, t, _] = logits.dims();
    let logp = burn::tensor::activation::log_softmax(logits, 2);
    let nll = logp
        .clone()
        .gather(2, targets.clone().reshape([rows, t, 1]))
        .reshape([rows, t])
        .neg()
        .mask_fill(tgt_pad.clone(), 0.0)
        .sum()
        .into_scalar()
        .elem::<f64>();
    let right = logp
        .argmax(2)
        .reshape([rows, t])
        .equal(targets)
        .int()
        .mask_fill(tgt_pad, 0)
        .sum()
        .into_scalar()
        .elem::<i64>();
    (nll, right as usize)
}

/// Linear-interpolated quantile of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// chrF (Popović 2015) of one hypothesis against one reference; see [`ChrfStats`].
pub fn chrf(hypothesis: &str, reference: &str) -> f64 {
    let mut stats = ChrfStats::default();
    stats.add(hypothesis, reference);
    stats.score()
}

/// chrF's statistics over a corpus, as sacreBLEU computes its default corpus score:
/// character 1- to 6-grams with whitespace removed, each order's hypothesis, reference and
/// matched counts summed over every sentence, then precision and recall averaged over the
/// orders both sides have, and their F-score with beta 2, 0-100. Summing counts, not
/// averaging sentence scores, weighs a long continuation by its length (a short prompt
/// scoring 0 beside a long one scoring 100 is near 100, not 50).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ChrfStats {
    /// Per order n = 1..=6: hypothesis n-grams, reference n-grams, matched n-grams.
    counts: [[u64; 3]; 6],
}

impl ChrfStats {
    pub fn add(&mut self, hypothesis: &str, reference: &str) {
        let h: Vec<char> = hypothesis.chars().filter(|c| !c.is_whitespace()).collect();
        let r: Vec<char> = reference.chars().filter(|c| !c.is_whitespace()).collect();
        fn grams(s: &[char], n: usize) -> std::collections::HashMap<&[char], u64> {
            let mut m = std::collections::HashMap::new();
            for w in s.windows(n) {
                *m.entry(w).or_default() += 1;
            }
            m
        }
        for (n, c) in (1..=6).zip(self.counts.iter_mut()) {
            let (hg, rg) = (grams(&h, n), grams(&r, n));
            let matched: u64 = hg
                .iter()
                .map(|(g, count)| (*count).min(*rg.get(g).unwrap_or(&0)))
                .sum();
            c[0] += hg.values().sum::<u64>();
            c[1] += rg.values().sum::<u64>();
            c[2] += matched;
        }
    }

    pub fn merge(&mut self, other: &ChrfStats) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
    }

    pub fn score(&self) -> f64 {
        let (mut p_sum, mut r_sum, mut orders) = (0.0, 0.0, 0usize);
        for &[hyp, reference, matched] in &self.counts {
            if hyp == 0 || reference == 0 {
                continue;
            }
            p_sum += matched as f64 / hyp as f64;
            r_sum += matched as f64 / reference as f64;
            orders += 1;
        }
        if orders == 0 {
            return 0.0;
        }
        let (p, r) = (p_sum / orders as f64, r_sum / orders as f64);
        if p + r == 0.0 {
            return 0.0;
        }
        let beta2 = 4.0;
        100.0 * (1.0 + beta2) * p * r / (beta2 * p + r)
    }
}

fn markdown(reports: &[VariantReport], baseline: &str, batch: usize) -> String {
    let mut s = format!(
        "| variant | scheme | artifact MB | perplexity | vs `{baseline}` | token acc. | chrF | latency tokens | p50 ms | p95 ms | tok/s b=1 | tok/s b={batch} |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in reports {
        s += &format!(
            "| {} | {} | {:.2} | {:.2} | {:+.2}% | {:.3} | {:.1} | {} | {:.1} | {:.1} | {:.0} | {:.0} |\n",
            r.name,
            r.quantization,
            r.artifact_bytes as f64 / 1e6,
            r.perplexity,
            100.0 * r.ppl_increase,
            r.token_accuracy,
            r.chrf,
            r.latency_tokens,
            r.latency_p50_ms,
            r.latency_p95_ms,
            r.tokens_per_second_batch1,
            r.tokens_per_second_batch
        );
    }
    s += "\n| variant | language | records | perplexity | token acc. | chrF |\n|---|---|---:|---:|---:|---:|\n";
    for r in reports {
        for (lang, l) in &r.languages {
            s += &format!(
                "| {} | {lang} | {} | {:.2} | {:.3} | {:.1} |\n",
                r.name, l.records, l.perplexity, l.token_accuracy, l.chrf
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chrf_is_100_for_a_match_and_low_for_nonsense() {
        assert!((chrf("the cat sat", "the cat sat") - 100.0).abs() < 1e-9);
        assert!(chrf("xyz qqq", "the cat sat") < 10.0);
        let partial = chrf("the cat", "the cat sat");
        assert!(partial > 30.0 && partial < 100.0, "{partial}");
    }

    #[test]
    fn corpus_chrf_sums_counts_over_sentences() {
        // A short miss beside a long match: near 100, where the mean of the two sentence
        // scores is about 50.
        let long = "a much longer continuation that the model got exactly right";
        let mut corpus = ChrfStats::default();
        corpus.add("zz", "qq");
        corpus.add(long, long);
        let mean = (chrf("zz", "qq") + chrf(long, long)) / 2.0;
        assert!((mean - 50.0).abs() < 1.0, "{mean}");
        assert!(corpus.score() > 90.0, "{}", corpus.score());
        // Merging per-language statistics is the same as adding every sentence to one.
        let (mut a, mut b) = (ChrfStats::default(), ChrfStats::default());
        a.add("zz", "qq");
        b.add(long, long);
        a.merge(&b);
        assert_eq!(a, corpus);
        assert_eq!(ChrfStats::default().score(), 0.0);
    }

    #[test]
    fn params_that_would_take_the_memory_are_refused_by_name() {
        for (key, most) in [
            ("batch", MAX_BATCH),
            ("new_tokens", MAX_NEW_TOKENS),
            ("latency_runs", MAX_LATENCY_RUNS),
        ] {
            assert!(canonical(serde_json::json!({ key: most })).is_ok(), "{key}");
            let e = canonical(serde_json::json!({ key: most + 1 })).unwrap_err();
            assert_eq!(
                e.path,
                vec![orchestrate_stage::PathSegment::Key(key.into())]
            );
            let orchestrate_stage::ParamProblem::Invalid(m) = e.problem else {
                panic!("{key}: {:?}", e.problem)
            };
            assert_eq!(
                m,
                format!("`{key}` must be at most {most}, got {}", most + 1)
            );
        }
    }

    #[test]
    fn throughput_is_timed_after_a_warm_up_run() {
        let mut calls = 0;
        let (out, secs) = timed_after_warm_up(|| {
            calls += 1;
            if calls == 1 {
                // The first run's kernel compilation.
                std::thread::sleep(std::time::Duration::from_millis(2000));
            }
            calls
        });
        assert_eq!(out, 2);
        assert!(secs < 1.0, "the warm-up was timed: {secs} s");
    }

    #[test]
    fn quantiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert!((quantile(&v, 0.95) - 4.8).abs() < 1e-9);
    }

    fn report(name: &str, ppl: f64, p95: f64) -> VariantReport {
        VariantReport {
            name: name.into(),
            model_digest: String::new(),
            quantization: "fp32".into(),
            artifact_bytes: 0,
            stored_param_bytes: 0,
            resident_param_bytes: 0,
            load_ms: 0.0,
            perplexity: ppl,
            token_accuracy: 0.0,
            chrf: 10.0,
            latency_p50_ms: p95,
            latency_p95_ms: p95,
            tokens_per_second_batch1: 0.0,
            tokens_per_second_batch: 0.0,
            languages: BTreeMap::new(),
            ppl_increase: ppl / 100.0 - 1.0,
            latency_tokens: 0,
        }
    }

    #[test]
    fn the_gate_names_variant_metric_and_both_values() {
        let g = Gate {
            max_ppl_increase: Some(0.05),
            max_p95_ms: Some(100.0),
            ..Gate::default()
        };
        let ok = [report("model", 100.0, 50.0), report("int8", 101.0, 60.0)];
        assert!(gate(&g, &ok, 0).is_ok());
        let bad = [report("model", 100.0, 50.0), report("int8", 110.0, 60.0)];
        let e = gate(&g, &bad, 0).unwrap_err().to_string();
        assert!(
            e.contains("variant `int8`")
                && e.contains("ppl_increase 0.1000")
                && e.contains("max_ppl_increase 0.05"),
            "{e}"
        );
        // Pooled, int8 is 8% worse; Russian alone is twice as bad, and that fails it.
        let with_langs = |name: &str, pooled: f64, en: f64, ru: f64| {
            let mut r = report(name, pooled, 50.0);
            for (lang, ppl) in [("en", en), ("ru", ru)] {
                let scores = LangScores {
                    perplexity: ppl,
                    ..LangScores::default()
                };
                r.languages.insert(lang.to_string(), scores);
            }
            r
        };
        let hidden = [
            with_langs("model", 20.0, 20.0, 30.0),
            with_langs("int8", 21.6, 20.2, 60.0),
        ];
        let loose = Gate {
            max_ppl_increase: Some(0.1),
            ..Gate::default()
        };
        let e = gate(&loose, &hidden, 0).unwrap_err().to_string();
        assert!(
            e.contains(
                "variant `int8`: ppl_increase 1.0000 exceeds max_ppl_increase 0.1 in language `ru`"
            ),
            "{e}"
        );
        let e = gate(
            &Gate {
                max_ppl: Some(50.0),
                ..Gate::default()
            },
            &hidden,
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("perplexity 60.0000 exceeds max_ppl 50 in language `ru`"),
            "{e}"
        );
        let slow = [report("model", 100.0, 150.0)];
        let e = gate(&g, &slow, 0).unwrap_err().to_string();
        assert!(
            e.contains("latency_p95_ms 150.0000 exceeds max_p95_ms 100"),
            "{e}"
        );
    }

    #[test]
    fn a_value_that_is_not_a_number_fails_the_gate() {
        // A diverged model: every comparison with NaN is false, so "value > max" would
        // have passed it.
        let g = Gate {
            max_ppl: Some(1000.0),
            min_chrf: Some(1.0),
            ..Gate::default()
        };
        let diverged = [report("model", f64::NAN, 50.0)];
        let e = gate(&g, &diverged, 0).unwrap_err().to_string();
        assert!(e.contains("perplexity NaN exceeds max_ppl 1000"), "{e}");
        let mut no_chrf = report("model", 100.0, 50.0);
        no_chrf.chrf = f64::NAN;
        assert!(gate(&g, &[no_chrf], 0).is_err());
        // An infinite baseline made every finite variant's increase -100%, a pass.
        let relative = Gate {
            max_ppl_increase: Some(0.05),
            ..Gate::default()
        };
        let mut variants = [
            report("model", f64::INFINITY, 50.0),
            report("int8", 1e9, 50.0),
        ];
        variants[1].ppl_increase = -1.0;
        let e = gate(&relative, &variants, 0).unwrap_err().to_string();
        assert!(
            e.contains("baseline `model`") && e.contains("not finite"),
            "{e}"
        );
        // So in one language, the pooled perplexity finite: `ru` is not passed over.
        let mut model = report("model", 30.0, 50.0);
        let mut int8 = report("int8", 31.0, 50.0);
        for (r, ru) in [(&mut model, f64::INFINITY), (&mut int8, 1e9)] {
            let scores = |perplexity| LangScores {
                perplexity,
                ..LangScores::default()
            };
            r.languages.insert("en".into(), scores(20.0));
            r.languages.insert("ru".into(), scores(ru));
        }
        let e = gate(&relative, &[model, int8], 0).unwrap_err().to_string();
        assert!(
            e.contains("baseline `model`") && e.contains("language `ru` is not finite"),
            "{e}"
        );
    }

    #[test]
    fn parameters_that_would_measure_nothing_are_refused() {
        for key in [
            "max_records",
            "prompts",
            "new_tokens",
            "latency_runs",
            "batch",
        ] {
            let e = canonical(serde_json::json!({ key: 0 })).unwrap_err();
            assert_eq!(
                e.path,
                vec![orchestrate_stage::PathSegment::Key(key.into())],
                "{key}"
            );
        }
        assert!(canonical(serde_json::json!({})).is_ok());
    }
}
