//! The artifact store on a real S3-compatible server (moto, from the `.ci/venv` virtualenv),
//! reached through a TCP proxy the test can cut to fail an upload halfway.

mod common;
#[path = "common/servers.rs"]
mod servers;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Sandbox;
use servers::{http, Server};

/// Forwards connections to `target`. Once armed, it cuts every connection after `budget`
/// more bytes went upstream, and refuses new ones until healed.
struct Proxy {
    port: u16,
    armed: Arc<AtomicBool>,
    budget: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let p = Proxy {
            port,
            armed: Arc::new(AtomicBool::new(false)),
            budget: Arc::new(AtomicU64::new(u64::MAX)),
            cut: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        let (armed, budget, cut, conns) = (
            p.armed.clone(),
            p.budget.clone(),
            p.cut.clone(),
            p.conns.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if cut.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                conns
                    .lock()
                    .unwrap()
                    .extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (armed, budget, cut, conns2) =
                    (armed.clone(), budget.clone(), cut.clone(), conns.clone());
                std::thread::spawn(move || {
                    pump(client, server, Some((armed, budget, cut, conns2)))
                });
                std::thread::spawn(move || pump(s2, c2, None));
            }
        });
        p
    }

    fn arm(&self, bytes: u64) {
        self.budget.store(bytes, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    fn heal(&self) {
        self.armed.store(false, Ordering::SeqCst);
        self.cut.store(false, Ordering::SeqCst);
    }
}

type Fault = (
    Arc<AtomicBool>,
    Arc<AtomicU64>,
    Arc<AtomicBool>,
    Arc<Mutex<Vec<TcpStream>>>,
);

fn pump(mut from: TcpStream, mut to: TcpStream, fault: Option<Fault>) {
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((armed, budget, cut, conns)) = &fault {
            if armed.load(Ordering::SeqCst) {
                let left = budget.load(Ordering::SeqCst);
                if left < n as u64 || cut.load(Ordering::SeqCst) {
                    cut.store(true, Ordering::SeqCst);
                    for c in conns.lock().unwrap().drain(..) {
                        let _ = c.shutdown(Shutdown::Both);
                    }
                    break;
                }
                budget.store(left - n as u64, Ordering::SeqCst);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn manifest_keys(moto: &Server, bucket: &str) -> Vec<String> {
    let (code, body) = http(
        "GET",
        &format!("{}/{bucket}?list-type=2&prefix=team/manifests/", moto.url),
        None,
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    body.split("<Key>")
        .skip(1)
        .map(|k| k.split("</Key>").next().unwrap().to_string())
        .collect()
}

const PIPELINE: &str = r#"
name: s3
storage: s3://artifacts/team
stages:
  first:
    kind: shell
    with: { run: "echo small > small.txt", outputs: [small.txt] }
  big:
    kind: shell
    inputs: [first]
    with:
      run: head -c 40000000 /dev/urandom > big.bin; cat $INPUT_FIRST/small.txt > copy.txt; touch $PIPELINE_DIR/big-written; i=0; until [ -e $PIPELINE_DIR/armed ] || [ $i -ge 1200 ]; do sleep 0.05; i=$((i+1)); done
      outputs: [big.bin, copy.txt]
  last:
    kind: shell
    inputs: [big]
    with: { run: "wc -c < $INPUT_BIG/big.bin > n.txt", outputs: [n.txt] }
"#;

/// A real S3 server (moto) with the bucket `artifacts`, behind a [`Proxy`] that can cut it;
/// None where no test virtualenv is (outside CI).
fn moto_behind_a_proxy() -> Option<(Server, Proxy)> {
    let venv = servers::venv()?;
    let moto = Server::moto(&venv);
    let (code, body) = http("PUT", &format!("{}/artifacts", moto.url), None).unwrap();
    assert_eq!(code, 200, "{body}");
    let proxy = Proxy::start(moto.port);
    Some((moto, proxy))
}

/// `orchestrate ARGS` in `sb`, its store reached through `proxy`, its retries short.
fn through(sb: &Sandbox, proxy: &Proxy, args: &[&str], retry_secs: &str) -> std::process::Command {
    let mut c = sb.cmd(args);
    c.env(
        "AWS_ENDPOINT_URL",
        format!("http://127.0.0.1:{}", proxy.port),
    )
    .env("AWS_ACCESS_KEY_ID", "test")
    .env("AWS_SECRET_ACCESS_KEY", "test")
    .env("AWS_REGION", "us-east-1")
    .env("ORCHESTRATE_STORE_RETRIES", "2")
    .env("ORCHESTRATE_STORE_RETRY_SECS", retry_secs);
    c
}

#[test]
fn s3_store_survives_a_server_cut_mid_upload() {
    let Some((moto, proxy)) = moto_behind_a_proxy() else {
        return;
    };
    let sb = Sandbox::new();
    sb.write("p.yaml", PIPELINE);
    let run = |args: &[&str]| through(&sb, &proxy, args, "5");

    // Cut the connection once `big` has written its 40 MB and 5 MB of it went up.
    let mut child = run(&["run", "p.yaml"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(sb.wait_for("big-written", 60));
    proxy.arm(5_000_000);
    // The stage ends (and its upload starts) only once the cut is armed.
    sb.write("armed", "");
    let status = child.wait().unwrap();
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    // The stage failed on the store, and so did the run record if the store was still
    // unreachable when it was written: a store error (3) either way, and the summary names
    // the stage.
    assert_eq!(status.code(), Some(3), "{status:?} {stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("big "))
        .unwrap_or_default();
    assert!(line.contains("failed"), "{stdout}");
    assert!(
        stdout.contains("artifact store") && stdout.contains("`blobs/"),
        "a clear error naming the object: {stdout}"
    );
    // Only `first` committed: no manifest for the half-uploaded artifact.
    assert_eq!(manifest_keys(&moto, "artifacts").len(), 1);

    proxy.heal();
    std::thread::sleep(Duration::from_millis(200));
    let out = run(&["run", "p.yaml"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let plan = run(&["plan", "p.yaml"]).output().unwrap();
    let plan = String::from_utf8_lossy(&plan.stdout).to_string();
    assert!(plan.contains("3 cached"), "{plan}");
    assert_eq!(manifest_keys(&moto, "artifacts").len(), 3);
    let shown = run(&["show", "last"])
        .env("ORCHESTRATE_STORE", "s3://artifacts/team")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout).to_string();
    assert!(
        shown.contains("first") && shown.contains("cached"),
        "{shown}"
    );
    let fsck = run(&["fsck"])
        .env("ORCHESTRATE_STORE", "s3://artifacts/team")
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// With `retries`, a stage whose upload fails after its work is done retries the upload,
/// not the work: a training or a command with side effects is not redone for the store.
#[test]
fn a_failed_upload_is_retried_without_redoing_the_work() {
    let Some((moto, proxy)) = moto_behind_a_proxy() else {
        return;
    };
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        r#"
name: s3
storage: s3://artifacts/team
stages:
  big:
    kind: shell
    retries: 3
    with:
      run: echo x >> $PIPELINE_DIR/count-big; head -c 40000000 /dev/urandom > big.bin; touch $PIPELINE_DIR/big-written; i=0; until [ -e $PIPELINE_DIR/armed ] || [ $i -ge 1200 ]; do sleep 0.05; i=$((i+1)); done
      outputs: [big.bin]
"#,
    );
    let mut child = through(&sb, &proxy, &["run", "p.yaml"], "3")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Heal the connection once the engine says it will store again.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if line.contains("storing its output failed") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    assert!(sb.wait_for("big-written", 60));
    proxy.arm(5_000_000);
    // The stage ends (and its upload starts) only once the cut is armed.
    sb.write("armed", "");
    let noticed = rx.recv_timeout(Duration::from_secs(90)).is_ok();
    proxy.heal();
    let status = child.wait().unwrap();
    let stderr = reader.join().unwrap();
    assert!(noticed, "no retry of the upload: {stderr}");
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(common::line_count(&sb.read("count-big")), 1, "{stderr}");
    assert_eq!(manifest_keys(&moto, "artifacts").len(), 1);
}

#[cfg(feature = "corpus")]
#[test]
fn ingest_reads_sources_from_s3_and_notices_when_they_change() {
    let Some(venv) = servers::venv() else { return };
    let moto = Server::moto(&venv);
    assert_eq!(
        http("PUT", &format!("{}/corpus", moto.url), None)
            .unwrap()
            .0,
        200
    );
    let put = |key: &str, body: &str| {
        servers::s3(
            &venv,
            &moto.url,
            &format!("put_object(Bucket='corpus', Key={key:?}, Body={body:?}.encode())"),
        );
    };
    put(
        "quotes/a.txt",
        "First remote quote, long enough.\n\t\t-- Ann Author\n%\nSecond remote quote is here.\n%\n",
    );
    put("quotes/b.txt", "Третья цитата из хранилища.\n%\n");
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        "name: remote\nstorage: file://store\nstages:\n  corpus:\n    kind: ingest\n    with: { sources: [{ path: \"s3://corpus/quotes\" }] }\n",
    );
    let cmd = |args: &[&str]| {
        let mut c = sb.cmd(args);
        c.env("AWS_ENDPOINT_URL", &moto.url)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1");
        c.output().unwrap()
    };
    let out = cmd(&["run", "p.yaml"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let key = sb.last_run()["stages"][0]["key"]
        .as_str()
        .unwrap()
        .to_string();
    let m: serde_json::Value =
        serde_json::from_str(&sb.read(&format!("store/manifests/{key}.json"))).unwrap();
    assert_eq!(m["metadata"]["records"], 3, "{}", m["metadata"]);
    let langs = m["metadata"]["per_language"].as_object().unwrap();
    assert_eq!(
        langs.values().map(|v| v.as_u64().unwrap()).sum::<u64>(),
        3,
        "{langs:?}"
    );
    // Unchanged remote: cached. Changed: the plan says which source changed.
    let plan = cmd(&["plan", "p.yaml"]);
    let plan = String::from_utf8_lossy(&plan.stdout).to_string();
    assert!(plan.contains("1 cached, 0 will run"), "{plan}");
    put(
        "quotes/b.txt",
        "Третья цитата из хранилища, исправленная.\n%\n",
    );
    let plan = String::from_utf8_lossy(&cmd(&["plan", "p.yaml"]).stdout).to_string();
    assert!(
        plan.contains("will run") && plan.contains("file `s3://corpus/quotes` changed"),
        "{plan}"
    );
}

/// A source bucket that cannot be reached is the store's kind of failure (exit 3, which CI
/// and Argo retry), not an invalid pipeline (exit 2, never retried), and says which source.
#[test]
fn an_unreachable_source_bucket_is_exit_3_naming_it() {
    let closed = servers::free_port();
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        "name: remote\nstorage: file://store\nstages:\n  corpus:\n    kind: ingest\n    with: { sources: [{ path: \"s3://corpus/quotes\" }] }\n",
    );
    let out: common::Ran = sb
        .cmd(&["plan", "p.yaml"])
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{closed}"))
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("ORCHESTRATE_STORE_RETRIES", "0")
        .env("ORCHESTRATE_STORE_RETRY_SECS", "1")
        .output()
        .unwrap()
        .into();
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("`s3://corpus/quotes`, which could not be listed"),
        "{}",
        out.stderr
    );
}
