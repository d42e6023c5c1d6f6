//! Helpers for end-to-end tests that drive the real `orchestrate` binary in a scratch dir.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_orchestrate");

pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Ran {
    fn from(o: Output) -> Self {
        Ran {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Sandbox {
    pub fn new() -> Self {
        Sandbox {
            dir: tempfile::tempdir().expect("a temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join(name)).unwrap_or_default()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .current_dir(self.path())
            .env_remove("ORCHESTRATE_STORE")
            .env_remove("ORCHESTRATE_CACHE_DIR")
            // The caller's servers and settings are not the test's: a machine with
            // `MLFLOW_TRACKING_URI` set would deliver the tests' records there.
            .env_remove("MLFLOW_TRACKING_URI")
            .env_remove("ORCHESTRATE_DEVICE")
            .env_remove("ORCHESTRATE_API_KEY")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("ORCHESTRATE_STORE_RETRIES")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Ran {
        self.cmd(args).output().expect("the binary runs").into()
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts")
    }

    /// Run records in the sandbox's `store/`, oldest first.
    pub fn runs(&self) -> Vec<serde_json::Value> {
        let dir = self.path().join("store/runs");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        names.sort();
        names
            .iter()
            .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
            .collect()
    }

    pub fn last_run(&self) -> serde_json::Value {
        self.runs().pop().expect("a run record")
    }

    /// The manifest of `stage`'s artifact in the last run (store at `store/`).
    pub fn stage_manifest(&self, stage: &str) -> serde_json::Value {
        let run = self.last_run();
        let key = run["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == stage)
            .unwrap_or_else(|| panic!("no stage `{stage}` in the last run"))["key"]
            .as_str()
            .unwrap()
            .to_string();
        serde_json::from_str(&self.read(&format!("store/manifests/{key}.json"))).unwrap()
    }

    pub fn manifests(&self) -> usize {
        std::fs::read_dir(self.path().join("store/manifests"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Waits until `name` exists in the sandbox, up to `secs`.
    pub fn wait_for(&self, name: &str, secs: u64) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if self.path().join(name).exists() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }
}

/// Status of `stage` in a run record.
pub fn stage_status(run: &serde_json::Value, stage: &str) -> String {
    run["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == stage)
        .map(|s| s["status"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

pub fn line_count(s: &str) -> usize {
    s.lines().filter(|l| !l.is_empty()).count()
}
