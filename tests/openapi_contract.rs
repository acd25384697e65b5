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

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::TestServer;

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

    // Reports, and the caches schemathesis and hypothesis keep in their working
    // directory (which replay earlier failures first), stay under the target dir.
    let reports = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("schemathesis");
    std::fs::create_dir_all(&reports).unwrap();
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
        .current_dir(&reports)
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

// What the contract checks found, kept as plain HTTP cases.

/// A malformed paging parameter was ignored (200) unless `group_by=device`:
/// schemathesis sent `device_limit=false` with the default grouping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_parameters_are_checked_whatever_the_grouping() {
    let mut s = TestServer::start().await;
    let (_, key) = s.user("pager").await;
    let range = "from=0&to=86400000&window=1h";
    for (query, field) in [
        ("device_limit=false", "device_limit"),
        ("device_limit=0", "device_limit"),
        ("group_by=type&device_limit=1001", "device_limit"),
        ("after_device=nope", "after_device"),
    ] {
        let (status, body) = s
            .get(&format!("/v1/aggregates?{range}&{query}"), &key)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(body["field"], field, "{query}");
    }
    let (status, body) = s
        .get(&format!("/v1/aggregates?{range}&device_limit=5"), &key)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    s.stop().await;
}

/// The percentile fields sit beside a window's own: the document had constrained every
/// field of the window to the `p50` form, so a window's `start` broke its own schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percentile_fields_are_described_beside_the_windows_own() {
    let mut s = TestServer::start().await;
    let (_, key) = s.user("ranks").await;
    let (device, token) = s.device(&key, "ranked").await;
    let ts = support::now_ms() - 60_000;
    let (status, _) = s
        .ingest(
            &token,
            json!({"type": "r", "ts": ts, "metrics": {"v": 2.0}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = s
        .get(
            &format!(
                "/v1/devices/{device}/aggregates?from={}&to={}&window=1h&metric=v&percentiles=50,99.9",
                ts - 3_600_000,
                ts + 60_000
            ),
            &key,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let window = &body["buckets"][0];
    // Within the sketch's 1% relative error.
    let p50 = window["p50"].as_f64().unwrap();
    assert!((p50 - 2.0).abs() <= 0.02, "{body}");
    assert!(window["start"].is_string());

    let doc = document(&s).await;
    let schema = &doc["components"]["schemas"]["Percentiles"];
    assert!(schema.get("propertyNames").is_none(), "{schema}");
    assert!(schema.get("additionalProperties").is_none(), "{schema}");
    let by_name = schema["patternProperties"].as_object().unwrap();
    assert_eq!(
        by_name.keys().collect::<Vec<_>>(),
        ["^p[0-9]+(\\.[0-9]+)?$"]
    );
    // Every field of the window is either one of its own, described by `WindowOut`
    // and `StatsOut`, or of the percentile form.
    let own = &doc["components"]["schemas"];
    for name in window.as_object().unwrap().keys() {
        let described = own["WindowOut"]
            .to_string()
            .contains(&format!("\"{name}\""))
            || own["StatsOut"]["properties"].get(name).is_some();
        let percentile = ["p50", "p99.9"].contains(&name.as_str());
        assert!(described != percentile, "{name}");
    }
    s.stop().await;
}

/// Input outside the documented patterns is refused, though a laxer parser would
/// have read it (`5e1` as 50).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percentiles_are_plain_decimals_and_a_parameter_is_given_once() {
    let mut s = TestServer::start().await;
    let (_, key) = s.user("strict").await;
    let (device, _) = s.device(&key, "strict-dev").await;
    let base = format!("/v1/devices/{device}/aggregates?from=0&to=86400000&window=1h&metric=v");
    // `%2B` is a `+` (a bare one is a space in a query string).
    for bad in ["5e1", "%2B50", "inf", "50,", ".5"] {
        let (status, body) = s.get(&format!("{base}&percentiles={bad}"), &key).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["field"], "percentiles");
    }
    let (status, body) = s.get(&format!("{base}&percentiles=50,%2099.5"), &key).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = s.get(&format!("{base}&window=1d"), &key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "window");
    s.stop().await;
}

/// A known path with another method was a 405 with an empty body; now it is the
/// documented error shape, and `Allow` still names the methods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_gets_the_error_shape_and_allow() {
    let mut s = TestServer::start().await;
    let (status, headers, body) = s.call(Method::PUT, "/v1/devices", None, None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(body["error"].is_string(), "{body}");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["allow"], "POST,GET,HEAD");
    s.stop().await;
}

/// Found by schemathesis once the export and purge parameters joined the document:
/// `purge=` (empty) answered a 400 the delete operation did not list, and `format`
/// was matched ignoring case where the schema's pattern is lower case, so `CSV`
/// (malformed by the schema) streamed a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_and_format_refusals_are_the_documented_ones() {
    let mut s = TestServer::start().await;
    let (_, key) = s.user("seeds").await;
    let (device, _) = s.device(&key, "seeded").await;
    let doc = document(&s).await;
    let delete = &doc["paths"]["/v1/devices/{id}"]["delete"]["responses"];
    assert!(delete.get("400").is_some(), "{delete}");
    let (status, _, body) = s
        .call(
            Method::DELETE,
            &format!("/v1/devices/{device}?purge="),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "purge", "{body}");
    for format in ["CSV", "Ndjson", "xml"] {
        let (status, body) = s
            .get(
                &format!("/v1/devices/{device}/events?format={format}"),
                &key,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{format}: {body}");
        assert_eq!(body["field"], "format", "{format}");
    }
    s.stop().await;
}
