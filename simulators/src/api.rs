//! A small client for the parts of iotpipe's HTTP API the simulator needs: the
//! registry (provisioning), ingest, and the read endpoints (verification, the demo).

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

/// Why a call to the API failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{method} {path}: {source}")]
    Transport {
        method: Method,
        path: String,
        source: reqwest::Error,
    },
    #[error("{method} {path} answered {status}: {body}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("{path}: unexpected answer: {reason}")]
    Shape { path: String, reason: String },
}

/// The answer to one ingest request.
#[derive(Debug, Clone)]
pub enum IngestAnswer {
    /// 2xx: every event of the request is durable.
    Accepted,
    /// 429 or 503: nothing was taken now; try again after this long.
    RetryLater { status: u16, after: Duration },
    /// Any other status: the request was refused and nothing of it is stored.
    Refused { status: u16 },
    /// No answer (connection error, timeout) or a 5xx: the events may or may not be
    /// stored.
    Unknown { reason: String },
}

/// A stored event as the events endpoint returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct StoredEvent {
    pub id: uuid::Uuid,
    pub ts: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub metrics: serde_json::Map<String, Value>,
    #[serde(default)]
    pub attrs: serde_json::Map<String, Value>,
}

/// One window of a device aggregate.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Bucket {
    pub start_ms: i64,
    pub count: u64,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default)]
    pub sum: Option<f64>,
}

/// One window of a grouped aggregate.
#[derive(Debug, Clone, Deserialize)]
pub struct GroupBucket {
    pub start_ms: i64,
    pub group: String,
    pub count: u64,
}

/// A device as created by the registry.
#[derive(Debug, Clone)]
pub struct CreatedDevice {
    pub id: String,
    pub token: String,
}

