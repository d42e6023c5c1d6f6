//! Phase two: a validated pipeline. Every stage kind is known, every `with:` block is
//! canonical, every reference resolves, every edge carries the artifact kind its consumer
//! expects, and the graph has no cycle. A [`Pipeline`] cannot exist otherwise, so planning and
//! running never re-check any of it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use orchestrate_stage::{ArtifactKind, Inputs, ParamError, ParamProblem, PathSegment};
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;

use crate::diag::{suggest, Diagnostic, Span};
use crate::kinds::StageKind;
use crate::spec::{Invalid, PipelineSpec, TOP_LEVEL_KEYS};
use crate::yaml::{Key, Node, Value};

const STAGE_KEYS: [&str; 7] = [
    "kind",
    "inputs",
    "with",
    "resources",
    "retries",
    "timeout",
    "deps",
];
const TRACKING_KEYS: [&str; 3] = ["mlflow", "experiment", "register"];
const REGISTER_KEYS: [&str; 2] = ["stage", "name"];
// `devices` is known here only to be refused with a hint (see `resources`).
const RESOURCE_KEYS: [&str; 2] = ["device", "devices"];

#[derive(Clone, Debug, Serialize)]
pub struct Tracking {
    /// MLflow tracking URI; `None` keeps records locally.
    pub mlflow: Option<String>,
    pub experiment: String,
    /// Register each new artifact of this stage as a version of this registered model.
    pub register: Option<Register>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Register {
    pub stage: String,
    pub name: String,
    #[serde(skip)]
    span: Span,
}

/// Where a stage runs. `Auto` is resolved when the stage's cache key is computed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Device {
    Auto,
    Cpu,
    Cuda(Option<u32>),
}

impl Device {
    fn parse(s: &str) -> Option<Device> {
        match s {
            "auto" => Some(Device::Auto),
            "cpu" => Some(Device::Cpu),
            "cuda" => Some(Device::Cuda(None)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| Device::Cuda(Some(n))),
        }
    }

    /// The device a stage is handed: `auto` becomes `cuda` only where this binary can use one.
    pub fn resolve(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(None) => "cuda".into(),
            Device::Cuda(Some(n)) => format!("cuda:{n}"),
            Device::Auto => {
                if cuda_usable() {
                    "cuda".into()
                } else {
                    "cpu".into()
                }
            }
        }
    }

    /// What joins the cache key: results differ between CPU and GPU, not between GPU 0 and 1.
    pub fn class(&self) -> &'static str {
        if self.resolve().starts_with("cuda") {
            "cuda"
        } else {
            "cpu"
        }
    }
}

/// `auto` picks CUDA only in a build with the CUDA backend, on a machine with an NVIDIA driver.
fn cuda_usable() -> bool {
    cfg!(feature = "cuda") && std::path::Path::new("/proc/driver/nvidia/version").exists()
}

#[derive(Clone, Debug)]
pub struct InputBinding {
    pub name: String,
    /// Producing stages, as indices into [`Pipeline::stages`], in the order written.
    pub stages: Vec<usize>,
}

#[derive(Clone, Debug)]
pub struct Stage {
    pub name: String,
    pub kind: StageKind,
    /// The canonical `with:` block: defaults filled in, as it enters the cache key.
    pub params: serde_json::Value,
    pub inputs: Vec<InputBinding>,
    pub device: Device,
    pub retries: u32,
    pub timeout: Option<Duration>,
    /// Local files whose contents join the cache key, relative to the pipeline directory.
    pub deps: Vec<String>,
}

#[derive(Debug)]
pub struct Pipeline {
    pub name: String,
    pub path: PathBuf,
    pub dir: PathBuf,
    /// The artifact store URL, as written (relative `file://` paths resolve against `dir`).
    pub storage: String,
    pub tracking: Tracking,
    pub params: serde_json::Value,
    pub stages: Vec<Stage>,
    /// Producer → consumer; node `i` is stage `i`; edges carry the consumer's input name.
    pub graph: DiGraph<usize, String>,
    /// Stage indices, every producer before its consumers, ties in file order.
    pub order: Vec<usize>,
    /// Identifies the pipeline's effective content (after overrides), for run records.
    pub digest: String,
}

