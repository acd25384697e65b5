//! The backends: the shared MariaDB, Redis and Cassandra of `scripts/deps` (each test
//! takes a fresh database, key prefix or keyspace on them), and private server
//! processes on free ports for the tests that stop or break them.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use iotpipe::config::StoreConfig;
use iotpipe::store::scylla::{ScyllaSettings, ScyllaStore};
use iotpipe::Config;
use tokio::time::Instant;

use super::random_name;

/// The shared MariaDB (root, empty password).
pub const MARIADB: &str = "mysql://root@127.0.0.1:3306";
/// The shared Redis. Tests never stop it; each uses a random key prefix.
pub const REDIS: &str = "redis://127.0.0.1:6379/0";
/// The shared Cassandra node.
pub const CASSANDRA: &str = "127.0.0.1:9042";

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// A random Redis key prefix for one test.
pub fn redis_prefix() -> String {
    format!("iotpipe_test_{}:", random_name())
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
                    let drop = format!("DROP DATABASE IF EXISTS {name}");
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
                        .execute(&mut conn)
                        .await;
                }
            });
        });
        let _ = done.join();
    }
}

/// A fresh keyspace on the shared Cassandra node, in the store settings of `config`.
pub fn cassandra_store(tag: &str) -> StoreConfig {
    StoreConfig {
        scylla_nodes: Some(CASSANDRA.into()),
        keyspace: format!("iotpipe_{tag}_{}", random_name()),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        consistency: "ONE".into(),
        ..StoreConfig::default()
    }
}

/// Every production backend for one test: a fresh MariaDB database, a fresh Cassandra
/// keyspace and a random Redis prefix. `cleanup` removes the keyspace and the keys;
/// the database goes when this is dropped.
pub struct Production {
    pub db: TestDb,
    pub prefix: String,
    pub store: StoreConfig,
}

impl Production {
    pub async fn new(tag: &str) -> Self {
        Self {
            db: TestDb::create(MARIADB).await,
            prefix: redis_prefix(),
            store: cassandra_store(tag),
        }
    }

    /// Points `config` at these backends and creates the keyspace; answers the
    /// store's settings.
    pub async fn apply(&self, config: &mut Config) -> ScyllaSettings {
        config.store = self.store.clone();
        config.registry.url = Some(self.db.url.clone());
        config.live.redis_url = Some(REDIS.into());
        config.live.key_prefix = self.prefix.clone();
        let settings =
            ScyllaSettings::from_config(&config.store, config.pipeline.bucket_len_ms).unwrap();
        ScyllaStore::migrate(&settings)
            .await
            .expect("the Cassandra node of scripts/deps answers at 127.0.0.1:9042");
        settings
    }

    pub async fn cleanup(self) {
        drop_keyspace(&self.store.keyspace).await;
        clear_redis(REDIS, &self.prefix).await;
    }
}

/// A session on the shared Cassandra node.
pub async fn cassandra_session() -> scylla::client::session::Session {
    scylla::client::session_builder::SessionBuilder::new()
        .known_node(CASSANDRA)
        .build()
        .await
        .expect("the Cassandra node of scripts/deps answers at 127.0.0.1:9042")
}

pub async fn drop_keyspace(keyspace: &str) {
    cassandra_session()
        .await
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
        .await
        .unwrap();
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private, non-persistent `redis-server` on `port`.
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
