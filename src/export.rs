//! `orchestrate export argo`: the pipeline as an Argo Workflow. One template per stage runs
//! `orchestrate run FILE --only STAGE` in the image; the DAG's edges become task
//! dependencies; a stage on `cuda` asks for a GPU. Stages hand artifacts to each other
//! through the shared store (which must therefore be remote, e.g. S3), exactly as two
//! laptops sharing a store would, so a task whose artifact is stored does no work.

use serde_json::{json, Value};

use crate::pipeline::{Device, Pipeline};

pub struct ArgoOptions {
    pub image: String,
    /// Overrides the pipeline's `storage`.
    pub store: Option<String>,
    /// Kubernetes secret holding the store's and MLflow's credentials (`AWS_*`,
    /// `MLFLOW_TRACKING_*`) and any the pipeline reads (`${env.HF_TOKEN}`).
    pub secret: String,
    pub mlflow: Option<String>,
    /// The command line's `--set PATH=VALUE` overrides, which every task's run repeats
    /// (the pipeline file travels as written).
    pub sets: Vec<String>,
}

/// Where the pipeline file sits inside every task's container.
pub const PIPELINE_PATH: &str = "/work/pipeline.yaml";

/// The credentials every task takes from the Kubernetes secret (each optional there).
const SECRET_KEYS: [&str; 8] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
];

pub fn argo(p: &Pipeline, source: &str, o: &ArgoOptions) -> Result<Value, String> {
    let store = o.store.clone().unwrap_or_else(|| p.storage.clone());
    if !store.starts_with("s3://") {
        return Err(format!(
            "the store is `{store}`, but tasks on different nodes must share it: give an s3:// store (--store or `storage:`)"
        ));
    }
    // (`s3://` with no bucket would fail in every task, and exit 2 is not retried.)
    if let Some(problem) = crate::store::url_problem(&store) {
        return Err(format!("the store `{store}`: {problem}"));
    }
    let mut env = vec![json!({"name": "ORCHESTRATE_STORE", "value": store})];
    if let Some(m) = &o.mlflow {
        env.push(json!({"name": "MLFLOW_TRACKING_URI", "value": m}));
    }
    let from_secret = |key: &str| {
        json!({
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": o.secret, "key": key, "optional": true}}
        })
    };
    for key in SECRET_KEYS {
        env.push(from_secret(key));
    }
    // The variables the pipeline reads (`${env.X}`): a task's container has only the
    // environment given here, so without them it would resolve other values than `plan`
    // showed (a default) or fail. Those set here travel with their values.
    // Comments are passed over (the text is parsed), and the variables the workflow sets
    // itself (the store, MLflow, the secret's) are not given twice: Kubernetes would let the
    // later, local, value override the cluster's secret.
    let mut read = Vec::new();
    if let Ok((root, _)) = crate::yaml::parse(source, crate::diag::SourceId(0)) {
        strings_of(&root, &mut |text| read.extend(env_names(text)));
    }
    for set in &o.sets {
        read.extend(env_names(set));
    }
    let mut given: Vec<String> = env
        .iter()
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect();
    for name in read {
        if given.contains(&name) {
            continue;
        }
        if crate::tracking::names_a_secret(&name) {
            // Its value would be in the workflow's text for anyone who can read it: it is
            // taken from the secret instead, where it must then be.
            env.push(from_secret(&name));
            given.push(name);
        } else if let Ok(value) = std::env::var(&name) {
            env.push(json!({"name": name, "value": value}));
            given.push(name);
        }
    }
    let names = task_names(p);
    let mut tasks = Vec::new();
    let mut templates = Vec::new();
    for &i in &p.order {
        let s = &p.stages[i];
        let name = names[i].clone();
        let mut deps: Vec<String> = p.upstream(i).iter().map(|&u| names[u].clone()).collect();
        deps.sort();
        deps.dedup();
        let mut task = json!({"name": name, "template": name});
        if !deps.is_empty() {
            task["dependencies"] = json!(deps);
        }
        tasks.push(task);
        let mut args: Vec<String> = ["run", PIPELINE_PATH, "--only", s.name.as_str()]
            .map(String::from)
            .to_vec();
        for set in &o.sets {
            args.extend(["--set".to_string(), set.clone()]);
        }
        // Argo retries the task (`retryStrategy`): the run inside it does not retry as
        // well, or `retries: 2` would be up to nine trainings. (`retries` is in no key.)
        // (Under `stages.`: a stage may be named like a top-level key, `params`.)
        args.extend(["--set".to_string(), format!("stages.{}.retries=0", s.name)]);
        let gpus = gpus(s)?;
        if let Device::Cuda(Some(_)) = s.device {
            // `cuda:N` names a GPU of the machine it was written on; a pod sees the ones
            // it was given, from 0. (Only the device class is in the key.)
            args.extend([
                "--set".to_string(),
                format!("stages.{}.resources.device=cuda", s.name),
            ]);
        }
        args.extend(["--no-serve", "--quiet"].map(String::from));
        let mut container = json!({
            "image": o.image,
            "command": ["orchestrate"],
            "args": args,
            "env": env,
        });
        if gpus > 0 {
            container["resources"] = json!({"limits": {"nvidia.com/gpu": gpus.to_string()}});
        }
        templates.push(json!({
            "name": name,
            "metadata": {"labels": {"orchestrate.stage": label_value(&s.name), "orchestrate.kind": s.kind.name()}},
            // A quality gate's failure (exit 4) is final, as in `run`: retrying would
            // re-measure a latency until it happened to pass. So is an invalid pipeline
            // (exit 2), which fails the same way every time.
            "retryStrategy": {
                "limit": (s.retries).to_string(),
                "expression": "asInt(lastRetry.exitCode) != 4 && asInt(lastRetry.exitCode) != 2",
            },
            "inputs": {"artifacts": [{"name": "pipeline", "path": PIPELINE_PATH, "raw": {"data": source}}]},
            "container": container,
        }));
    }
    templates.insert(0, json!({"name": DAG, "dag": {"tasks": tasks}}));
    // Argo adds 5 characters to `generateName`, and a workflow's name is at most 63.
    let workflow: String = task_name(&p.name).chars().take(57).collect();
    let workflow = Some(workflow.trim_end_matches('-').to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| DAG.to_string());
    Ok(json!({
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {
            "generateName": format!("{workflow}-"),
            "labels": {"orchestrate.pipeline": label_value(&p.name)},
        },
        "spec": {"entrypoint": DAG, "templates": templates},
    }))
}