impl Pipeline {
    pub fn stage_index(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    /// Stages that feed `i` directly.
    pub fn upstream(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self.stages[i]
            .inputs
            .iter()
            .flat_map(|b| b.stages.iter().copied())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Stages fed by `i` directly.
    pub fn downstream(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .graph
            .neighbors_directed(NodeIndex::new(i), petgraph::Direction::Outgoing)
            .map(|n| n.index())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

impl PipelineSpec {
    /// Checks everything and returns the typed pipeline, or every problem found: the file
    /// itself, and that every local file a stage reads (an ingest source, a `deps` entry)
    /// exists here. For commands that run, plan or validate the pipeline.
    pub fn validate(self) -> Result<Pipeline, Invalid> {
        self.check(true)
    }

    /// As [`validate`](Self::validate), except for the files stages read: for commands that
    /// only look at the pipeline (`graph`, `export argo`, `runs --pipeline`, `serve
    /// --pipeline`), which must work on a machine where the corpus is not installed.
    pub fn validate_shape(self) -> Result<Pipeline, Invalid> {
        self.check(false)
    }

    fn check(self, check_files: bool) -> Result<Pipeline, Invalid> {
        let mut v = Validator {
            diags: self.diags,
            dir: self.dir.clone(),
            check_files,
        };
        let root = &self.root;
        // A key missing from the whole document is pointed at its start.
        let top = Span {
            line: 1,
            col: 1,
            len: 1,
            ..root.span
        };
        // `x-...` at the top level is the user's own, a home for anchors that stages merge
        // (`x-defaults: &d {...}`, then `<<: *d`), as in Compose files.
        v.unknown_keys_but(root, &TOP_LEVEL_KEYS, "at the top level", |k| {
            k.starts_with("x-")
        });
        let name = match root.get("name") {
            Some(n) => {
                let name = v.string(n, "name").unwrap_or_default();
                // It names the run records, the stages' history and the MLflow experiment.
                if n.as_str().is_some_and(|s| s.trim().is_empty()) {
                    v.diags.push(
                        Diagnostic::new("`name` is empty", n.span)
                            .hint("name the pipeline: `name: my-pipeline`"),
                    );
                }
                name
            }
            None => {
                v.diags.push(
                    Diagnostic::new("missing required key `name`", top)
                        .hint("add `name: my-pipeline` at the top of the file"),
                );
                String::new()
            }
        };
        let storage = match root.get("storage") {
            None => "file://artifacts".to_string(),
            Some(n) => v.string(n, "storage").unwrap_or_default(),
        };
        // (An empty string here is a `storage` of the wrong type, reported already.)
        if let Some(n) = root.get("storage").filter(|n| n.as_str() == Some("")) {
            v.diags.push(
                Diagnostic::new("`storage` is empty", n.span)
                    .hint("name a store (`file://DIR` or `s3://BUCKET/PREFIX`), or leave the key out for `file://artifacts`"),
            );
        } else if let Some(problem) =
            crate::store::url_problem(&storage).filter(|_| !storage.is_empty())
        {
            if let Some(n) = root.get("storage") {
                v.diags.push(
                    Diagnostic::new(format!("unsupported storage URL `{storage}`"), n.span)
                        .hint(problem),
                );
            }
        }
        let tracking = v.tracking(root.get("tracking"), &name);
        let params = match root.get("params") {
            None => serde_json::json!({}),
            Some(
                n @ Node {
                    value: Value::Map(_) | Value::Null,
                    ..
                },
            ) => match n.to_json() {
                serde_json::Value::Null => serde_json::json!({}),
                json => json,
            },
            // `${params.X}` names a key: a list or a number has none.
            Some(n) => {
                v.diags.push(
                    Diagnostic::new(
                        format!(
                            "`params` must be a mapping of names to values, found {}",
                            n.type_name()
                        ),
                        n.span,
                    )
                    .hint("write `params: { seed: 42 }`"),
                );
                serde_json::json!({})
            }
        };

        let stage_entries: Vec<(Key, Node)> = match root.get("stages") {
            Some(Node {
                value: Value::Map(entries),
                ..
            }) => entries.clone(),
            Some(n) => {
                v.diags.push(Diagnostic::new(
                    format!(
                        "`stages` must be a mapping of stage names to stages, found {}",
                        n.type_name()
                    ),
                    n.span,
                ));
                Vec::new()
            }
            None => {
                v.diags.push(
                    Diagnostic::new("missing required key `stages`", top)
                        .hint("add `stages:` with at least one stage"),
                );
                Vec::new()
            }
        };
        let names: Vec<&str> = stage_entries.iter().map(|(k, _)| k.name.as_str()).collect();
        // Names that differ only in case or in `-`/`_` are one name to Argo (task names) and
        // to a shell stage's `$INPUT_<NAME>` variables.
        let mut seen: BTreeMap<String, &str> = BTreeMap::new();
        for (key, _) in &stage_entries {
            match seen.get(&name_folded(&key.name)) {
                Some(first) if *first != key.name => v.diags.push(
                    Diagnostic::new(
                        format!(
                            "stage names `{first}` and `{}` differ only in case or in `-`/`_`",
                            key.name
                        ),
                        key.span,
                    )
                    .hint("they would be one name in `export argo` and in `$INPUT_` variables: rename one"),
                ),
                _ => {
                    seen.insert(name_folded(&key.name), &key.name);
                }
            }
        }

        let mut stages = Vec::new();
        // Per stage, per input: the reference spans, for pointing at edges later.
        let mut ref_spans: Vec<BTreeMap<(String, usize), Span>> = Vec::new();
        // Every resolvable reference, even from stages with other problems, so that a cycle
        // is reported together with them.
        let mut edges: Vec<(usize, usize, String)> = Vec::new();
        for (i, (key, node)) in stage_entries.iter().enumerate() {
            let (stage, spans, bindings) = v.stage(key, node, &names);
            let mut input_names: BTreeMap<String, &str> = BTreeMap::new();
            for b in &bindings {
                let first = input_names.insert(name_folded(&b.name), &b.name);
                if let Some(first) = first.filter(|f| *f != b.name) {
                    let at = spans
                        .iter()
                        .find(|((name, _), _)| name == &b.name)
                        .map(|(_, span)| *span)
                        .unwrap_or(key.span);
                    v.diags.push(
                        Diagnostic::new(
                            format!(
                                "inputs `{first}` and `{}` of stage `{}` differ only in case or punctuation",
                                b.name, key.name
                            ),
                            at,
                        )
                        .hint("a shell stage would see both as one `$INPUT_` variable: rename one"),
                    );
                }
            }
            for b in bindings {
                edges.extend(b.stages.iter().map(|&p| (p, i, b.name.clone())));
            }
            stages.push(stage);
            ref_spans.push(spans);
        }

        // Type-check edges now that every stage's output kind is known, and check that
        // each producer can make what its consumers need.
        for (i, stage) in stages.iter().enumerate() {
            let Some(stage) = stage else { continue };
            let Inputs::Typed(decls) = stage.kind.descriptor().inputs else {
                continue;
            };
            for binding in &stage.inputs {
                let Some(decl) = decls.iter().find(|d| d.name == binding.name) else {
                    continue;
                };
                for &producer in &binding.stages {
                    let Some(p) = &stages[producer] else { continue };
                    let produced = p.kind.descriptor().output;
                    if produced != decl.kind {
                        let span = ref_spans[i][&(binding.name.clone(), producer)];
                        v.diags.push(
                            Diagnostic::new(
                                format!(
                                    "stage `{}` input `{}` expects {}, but `{}` produces {}",
                                    stage.name, binding.name, decl.kind, p.name, produced
                                ),
                                span,
                            )
                            .label(format!("produces {produced}"))
                            .hint_opt(producers_of(decl.kind, &stages)),
                        );
                    }
                    // A part of the input this stage needs (evaluate: the test split) that
                    // the producer's params leave empty is refused now, at that param,
                    // rather than after every stage before this one has run.
                    for part in decl.reads {
                        let Some(path) = (p.kind.descriptor().empty_part)(&p.params, part) else {
                            continue;
                        };
                        let (key, node) = &stage_entries[producer];
                        let e = ParamError {
                            path,
                            problem: ParamProblem::Invalid(format!(
                                "it leaves the {part} split empty, which stage `{}` needs (its input `{}`)",
                                stage.name, binding.name
                            )),
                        };
                        let empty = Node::new(Value::Map(Vec::new()), key.span);
                        let with = node.get("with").unwrap_or(&empty);
                        let anchor = with_anchor(key, node);
                        v.diags
                            .push(param_diagnostic(&p.name, p.kind, with, anchor, &e).hint(
                                format!("give the {part} split a fraction above 0, such as 0.02"),
                            ));
                    }
                }
            }
        }

        for (i, stage) in stages.iter().enumerate() {
            let Some(stage) = stage else { continue };
            for unscored in models_their_report_does_not_score(stage, &stages) {
                let span = ref_spans[i]
                    .get(&(unscored.input.to_string(), unscored.model))
                    .copied()
                    .unwrap_or(stage_entries[i].0.span);
                let report = stages[unscored.report].as_ref().map_or("", |s| &s.name);
                let model = stages[unscored.model].as_ref().map_or("", |s| &s.name);
                v.diags.push(
                    Diagnostic::new(
                        format!(
                            "stage `{}` takes model `{model}`, which its report `{report}` does not score (it scores {})",
                            stage.name,
                            unscored.scored.join(", ")
                        ),
                        span,
                    )
                    .label("not gated by the report")
                    .hint(format!(
                        "add `{model}` to the models of `{report}`, or take one it scores"
                    )),
                );
            }
        }

        // Params that name other stages or need another stage's setting, checked against
        // them now rather than after the stages before them have run (a training).
        for (i, stage) in stages.iter().enumerate() {
            let Some(stage) = stage else { continue };
            let (key, node) = &stage_entries[i];
            let empty = Node::new(Value::Map(Vec::new()), key.span);
            let with = node.get("with").unwrap_or(&empty);
            let anchor = with_anchor(key, node);
            let problem = |path: &str, msg: String| ParamError {
                path: vec![PathSegment::Key(path.into())],
                problem: ParamProblem::Invalid(msg),
            };
            let model_inputs = inputs_of(stage, ArtifactKind::Model, &stages);
            let models: Vec<usize> = model_inputs
                .iter()
                .flat_map(|(_, producers)| producers.iter().copied())
                .collect();
            // evaluate's `baseline` is one of its models.
            if let Some(b) = stage.params.get("baseline").and_then(|b| b.as_str()) {
                let names: Vec<&str> = models
                    .iter()
                    .filter_map(|&m| stages[m].as_ref().map(|s| s.name.as_str()))
                    .collect();
                if !names.is_empty() && !names.contains(&b) {
                    let e = problem(
                        "baseline",
                        format!("`{b}` is not among the models ({})", names.join(", ")),
                    );
                    v.diags.push(
                        param_diagnostic(&stage.name, stage.kind, with, anchor, &e)
                            .hint_opt(suggest(b, &names)),
                    );
                }
            }
            // GPUs for data-parallel training, on a stage pinned to the CPU.
            let devices = stage.params.get("devices").and_then(|d| d.as_array());
            if devices.is_some_and(|d| !d.is_empty()) && stage.device == Device::Cpu {
                let e = problem(
                    "devices",
                    "lists GPUs, but the stage runs on the CPU (resources.device: cpu)".into(),
                );
                v.diags.push(
                    param_diagnostic(&stage.name, stage.kind, with, anchor, &e)
                        .hint("set resources.device: cuda, or leave devices out"),
                );
            }
            // A gate's `max_ppl_increase` compares each model with the baseline: with one
            // model there is nothing to compare, and the bound would pass untested.
            // (Counted as written: a model stage with problems of its own still counts.)
            let named: usize = stage
                .inputs
                .iter()
                .filter(|b| model_inputs.iter().any(|(name, _)| *name == b.name))
                .map(|b| b.stages.len())
                .sum();
            let increase = &stage.params["gate"]["max_ppl_increase"];
            if named == 1 && !increase.is_null() {
                let e = ParamError {
                    path: vec![
                        PathSegment::Key("gate".into()),
                        PathSegment::Key("max_ppl_increase".into()),
                    ],
                    problem: ParamProblem::Invalid(
                        "compares each model with the baseline, but the stage scores one model"
                            .into(),
                    ),
                };
                v.diags.push(
                    param_diagnostic(&stage.name, stage.kind, with, anchor, &e).hint(
                        "score the models to compare beside it (`models: [model, int8]`), or bound `max_ppl`",
                    ),
                );
            }
            let name = |j: usize| stages[j].as_ref().map_or("", |s| s.name.as_str());
            let span_of = |input_kind: ArtifactKind, producer: usize| {
                let Inputs::Typed(decls) = stage.kind.descriptor().inputs else {
                    return key.span;
                };
                decls
                    .iter()
                    .filter(|d| d.kind == input_kind)
                    .find_map(|d| ref_spans[i].get(&(d.name.to_string(), producer)).copied())
                    .unwrap_or(key.span)
            };
            #[cfg(feature = "model")]
            for d in quantize_problems(stage, &stages) {
                let diag = match d {
                    QuantizeProblem::Quantized { model, scheme } => Diagnostic::new(
                        format!(
                            "stage `{}` quantizes `{}`, whose weights are {scheme} already",
                            stage.name,
                            stages[model].as_ref().map_or("", |s| s.name.as_str())
                        ),
                        span_of(ArtifactKind::Model, model),
                    )
                    .label("quantized already")
                    .hint("quantize the trained model: quantize reads fp32 weights"),
                    QuantizeProblem::Block(msg) => param_diagnostic(
                        &stage.name,
                        stage.kind,
                        with,
                        anchor,
                        &problem("block", msg),
                    ),
                };
                v.diags.push(diag);
            }
            // Models scored together (evaluate) were trained with one tokenizer, and a
            // tokenizer beside them is that one: otherwise their scores would not compare.
            // Per tokenizer they were trained with, the models that were.
            let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for &m in &models {
                if let Some(trained) = tokenizer_of(m, &stages) {
                    groups.entry(trained).or_default().push(m);
                }
            }
            let listed = |models: &[usize]| {
                models
                    .iter()
                    .map(|&m| format!("`{}`", name(m)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if groups.len() > 1 {
                let which: Vec<String> = groups
                    .iter()
                    .map(|(&t, models)| format!("{} with `{}`", listed(models), name(t)))
                    .collect();
                let odd = groups.values().nth(1).and_then(|m| m.first()).copied();
                v.diags.push(
                    Diagnostic::new(
                        format!(
                            "the models of stage `{}` were trained with different tokenizers ({}): their scores would not compare",
                            stage.name,
                            which.join("; ")
                        ),
                        odd.map_or(key.span, |m| span_of(ArtifactKind::Model, m)),
                    )
                    .hint("score each tokenizer's models in an evaluation of their own"),
                );
            } else if let Some((&trained, models)) = groups.iter().next() {
                for tok in producers_of_kind(stage, ArtifactKind::Tokenizer, &stages) {
                    if tok != trained {
                        v.diags.push(
                            Diagnostic::new(
                                format!(
                                    "stage `{}` reads with tokenizer `{}`, but {} {} trained with `{}`",
                                    stage.name,
                                    name(tok),
                                    listed(models),
                                    if models.len() == 1 { "was" } else { "were" },
                                    name(trained)
                                ),
                                span_of(ArtifactKind::Tokenizer, tok),
                            )
                            .label("not the models' tokenizer")
                            .hint(format!("use `{}`", name(trained))),
                        );
                    }
                }
            }
        }

        let mut graph = DiGraph::new();
        for i in 0..stages.len() {
            graph.add_node(i);
        }
        for (p, i, name) in edges {
            graph.add_edge(NodeIndex::new(p), NodeIndex::new(i), name);
        }
        for cycle in find_cycles(&graph) {
            let names: Vec<&str> = cycle
                .iter()
                .map(|&i| stage_entries[i].0.name.as_str())
                .collect();
            // Point at the reference that closes the loop: the first stage's input naming the last.
            let (first, last) = (cycle[0], cycle[cycle.len() - 2]);
            let span = ref_spans[first]
                .iter()
                .find(|((_, p), _)| *p == last)
                .map(|(_, s)| *s)
                .unwrap_or(stage_entries[first].0.span);
            v.diags.push(
                Diagnostic::new(
                    format!("the stages form a cycle: {}", names.join(" -> ")),
                    span,
                )
                .label("this input closes the cycle")
                .hint("a stage cannot depend, directly or not, on its own output"),
            );
        }

        if let Some(r) = &tracking.register {
            match names.iter().position(|n| *n == r.stage) {
                None => v.diags.push(
                    Diagnostic::new(
                        format!("`tracking.register` names unknown stage `{}`", r.stage),
                        r.span,
                    )
                    .hint_opt(suggest(&r.stage, &names)),
                ),
                Some(i) => {
                    if let Some(s) = &stages[i] {
                        let out = s.kind.descriptor().output;
                        if !matches!(out, ArtifactKind::Model | ArtifactKind::Deployment) {
                            v.diags.push(Diagnostic::new(
                                format!("`tracking.register` needs a stage producing a Model, but `{}` produces {out}", r.stage),
                                r.span,
                            ));
                        }
                    }
                }
            }
        }

        if stage_entries.is_empty() && root.get("stages").is_some() {
            v.diags.push(Diagnostic::new(
                "the pipeline has no stages",
                root.get("stages").map(|n| n.span).unwrap_or(root.span),
            ));
        }

        if !v.diags.is_empty() {
            // Problems without a position first, then the file's in its order, then those of
            // `--set` values in the order the arguments came.
            v.diags
                .sort_by_key(|d| d.span.map(|s| (s.source.0 != 0, s.source.0, s.line, s.col)));
            return Err(Invalid {
                diags: v.diags,
                sources: self.sources,
            });
        }
        let stages: Vec<Stage> = stages
            .into_iter()
            .map(|s| s.expect("no diagnostics"))
            .collect();
        let order = topo_order(&graph);
        let digest = pipeline_digest(&name, &params, &stages);
        Ok(Pipeline {
            name,
            path: self.path,
            dir: self.dir,
            storage,
            tracking,
            params,
            stages,
            graph,
            order,
            digest,
        })
    }
}

/// A stage's inputs of `kind`, as (declared name, producers), keeping the producers whose
/// output is of that kind (an edge of the wrong kind is reported already).
fn inputs_of(
    stage: &Stage,
    kind: ArtifactKind,
    stages: &[Option<Stage>],
) -> Vec<(&'static str, Vec<usize>)> {
    let Inputs::Typed(decls) = stage.kind.descriptor().inputs else {
        return Vec::new();
    };
    decls
        .iter()
        .filter(|d| d.kind == kind)
        .filter_map(|d| {
            let binding = stage.inputs.iter().find(|b| b.name == d.name)?;
            let producers = binding
                .stages
                .iter()
                .copied()
                .filter(|&p| {
                    stages[p]
                        .as_ref()
                        .is_some_and(|s| s.kind.descriptor().output == kind)
                })
                .collect();
            Some((d.name, producers))
        })
        .collect()
}

/// The producers of `stage`'s inputs of `kind` that do produce it, in input order.
fn producers_of_kind(stage: &Stage, kind: ArtifactKind, stages: &[Option<Stage>]) -> Vec<usize> {
    inputs_of(stage, kind, stages)
        .into_iter()
        .flat_map(|(_, producers)| producers)
        .collect()
}

/// A model stage and the model stages its weights came from, up the graph: a quantize
/// stage, the stage it quantized, ..., the train stage. Bounded by the number of stages (a
/// cycle, reported elsewhere, would make it endless).
fn model_lineage(model: usize, stages: &[Option<Stage>]) -> impl Iterator<Item = usize> + '_ {
    std::iter::successors(Some(model), move |&m| {
        let s = stages[m].as_ref()?;
        producers_of_kind(s, ArtifactKind::Model, stages)
            .first()
            .copied()
    })
    .take(stages.len())
}

/// The tokenizer stage a model stage's weights were trained with: the first Tokenizer input
/// along its lineage (train's own). None where there is none.
fn tokenizer_of(model: usize, stages: &[Option<Stage>]) -> Option<usize> {
    model_lineage(model, stages).find_map(|m| {
        let s = stages[m].as_ref()?;
        producers_of_kind(s, ArtifactKind::Tokenizer, stages)
            .first()
            .copied()
    })
}

/// What a quantize stage's model makes impossible, found before the model is trained.
#[cfg(feature = "model")]
enum QuantizeProblem {
    /// The model is a quantize stage's output, not fp32.
    Quantized { model: usize, scheme: String },
    /// `dynamic`'s block does not divide the trained model's rows (message).
    Block(String),
}

#[cfg(feature = "model")]
fn quantize_problems(stage: &Stage, stages: &[Option<Stage>]) -> Vec<QuantizeProblem> {
    let mut problems = Vec::new();
    if stage.kind != StageKind::Quantize {
        return problems;
    }
    for model in producers_of_kind(stage, ArtifactKind::Model, stages) {
        let Some(up) = &stages[model] else { continue };
        if up.kind == StageKind::Quantize {
            let scheme = up.params["scheme"].as_str().unwrap_or("fp32");
            if scheme != "fp32" {
                problems.push(QuantizeProblem::Quantized {
                    model,
                    scheme: scheme.to_string(),
                });
                continue;
            }
        }
        if stage.params["scheme"] != "dynamic" {
            continue;
        }
        let (Some(block), Some(trained)) = (
            stage.params["block"].as_u64(),
            model_lineage(model, stages)
                .filter_map(|m| stages[m].as_ref())
                .find(|s| s.kind == StageKind::Train),
        ) else {
            continue;
        };
        let Ok(params) =
            serde_json::from_value::<orchestrate_model::train::TrainParams>(trained.params.clone())
        else {
            continue;
        };
        let rows: Vec<(String, usize)> = params
            .matrix_rows()
            .into_iter()
            .map(|(param, width)| (format!("stage `{}`'s `{param}`", trained.name), width))
            .collect();
        if let Some(msg) = orchestrate_model::weights::int8_block_misfit(block as usize, &rows) {
            problems.push(QuantizeProblem::Block(msg));
        }
    }
    problems
}

/// Whether `url` is an `http://` or `https://` URL with a host: what MLflow is reached at.
pub fn is_http_url(url: &str) -> bool {
    ["http://", "https://"].iter().any(|scheme| {
        url.strip_prefix(scheme)
            .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
    })
}

/// A model a stage takes beside an evaluation report that did not score it.
struct Unscored {
    /// The consumer's input that names the model (`model`).
    input: &'static str,
    model: usize,
    report: usize,
    /// The report's models, backticked, for the message.
    scored: Vec<String>,
}

/// The models `stage` takes (one-stage inputs of kind Model) that a report it also takes
/// (inputs of kind EvalReport) did not score. deploy checks the same by digest when it
/// runs; this refuses the plain case (`deploy: {model: fp16, report: evaluation}` with an
/// evaluation of `[model, int8]`) before anything is trained.
fn models_their_report_does_not_score(stage: &Stage, stages: &[Option<Stage>]) -> Vec<Unscored> {
    let mut unscored = Vec::new();
    for (_, reports) in inputs_of(stage, ArtifactKind::EvalReport, stages) {
        for report in reports {
            let Some(r) = &stages[report] else { continue };
            let scored = producers_of_kind(r, ArtifactKind::Model, stages);
            if scored.is_empty() {
                // Its models are all of the wrong kind, reported already.
                continue;
            }
            for (input, models) in inputs_of(stage, ArtifactKind::Model, stages) {
                for model in models.into_iter().filter(|m| !scored.contains(m)) {
                    unscored.push(Unscored {
                        input,
                        model,
                        report,
                        scored: scored
                            .iter()
                            .filter_map(|&s| stages[s].as_ref().map(|s| format!("`{}`", s.name)))
                            .collect(),
                    });
                }
            }
        }
    }
    unscored
}

fn producers_of(kind: ArtifactKind, stages: &[Option<Stage>]) -> Option<String> {
    let names: Vec<String> = stages
        .iter()
        .flatten()
        .filter(|s| s.kind.descriptor().output == kind)
        .map(|s| format!("`{}`", s.name))
        .collect();
    if names.is_empty() {
        let kinds: Vec<&str> = StageKind::ALL
            .iter()
            .filter(|k| k.descriptor().output == kind)
            .map(|k| k.name())
            .collect();
        if kinds.is_empty() {
            None
        } else {
            Some(format!(
                "a {kind} comes from a stage of kind {}",
                kinds.join(" or ")
            ))
        }
    } else {
        Some(format!("stages producing {kind}: {}", names.join(", ")))
    }
}

/// A stage if it is valid, where its input references are written, and the references that
/// resolve (kept even for an invalid stage, so cycles through it are still found).
type StageParts = (
    Option<Stage>,
    BTreeMap<(String, usize), Span>,
    Vec<InputBinding>,
);

struct Validator {
    diags: Vec<Diagnostic>,
    dir: PathBuf,
    /// Whether the local files a stage reads must exist (see [`PipelineSpec::validate`]).
    check_files: bool,
}

impl Validator {
    fn unknown_keys(&mut self, node: &Node, allowed: &[&str], where_: &str) {
        self.unknown_keys_but(node, allowed, where_, |_| false);
    }

    /// [`Self::unknown_keys`], passing over the keys `own` says are the user's own.
    fn unknown_keys_but(
        &mut self,
        node: &Node,
        allowed: &[&str],
        where_: &str,
        own: impl Fn(&str) -> bool,
    ) {
        if let Value::Map(entries) = &node.value {
            for (k, _) in entries {
                if !allowed.contains(&k.name.as_str()) && !own(&k.name) {
                    self.diags.push(
                        Diagnostic::new(format!("unknown key `{}` {where_}", k.name), k.span)
                            .hint_opt(suggest(&k.name, allowed)),
                    );
                }
            }
        }
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        // A number is its text as written: `name: 1.10` (or `${env.V}` with `1.10`) is the
        // pipeline `1.10`, not `1.1`, and `007` stays `007`.
        match &node.value {
            Value::Str(s) => Some(s.clone()),
            Value::Int(_) | Value::Float(_) if node.text.is_some() => node.text.clone(),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) => Some(f.to_string()),
            _ => {
                self.diags.push(Diagnostic::new(
                    format!("`{what}` must be a string, found {}", node.type_name()),
                    node.span,
                ));
                None
            }
        }
    }

    fn tracking(&mut self, node: Option<&Node>, pipeline: &str) -> Tracking {
        let mut t = Tracking {
            mlflow: None,
            experiment: pipeline.to_string(),
            register: None,
        };
        let Some(node) = node else { return t };
        if !matches!(node.value, Value::Map(_)) {
            self.diags.push(Diagnostic::new(
                format!("`tracking` must be a mapping, found {}", node.type_name()),
                node.span,
            ));
            return t;
        }
        self.unknown_keys(node, &TRACKING_KEYS, "in `tracking`");
        if let Some(n) = node.get("mlflow") {
            if n.value != Value::Null {
                t.mlflow = self.string(n, "tracking.mlflow").filter(|s| !s.is_empty());
                if let Some(url) = t.mlflow.as_deref().filter(|u| !is_http_url(u)) {
                    self.diags.push(
                        Diagnostic::new(format!("`{url}` is not an MLflow server's URL"), n.span)
                            .hint("write it as http://HOST:PORT or https://HOST"),
                    );
                }
            }
        }
        if let Some(n) = node.get("experiment") {
            if let Some(s) = self.string(n, "tracking.experiment") {
                t.experiment = s;
            }
        }
        if let Some(n) = node.get("register") {
            if matches!(n.value, Value::Map(_)) {
                self.unknown_keys(n, &REGISTER_KEYS, "in `tracking.register`");
                let stage = n
                    .get("stage")
                    .and_then(|s| self.string(s, "tracking.register.stage"));
                let span = n.get("stage").map(|s| s.span).unwrap_or(n.span);
                let name = n
                    .get("name")
                    .and_then(|s| self.string(s, "tracking.register.name"))
                    .unwrap_or_else(|| pipeline.to_string());
                // Found now, not as a delivery warning after the training.
                if let Some(problem) = registered_name_problem(&name) {
                    let at = n.get("name").map_or(n.span, |s| s.span);
                    self.diags.push(
                        Diagnostic::new(
                            format!("`{name}` cannot name an MLflow registered model: {problem}"),
                            at,
                        )
                        .hint("for example `register: { stage: model, name: prometheus-mini }`"),
                    );
                }
                match stage {
                    Some(stage) => t.register = Some(Register { stage, name, span }),
                    None => self.diags.push(
                        Diagnostic::new("`tracking.register` needs `stage`", n.span).hint(
                            "for example `register: { stage: model, name: prometheus-mini }`",
                        ),
                    ),
                }
            } else {
                self.diags.push(Diagnostic::new(
                    format!(
                        "`tracking.register` must be a mapping, found {}",
                        n.type_name()
                    ),
                    n.span,
                ));
            }
        }
        t
    }

    fn stage(&mut self, key: &Key, node: &Node, names: &[&str]) -> StageParts {
        let mut spans = BTreeMap::new();
        let name = &key.name;
        if !valid_stage_name(name) {
            self.diags.push(
                Diagnostic::new(format!("invalid stage name `{name}`"), key.span)
                    .hint("use letters, digits, `-` and `_`, starting with a letter"),
            );
        }
        if !matches!(node.value, Value::Map(_)) {
            self.diags.push(
                Diagnostic::new(
                    format!(
                        "stage `{name}` must be a mapping, found {}",
                        node.type_name()
                    ),
                    node.span,
                )
                .hint("give it at least `kind:`"),
            );
            return (None, spans, Vec::new());
        }
        self.unknown_keys(node, &STAGE_KEYS, &format!("in stage `{name}`"));
        let kind = match node.get("kind") {
            None => {
                self.diags.push(
                    Diagnostic::new(format!("stage `{name}` has no `kind`"), key.span).hint(
                        format!("add `kind:` with one of {}", StageKind::names().join(", ")),
                    ),
                );
                None
            }
            Some(k) => match k.as_str().and_then(StageKind::from_name) {
                Some(kind) => Some(kind),
                None => {
                    let shown = k
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| k.type_name().to_string());
                    let hint = suggest(&shown, &StageKind::names());
                    self.diags.push(
                        Diagnostic::new(
                            format!("unknown stage kind `{shown}` in stage `{name}`"),
                            k.span,
                        )
                        .hint_opt(hint),
                    );
                    None
                }
            },
        };
        let (bindings, inputs_ok) =
            self.inputs(name, node.get("inputs"), kind, names, key.span, &mut spans);
        let inputs = inputs_ok.then(|| bindings.clone());
        let reported = self.diags.len();
        let params = match kind {
            Some(kind) => self.params(name, kind, node.get("with"), with_anchor(key, node)),
            None => None,
        };
        // (Null params below only where their problems were reported: such a pipeline is
        // invalid, so they never reach a run.)
        let params_reported = self.diags.len() > reported;
        let device = self.device(name, node.get("resources"));
        let retries = match node.get("retries") {
            None => 0,
            Some(n) => match n.value {
                Value::Int(i) if (0..=100).contains(&i) => i as u32,
                _ => {
                    let found = match n.value {
                        Value::Int(i) => i.to_string(),
                        _ => n.type_name().to_string(),
                    };
                    // The stage named: a value merged from an anchor (`<<: *defaults`) is
                    // shown where the anchor is, once per stage that takes it.
                    self.diags.push(Diagnostic::new(
                        format!(
                            "`retries` of stage `{name}` must be a whole number from 0 to 100, found {found}"
                        ),
                        n.span,
                    ));
                    0
                }
            },
        };
        let timeout = node.get("timeout").and_then(|n| {
            let parsed = match &n.value {
                Value::Int(s) if *s > 0 => Some(Duration::from_secs(*s as u64)),
                // (`1e-10` is above 0 but rounds to no time at all.)
                Value::Float(s) if *s > 0.0 => Duration::try_from_secs_f64(*s)
                    .ok()
                    .filter(|d| !d.is_zero()),
                Value::Str(s) => parse_duration(s),
                _ => None,
            };
            if parsed.is_none() {
                // Zero (or less) is a duration no stage could finish in.
                let problem = match &n.value {
                    Value::Float(s) if *s >= 1.0 => "is too large",
                    Value::Float(s) if *s > 0.0 => "must be at least a nanosecond",
                    Value::Int(_) | Value::Float(_) => "must be above 0",
                    Value::Str(s) if parse_duration_or_zero(s).is_some() => "must be above 0",
                    _ => "is not a duration",
                };
                let message = format!("`timeout` of stage `{name}` {problem}");
                self.diags.push(Diagnostic::new(message, n.span).hint(
                    "write seconds (`90`) or a duration such as `500ms`, `30s`, `10m`, `2h`",
                ));
            }
            parsed
        });
        let mut deps = Vec::new();
        if let Some(n) = node.get("deps") {
            match &n.value {
                Value::Seq(items) => {
                    for item in items {
                        if let Some(s) = self.string(item, "deps[]") {
                            let path = self.dir.join(&s);
                            if self.check_files && !s.contains("://") && !path.is_file() {
                                let (what, hint) = if path.is_dir() {
                                    ("is a directory", "`deps` lists files: name the files in it whose contents the stage depends on".to_string())
                                } else {
                                    ("does not exist", format!("looked at {}", path.display()))
                                };
                                self.diags.push(
                                    Diagnostic::new(
                                        format!("`{s}` in `deps` of stage `{name}` {what}"),
                                        item.span,
                                    )
                                    .hint(hint),
                                );
                            }
                            deps.push(s);
                        }
                    }
                }
                _ => self.diags.push(Diagnostic::new(
                    format!(
                        "`deps` must be a list of file paths, found {}",
                        n.type_name()
                    ),
                    n.span,
                )),
            }
        }
        // Params with problems of their own (reported) leave the stage null params, not
        // out of the pipeline: what its edges and the stages around it get wrong is found
        // in the same pass ("every problem at once"), while the checks that read params pass
        // over it. Such a pipeline is invalid, so those params never reach a run.
        let params_ok = params.is_some();
        let params = params.or_else(|| {
            kind.filter(|_| params_reported)
                .map(|_| serde_json::Value::Null)
        });
        let (Some(kind), Some(params), Some(inputs), Some(device)) = (kind, params, inputs, device)
        else {
            return (None, spans, bindings);
        };
        match (kind.descriptor().file_deps)(&params, &self.dir) {
            _ if !params_ok => {}
            Ok(files) => deps.extend(files),
            Err(errors) if self.check_files => {
                let anchor = with_anchor(key, node);
                let empty = Node::new(Value::Map(Vec::new()), anchor);
                let with = node.get("with").unwrap_or(&empty);
                for e in &errors {
                    self.diags
                        .push(param_diagnostic(name, kind, with, anchor, e));
                }
            }
            // Not running it (`graph`, `export`, `runs --pipeline`): files may live elsewhere.
            Err(_) => {}
        }
        (
            Some(Stage {
                name: name.clone(),
                kind,
                params,
                inputs,
                device,
                retries,
                timeout,
                deps,
            }),
            spans,
            bindings,
        )
    }

    fn inputs(
        &mut self,
        stage: &str,
        node: Option<&Node>,
        kind: Option<StageKind>,
        names: &[&str],
        stage_span: Span,
        spans: &mut BTreeMap<(String, usize), Span>,
    ) -> (Vec<InputBinding>, bool) {
        let typed = kind.and_then(|k| match k.descriptor().inputs {
            Inputs::Typed(d) => Some(d),
            Inputs::Any => None,
        });
        let mut bindings = Vec::new();
        let mut ok = true;
        // (input name, its span, the referenced stages)
        let mut raw: Vec<(String, Span, Vec<&Node>, bool)> = Vec::new();
        match node.map(|n| &n.value) {
            None | Some(Value::Null) => {}
            Some(Value::Map(entries)) => {
                for (k, v) in entries {
                    match &v.value {
                        Value::Seq(items) => {
                            raw.push((k.name.clone(), k.span, items.iter().collect(), true))
                        }
                        _ => raw.push((k.name.clone(), k.span, vec![v], false)),
                    }
                }
            }
            // A plain list binds each stage under its own name: handy for `shell` glue.
            Some(Value::Seq(items)) if typed.is_none() => {
                for item in items {
                    let n = item.as_str().unwrap_or_default().to_string();
                    raw.push((n, item.span, vec![item], false));
                }
            }
            Some(_) => {
                let n = node.expect("matched Some");
                self.diags.push(
                    Diagnostic::new(
                        format!(
                            "`inputs` of stage `{stage}` must map input names to stages, found {}",
                            n.type_name()
                        ),
                        n.span,
                    )
                    .hint("for example `inputs: { corpus: corpus }`"),
                );
                return (Vec::new(), false);
            }
        }
        for (input, input_span, refs, is_list) in &raw {
            if let Some(decls) = typed {
                match decls.iter().find(|d| d.name == input) {
                    None => {
                        let known: Vec<&str> = decls.iter().map(|d| d.name).collect();
                        self.diags.push(
                            Diagnostic::new(
                                format!("stage `{stage}` has no input `{input}`"),
                                *input_span,
                            )
                            .hint_opt(suggest(input, &known)),
                        );
                        ok = false;
                        continue;
                    }
                    Some(d) if *is_list && !d.many => {
                        self.diags.push(Diagnostic::new(
                            format!(
                                "input `{input}` of stage `{stage}` takes one stage, not a list"
                            ),
                            *input_span,
                        ));
                        ok = false;
                        continue;
                    }
                    // `models: []` binds nothing: the stage would fail once everything above
                    // it had run.
                    Some(d) if *is_list && refs.is_empty() && d.required => {
                        self.diags.push(Diagnostic::new(
                            format!(
                                "input `{input}` of stage `{stage}` lists no stage; it needs at least one producing {}",
                                d.kind
                            ),
                            *input_span,
                        ));
                        ok = false;
                        continue;
                    }
                    Some(_) => {}
                }
            }
            let mut producers = Vec::new();
            for r in refs {
                let Some(target) = r.as_str() else {
                    self.diags.push(Diagnostic::new(
                        format!("input `{input}` must name a stage, found {}", r.type_name()),
                        r.span,
                    ));
                    ok = false;
                    continue;
                };
                match names.iter().position(|n| *n == target) {
                    Some(p) => {
                        spans.insert((input.clone(), p), r.span);
                        producers.push(p);
                    }
                    None => {
                        let others: Vec<&str> =
                            names.iter().copied().filter(|n| *n != stage).collect();
                        self.diags.push(
                            Diagnostic::new(
                                format!("stage `{stage}` input `{input}` refers to unknown stage `{target}`"),
                                r.span,
                            )
                            .hint_opt(suggest(target, &others)),
                        );
                        ok = false;
                    }
                }
            }
            bindings.push(InputBinding {
                name: input.clone(),
                stages: producers,
            });
        }
        if let Some(decls) = typed {
            for d in decls.iter().filter(|d| d.required) {
                if !raw.iter().any(|(n, ..)| n == d.name) {
                    self.diags.push(
                        Diagnostic::new(
                            format!(
                                "stage `{stage}` is missing its required input `{}` ({})",
                                d.name, d.kind
                            ),
                            stage_span,
                        )
                        .hint(format!(
                            "add `inputs: {{ {}: <a stage producing {}> }}`",
                            d.name, d.kind
                        )),
                    );
                    ok = false;
                }
            }
        }
        (bindings, ok)
    }

    /// `anchor` is where a problem with the block as a whole is shown: its `with` key, or the
    /// stage name when there is no `with`.
    fn params(
        &mut self,
        stage: &str,
        kind: StageKind,
        node: Option<&Node>,
        anchor: Span,
    ) -> Option<serde_json::Value> {
        let empty = Node::new(Value::Map(Vec::new()), anchor);
        let node = match node {
            None => &empty,
            Some(n) if n.value == Value::Null => &empty,
            Some(n) if matches!(n.value, Value::Map(_)) => n,
            Some(n) => {
                self.diags.push(Diagnostic::new(
                    format!(
                        "`with` of stage `{stage}` must be a mapping, found {}",
                        n.type_name()
                    ),
                    n.span,
                ));
                return None;
            }
        };
        let mut json = node.to_json();
        let mut retyped: Vec<Vec<PathSegment>> = Vec::new();
        loop {
            let e = match (kind.descriptor().canonical_params)(json.clone()) {
                Ok(p) => return Some(p),
                Err(e) => e,
            };
            let each = match &e.problem {
                ParamProblem::Several(all) => all.iter().collect(),
                _ => vec![&e],
            };
            // A value YAML typed (`A: 123`, `v: 3.10`, `run: true`, or `${env.X}` standing
            // alone) where a stage wants text: the text as written. An environment variable
            // is text, and `3.10` must not arrive as `3.1`. A value left empty (`run:`) is
            // text only in a mapping of texts (a shell `env`), not where text is required.
            let as_text: Vec<(&ParamError, String)> = each
                .iter()
                .filter(|e| matches!(&e.problem, ParamProblem::Invalid(m) if m.contains("expected a string")))
                .filter(|e| !retyped.contains(&e.path))
                .filter(|e| {
                    let parent = node_at(node, &e.path[..e.path.len().saturating_sub(1)]);
                    let in_map = e.path.len() >= 2
                        && parent.is_some_and(|p| matches!(p.value, Value::Map(_)));
                    let typed = node_at(node, &e.path).is_some_and(|n| {
                        matches!(n.value, Value::Int(_) | Value::Float(_) | Value::Bool(_))
                    });
                    in_map || typed
                })
                .filter_map(|e| Some((*e, written_text(node_at(node, &e.path)?)?)))
                .collect();
            if as_text.is_empty() {
                for e in &each {
                    self.diags
                        .push(param_diagnostic(stage, kind, node, anchor, e));
                }
                // The stage's own checks (a value in range, keys that must agree) need the
                // block read whole, so none ran: they run again on the block without the
                // keys at fault (their defaults in their place), so that their problems show
                // in this pass rather than in the next `validate` after these are fixed.
                let at_fault: Vec<&str> = each.iter().filter_map(|e| top_key(e)).collect();
                let serde_json::Value::Object(block) = &json else {
                    return None;
                };
                if !at_fault.is_empty() {
                    let rest = block
                        .iter()
                        .filter(|(k, _)| !at_fault.contains(&k.as_str()))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    if let Err(more) =
                        (kind.descriptor().canonical_params)(serde_json::Value::Object(rest))
                    {
                        let more = match more.problem {
                            ParamProblem::Several(all) => all,
                            _ => vec![more],
                        };
                        // Not a problem of a key at fault, nor one only its stand-in default
                        // makes: a check of two keys names both (`12 heads do not divide
                        // d_model 256`, d_model's default where the file's is a string), so a
                        // message naming a key at fault is passed over. A required key taken
                        // out is missing only for that; one never written is reported.
                        let names_fault = |e: &ParamError| {
                            let said = e.to_string();
                            at_fault.iter().any(|k| said.contains(k))
                        };
                        for e in more {
                            let new = match &e.problem {
                                ParamProblem::MissingKey { key } => {
                                    !at_fault.contains(&key.as_str()) && !each.contains(&&e)
                                }
                                _ => {
                                    top_key(&e).is_some_and(|k| !at_fault.contains(&k))
                                        && !names_fault(&e)
                                }
                            };
                            if new {
                                self.diags
                                    .push(param_diagnostic(stage, kind, node, anchor, &e));
                            }
                        }
                    }
                }
                return None;
            }
            for (e, text) in as_text {
                if let Some(slot) = json_at(&mut json, &e.path) {
                    *slot = serde_json::Value::String(text);
                }
                retyped.push(e.path.clone());
            }
        }
    }

    fn device(&mut self, stage: &str, node: Option<&Node>) -> Option<Device> {
        let Some(node) = node else {
            return Some(Device::Auto);
        };
        if !matches!(node.value, Value::Map(_)) {
            self.diags.push(Diagnostic::new(
                format!(
                    "`resources` of stage `{stage}` must be a mapping, found {}",
                    node.type_name()
                ),
                node.span,
            ));
            return None;
        }
        self.unknown_keys(
            node,
            &RESOURCE_KEYS,
            &format!("in `resources` of stage `{stage}`"),
        );
        // Several GPUs are the train stage's own parameter (`with.devices`): accepted here,
        // they would be ignored without a word.
        if let Some(d) = node.get("devices") {
            self.diags.push(
                Diagnostic::new(
                    format!("`devices` is not a resource: stage `{stage}` would ignore it here"),
                    d.span,
                )
                .hint("several GPUs are the train stage's `with: { devices: [0, 1] }`, beside `resources: { device: cuda }`"),
            );
        }
        match node.get("device") {
            None => Some(Device::Auto),
            Some(d) => match d.as_str().and_then(Device::parse) {
                Some(dev) => Some(dev),
                None => {
                    self.diags.push(
                        Diagnostic::new(format!("unknown device in stage `{stage}`"), d.span)
                            .hint("use `cpu`, `cuda`, `cuda:N` or `auto`"),
                    );
                    None
                }
            },
        }
    }
}

/// Where a problem with a stage's `with:` block as a whole is shown: its `with` key, or the
/// stage name when there is no `with`.
fn with_anchor(key: &Key, node: &Node) -> Span {
    match &node.value {
        Value::Map(entries) => entries
            .iter()
            .find(|(k, _)| k.name == "with")
            .map(|(k, _)| k.span),
        _ => None,
    }
    .unwrap_or(key.span)
}

/// The node a parameter path leads to inside a `with:` block.
fn node_at<'n>(mut node: &'n Node, path: &[PathSegment]) -> Option<&'n Node> {
    for seg in path {
        node = match (seg, &node.value) {
            (PathSegment::Key(k), Value::Map(entries)) => entries
                .iter()
                .find(|(key, _)| &key.name == k)
                .map(|(_, v)| v)?,
            (PathSegment::Index(i), Value::Seq(items)) => items.get(*i)?,
            _ => return None,
        };
    }
    Some(node)
}

fn json_at<'j>(
    mut json: &'j mut serde_json::Value,
    path: &[PathSegment],
) -> Option<&'j mut serde_json::Value> {
    for seg in path {
        json = match seg {
            PathSegment::Key(k) => json.get_mut(k.as_str())?,
            PathSegment::Index(i) => json.get_mut(*i)?,
        };
    }
    Some(json)
}

