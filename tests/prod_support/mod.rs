//! Helpers for the production-backend tests: fresh MariaDB databases, random Redis
//! key prefixes, private server processes on free ports, and an in-process server.
#![allow(dead_code)]

use std::net::TcpListener as StdListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iotpipe::topology::{self, Server};
use iotpipe::Config;
use serde_json::{json, Value};
use uuid::Uuid;

/// The shared MariaDB of this machine (root, empty password).
pub const MARIADB: &str = "mysql://root@127.0.0.1:3306";
/// The shared Redis of this machine. Tests never stop it; they use a random prefix.
pub const REDIS: &str = "redis://127.0.0.1:6379/0";

/// A random suffix for database names, key prefixes and topics.
pub fn random_name() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// A random Redis key prefix for one test run.
pub fn redis_prefix() -> String {
    format!("iotpipe_prodtest_{}:", random_name())
}

/// Deletes every key under `prefix` (keys without a TTL would otherwise stay behind
/// in the shared Redis).
pub async fn clear_redis(url: &str, prefix: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh database on `server` (a `mysql://` URL without a database), dropped when
/// this guard is dropped, even if the test panics.
pub struct TestDb {
    server: String,
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create(server: &str) -> TestDb {
        use sqlx::Connection;
        let name = format!("iotpipe_test_{}", random_name());
        let mut conn = sqlx::MySqlConnection::connect(server)
            .await
            .expect("the MariaDB test server is reachable");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        TestDb {
            server: server.to_owned(),
            url: format!("{server}/{name}"),
            name,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let server = self.server.clone();
        let name = self.name.clone();
        // Drop cannot await; a short-lived runtime on its own thread can.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use sqlx::Connection;
                if let Ok(mut conn) = sqlx::MySqlConnection::connect(&server).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name}"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        });
        let _ = done.join();
    }
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until something accepts TCP connections on `port`.
pub async fn wait_for_port(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Starts a private, non-persistent `redis-server` on `port`.
pub async fn start_redis(port: u16) -> Proc {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--daemonize", "no", "--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed");
    let proc = Proc(child);
    assert!(
        wait_for_port(port, Duration::from_secs(10)).await,
        "redis-server started"
    );
    proc
}

/// A config for an in-process server on a free port, with a temp data dir.
pub fn config(data_dir: &Path) -> Config {
    let mut c = Config::load(None, |_| None).unwrap();
    c.data_dir = data_dir.to_owned();
    c.http.addr = "127.0.0.1:0".into();
    c.mqtt.addr = "off".into();
    c.admin_token = Some(format!("ipa_{}{}", random_name(), random_name()).repeat(2));
    c.pipeline.retry_budget_ms = 500;
    c
}

/// The `iotpipe` binary with none of the caller's `IOTPIPE_*` settings (a
/// developer's exported production settings must not redirect a test).
pub fn bare_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_iotpipe"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("IOTPIPE_")) {
        cmd.env_remove(k);
    }
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// The `iotpipe` binary with `config`'s backends as `IOTPIPE_*` variables (the
/// settings an operations command shares with `serve`), and none of the caller's.
pub fn command(config: &Config) -> Command {
    let mut cmd = bare_command();
    cmd.env("IOTPIPE_DATA_DIR", &config.data_dir);
    if let Some(nodes) = &config.store.scylla_nodes {
        cmd.env("IOTPIPE_SCYLLA_NODES", nodes)
            .env("IOTPIPE_SCYLLA_KEYSPACE", &config.store.keyspace)
            .env("IOTPIPE_SCYLLA_REPLICATION", &config.store.replication)
            .env("IOTPIPE_SCYLLA_CONSISTENCY", &config.store.consistency);
    }
    if let Some(url) = &config.registry.url {
        cmd.env("IOTPIPE_REGISTRY_URL", url);
    }
    if let Some(url) = &config.live.redis_url {
        cmd.env("IOTPIPE_REDIS_URL", url)
            .env("IOTPIPE_REDIS_PREFIX", &config.live.key_prefix);
    }
    if let Some(token) = &config.admin_token {
        cmd.env("IOTPIPE_ADMIN_TOKEN", token);
    }
    cmd
}

pub async fn start(config: Config) -> Server {
    topology::start(config).await.expect("server starts")
}

/// A small HTTP client bound to one server.
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(server: &Server) -> Api {
        Api {
            base: format!("http://{}", server.http_addr),
            http: reqwest::Client::new(),
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        secret: &str,
        body: Option<Value>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(secret)
            .timeout(Duration::from_secs(20));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, value, headers)
    }

    pub async fn get(&self, path: &str, secret: &str) -> (u16, Value) {
        let (s, v, _) = self.call(reqwest::Method::GET, path, secret, None).await;
        (s, v)
    }

    pub async fn post(&self, path: &str, secret: &str, body: Value) -> (u16, Value) {
        let (s, v, _) = self
            .call(reqwest::Method::POST, path, secret, Some(body))
            .await;
        (s, v)
    }

    pub async fn health(&self) -> Value {
        let resp = self
            .http
            .get(format!("{}/health", self.base))
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .unwrap();
        resp.json().await.unwrap()
    }

    /// Creates a user; returns its API key.
    pub async fn user(&self, admin: &str) -> String {
        let name = format!("u{}", random_name());
        let (s, v) = self
            .post(
                "/v1/users",
                admin,
                json!({"username": name, "email": "a@b.c"}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        v["api_key"].as_str().unwrap().to_owned()
    }

    /// Creates a device; returns (id, token).
    pub async fn device(&self, key: &str) -> (String, String) {
        let (s, v) = self
            .post("/v1/devices", key, json!({"name": "d", "type": "sensor"}))
            .await;
        assert_eq!(s, 201, "{v}");
        (
            v["id"].as_str().unwrap().to_owned(),
            v["token"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn ingest(&self, token: &str, n: usize) -> (u16, Value, reqwest::header::HeaderMap) {
        let events: Vec<Value> = (0..n)
            .map(|i| json!({"type": "t", "metrics": {"x": i as f64}}))
            .collect();
        self.call(
            reqwest::Method::POST,
            "/v1/ingest",
            token,
            Some(json!(events)),
        )
        .await
    }
}

/// A private Apache Cassandra node (`scripts/cassandra` with its own ports and
/// directory), for tests that pause or kill it; killed when dropped.
pub struct CassandraNode {
    pub port: u16,
    pub pid: i32,
    _dir: tempfile::TempDir,
}

impl CassandraNode {
    pub fn start() -> CassandraNode {
        let dir = tempfile::tempdir().unwrap();
        let (port, storage) = (free_port(), free_port());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cassandra");
        let out = Command::new(script)
            .arg("start")
            .env("IOTPIPE_CASSANDRA_PORT", port.to_string())
            .env("IOTPIPE_CASSANDRA_STORAGE_PORT", storage.to_string())
            .env("IOTPIPE_CASSANDRA_DIR", dir.path())
            .output()
            .expect("scripts/cassandra runs");
        let pid = std::fs::read_to_string(dir.path().join("cassandra.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok());
        let node = CassandraNode {
            port,
            pid: pid.unwrap_or(0),
            _dir: dir,
        };
        assert!(
            out.status.success() && node.pid > 0,
            "a private Cassandra node started:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        node
    }

    /// SIGSTOP or SIGCONT.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {}", self.pid);
    }
}

impl Drop for CassandraNode {
    fn drop(&mut self) {
        // Resumed first: a stopped JVM does not act on SIGKILL's effects promptly.
        let _ = Command::new("kill")
            .args(["-CONT", &self.pid.to_string()])
            .status();
        let _ = Command::new("kill")
            .args(["-KILL", &self.pid.to_string()])
            .status();
    }
}
