//! `quantize` and `evaluate` end to end on part of the real corpus with a small model: every
//! variant loads and generates, int8 really shrinks the artifact, the report comes out as
//! JSON, Markdown and PNG, and a gate failure stops the pipeline with exit code 4 and a
//! message naming the variant, the metric and both values.
#![cfg(feature = "model")]

mod common;
use common::{stage_status, Sandbox};

const PIPELINE: &str = r#"
name: quant
storage: file://store
stages:
  corpus:
    kind: ingest
    with:
      sources:
        - { path: "/usr/share/games/fortunes/p*", lang: en }
        - { path: "/usr/share/games/fortunes/ru/[a-c]*", lang: ru }
      split: { val: 0.05, test: 0.05 }
  tokenizer:
    kind: bpe
    inputs: { corpus: corpus }
    with: { vocab_size: 400, author_tokens: 8 }
  model:
    kind: train
    inputs: { corpus: corpus, tokenizer: tokenizer }
    resources: { device: cpu }
    with:
      d_model: 64
      n_heads: 4
      enc_layers: 1
      dec_layers: 1
      d_ff: 128
      max_len: 64
      batch: 8
      steps: 20
      warmup: 5
      lr: 0.003
      eval_every: 10
      eval_batches: 2
      max_records: 400
  int8:
    kind: quantize
    inputs: { model: model }
    with: { scheme: int8 }
  fp16:
    kind: quantize
    inputs: { model: model }
    with: { scheme: fp16 }
  bf16:
    kind: quantize
    inputs: { model: model }
    with: { scheme: bf16 }
  dyn:
    kind: quantize
    inputs: { model: model }
    # int8's blocks: the same values, held another way.
    with: { scheme: dynamic, block: 64 }
  evaluation:
    kind: evaluate
    inputs: { corpus: corpus, tokenizer: tokenizer, models: [model, int8, fp16, bf16, dyn] }
    with:
      max_records: 40
      prompts: 4
      new_tokens: 10
      latency_runs: 3
      batch: 4
      gate: { max_ppl_increase: 0.5 }
  # The same model with a longer length limit: compared with `model`, both must be scored
  # on the same targets (the shorter limit's).
  long:
    kind: train
    inputs: { corpus: corpus, tokenizer: tokenizer }
    resources: { device: cpu }
    with:
      d_model: 64
      n_heads: 4
      enc_layers: 1
      dec_layers: 1
      d_ff: 128
      max_len: 128
      batch: 8
      steps: 4
      warmup: 2
      eval_every: 4
      eval_batches: 1
      max_records: 100
  lengths:
    kind: evaluate
    inputs: { corpus: corpus, models: [long, model] }
    with: { max_records: 40, prompts: 1, new_tokens: 2, timings: false }
"#;

fn file(sb: &Sandbox, stage: &str, name: &str) -> (Vec<u8>, u64) {
    let m = sb.stage_manifest(stage);
    let f = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == name)
        .unwrap_or_else(|| panic!("{stage} has no {name}: {m}"));
    let hex = f["digest"].as_str().unwrap().trim_start_matches("blake3:");
    let bytes = std::fs::read(sb.path().join(format!("store/blobs/{}/{hex}", &hex[..2]))).unwrap();
    (bytes, f["size"].as_u64().unwrap())
}