/// A scalar's text as written, when YAML typed it as something else: a number, a boolean,
/// or an empty value (`A:`, `${env.A:-}`). A null written as `null` or `~` stays null.
fn written_text(node: &Node) -> Option<String> {
    let text = node.text.as_ref()?;
    match node.value {
        Value::Null if !text.is_empty() => None,
        Value::Seq(_) | Value::Map(_) => None,
        _ => Some(text.clone()),
    }
}

/// Why MLflow would refuse `name` for a registered model, if it would: it refuses a blank
/// one, `/` and `:`, and a name read as another path (`.`, `..x`); a `'` would break the
/// search for the versions this tool makes.
fn registered_name_problem(name: &str) -> Option<&'static str> {
    if name.trim().is_empty() {
        Some("it is blank")
    } else if name.contains(['/', ':', '\'', '\\']) {
        Some("it may not hold `/`, `:`, `'` or `\\`")
    } else if name == "." || name.starts_with("..") {
        Some("MLflow reads it as a path (`.`, or `..` at the start)")
    } else {
        None
    }
}

/// The key of the `with:` block a problem is at (an unknown key, or a value under a key);
/// None for one about the block as a whole (a required key missing).
fn top_key(e: &ParamError) -> Option<&str> {
    match (&e.problem, e.path.first()) {
        (_, Some(PathSegment::Key(k))) => Some(k),
        (ParamProblem::UnknownKey { key, .. }, None) => Some(key),
        _ => None,
    }
}

