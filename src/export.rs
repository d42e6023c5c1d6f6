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
    /// Kubernetes secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and optionally
    /// AWS_ENDPOINT_URL, AWS_REGION, MLFLOW_TRACKING_TOKEN).
    pub secret: String,
    pub mlflow: Option<String>,
    /// The command line's `--set PATH=VALUE` overrides, which every task's run repeats
    /// (the pipeline file travels as written).
    pub sets: Vec<String>,
}

/// Where the pipeline file sits inside every task's container.
/// Where the workflow puts the pipeline file in each task.
pub const PIPELINE_PATH: &str = "/work/pipeline.yaml";

pub fn argo(p: &Pipeline, source: &str, o: &ArgoOptions) -> Result<Value, String> {
    let store = o.store.clone().unwrap_or_else(|| p.storage.clone());
    if !store.starts_with("s3://") {
        return Err(format!(
            "the store is `{store}`, but tasks on different nodes must share it: give an s3:// store (--store or `storage:`)"
        ));
    }
    let mut env = vec![json!({"name": "ORCHESTRATE_STORE", "value": store})];
    if let Some(m) = &o.mlflow {
        env.push(json!({"name": "MLFLOW_TRACKING_URI", "value": m}));
    }
    for key in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "MLFLOW_TRACKING_TOKEN",
    ] {
        env.push(json!({
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": o.secret, "key": key, "optional": true}}
        }));
    }
    let mut tasks = Vec::new();
    let mut templates = Vec::new();
    for &i in &p.order {
        let s = &p.stages[i];
        let name = task_name(&s.name);
        let mut deps: Vec<String> = p
            .upstream(i)
            .iter()
            .map(|&u| task_name(&p.stages[u].name))
            .collect();
        deps.sort();
        deps.dedup();
        let mut task = json!({"name": name, "template": name});
        if !deps.is_empty() {
            task["dependencies"] = json!(deps);
        }
        tasks.push(task);
        let mut args = vec!["run", PIPELINE_PATH, "--only", s.name.as_str()];
        for set in &o.sets {
            args.extend(["--set", set.as_str()]);
        }
        args.extend(["--no-serve", "--quiet"]);
        let mut container = json!({
            "image": o.image,
            "command": ["orchestrate"],
            "args": args,
            "env": env,
        });
        if let Device::Cuda(_) = s.device {
            // One GPU per task: the scheduler picks which; `cuda:N` indices are node-local.
            container["resources"] = json!({"limits": {"nvidia.com/gpu": "1"}});
        }
        templates.push(json!({
            "name": name,
            "metadata": {"labels": {"orchestrate.stage": s.name, "orchestrate.kind": s.kind.name()}},
            // A quality gate's failure (exit 4) is final, as in `run`: retrying would
            // re-measure a latency until it happened to pass.
            "retryStrategy": {
                "limit": (s.retries).to_string(),
                "expression": "asInt(lastRetry.exitCode) != 4",
            },
            "inputs": {"artifacts": [{"name": "pipeline", "path": PIPELINE_PATH, "raw": {"data": source}}]},
            "container": container,
        }));
    }
    templates.insert(0, json!({"name": "pipeline", "dag": {"tasks": tasks}}));
    Ok(json!({
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {
            "generateName": format!("{}-", task_name(&p.name)),
            "labels": {"orchestrate.pipeline": task_name(&p.name)},
        },
        "spec": {"entrypoint": "pipeline", "templates": templates},
    }))
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
