//! `iotpipe transfer --to <settings>` from an embedded deployment to MariaDB +
//! Cassandra + Redis, interrupted and run again, then back to a new embedded
//! directory; and the targets it refuses before writing (an unreachable one, one
//! holding another deployment's data). Never skipped: a missing service fails.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use iotpipe::store::scylla::{ScyllaSettings, ScyllaStore};
use iotpipe::Config;
use reqwest::Method;
use serde_json::{json, Value};
use support::{telemetry, Api, Production, TestDb};
use uuid::Uuid;

const DAY: i64 = 86_400_000;

/// `iotpipe transfer` with only settings files: the source's as `--config`, the
/// target's as `--to`, and none of the caller's `IOTPIPE_*` variables.
fn transfer(from: &Path, to: &Path, rate: u64) -> Command {
    let mut cmd = support::iotpipe();
    cmd.arg("transfer")
        .arg("--config")
        .arg(from)
        .arg("--to")
        .arg(to)
        .arg("--max-events-per-sec")
        .arg(rate.to_string());
    cmd
}

fn embedded_toml(dir: &Path) -> String {
    format!(
        "data_dir = {:?}\n[http]\naddr = \"127.0.0.1:0\"\n[mqtt]\naddr = \"off\"\n\
         [limits]\ndevice_per_sec = 0\nuser_per_sec = 0\n",
        dir.display().to_string()
    )
}