/// Turns a stage's parameter error into a diagnostic pointing at the offending value.
fn param_diagnostic(
    stage: &str,
    kind: StageKind,
    with: &Node,
    anchor: Span,
    e: &ParamError,
) -> Diagnostic {
    let mut node = with;
    let mut path = vec![stage.to_string(), "with".to_string()];
    let mut key_span = None;
    for seg in &e.path {
        let next = match (seg, &node.value) {
            (PathSegment::Key(k), Value::Map(entries)) => entries
                .iter()
                .find(|(key, _)| &key.name == k)
                .map(|(key, v)| {
                    key_span = Some(key.span);
                    v
                }),
            (PathSegment::Index(i), Value::Seq(items)) => items.get(*i),
            _ => None,
        };
        match next {
            Some(n) => {
                node = n;
                path.push(match seg {
                    PathSegment::Key(k) => k.clone(),
                    PathSegment::Index(i) => i.to_string(),
                });
            }
            None => break,
        }
    }
    let at = path.join(".");
    match &e.problem {
        ParamProblem::UnknownKey { key, expected } => {
            let span = match &node.value {
                Value::Map(entries) => entries
                    .iter()
                    .find(|(k, _)| &k.name == key)
                    .map(|(k, _)| k.span),
                _ => None,
            }
            .or(key_span)
            .unwrap_or(node.span);
            let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
            let where_ = if path.last().map(String::as_str) == Some(key.as_str()) {
                path[..path.len() - 1].join(".")
            } else {
                at.clone()
            };
            Diagnostic::new(
                format!("unknown key `{key}` in `{where_}` ({} stage)", kind.name()),
                span,
            )
            .hint_opt(suggest(key, &expected))
        }
        ParamProblem::MissingKey { key } => Diagnostic::new(
            format!(
                "stage `{stage}` ({}) is missing required param `{at}.{key}`",
                kind.name()
            ),
            // A mapping's own position is where its first entry starts: point at its key.
            key_span.unwrap_or(anchor),
        )
        .hint(format!("add `{key}:` under `with:`")),
        // Split up by the caller; here only as the first of them.
        ParamProblem::Several(all) => match all.first() {
            Some(first) => param_diagnostic(stage, kind, with, anchor, first),
            None => Diagnostic::new(format!("invalid value for `{at}`"), anchor),
        },
        ParamProblem::Invalid(msg) => {
            let span = match node.value {
                Value::Map(_) | Value::Seq(_) => key_span.unwrap_or(anchor),
                _ => node.span,
            };
            Diagnostic::new(format!("invalid value for `{at}`: {msg}"), span)
        }
    }
}

