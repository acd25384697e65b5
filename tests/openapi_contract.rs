//! The OpenAPI document (`GET /openapi.json`) against the server that serves it:
//!
//! - its operations are exactly the router's routes (`iotpipe::api::routes()`, the one
//!   table the router is built from), and the router answers each of them;
//! - schemathesis, run against a live server with real secrets, finds no 5xx, no answer
//!   outside the schema (every error in the `Error` shape), and no 2xx to input the
//!   schema calls malformed (`tests/openapi_contract/schemathesis.toml`);
//! - what it found stays fixed: the regression tests at the end.
//!
//! schemathesis comes from `scripts/deps` (a venv under `~/.cache/iotpipe`). Without
//! it the fuzzing test is skipped, except with `CI=true`, where it fails.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use common::TestServer;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn document(s: &TestServer) -> Value {
    let resp = s
        .http
        .get(format!("{}/openapi.json", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    resp.json().await.unwrap()
}

/// (method, path) of every operation in the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

/// A concrete URL path for a templated one.
fn concrete(path: &str) -> String {
    path.replace("{id}", "00000000-0000-4000-8000-000000000000")
        .replace("{file}", "app.js")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_describes_exactly_the_routes_the_router_serves() {
    let mut s = TestServer::start().await;
    let doc = document(&s).await;
    assert_eq!(doc["openapi"], "3.1.0");

    let table: BTreeSet<(String, String)> = iotpipe::api::routes()
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_owned()))
        .collect();
    let listed = documented(&doc);
    assert_eq!(
        table.difference(&listed).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "served but not in /openapi.json: add #[utoipa::path] and list it in api::openapi"
    );
    assert_eq!(
        listed.difference(&table).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "in /openapi.json but not served"
    );

    // The table is what the router serves: each path answers its listed methods (a 401
    // or a 200, never the fallback's 404) and refuses others with 405, naming exactly
    // the listed ones in `Allow`.
    let paths: BTreeSet<&str> = table.iter().map(|(_, p)| p.as_str()).collect();
    for path in paths {
        let url = format!("{}{}", s.base, concrete(path));
        let mut methods: BTreeSet<String> = table
            .iter()
            .filter(|(_, p)| p == path)
            .map(|(m, _)| m.clone())
            .collect();
        for m in &methods {
            let resp = s
                .http
                .request(Method::from_bytes(m.as_bytes()).unwrap(), &url)
                .send()
                .await
                .unwrap();
            assert!(
                ![StatusCode::NOT_FOUND, StatusCode::METHOD_NOT_ALLOWED].contains(&resp.status()),
                "{m} {path}: {}",
                resp.status()
            );
        }
        let resp = s.http.patch(&url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{path}");
        if methods.contains("GET") {
            methods.insert("HEAD".into());
        }
        let allow: BTreeSet<String> = resp.headers()["allow"]
            .to_str()
            .unwrap()
            .split(',')
            .map(|m| m.trim().to_owned())
            .collect();
        assert_eq!(allow, methods, "Allow of {path}");
    }

    // Every authenticated operation documents the answers of the authentication step.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
            if !secured {
                continue;
            }
            for status in ["401", "429", "503"] {
                assert!(
                    op["responses"].get(status).is_some(),
                    "{method} {path} lacks {status}"
                );
            }
        }
    }
    for name in ["TooManyRequests", "Unavailable"] {
        assert!(
            doc["components"]["responses"][name]["headers"]
                .get("Retry-After")
                .is_some(),
            "{name} names Retry-After"
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newer_query_parameters_are_documented_with_their_limits() {
    let mut s = TestServer::start().await;
    let doc = document(&s).await;
    let params = |path: &str| -> Vec<Value> {
        doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .clone()
    };
    let named = |list: &[Value], name: &str| -> Value {
        list.iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} is documented"))
            .clone()
    };
    let device = params("/v1/devices/{id}/aggregates");
    for name in [
        "from",
        "to",
        "window",
        "metric",
        "type",
        "tz",
        "fill",
        "percentiles",
    ] {
        named(&device, name);
    }
    assert_eq!(named(&device, "from")["required"], true);
    let grouped = params("/v1/aggregates");
    let limit = named(&grouped, "device_limit");
    assert_eq!(limit["schema"]["minimum"], 1);
    assert_eq!(limit["schema"]["maximum"], 1000);
    named(&grouped, "after_device");
    named(&grouped, "group_by");
    let events = named(&params("/v1/devices/{id}/events"), "limit");
    assert_eq!(events["schema"]["maximum"], 10000);
    let answer = &doc["components"]["schemas"]["GroupedAggregateOut"]["properties"];
    assert!(answer.get("next_after_device").is_some());
    s.stop().await;
}

/// The schemathesis executable, if installed.
fn schemathesis() -> Option<PathBuf> {
    let path = match std::env::var_os("SCHEMATHESIS") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("IOTPIPE_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/iotpipe")
                });
            cache.join("schemathesis/bin/schemathesis")
        }
    };
    path.exists().then_some(path)
}

/// Fuzzes every operation of the document against a live server. Bounded: examples
/// per operation and the whole run's time (well inside CI's budget).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_answer_outside_the_contract() {
    let Some(st) = schemathesis() else {
        let why = "schemathesis is not installed: run scripts/deps";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("skipped: {why}");
        return;
    };
    // The coverage phase sends requests without a secret on purpose; without this
    // the failed-login limit would answer 429 to everything after the first 30.
    let mut s = TestServer::start_with(|c| c.limits.failed_logins_per_minute = 0).await;
    let (_, key) = s.user("contract").await;
    let (other, _) = s.user("bystander").await;
    let (device, token) = s.device(&key, "fuzzed").await;
    let (spare, _) = s.device(&key, "to-delete").await;
    let (status, _) = s
        .ingest(&token, json!({"type": "reading", "metrics": {"t": 1.5}}))
        .await;
    assert_eq!(status, StatusCode::OK);

    let reports = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("schemathesis");
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/openapi_contract/schemathesis.toml"
    );
    let seed = std::env::var("IOTPIPE_SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".into());
    let run = tokio::process::Command::new(&st)
        .args(["--config-file", config, "run"])
        .arg(format!("{}/openapi.json", s.base))
        .args(["--checks", "all"])
        // Valid by the schema yet refused is expected: the contract has rules a
        // schema cannot state (`to` after `from`, at most 10,000 windows, a cursor
        // from a previous page, `device_id` only in gateway mode). The reverse,
        // malformed yet accepted, is checked (negative_data_rejection).
        .args(["--exclude-checks", "positive_data_acceptance"])
        .args(["--max-examples", "25", "--max-time", "60"])
        .args(["--seed", &seed, "--no-color"])
        .args(["--report", "junit,har", "--report-dir"])
        .arg(&reports)
        .env("IOTPIPE_ADMIN_TOKEN", &s.admin)
        .env("IOTPIPE_USER_KEY", &key)
        .env("IOTPIPE_OTHER_USER_ID", other.to_string())
        .env("IOTPIPE_DEVICE_ID", &device)
        .env("IOTPIPE_DEVICE_TOKEN", &token)
        .env("IOTPIPE_SPARE_DEVICE_ID", &spare)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(150), run)
        .await
        .expect("schemathesis keeps to its time budget")
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems (reports in {}):\n{stdout}\n{}",
        reports.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // A run that skipped operations would pass vacuously for them.
    let selected = stdout
        .split("Selected: ")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("a summary");
    assert!(
        stdout.contains(&format!("Tested: {selected}\n")),
        "every operation was tested:\n{stdout}"
    );
    s.stop().await;
}