fn production_toml(dir: &Path, db: &str, nodes: &str, keyspace: &str, prefix: &str) -> String {
    format!(
        "{}[registry]\nurl = {db:?}\n[live]\nredis_url = {:?}\nkey_prefix = {prefix:?}\n\
         [store]\nscylla_nodes = {nodes:?}\nkeyspace = {keyspace:?}\nbucket = \"1d\"\n\
         replication = \"{{'class': 'SimpleStrategy', 'replication_factor': 1}}\"\n\
         consistency = \"ONE\"\n",
        embedded_toml(dir),
        support::REDIS
    )
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn load(path: &Path) -> Config {
    let mut c = Config::load(Some(path), |_| None).unwrap();
    c.admin_token = Some("ipa_transfer_test_admin_token_0123456789abcdef".into());
    c
}

/// What a deployment serves to one user: every device's events and hourly
/// aggregates, and the device list.
async fn served(api: &Api, key: &str, devices: &[String]) -> Vec<Value> {
    let mut out = Vec::new();
    let (s, list) = api.get("/v1/devices", key).await;
    assert_eq!(s, 200, "{list}");
    out.push(list);
    for d in devices {
        let mut events = Vec::new();
        let mut cursor = String::new();
        loop {
            let (s, v) = api
                .get(
                    &format!("/v1/devices/{d}/events?from=0&limit=10000{cursor}"),
                    key,
                )
                .await;
            assert_eq!(s, 200, "{v}");
            events.extend(v["events"].as_array().unwrap().iter().cloned());
            match v["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => break,
            }
        }
        out.push(json!(events));
        let now = iotpipe::model::now_ms();
        let (s, v) = api
            .get(
                &format!(
                    "/v1/devices/{d}/aggregates?from={}&to={now}&window=1h&metric=v",
                    now - 4 * DAY
                ),
                key,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        out.push(v);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_to_mariadb_and_cassandra_interrupted_resumed_and_back() {
    let work = tempfile::tempdir().unwrap();
    let source_file = write(
        work.path(),
        "source.toml",
        &embedded_toml(&work.path().join("src")),
    );
    let source = load(&source_file);
    let server = support::start(source.clone()).await;
    let api = Api::new(&server);
    let key = api.user_key().await;
    let from = iotpipe::model::now_ms() - 3 * DAY;
    let mut devices = Vec::new();
    let mut tokens = Vec::new();
    for n in [2_000i64, 700] {
        let (id, token) = api.device(&key, "d").await;
        let body: Vec<Value> = (0..n)
            .map(|i| {
                let mut e = json!({"ts": from + i * 97_000, "type": "t", "metrics": {"v": i % 13}});
                if i % 2 == 1 {
                    e["id"] = json!(Uuid::new_v4());
                }
                e
            })
            .collect();
        for chunk in body.chunks(1_000) {
            let (s, _, v) = api
                .call(Method::POST, "/v1/ingest", Some(&token), Some(json!(chunk)))
                .await;
            assert_eq!(s, 200, "{v}");
        }
        devices.push(id);
        tokens.push(token);
    }
    let before = served(&api, &key, &devices).await;
    server.stop().await;

    // The target: MariaDB, Cassandra (with another bucket length) and Redis.
    let backends = Production::new("transfer").await;
    let target_file = write(
        work.path(),
        "target.toml",
        &production_toml(
            &work.path().join("dst"),
            &backends.db.url,
            support::CASSANDRA,
            &backends.store.keyspace,
            &backends.prefix,
        ),
    );

    // Interrupted: killed part-way through a throttled copy. The target then has no
    // registry, so nobody can use it as if it were complete.
    let mut child = transfer(&source_file, &target_file, 1_000)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let target = load(&target_file);
    let server = support::start(target.clone()).await;
    let (s, _) = Api::new(&server).get("/v1/devices", &key).await;
    assert_eq!(s, 401, "the user is not on an interrupted target");
    server.stop().await;

    // Run again: complete, verified, no event twice.
    let out = transfer(&source_file, &target_file, 0).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("transfer complete: 1 users"), "{err}");
    assert!(err.contains("2700 verified"), "{err}");
    let server = support::start(target.clone()).await;
    let api = Api::new(&server);
    assert_eq!(served(&api, &key, &devices).await, before);
    // Hashed secrets came along: the device token still ingests, with no re-provisioning.
    let (s, _) = api.ingest(&tokens[1], telemetry(1)).await;
    assert_eq!(s, 200);
    let (s, v) = api
        .get(&format!("/v1/devices/{}/live", devices[0]), &key)
        .await;
    assert_eq!(
        (s.as_u16(), v["events_total"].as_u64()),
        (200, Some(2_000)),
        "{v}"
    );
    server.stop().await;

    // And back, into a new embedded directory.
    let back_file = write(
        work.path(),
        "back.toml",
        &embedded_toml(&work.path().join("back")),
    );
    let out = transfer(&target_file, &back_file, 0).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let server = support::start(load(&back_file)).await;
    let back = served(&Api::new(&server), &key, &devices).await;
    server.stop().await;
    // The same, but for the event ingested on the target meanwhile.
    assert_eq!(back[0], before[0]);
    assert_eq!(back[1], before[1]);
    assert_eq!(back[2], before[2]);
    assert_eq!(back[3].as_array().unwrap().len(), 701);

    let settings =
        ScyllaSettings::from_config(&target.store, target.pipeline.bucket_len_ms).unwrap();
    drop(ScyllaStore::connect(settings).await.unwrap());
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_that_are_unreachable_or_foreign_are_refused_before_writing() {
    let work = tempfile::tempdir().unwrap();
    let source_file = write(
        work.path(),
        "source.toml",
        &embedded_toml(&work.path().join("src")),
    );
    let server = support::start(load(&source_file)).await;
    let api = Api::new(&server);
    let key = api.user_key().await;
    let (_, token) = api.device(&key, "d").await;
    assert_eq!(api.ingest(&token, telemetry(5)).await.0, 200);
    server.stop().await;

    // Nothing listens at the target's Cassandra address.
    let db = TestDb::create(support::MARIADB).await;
    let nowhere = format!("127.0.0.1:{}", support::free_port());
    let unreachable = write(
        work.path(),
        "unreachable.toml",
        &production_toml(
            &work.path().join("u"),
            &db.url,
            &nowhere,
            "iotpipe_nowhere",
            "x:",
        ),
    );
    let out = transfer(&source_file, &unreachable, 0).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("refused, nothing was written") && err.contains("cannot be reached"),
        "{err}"
    );

    // Another deployment's directory, with its own user and events.
    let other_file = write(
        work.path(),
        "other.toml",
        &embedded_toml(&work.path().join("other")),
    );
    let other = support::start(load(&other_file)).await;
    let other_api = Api::new(&other);
    let other_key = other_api.user_key().await;
    let (_, other_token) = other_api.device(&other_key, "d").await;
    assert_eq!(other_api.ingest(&other_token, telemetry(3)).await.0, 200);
    other.stop().await;
    let out = transfer(&source_file, &other_file, 0).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("another deployment"), "{err}");
    let other = support::start(load(&other_file)).await;
    let (s, v) = Api::new(&other).get("/v1/devices", &key).await;
    assert_eq!(s, 401, "the source's user was not written: {v}");
    other.stop().await;

    // The source itself is not a target.
    let out = transfer(&source_file, &source_file, 0).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("where the source does"));
}