/// A name as Argo task names and environment variables see it: a shell stage's input `a.b`
/// and `a b` are both `$INPUT_A_B`.
fn name_folded(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            c if c.is_ascii_alphanumeric() => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect()
}

fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `500ms`, `30s`, `10m`, `2h`, or plain seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    parse_duration_or_zero(s).filter(|d| !d.is_zero())
}

/// As [`parse_duration`], zero allowed (`gc --grace 0s`).
pub fn parse_duration_or_zero(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    // `try_from`: a number too large for a Duration is an invalid value, not a panic.
    Duration::try_from_secs_f64(secs).ok()
}

/// Each elementary cycle through a strongly connected component, as stage indices with the
/// first repeated at the end, starting from the stage written first.
fn find_cycles(graph: &DiGraph<usize, String>) -> Vec<Vec<usize>> {
    let mut cycles = Vec::new();
    for scc in petgraph::algo::tarjan_scc(graph) {
        let self_loop = scc.len() == 1 && graph.contains_edge(scc[0], scc[0]);
        if scc.len() < 2 && !self_loop {
            continue;
        }
        let start = *scc.iter().min().expect("non-empty");
        // The shortest way back to the start, by breadth-first search inside the component
        // (every node of which leads back to it): a real cycle, never a dead end.
        let mut parent: BTreeMap<NodeIndex, NodeIndex> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start]);
        let mut last = None;
        while let Some(at) = queue.pop_front() {
            let mut next: Vec<NodeIndex> =
                graph.neighbors(at).filter(|n| scc.contains(n)).collect();
            next.sort();
            next.dedup();
            if next.contains(&start) {
                last = Some(at);
                break;
            }
            for n in next {
                if n != start && !parent.contains_key(&n) {
                    parent.insert(n, at);
                    queue.push_back(n);
                }
            }
        }
        let Some(mut at) = last else { continue };
        let mut back = Vec::new();
        while at != start {
            back.push(at.index());
            at = parent[&at];
        }
        back.reverse();
        cycles.push([vec![start.index()], back, vec![start.index()]].concat());
    }
    cycles.sort();
    cycles
}

