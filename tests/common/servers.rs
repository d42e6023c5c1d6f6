//! Real servers for end-to-end tests: MLflow and moto (S3), from the virtualenv that
#![allow(dead_code)] // each test binary uses a different subset
//! `.ci/venv` makes, each in its own process group so stopping it stops its workers too.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The test virtualenv, or `None` outside CI when it was not made (the caller skips).
pub fn venv() -> Option<PathBuf> {
    let dir = std::env::var_os("ORCHESTRATE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/.venv"));
    if dir.join("bin/mlflow").exists() && dir.join("bin/moto_server").exists() {
        return Some(dir);
    }
    // Named on purpose (`.ci/test` does) or under CI: a broken one is a failure, not a skip.
    assert!(
        std::env::var_os("CI").is_none() && std::env::var_os("ORCHESTRATE_TEST_VENV").is_none(),
        "the test servers are missing from {}: run `bash .ci/venv` (bash .ci/test does)",
        dir.display()
    );
    eprintln!("skipped: no test virtualenv; `bash .ci/venv` makes one");
    None
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Server {
    child: Option<Child>,
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    health: String,
    pub url: String,
    pub port: u16,
}

impl Server {
    pub fn mlflow(venv: &Path, dir: &Path) -> Server {
        let port = free_port();
        let db = format!("sqlite:///{}/mlflow.db", dir.display());
        let cmd = vec![
            venv.join("bin/mlflow").display().to_string(),
            "server".into(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--workers".into(),
            "1".into(),
            "--backend-store-uri".into(),
            db,
            "--artifacts-destination".into(),
            dir.join("mlflow-artifacts").display().to_string(),
        ];
        let env = vec![
            (
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION".to_string(),
                "false".to_string(),
            ),
            // Nothing leaves 127.0.0.1 in a test.
            ("MLFLOW_DISABLE_TELEMETRY".to_string(), "true".to_string()),
        ];
        let url = format!("http://127.0.0.1:{port}");
        let mut s = Server {
            child: None,
            cmd,
            env,
            health: format!("{url}/health"),
            url,
            port,
        };
        s.start();
        s
    }

    pub fn moto(venv: &Path) -> Server {
        let port = free_port();
        let cmd = vec![
            venv.join("bin/moto_server").display().to_string(),
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ];
        let url = format!("http://127.0.0.1:{port}");
        let mut s = Server {
            child: None,
            cmd,
            env: Vec::new(),
            health: format!("{url}/moto-api/"),
            url,
            port,
        };
        s.start();
        s
    }

    pub fn start(&mut self) {
        use std::os::unix::process::CommandExt;
        // Its output goes to a log, whose end is shown where it does not come up.
        let log = std::env::temp_dir().join(format!(
            "test-server-{}-{}.log",
            std::process::id(),
            self.port
        ));
        let out = std::fs::File::create(&log).expect("a log file");
        let err = out.try_clone().expect("a log file");
        let mut cmd = Command::new(&self.cmd[0]);
        cmd.args(&self.cmd[1..])
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // A test binary killed by a signal runs no `Drop`: the server is told to stop when
        // the thread that started it (the test's) is gone, rather than holding its port.
        // SAFETY: prctl is async-signal-safe and touches only the child's own state.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("the server starts");
        self.child = Some(child);
        let tail = || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if http("GET", &self.health, None)
                .map(|(code, _)| code == 200)
                .unwrap_or(false)
            {
                let _ = std::fs::remove_file(&log);
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "{} exited ({status}) before it was healthy:\n{}",
                    self.cmd[0],
                    tail()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "{} did not become healthy in 120 s:\n{}",
            self.cmd[0],
            tail()
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pgid = child.id() as i32;
            // SAFETY: signalling the process group we created for this server.
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // SAFETY: as above.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A tiny blocking HTTP/1.1 client (status, body) over std, for talking to test servers.
pub fn http(method: &str, url: &str, body: Option<&str>) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// GET or POST to MLflow's REST API; panics on failure, as a test should.
pub fn mlflow_api(base: &str, api: &str, body: Option<serde_json::Value>) -> serde_json::Value {
    let (method, b) = match &body {
        Some(b) => ("POST", Some(b.to_string())),
        None => ("GET", None),
    };
    let (code, text) = http(
        method,
        &format!("{base}/api/2.0/mlflow/{api}"),
        b.as_deref(),
    )
    .unwrap();
    assert_eq!(code, 200, "{api}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// Runs one boto3 S3 client call (moto's own dependency, so any S3 client's behaviour)
/// against `endpoint` and returns what it printed.
pub fn s3(venv: &Path, endpoint: &str, call: &str) -> String {
    let script = format!(
        "import boto3, sys\nc = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\nprint(c.{call})\n"
    );
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", &script, endpoint])
        .output()
        .expect("the virtualenv's python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
