//! The real binary: acknowledged means durable (killed with SIGKILL mid-stream, or
//! stopped with SIGTERM, everything it acknowledged is there after a restart), and
//! its command line: start-up refusals, `--help`, `serve --config FILE`, and a
//! spawned server that sees none of the caller's `IOTPIPE_*` settings.

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{iotpipe, Api, Owner, Process};

/// The stored event ids of a device.
async fn stored_ids(api: &Api, key: &str, dev: &str) -> Vec<String> {
    let events = api.all_events(key, dev).await;
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The binary on `dir`, and a user with a device on it.
async fn spawn_with_device(dir: &Path) -> (Process, Api, Owner) {
    let p = spawn(dir);
    let api = p.api();
    let owner = api.owner().await;
    (p, api, owner)
}

fn spawn(dir: &Path) -> Process {
    Process::start(dir, &[]).expect("iotpipe serve starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (p, api, owner) = spawn_with_device(dir.path()).await;
    let (http, key, dev, token) = (api.http.clone(), owner.key, owner.device, owner.token);

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
    p.kill9();
    for w in writers {
        w.await.unwrap();
    }
    let acked: Vec<String> = acked.lock().clone();
    assert!(
        acked.len() >= 1_000,
        "too few acknowledged before the kill: {}",
        acked.len()
    );

    let p = spawn(dir.path());
    let stored = stored_ids(&p.api(), &key, &dev).await;
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_everything_acknowledged_is_there_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (p, api, owner) = spawn_with_device(dir.path()).await;
    let (http, key, dev, token) = (api.http.clone(), owner.key, owner.device, owner.token);
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
    let exit = p.terminate();
    assert!(exit.success(), "graceful stop exits 0: {exit}");

    let p = spawn(dir.path());
    assert_eq!(stored_ids(&p.api(), &key, &dev).await.len(), 2_000);
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
    let p = spawn_without_admin(dir.path());
    let path = dir.path().join("admin.token");
    let token = std::fs::read_to_string(&path).unwrap();
    assert!(token.trim().starts_with("ipa_") && token.trim().len() > 40);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    p.kill9();
    let p = spawn_without_admin(dir.path());
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        token,
        "kept across restarts"
    );
    p.kill9();
}

fn spawn_without_admin(dir: &Path) -> Process {
    let mut cmd = Process::command(dir);
    cmd.env_remove("IOTPIPE_ADMIN_TOKEN");
    Process::launch(cmd).expect("iotpipe serve starts")
}

#[test]
fn help_names_every_command_and_the_config_option() {
    let out = support::iotpipe().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "serve",
        "migrate",
        "export",
        "backup",
        "restore",
        "rebuild-live",
        "check",
        "transfer",
        "--config",
    ] {
        assert!(help.contains(word), "--help does not name {word}:\n{help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reads_its_settings_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let file = dir.path().join("iotpipe.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = {:?}\nadmin_token = {:?}\n[http]\naddr = \"127.0.0.1:{port}\"\n\
             [mqtt]\naddr = \"off\"\n[limits]\ndevice_per_sec = 3\n",
            dir.path().join("data").display().to_string(),
            support::ADMIN,
        ),
    )
    .unwrap();
    let mut cmd = support::iotpipe();
    cmd.arg("serve").arg("--config").arg(&file);
    let p = Process::launch(cmd).expect("iotpipe serve --config starts");
    assert_eq!(p.http.port(), port, "the file's HTTP address is honoured");
    assert!(dir.path().join("data").join("registry.db").exists());
    // So is its rate limit, three events a second per device: ten put the device in
    // debt (the default allows far more), so the next request is refused.
    let api = p.api();
    let o = api.owner().await;
    api.ingest_ok(&o.token, support::telemetry(10)).await;
    let (s, v) = api.ingest(&o.token, support::telemetry(1)).await;
    assert_eq!(s, 429, "{v}");
    assert_eq!(v["limit"], "device", "{v}");
}

/// A developer's shell may export production settings: a spawned server must ignore
/// them. The bogus registry below would stop start-up, or show in `/health`, if it
/// reached the child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawned_server_ignores_the_callers_iotpipe_settings() {
    // Only this test of the binary reads or writes this variable; std serialises
    // environment access, and every spawn in this binary goes through the harness.
    std::env::set_var("IOTPIPE_REGISTRY_URL", "mysql://root@127.0.0.1:1/not_here");
    std::env::set_var("IOTPIPE_HTTP_ADDR", "127.0.0.1:1");
    let dir = tempfile::tempdir().unwrap();
    let started = Process::start(dir.path(), &[]);
    std::env::remove_var("IOTPIPE_REGISTRY_URL");
    std::env::remove_var("IOTPIPE_HTTP_ADDR");
    let p = started.expect("the server starts on its test settings");
    assert_ne!(p.http.port(), 1);
    let health = p.api().health().await;
    assert_eq!(
        health["components"]["registry"]["backend"], "sqlite",
        "{health}"
    );
}
