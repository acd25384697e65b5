//! The API client. Every request takes `(path, secret)` in that order, and answers
//! the status first.

use std::net::SocketAddr;
use std::time::Duration;

use iotpipe::topology::Server;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{random_name, PATIENCE};

/// A client of one server, which knows its admin token.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub admin: String,
    pub http: reqwest::Client,
}

/// A user with one device.
#[derive(Debug, Clone)]
pub struct Owner {
    pub key: String,
    pub device: String,
    pub token: String,
}

impl Api {
    /// A client of a server in this process.
    pub fn new(server: &Server) -> Self {
        Self::at(server.http_addr, &server.admin_token)
    }

    pub fn at(addr: SocketAddr, admin: &str) -> Self {
        Self {
            base: format!("http://{addr}"),
            admin: admin.to_owned(),
            http: reqwest::Client::builder()
                .timeout(PATIENCE)
                .build()
                .unwrap(),
        }
    }

    /// Sends a request; answers the status, the headers and the JSON body (or Null).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        secret: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, HeaderMap, Value) {
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
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            headers,
            serde_json::from_str(&text).unwrap_or(Value::Null),
        )
    }

    pub async fn get(&self, path: &str, secret: &str) -> (StatusCode, Value) {
        let (s, _, v) = self.call(Method::GET, path, Some(secret), None).await;
        (s, v)
    }

    /// A GET that must answer 200; its body.
    pub async fn ok(&self, path: &str, secret: &str) -> Value {
        let (s, v) = self.get(path, secret).await;
        assert_eq!(s, StatusCode::OK, "GET {path}: {v}");
        v
    }

    pub async fn post(&self, path: &str, secret: &str, body: Value) -> (StatusCode, Value) {
        let (s, _, v) = self
            .call(Method::POST, path, Some(secret), Some(body))
            .await;
        (s, v)
    }

    pub async fn delete(&self, path: &str, secret: &str) -> (StatusCode, Value) {
        let (s, _, v) = self.call(Method::DELETE, path, Some(secret), None).await;
        (s, v)
    }

    /// Posts raw bytes to the ingest endpoint.
    pub async fn ingest_raw(
        &self,
        secret: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, HeaderMap, Value) {
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
            .call(Method::POST, "/v1/ingest", Some(secret), Some(body))
            .await;
        (s, v)
    }

    /// Ingest that must be accepted.
    pub async fn ingest_ok(&self, secret: &str, body: Value) {
        let (s, v) = self.ingest(secret, body).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }

    /// Creates a user; answers (id, API key).
    pub async fn user(&self, name: &str) -> (i64, String) {
        let (s, v) = self
            .post(
                "/v1/users",
                &self.admin,
                json!({"username": name, "email": format!("{name}@example.com")}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        (
            v["id"].as_i64().unwrap(),
            v["api_key"].as_str().unwrap().to_owned(),
        )
    }

    /// A user of a name of its own; its API key.
    pub async fn user_key(&self) -> String {
        self.user(&format!("u{}", random_name())).await.1
    }

    /// Creates a device; answers (id, token).
    pub async fn device(&self, key: &str, name: &str) -> (String, String) {
        let (s, v) = self
            .post("/v1/devices", key, json!({"name": name, "type": "sensor"}))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        (
            v["id"].as_str().unwrap().to_owned(),
            v["token"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn owner(&self) -> Owner {
        let key = self.user_key().await;
        let (device, token) = self.device(&key, "sensor").await;
        Owner { key, device, token }
    }

    /// A user whose devices got `events(n)` for each `n` of `counts`, the same
    /// batch twice when `twice` (a resend changes nothing stored); answers the user's
    /// key and the device ids.
    pub async fn fleet(
        &self,
        counts: &[i64],
        twice: bool,
        events: impl Fn(i64) -> Value,
    ) -> (String, Vec<String>) {
        let key = self.user_key().await;
        let mut devices = Vec::new();
        for &n in counts {
            let (id, token) = self.device(&key, "d").await;
            let body = events(n);
            for _ in 0..if twice { 2 } else { 1 } {
                self.ingest_ok(&token, body.clone()).await;
            }
            devices.push(id);
        }
        (key, devices)
    }

    /// Deletes a device (without a purge), which must succeed.
    pub async fn delete_device(&self, key: &str, device: &str) {
        let (s, v) = self.delete(&format!("/v1/devices/{device}"), key).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    }

    /// Every stored event of a device, newest first, following cursors.
    pub async fn all_events(&self, key: &str, device: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let v = self
                .ok(
                    &format!("/v1/devices/{device}/events?limit=10000&from=0{cursor}"),
                    key,
                )
                .await;
            out.extend(v["events"].as_array().unwrap().iter().cloned());
            match v["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => return out,
            }
        }
    }

    pub async fn events(&self, o: &Owner) -> Vec<Value> {
        self.all_events(&o.key, &o.device).await
    }

    /// Waits until a device has stored at least `n` events; answers them.
    pub async fn wait_events(&self, o: &Owner, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let events = self.events(o).await;
            if events.len() >= n || Instant::now() > deadline {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn live(&self, o: &Owner) -> Value {
        self.ok(&format!("/v1/devices/{}/live", o.device), &o.key)
            .await
    }

    pub async fn metrics(&self) -> String {
        let resp = self.http.get(format!("{}/metrics", self.base)).send();
        resp.await.unwrap().text().await.unwrap()
    }

    pub async fn health(&self) -> Value {
        let resp = self.http.get(format!("{}/health", self.base)).send();
        resp.await.unwrap().json().await.unwrap()
    }
}

/// `n` telemetry events without ids or times, as one ingest body.
pub fn telemetry(n: usize) -> Value {
    (0..n)
        .map(|i| json!({"type": "t", "metrics": {"x": i as f64}}))
        .collect()
}

/// One JSON POST that must succeed, on a caller's client, without the `Api`'s
/// assertions: for benches, which time their own requests and report errors.
pub async fn post_json(
    http: &reqwest::Client,
    url: &str,
    secret: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let r = http.post(url).bearer_auth(secret).json(body).send().await?;
    anyhow::ensure!(r.status().is_success(), "{url}: {}", r.status());
    Ok(r.json().await?)
}

/// `n` events with ids of their own, `step_ms` apart from `from`, each with the
/// metric `v` = its index, as one ingest body.
pub fn events(n: i64, from: i64, step_ms: i64) -> Value {
    (0..n)
        .map(|i| {
            json!({"id": uuid::Uuid::new_v4(), "ts": from + i * step_ms, "type": "t",
                   "metrics": {"v": i}})
        })
        .collect()
}
