//! Shared test support: a real server on an ephemeral port with a temp data dir, and a
//! small HTTP client that speaks the API.
#![allow(dead_code)]

use std::time::Duration;

use iotpipe::store::SharedStore;
use iotpipe::topology::{self, Server};
use iotpipe::Config;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;

/// A config for tests: ephemeral HTTP port, no MQTT, a temp data dir.
pub fn test_config(dir: &TempDir) -> Config {
    let mut c = Config::load(None, |_| None).expect("default config");
    c.data_dir = dir.path().to_owned();
    c.http.addr = "127.0.0.1:0".into();
    c.mqtt.addr = "off".into();
    c
}

pub struct TestServer {
    pub server: Option<Server>,
    pub base: String,
    pub admin: String,
    pub http: reqwest::Client,
    pub dir: TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(&dir);
        tune(&mut config);
        let server = topology::start(config).await.expect("server starts");
        Self::wrap(server, dir)
    }

    pub async fn start_with_store(store: SharedStore, tune: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(&dir);
        tune(&mut config);
        let server = topology::start_with_store(config, store)
            .await
            .expect("server starts");
        Self::wrap(server, dir)
    }

    fn wrap(server: Server, dir: TempDir) -> Self {
        Self {
            base: format!("http://{}", server.http_addr),
            admin: server.admin_token.clone(),
            server: Some(server),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            dir,
        }
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }

    /// Sends a request; returns the status, the headers and the JSON body (or Null).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        secret: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(s) = secret {
            req = req.bearer_auth(s);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, headers, value)
    }

    pub async fn get(&self, path: &str, secret: &str) -> (StatusCode, Value) {
        let (s, _, v) = self.call(Method::GET, path, Some(secret), None).await;
        (s, v)
    }

    /// Posts raw bytes to the ingest endpoint.
    pub async fn ingest_raw(
        &self,
        secret: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self
            .http
            .post(format!("{}/v1/ingest", self.base))
            .bearer_auth(secret)
            .body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let headers = resp.headers().clone();
        let value = resp.json().await.unwrap_or(Value::Null);
        (status, headers, value)
    }

    pub async fn ingest(&self, secret: &str, body: Value) -> (StatusCode, Value) {
        let (s, _, v) = self
            .ingest_raw(secret, Some("application/json"), body.to_string())
            .await;
        (s, v)
    }

    /// Creates a user; returns (id, api key).
    pub async fn user(&self, name: &str) -> (i64, String) {
        let (status, _, v) = self
            .call(
                Method::POST,
                "/v1/users",
                Some(&self.admin),
                Some(json!({"username": name, "email": format!("{name}@example.com")})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        (
            v["id"].as_i64().unwrap(),
            v["api_key"].as_str().unwrap().to_owned(),
        )
    }

    /// Creates a device; returns (id, token).
    pub async fn device(&self, key: &str, name: &str) -> (String, String) {
        let (status, _, v) = self
            .call(
                Method::POST,
                "/v1/devices",
                Some(key),
                Some(json!({"name": name, "type": "sensor"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        (
            v["id"].as_str().unwrap().to_owned(),
            v["token"].as_str().unwrap().to_owned(),
        )
    }

    /// All stored events of a device (newest first), following cursors.
    pub async fn all_events(&self, key: &str, device: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/v1/devices/{device}/events?limit=10000&from=0");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (status, v) = self.get(&path, key).await;
            assert_eq!(status, StatusCode::OK, "{v}");
            out.extend(v["events"].as_array().unwrap().iter().cloned());
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return out,
            }
        }
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A Prometheus sample's value, by its full series text (name and labels).
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The `iotpipe` binary on the data directory `dir`, with none of the caller's
/// `IOTPIPE_*` settings (a developer's exported production settings must not
/// redirect a test).
pub fn iotpipe_command(dir: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_iotpipe"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("IOTPIPE_")) {
        cmd.env_remove(k);
    }
    cmd.env("IOTPIPE_DATA_DIR", dir).env("RUST_LOG", "warn");
    cmd
}

/// Now in ms.
pub fn now_ms() -> i64 {
    iotpipe::model::now_ms()
}
