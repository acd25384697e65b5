//! What the end-to-end benches share: the release server as a child process, its
//! memory, a JSON POST, and medians.

#![allow(dead_code)] // each bench uses its own part

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use serde_json::Value;

pub const ADMIN: &str = "ipa_bench-admin-token-0123456789abcdef";

/// A running `iotpipe serve`, killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the benched binary on the embedded defaults in `dir`, without rate limits
/// or MQTT, with `env` on top; no `IOTPIPE_*` from the caller's shell leaks in.
pub fn start_server(dir: &std::path::Path, env: &[(&str, String)]) -> Result<Server> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_iotpipe"));
    for (k, _) in std::env::vars() {
        if k.starts_with("IOTPIPE_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("serve")
        .env("IOTPIPE_DATA_DIR", dir)
        .env("IOTPIPE_HTTP_ADDR", "127.0.0.1:0")
        .env("IOTPIPE_MQTT_ADDR", "off")
        .env("IOTPIPE_RATE_DEVICE", "0")
        .env("IOTPIPE_RATE_USER", "0")
        .env("IOTPIPE_ADMIN_TOKEN", ADMIN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().context("starting iotpipe")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .context("no address line")?
        .to_owned();
    Ok(Server {
        child,
        base: format!("http://{addr}"),
    })
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

pub async fn post_json(
    http: &reqwest::Client,
    url: &str,
    secret: &str,
    body: &Value,
) -> Result<Value> {
    let r = http.post(url).bearer_auth(secret).json(body).send().await?;
    anyhow::ensure!(r.status().is_success(), "{url}: {}", r.status());
    Ok(r.json().await?)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