/// Kahn's algorithm, always taking the ready stage written first, so the order is stable.
fn topo_order(graph: &DiGraph<usize, String>) -> Vec<usize> {
    let n = graph.node_count();
    let mut indegree: Vec<usize> = (0..n)
        .map(|i| {
            graph
                .neighbors_directed(NodeIndex::new(i), petgraph::Direction::Incoming)
                .count()
        })
        .collect();
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for e in graph.neighbors_directed(NodeIndex::new(i), petgraph::Direction::Outgoing) {
            indegree[e.index()] -= 1;
            if indegree[e.index()] == 0 {
                ready.insert(e.index());
            }
        }
    }
    order
}

fn pipeline_digest(name: &str, params: &serde_json::Value, stages: &[Stage]) -> String {
    let stages: Vec<serde_json::Value> = stages
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.name,
                "kind": s.kind.name(),
                "params": s.params,
                "inputs": s.inputs.iter().map(|b| (b.name.clone(), b.stages.clone())).collect::<BTreeMap<_, _>>(),
                "device": s.device,
                "deps": s.deps,
            })
        })
        .collect();
    let doc = serde_json::json!({"name": name, "params": params, "stages": stages});
    let bytes = serde_json::to_vec(&doc).unwrap_or_default();
    blake3::hash(&bytes).to_hex()[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(usize, usize)], n: usize) -> DiGraph<usize, String> {
        let mut g = DiGraph::new();
        for i in 0..n {
            g.add_node(i);
        }
        for &(a, b) in edges {
            g.add_edge(NodeIndex::new(a), NodeIndex::new(b), String::new());
        }
        g
    }

    /// Every reported cycle is one: each step an edge, ending where it began. A greedy walk
    /// used to report `a -> b -> c` here, which is a dead end, not a cycle.
    #[test]
    fn cycles_are_real_cycles() {
        // Producer -> consumer. a=0 reads d, b=1 reads a and c, c=2 reads b, d=3 reads b.
        let g = graph(&[(3, 0), (0, 1), (2, 1), (1, 2), (1, 3)], 4);
        let cycles = find_cycles(&g);
        assert_eq!(cycles, vec![vec![0, 1, 3, 0]]);
        let g = graph(&[(0, 0), (1, 2), (2, 1)], 3);
        assert_eq!(find_cycles(&g), vec![vec![0, 0], vec![1, 2, 1]]);
    }

    #[test]
    fn registered_model_names_mlflow_refuses_are_found() {
        for bad in [
            "",
            "  ",
            "team/model",
            "model:v2",
            "it's",
            ".",
            "..x",
            "a\\b",
        ] {
            assert!(registered_name_problem(bad).is_some(), "{bad:?}");
        }
        for good in ["prometheus-mini", "x.y", "Model 2", "a..b"] {
            assert_eq!(registered_name_problem(good), None, "{good:?}");
        }
    }
}
