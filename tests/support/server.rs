//! The server under test: in process (`TestServer`), or the built `iotpipe` binary as
//! a child process (`Process`, `iotpipe()`), which never sees the caller's `IOTPIPE_*`
//! variables: a developer's exported production settings must not redirect a test.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;

use iotpipe::store::SharedStore;
use iotpipe::topology::{self, Server};
use iotpipe::Config;
use tempfile::TempDir;

use super::{Api, ADMIN, PATIENCE};

/// The test configuration: loopback port 0 for HTTP, MQTT off, data in `dir`, the
/// harness's admin token; everything else as shipped.
pub fn config(dir: &Path) -> Config {
    let mut c = Config::load(None, |_| None).expect("the embedded defaults load");
    c.data_dir = dir.to_owned();
    c.http.addr = "127.0.0.1:0".into();
    c.mqtt.addr = "off".into();
    c.admin_token = Some(ADMIN.into());
    c
}

/// A server in this process on `config`.
pub async fn start(config: Config) -> Server {
    topology::start(config).await.expect("the server starts")
}

/// A server in this process on a temporary data directory; `Deref`s to its client.
pub struct TestServer {
    pub server: Option<Server>,
    pub api: Api,
    pub dir: TempDir,
}

impl std::ops::Deref for TestServer {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        tune(&mut c);
        Self::wrap(start(c).await, dir)
    }

    /// With the built-in MQTT endpoint on a port of its own.
    pub async fn with_mqtt(tune: impl FnOnce(&mut Config)) -> Self {
        Self::start_with(|c| {
            c.mqtt.addr = "127.0.0.1:0".into();
            tune(c);
        })
        .await
    }

    pub async fn start_with_store(store: SharedStore, tune: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        tune(&mut c);
        let server = topology::start_with_store(c, store)
            .await
            .expect("the server starts");
        Self::wrap(server, dir)
    }

    fn wrap(server: Server, dir: TempDir) -> Self {
        Self {
            api: Api::new(&server),
            server: Some(server),
            dir,
        }
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.server.as_ref().expect("the server runs").http_addr
    }

    /// The built-in MQTT endpoint's address.
    pub fn mqtt(&self) -> SocketAddr {
        let server = self.server.as_ref().expect("the server runs");
        server.mqtt_addr.expect("the built-in MQTT endpoint is on")
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }
}

/// The `iotpipe` binary: cargo names it to the main crate's tests and benches; the
/// simulator's tests find it beside their own executable, in the same target
/// directory.
fn iotpipe_bin() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_iotpipe") {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join("iotpipe");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (cargo test --workspace)",
        bin.display()
    );
    bin
}

/// The binary with every `IOTPIPE_*` variable of the caller removed: only what the
/// test sets reaches it.
pub fn iotpipe() -> Command {
    let mut cmd = Command::new(iotpipe_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("IOTPIPE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// The binary with `config`'s data directory and backends as `IOTPIPE_*` variables:
/// the settings an operations command shares with `serve`.
pub fn ops_command(config: &Config) -> Command {
    let mut cmd = iotpipe();
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

/// `iotpipe serve` as a child process, killed when dropped.
pub struct Process {
    pub child: Child,
    pub http: SocketAddr,
    pub mqtt: Option<SocketAddr>,
    /// `http://` and the HTTP address.
    pub base: String,
}

impl Process {
    /// The serve command on `data_dir` with the test defaults (port 0, MQTT off, the
    /// harness's admin token, no rate limits), before `env` is applied on top.
    pub fn command(data_dir: &Path) -> Command {
        let mut cmd = iotpipe();
        cmd.arg("serve")
            .env("IOTPIPE_DATA_DIR", data_dir)
            .env("IOTPIPE_HTTP_ADDR", "127.0.0.1:0")
            .env("IOTPIPE_MQTT_ADDR", "off")
            .env("IOTPIPE_ADMIN_TOKEN", ADMIN)
            .env("IOTPIPE_RATE_DEVICE", "0")
            .env("IOTPIPE_RATE_USER", "0");
        cmd
    }

    /// Starts `iotpipe serve` with `env` on top of the test defaults and waits for
    /// the line naming its addresses. Blocks: for benches and synchronous tests.
    pub fn start(data_dir: &Path, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let mut cmd = Self::command(data_dir);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::launch(cmd)
    }

    /// `start` without blocking the runtime: other tasks go on meanwhile.
    pub async fn spawn(data_dir: &Path, env: &[(&str, String)]) -> Self {
        let dir = data_dir.to_owned();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, String)> =
                env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            Self::start(&dir, &env)
        })
        .await
        .unwrap()
        .expect("iotpipe serve starts")
    }

    /// Runs a prepared serve command (see `command`).
    pub fn launch(mut cmd: Command) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().unwrap();
        // The first line names the addresses; the rest is drained so that the child
        // never blocks on a full pipe.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let line = match rx.recv_timeout(PATIENCE) {
            Ok(Some(Ok(line))) => line,
            other => {
                let _ = child.kill();
                anyhow::bail!("iotpipe printed no address line: {other:?}");
            }
        };
        // iotpipe listening http=ADDR mqtt=ADDR|off
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_owned)
        };
        let http: SocketAddr = field("http=")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no http= in {line:?}"))?;
        let mqtt = field("mqtt=").and_then(|a| a.parse().ok());
        Ok(Self {
            child,
            http,
            mqtt,
            base: format!("http://{http}"),
        })
    }

    /// A client of this process.
    pub fn api(&self) -> Api {
        Api::at(self.http, ADMIN)
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        self.child.wait().unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process, in MB.
pub fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}