#[test]
fn quantized_variants_are_smaller_measured_and_gated() {
    let sb = Sandbox::new();
    sb.write("p.yaml", PIPELINE);
    let r = sb.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);

    let (_, fp32) = file(&sb, "model", "model.mpk");
    let (_, int8) = file(&sb, "int8", "weights.safetensors");
    let (_, fp16) = file(&sb, "fp16", "weights.safetensors");
    assert!(
        (int8 as f64) <= 0.30 * fp32 as f64,
        "int8 {int8} bytes against fp32 {fp32}"
    );
    assert!((fp16 as f64) <= 0.52 * fp32 as f64, "fp16 {fp16} vs {fp32}");

    let (report, _) = file(&sb, "evaluation", "report.json");
    let report: serde_json::Value = serde_json::from_slice(&report).unwrap();
    let variants = report["variants"].as_array().unwrap();
    let names: Vec<&str> = variants
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["model", "int8", "fp16", "bf16", "dyn"]);
    let ppl = |i: usize| variants[i]["perplexity"].as_f64().unwrap();
    // `dynamic` keeps its weight matrices int8 in memory; the others hold f32.
    let resident = |i: usize| variants[i]["resident_param_bytes"].as_f64().unwrap();
    assert!(
        resident(4) < 0.4 * resident(0),
        "{} vs {}",
        resident(4),
        resident(0)
    );
    assert_eq!(resident(1), resident(0));
    // The same int8 blocks, dequantized when loaded or inside each product: the same
    // perplexity up to f32 rounding (a second rounding of the output projection's blocks
    // moved it by more).
    assert!(
        (ppl(4) / ppl(1) - 1.0).abs() < 1e-4,
        "dynamic {} vs int8 {}",
        ppl(4),
        ppl(1)
    );
    for v in variants {
        let ppl = v["perplexity"].as_f64().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{v}");
        assert!(v["latency_p95_ms"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["tokens_per_second_batch"].as_f64().unwrap() > 0.0, "{v}");
        let chrf = v["chrf"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&chrf), "{v}");
        let langs: Vec<&String> = v["languages"].as_object().unwrap().keys().collect();
        assert_eq!(langs, ["en", "ru"], "{v}");
    }
    // Half precision barely moves perplexity; int8 moves it a little.
    assert!(
        (ppl(2) / ppl(0) - 1.0).abs() < 0.005,
        "fp16 {} vs {}",
        ppl(2),
        ppl(0)
    );
    assert!(
        (ppl(3) / ppl(0) - 1.0).abs() < 0.02,
        "bf16 {} vs {}",
        ppl(3),
        ppl(0)
    );
    assert!(
        (ppl(1) / ppl(0) - 1.0).abs() < 0.05,
        "int8 {} vs {}",
        ppl(1),
        ppl(0)
    );
    let (md, _) = file(&sb, "evaluation", "report.md");
    assert!(String::from_utf8(md).unwrap().contains("| int8 | int8 |"));
    let (png, _) = file(&sb, "evaluation", "chart.png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // Models with different length limits score the same target tokens, language by
    // language: the records are cut to the shorter limit for both.
    let (lengths, _) = file(&sb, "lengths", "report.json");
    let lengths: serde_json::Value = serde_json::from_slice(&lengths).unwrap();
    let tokens = |v: &serde_json::Value| {
        v["languages"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(lang, s)| (lang.clone(), s["tokens"].as_u64().unwrap()))
            .collect::<Vec<_>>()
    };
    let [long, short] = [0, 1].map(|i| tokens(&lengths["variants"][i]));
    assert_eq!(long, short, "{lengths}");
    assert_eq!(short, tokens(&variants[0]));

    // A gate no model can pass: exit 4, and the message says who, what and by how much.
    // Not retried, even with retries to spare: a gate measured until it passes is no gate.
    let r = sb.run(&[
        "run",
        "p.yaml",
        "--set",
        "evaluation.with.gate.max_p95_ms=0.001",
        "--set",
        "evaluation.retries=2",
    ]);
    assert_eq!(r.code, 4, "{}\n{}", r.stdout, r.stderr);
    let evaluation = sb.last_run()["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "evaluation")
        .cloned()
        .unwrap();
    assert_eq!(evaluation["attempts"], 1, "{evaluation}");
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(
        all.contains("variant `model`: latency_p95_ms") && all.contains("exceeds max_p95_ms 0.001"),
        "{all}"
    );
    assert_eq!(stage_status(&sb.last_run(), "int8"), "cached");

    // A deployment of a model the report did not score is not covered by its gate: refused
    // by validation, before anything runs, naming the models it did score (deploy checks
    // the same by digest when it runs: `deploy::tests::a_report_covers_only_the_models_it_scored`).
    let ungated = format!(
        "{PIPELINE}  ungated:\n    kind: deploy\n    inputs: {{ model: long, report: evaluation }}\n    with: {{ port: 0 }}\n"
    );
    sb.write("p.yaml", &ungated);
    let r = sb.run(&["run", "p.yaml", "--only", "ungated", "--no-serve"]);
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(
        all.contains("takes model `long`, which its report `evaluation` does not score (it scores `model`, `int8`, `fp16`, `bf16`, `dyn`)"),
        "{all}"
    );
}
