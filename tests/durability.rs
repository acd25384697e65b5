//! Acknowledged means durable: the real binary is killed with SIGKILL mid-stream, or
//! stopped with SIGTERM, and everything it acknowledged is there after a restart.

mod support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use reqwest::StatusCode;
use serde_json::{json, Value};

const ADMIN: &str = "ipa_durability-test-admin-token-0123456789";

struct Proc {
    child: Child,
    base: String,
}

/// The binary, with none of the caller's `IOTPIPE_*` settings: a developer's exported
/// production settings must not redirect a test.
fn iotpipe() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_iotpipe"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("IOTPIPE_")) {
        cmd.env_remove(k);
    }
    cmd
}

fn spawn(dir: &Path) -> Proc {
    let mut cmd = iotpipe();
    let mut child = cmd
        .arg("serve")
        .env("IOTPIPE_DATA_DIR", dir)
        .env("IOTPIPE_HTTP_ADDR", "127.0.0.1:0")
        .env("IOTPIPE_MQTT_ADDR", "off")
        .env("IOTPIPE_RATE_DEVICE", "0")
        .env("IOTPIPE_RATE_USER", "0")
        .env("IOTPIPE_ADMIN_TOKEN", ADMIN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("iotpipe starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    Proc {
        child,
        base: format!("http://{addr}"),
    }
}

async fn setup(http: &reqwest::Client, base: &str) -> (String, String, String) {
    let u: Value = http
        .post(format!("{base}/v1/users"))
        .bearer_auth(ADMIN)
        .json(&json!({"username": "ann", "email": "ann@example.com"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = u["api_key"].as_str().unwrap().to_owned();
    let d: Value = http
        .post(format!("{base}/v1/devices"))
        .bearer_auth(&key)
        .json(&json!({"name": "d", "type": "t"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        key,
        d["id"].as_str().unwrap().to_owned(),
        d["token"].as_str().unwrap().to_owned(),
    )
}

async fn stored_ids(http: &reqwest::Client, base: &str, key: &str, dev: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let v: Value = http
            .get(format!(
                "{base}/v1/devices/{dev}/events?limit=10000&from=0{cursor}"
            ))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        out.extend(
            v["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_owned()),
        );
        match v["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path());
    let http = reqwest::Client::new();
    let (key, dev, token) = setup(&http, &p.base).await;

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let sent = Arc::new(Mutex::new(HashSet::<String>::new()));
    let mut writers = Vec::new();
    for _ in 0..4 {
        let (http, url, token) = (http.clone(), format!("{}/v1/ingest", p.base), token.clone());
        let (acked, sent) = (acked.clone(), sent.clone());
        writers.push(tokio::spawn(async move {
            // Bounded: stops at the first failure (the kill) or after 2,000 requests.
            for _ in 0..2_000 {
                let ids: Vec<String> = (0..50).map(|_| uuid::Uuid::new_v4().to_string()).collect();
                sent.lock().extend(ids.iter().cloned());
                let body: Vec<Value> = ids
                    .iter()
                    .map(|id| json!({"id": id, "type": "t", "metrics": {"v": 1}}))
                    .collect();
                match http.post(&url).bearer_auth(&token).json(&body).send().await {
                    Ok(r) if r.status() == StatusCode::OK => acked.lock().extend(ids),
                    _ => return,
                }
            }
        }));
    }
    // Kill once a good number of requests have been acknowledged.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().len() < 5_000 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let acked: Vec<String> = acked.lock().clone();
    assert!(
        acked.len() >= 1_000,
        "too few acknowledged before the kill: {}",
        acked.len()
    );

    let mut p = spawn(dir.path());
    let stored = stored_ids(&http, &p.base, &key, &dev).await;
    let stored_set: HashSet<&String> = stored.iter().collect();
    assert_eq!(stored_set.len(), stored.len(), "an event is stored twice");
    let missing = acked.iter().filter(|id| !stored_set.contains(id)).count();
    assert_eq!(
        missing,
        0,
        "{missing} acknowledged events lost of {}",
        acked.len()
    );
    let sent = sent.lock();
    assert!(stored.iter().all(|id| sent.contains(id)));
    p.child.kill().unwrap();
    p.child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_everything_acknowledged_is_there_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path());
    let http = reqwest::Client::new();
    let (key, dev, token) = setup(&http, &p.base).await;
    let body: Vec<Value> = (0..500)
        .map(|i| json!({"type": "t", "metrics": {"i": i}}))
        .collect();
    for _ in 0..4 {
        let r = http
            .post(format!("{}/v1/ingest", p.base))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let status = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = p.child.wait().unwrap();
    assert!(exit.success(), "graceful stop exits 0: {exit}");

    let mut p = spawn(dir.path());
    assert_eq!(stored_ids(&http, &p.base, &key, &dev).await.len(), 2_000);
    p.child.kill().unwrap();
    p.child.wait().unwrap();
}

#[test]
fn a_short_admin_token_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let out = iotpipe()
        .arg("serve")
        .env("IOTPIPE_DATA_DIR", dir.path())
        .env("IOTPIPE_HTTP_ADDR", "127.0.0.1:0")
        .env("IOTPIPE_MQTT_ADDR", "off")
        .env("IOTPIPE_ADMIN_TOKEN", "short-token")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("IOTPIPE_ADMIN_TOKEN") && stderr.contains("32"),
        "{stderr}"
    );
}

#[test]
fn a_taken_port_stops_start_up_naming_the_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = iotpipe()
        .arg("serve")
        .env("IOTPIPE_DATA_DIR", dir.path())
        .env("IOTPIPE_HTTP_ADDR", &addr)
        .env("IOTPIPE_MQTT_ADDR", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&addr) && err.contains("IOTPIPE_HTTP_ADDR"),
        "{err}"
    );
}

#[test]
fn the_admin_token_is_generated_once_with_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // Open to everyone at first: iotpipe must close it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = iotpipe()
        .arg("migrate")
        .env("IOTPIPE_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode_of = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode_of(dir.path()),
        0o700,
        "the data dir is the owner's only"
    );
    assert_eq!(mode_of(&dir.path().join("registry.db")), 0o600);
    let mut p = spawn_without_admin(dir.path());
    let path = dir.path().join("admin.token");
    let token = std::fs::read_to_string(&path).unwrap();
    assert!(token.trim().starts_with("ipa_") && token.trim().len() > 40);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    p.kill().unwrap();
    p.wait().unwrap();
    let mut p = spawn_without_admin(dir.path());
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        token,
        "kept across restarts"
    );
    p.kill().unwrap();
    p.wait().unwrap();
}

fn spawn_without_admin(dir: &Path) -> Child {
    let mut child = iotpipe()
        .arg("serve")
        .env_remove("IOTPIPE_ADMIN_TOKEN")
        .env("IOTPIPE_DATA_DIR", dir)
        .env("IOTPIPE_HTTP_ADDR", "127.0.0.1:0")
        .env("IOTPIPE_MQTT_ADDR", "off")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("http="), "{line}");
    child
}