/// The DAG's template, the workflow's entrypoint.
const DAG: &str = "pipeline";

/// The number of GPUs a stage's task asks for: one on `cuda`, one per device listed in
/// `with.devices` (data-parallel training), which must then be `0..n`: the pod sees the
/// GPUs it was given, numbered from 0.
fn gpus(s: &crate::pipeline::Stage) -> Result<usize, String> {
    let devices: Vec<u64> = s.params["devices"]
        .as_array()
        .map(|d| d.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    if !devices.is_empty() {
        if devices.iter().enumerate().any(|(i, &d)| d != i as u64) {
            return Err(format!(
                "stage `{}` trains on GPUs {devices:?}, but a pod numbers the GPUs it is given from 0: write `devices: {:?}` to export it",
                s.name,
                (0..devices.len()).collect::<Vec<_>>()
            ));
        }
        return Ok(devices.len());
    }
    Ok(usize::from(matches!(s.device, Device::Cuda(_))))
}

/// Each stage's task (and template) name: [`task_name`], made unique. Stage names that fold
/// to one (`a` and `a_`), or to the DAG's own, or to nothing (`модель`), get their stage
/// name's hash after them.
fn task_names(p: &Pipeline) -> Vec<String> {
    let base: Vec<String> = p.stages.iter().map(|s| task_name(&s.name)).collect();
    base.iter()
        .zip(&p.stages)
        .map(|(b, s)| {
            let shared = base.iter().filter(|o| *o == b).count() > 1;
            // (63: a Kubernetes name's length, which Argo's task names share.)
            if b.is_empty() || b == DAG || shared || b.len() > 63 {
                let hash = blake3::hash(s.name.as_bytes()).to_hex();
                let stem: String = b.chars().take(40).collect();
                format!("{stem}-{}", &hash[..8])
                    .trim_start_matches('-')
                    .to_string()
            } else {
                b.clone()
            }
        })
        .collect()
}

/// A Kubernetes label value: at most 63 of `[A-Za-z0-9._-]`, starting and ending with a
/// letter or digit (or empty).
fn label_value(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// Calls `f` with every string in `node`, keys included.
fn strings_of(node: &crate::yaml::Node, f: &mut dyn FnMut(&str)) {
    use crate::yaml::Value as Y;
    match &node.value {
        Y::Str(text) => f(text),
        Y::Seq(items) => items.iter().for_each(|n| strings_of(n, f)),
        Y::Map(entries) => entries.iter().for_each(|(k, n)| {
            f(&k.name);
            strings_of(n, f);
        }),
        _ => {}
    }
}

/// The names of the environment variables `text` reads (`${env.NAME}`,
/// `${env.NAME:-default}`), in order, once each.
fn env_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in text.match_indices("${env.") {
        let name: String = text[at + 6..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Kubernetes names: lower case, digits and `-`.
fn task_name(s: &str) -> String {
    let n: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    n.trim_matches('-').to_string()
}

/// JSON to YAML text (block style), through yaml-rust2's emitter.
pub fn to_yaml(v: &Value) -> String {
    fn conv(v: &Value) -> yaml_rust2::Yaml {
        use yaml_rust2::Yaml;
        match v {
            Value::Null => Yaml::Null,
            Value::Bool(b) => Yaml::Boolean(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Yaml::Integer(i),
                None => Yaml::Real(n.to_string()),
            },
            Value::String(s) => Yaml::String(s.clone()),
            Value::Array(a) => Yaml::Array(a.iter().map(conv).collect()),
            Value::Object(o) => Yaml::Hash(
                o.iter()
                    .map(|(k, v)| (Yaml::String(k.clone()), conv(v)))
                    .collect(),
            ),
        }
    }
    let yaml = conv(v);
    let emit = |multiline: bool| {
        let mut out = String::new();
        let mut e = yaml_rust2::YamlEmitter::new(&mut out);
        e.multiline_strings(multiline);
        let _ = e.dump(&yaml);
        out.push('\n');
        out
    };
    // Literal blocks keep the embedded pipeline file readable, but the emitter writes them
    // without an indentation indicator, so text whose first line is indented reads back as
    // something else. Such a document is written with quoted strings instead.
    let readable = emit(true);
    let reads_back = yaml_rust2::YamlLoader::load_from_str(&readable)
        .is_ok_and(|docs| docs.first() == Some(&yaml));
    if reads_back {
        readable
    } else {
        emit(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_told_by_whole_words_in_variable_names() {
        for name in [
            "HF_TOKEN",
            "DB_PASSWORD",
            "OPENAI_API_KEY",
            "GH_PRIVATE_KEY",
            "client-secret",
        ] {
            assert!(crate::tracking::names_a_secret(name), "{name}");
        }
        for name in [
            "MAX_TOKENS",
            "TOKENIZER_DIR",
            "KEYBOARD",
            "PASSWORDLESS_MODE",
            "API_URL",
        ] {
            assert!(!crate::tracking::names_a_secret(name), "{name}");
        }
    }

    #[test]
    fn names_kubernetes_takes() {
        assert_eq!(label_value("a_"), "a");
        assert_eq!(label_value("модель"), "");
        assert_eq!(label_value(&"x".repeat(80)).len(), 63);
        assert_eq!(
            env_names("a: ${env.A_1:-x} b: ${env.B} c: ${env.A_1} d: ${params.p}"),
            ["A_1", "B"]
        );
    }

    #[test]
    fn yaml_reads_back_as_written_whatever_the_text() {
        for text in [
            "name: p\nstages: {}\n",
            "    # indented first line\nname: p\n",
            "a\n\n  b\n",
        ] {
            let v = serde_json::json!({"data": text, "n": 1});
            let back = yaml_rust2::YamlLoader::load_from_str(&to_yaml(&v)).unwrap();
            assert_eq!(back[0]["data"].as_str(), Some(text), "{text:?}");
        }
    }
}