/// The API of one iotpipe instance.
#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    /// `base` is the HTTP root, e.g. `http://127.0.0.1:8080`.
    ///
    /// # Errors
    ///
    /// When the HTTP client cannot be built.
    pub fn new(base: &str, pool_per_host: usize) -> Result<Self, ApiError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(pool_per_host)
            .tcp_nodelay(true)
            .build()
            .map_err(|source| ApiError::Transport {
                method: Method::GET,
                path: base.to_owned(),
                source,
            })?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        secret: &str,
        body: Option<Value>,
    ) -> Result<Value, ApiError> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .header(AUTHORIZATION, format!("Bearer {secret}"));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let transport = |source| ApiError::Transport {
            method: method.clone(),
            path: path.to_owned(),
            source,
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let text = resp.text().await.map_err(transport)?;
        if !status.is_success() {
            return Err(ApiError::Status {
                method,
                path: path.to_owned(),
                status,
                body: text,
            });
        }
        serde_json::from_str(&text).map_err(|e| ApiError::Shape {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// `POST /v1/users` (admin); returns the new user's API key.
    ///
    /// # Errors
    ///
    /// Transport errors and any non-2xx answer (409 when the name is taken).
    pub async fn create_user(&self, admin: &str, username: &str) -> Result<String, ApiError> {
        let v = self
            .call(
                Method::POST,
                "/v1/users",
                admin,
                Some(json!({"username": username, "email": format!("{username}@sim.invalid")})),
            )
            .await?;
        str_field(&v, "api_key", "/v1/users")
    }

    /// `POST /v1/devices` (user key).
    ///
    /// # Errors
    ///
    /// Transport errors and any non-2xx answer.
    pub async fn create_device(
        &self,
        key: &str,
        name: &str,
        kind: &str,
    ) -> Result<CreatedDevice, ApiError> {
        let v = self
            .call(
                Method::POST,
                "/v1/devices",
                key,
                Some(json!({"name": name, "type": kind})),
            )
            .await?;
        Ok(CreatedDevice {
            id: str_field(&v, "id", "/v1/devices")?,
            token: str_field(&v, "token", "/v1/devices")?,
        })
    }

    /// `POST /v1/ingest` with a device token and a JSON body. Never fails: every
    /// outcome is an [`IngestAnswer`], since the caller tallies them all.
    pub async fn ingest(&self, token: &str, body: bytes::Bytes) -> IngestAnswer {
        let sent = self
            .http
            .post(format!("{}/v1/ingest", self.base))
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                return IngestAnswer::Unknown {
                    reason: e.to_string(),
                }
            }
        };
        let status = resp.status();
        let after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Drain the body so that the connection goes back to the pool.
        let drained = resp.bytes().await;
        if status.is_success() {
            // A 2xx whose body was cut off still means durable: the server answers
            // only once the events are written.
            return IngestAnswer::Accepted;
        }
        if let Err(e) = drained {
            return IngestAnswer::Unknown {
                reason: e.to_string(),
            };
        }
        match status.as_u16() {
            s @ (429 | 503) => IngestAnswer::RetryLater {
                status: s,
                after: after.unwrap_or(Duration::from_millis(200)),
            },
            s if s >= 500 => IngestAnswer::Unknown {
                reason: format!("HTTP {s}"),
            },
            s => IngestAnswer::Refused { status: s },
        }
    }

    /// Every event of a device in `[from_ms, to_ms)`, following `next_cursor`.
    ///
    /// # Errors
    ///
    /// Transport errors, non-2xx answers, or a body that is not the documented shape.
    pub async fn all_events(
        &self,
        key: &str,
        device: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<StoredEvent>, ApiError> {
        #[derive(Deserialize)]
        struct Page {
            events: Vec<StoredEvent>,
            next_cursor: Option<String>,
        }
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path =
                format!("/v1/devices/{device}/events?limit=10000&from={from_ms}&to={to_ms}");
            if let Some(c) = &cursor {
                path.push_str("&cursor=");
                path.push_str(c);
            }
            let v = self.call(Method::GET, &path, key, None).await?;
            let page: Page = serde_json::from_value(v).map_err(|e| ApiError::Shape {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            out.extend(page.events);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// `GET /v1/devices/{id}/aggregates` for one metric.
    ///
    /// # Errors
    ///
    /// As [`Api::all_events`].
    pub async fn device_aggregates(
        &self,
        key: &str,
        device: &str,
        from_ms: i64,
        to_ms: i64,
        window: &str,
        metric: &str,
    ) -> Result<Vec<Bucket>, ApiError> {
        let path = format!(
            "/v1/devices/{device}/aggregates?from={from_ms}&to={to_ms}&window={window}\
             &metric={metric}"
        );
        let v = self.call(Method::GET, &path, key, None).await?;
        buckets(&v, &path)
    }

    /// `GET /v1/aggregates?group_by=...`.
    ///
    /// # Errors
    ///
    /// As [`Api::all_events`].
    pub async fn grouped_aggregates(
        &self,
        key: &str,
        from_ms: i64,
        to_ms: i64,
        window: &str,
        group_by: &str,
    ) -> Result<Vec<GroupBucket>, ApiError> {
        let path =
            format!("/v1/aggregates?from={from_ms}&to={to_ms}&window={window}&group_by={group_by}");
        let v = self.call(Method::GET, &path, key, None).await?;
        buckets(&v, &path)
    }
}

fn buckets<T: serde::de::DeserializeOwned>(v: &Value, path: &str) -> Result<Vec<T>, ApiError> {
    let shape = |reason: String| ApiError::Shape {
        path: path.to_owned(),
        reason,
    };
    let list = v
        .get("buckets")
        .cloned()
        .ok_or_else(|| shape("no buckets".into()))?;
    serde_json::from_value(list).map_err(|e| shape(e.to_string()))
}

fn str_field(v: &Value, name: &str, path: &str) -> Result<String, ApiError> {
    v.get(name)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| ApiError::Shape {
            path: path.to_owned(),
            reason: format!("no string field {name:?} in {v}"),
        })
}
