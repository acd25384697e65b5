//! The dashboard (`GET /`) in a real browser: headless Chromium driven through
//! chromedriver, both Debian's packages (`scripts/deps` installs them), against an
//! in-process server fed over HTTP and MQTT. The test uses the page as a person
//! would: it types the key, clicks, picks from the menus, and reads what is shown,
//! then checks that against the API. A screenshot of each view is saved under the
//! target directory, in `dashboard-screenshots/`.
//!
//! Without Chromium the test is skipped, except with `CI=true`, where it fails.

mod support;

use std::net::TcpListener;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::FutureExt;
use reqwest::Method;
use rumqttc::QoS;
use serde_json::{json, Value};
use support::{now_ms, TestServer};
use thirtyfour::components::SelectElement;
use thirtyfour::prelude::*;
use thirtyfour::LoggingPrefsLogLevel;
use tokio::time::Instant;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long the page may take to show something: it polls every 2 s.
const PATIENCE: Duration = Duration::from_secs(15);

/// chromedriver on a free loopback port, killed when dropped (also on a failed assert).
struct Chromedriver {
    child: Child,
    url: String,
}

impl Chromedriver {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + PATIENCE;
        let http = reqwest::Client::new();
        loop {
            let ready = http.get(format!("{}/status", driver.url)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return driver;
            }
            assert!(Instant::now() < deadline, "chromedriver did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the browser is installed; without it the test can only be skipped, and CI
/// must not pass that way.
fn browser_installed() -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{} missing: install Debian's chromium and chromium-driver (scripts/deps does)",
        missing.join(" and ")
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("skipped: {why}");
    false
}

/// `<target>/dashboard-screenshots`: the test binary is `<target>/debug/deps/<name>`.
fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .ancestors()
        .nth(3)
        .unwrap()
        .join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Browser {
    driver: WebDriver,
    base: String,
    shots: PathBuf,
}

impl Browser {
    async fn open(chromedriver: &Chromedriver, base: &str) -> Self {
        let mut caps = DesiredCapabilities::chrome();
        caps.set_binary(CHROMIUM).unwrap();
        for arg in [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1280,1400",
            "--lang=en-US",
        ] {
            caps.add_arg(arg).unwrap();
        }
        // Errors in the page (a script error, a CSP violation) land in this log.
        caps.set_browser_log_level(LoggingPrefsLogLevel::Severe)
            .unwrap();
        let driver = WebDriver::new(&chromedriver.url, caps)
            .await
            .expect("a Chromium session");
        Self {
            driver,
            base: base.to_owned(),
            shots: screenshot_dir(),
        }
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    async fn js(&self, script: &str) -> Value {
        self.driver
            .execute(script, Vec::<Value>::new())
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
            .json()
            .clone()
    }

    /// Waits until `expr` (a JavaScript expression) is truthy; returns its value.
    async fn until(&self, what: &str, expr: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let v = self.js(&format!("return ({expr}) || null;")).await;
            if !v.is_null() {
                return v;
            }
            if Instant::now() > deadline {
                let shot = self.shot("timeout").await;
                panic!(
                    "timed out waiting for {what} ({expr}); see {}",
                    shot.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn shot(&self, name: &str) -> PathBuf {
        let path = self.shots.join(format!("{name}.png"));
        self.driver.screenshot(&path).await.unwrap();
        path
    }

    async fn sign_in(&self, key: &str) {
        let input = self.driver.find(By::Id("key")).await.unwrap();
        input.clear().await.unwrap();
        input.send_keys(key).await.unwrap();
        self.click("#signin-button").await;
    }

    /// Waits until the section `id` is shown.
    async fn shown(&self, id: &str) {
        let expr = format!("!document.getElementById('{id}').hidden");
        self.until(&format!("#{id}"), &expr).await;
    }

    async fn click(&self, css: &str) {
        let el = self.driver.find(By::Css(css)).await.unwrap();
        el.click().await.unwrap();
    }

    /// Picks `value` from the menu `id`, as a person would, with a click.
    async fn select(&self, id: &str, value: &str) {
        let el = self.driver.find(By::Id(id)).await.unwrap();
        SelectElement::new(&el)
            .await
            .unwrap()
            .select_by_value(value)
            .await
            .unwrap();
        // select_by_value does nothing when no option has the value.
        assert_eq!(el.value().await.unwrap().as_deref(), Some(value), "#{id}");
    }

    /// The fleet table's rows: device id and cells by class.
    async fn fleet_rows(&self) -> Vec<Value> {
        let v = self
            .js(
                "return [...document.querySelectorAll('#devices tbody tr')].map(tr => ({
                    id: tr.dataset.deviceId,
                    type: tr.querySelector('.type').textContent,
                    minute: tr.querySelector('.minute').textContent,
                    hour: tr.querySelector('.hour').textContent,
                    rejected: tr.querySelector('.rejected').textContent,
                    error: tr.querySelector('.error-text').textContent,
                }));",
            )
            .await;
        v.as_array().unwrap().clone()
    }

    /// What a chart shows: its box's data-* and the rows of its data table, read in
    /// one script so that a refresh cannot fall between them.
    async fn chart(&self, box_id: &str, table_id: &str) -> (Value, Vec<Value>) {
        let v = self
            .js(&format!(
                "return {{
                    box: {{...document.getElementById('{box_id}').dataset}},
                    rows: [...document.querySelectorAll('#{table_id} tbody tr')].map(tr =>
                        ({{...tr.dataset, cells: [...tr.cells].map(c => c.textContent)}})),
                }};"
            ))
            .await;
        (v["box"].clone(), v["rows"].as_array().unwrap().clone())
    }
}

/// The query string of the windows a chart was drawn with.
fn windows_query(chart: &Value) -> String {
    let s = |k: &str| chart[k].as_str().unwrap().to_owned();
    format!(
        "from={}&to={}&window={}&tz={}",
        s("from"),
        s("to"),
        s("window"),
        s("tz").replace('/', "%2F")
    )
}

fn number(v: &Value) -> f64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A telemetry event `minutes_ago` before now.
fn reading(minutes_ago: i64, temperature: f64) -> Value {
    json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "ts": now_ms() - minutes_ago * 60_000,
        "type": "telemetry",
        "metrics": {"temperature": temperature, "humidity": 40.0 + temperature / 10.0},
    })
}

/// Two users: Alice has a sensor (fed over HTTP and MQTT) and a meter, Bob a boiler.
struct Fleet {
    server: TestServer,
    alice: String,
    bob: String,
    sensor: String,
    sensor_token: String,
    meter: String,
    boiler: String,
    mqtt: support::Device,
}

impl Fleet {
    async fn start() -> Self {
        let server = TestServer::with_mqtt(|_| {}).await;
        let mqtt_addr = server.mqtt();
        let (_, alice) = server.user("alice").await;
        let (_, bob) = server.user("bob").await;
        let (sensor, sensor_token) = server.device(&alice, "greenhouse sensor").await;
        let (status, _, meter) = server
            .call(
                Method::POST,
                "/v1/devices",
                Some(&alice),
                Some(json!({"name": "water meter", "type": "meter"})),
            )
            .await;
        assert_eq!(status, 201, "{meter}");
        let (boiler, boiler_token) = server.device(&bob, "bob's secret boiler").await;
        let (status, _) = server
            .ingest(&boiler_token, json!([reading(2, 70.0), reading(1, 71.0)]))
            .await;
        assert_eq!(status, 200);
        let mut mqtt = support::Device::connect(mqtt_addr, &sensor, &sensor_token);
        mqtt.connected().await;
        let mut fleet = Self {
            meter: meter["id"].as_str().unwrap().to_owned(),
            server,
            alice,
            bob,
            sensor,
            sensor_token,
            boiler,
            mqtt,
        };
        // Twelve readings in the last hour and two before it, so that the chart has
        // more than one hour window whatever the time of day; six more over MQTT.
        let by_http = (0..12).map(|k| reading(5 * k + 1, 18.0 + k as f64 * 0.75));
        let older = [reading(80, 15.0), reading(100, 14.5)];
        fleet.send_http(by_http.chain(older).collect()).await;
        let by_mqtt = (0..6).map(|k| reading(4 * k + 3, 25.0 - k as f64));
        fleet.send_mqtt(by_mqtt.collect()).await;
        // One refused event, for the rejected count and the last error.
        let (status, _) = fleet
            .server
            .ingest(
                &fleet.sensor_token,
                json!({"type": "telemetry", "metrics": {"temperature": "hot"}}),
            )
            .await;
        assert_eq!(status, 400);
        fleet
    }

    async fn send_http(&self, events: Vec<Value>) {
        let (status, v) = self.server.ingest(&self.sensor_token, json!(events)).await;
        assert_eq!(status, 200, "{v}");
    }

    /// Publishes at QoS 1 and waits for the PUBACKs, so the events are stored.
    async fn send_mqtt(&mut self, events: Vec<Value>) {
        let topic = support::topic(&self.sensor);
        for e in &events {
            self.mqtt
                .publish(&topic, QoS::AtLeastOnce, e.to_string())
                .await;
        }
        self.mqtt.pubacks(events.len()).await;
    }

    /// An API answer with Alice's key.
    async fn alices(&self, path: &str) -> Value {
        let (status, v) = self.server.get(path, &self.alice).await;
        assert_eq!(status, 200, "{path}: {v}");
        v
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_users_fleet_live_and_only_theirs() {
    if !browser_installed() {
        return;
    }
    let mut fleet = Fleet::start().await;
    let chromedriver = Chromedriver::start().await;
    let b = Browser::open(&chromedriver, &fleet.server.base).await;
    // Chromium is closed whatever happens: chromedriver, killed, would leave it running.
    let outcome = AssertUnwindSafe(async {
        sign_in_and_refusal(&b, &fleet).await;
        fleet_view(&b, &fleet).await;
        live_count_rises(&b, &mut fleet).await;
        device_chart(&b, &fleet).await;
        other_users_devices(&b, &fleet).await;
        phone_width_and_no_errors(&b).await;
    })
    .catch_unwind()
    .await;
    let _ = b.driver.clone().quit().await;
    drop(chromedriver);
    fleet.server.stop().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// A wrong key is refused with a message and not kept; Alice's key lets her in, and
/// lives in session storage only.
async fn sign_in_and_refusal(b: &Browser, f: &Fleet) {
    b.driver.goto(format!("{}/", b.base)).await.unwrap();
    b.shown("signin").await;
    b.until(
        "the health strip",
        "document.querySelectorAll('#health li[data-component]').length === 4",
    )
    .await;
    b.shot("1-sign-in").await;

    b.sign_in(&format!("ipk_{}", "0".repeat(64))).await;
    let refused = b
        .until(
            "the refusal",
            "!document.getElementById('signin-error').hidden && document.getElementById('signin-error').textContent",
        )
        .await;
    assert!(
        refused.as_str().unwrap().contains("refused this API key"),
        "{refused}"
    );
    assert_eq!(b.js("return sessionStorage.length;").await, 0);
    b.shot("2-wrong-key").await;

    b.sign_in(&f.alice).await;
    b.shown("fleet").await;
    let kept = b.js("return sessionStorage.getItem('iotpipe.key');").await;
    assert_eq!(kept, f.alice.as_str());
    let url = b.driver.current_url().await.unwrap().to_string();
    assert!(!url.contains("ipk_"), "the key is never in the URL: {url}");
    assert_eq!(b.js("return document.cookie;").await, "");
}

fn sensor_row(f: &Fleet) -> String {
    format!("#devices tr[data-device-id=\"{}\"]", f.sensor)
}

/// Alice's two devices with their figures; the fleet chart as the API counts it.
async fn fleet_view(b: &Browser, f: &Fleet) {
    // The sensor: 20 events received in the last minute, 18 of them with a `ts` in the
    // last hour, and the refused one counted, with its reason.
    let row = sensor_row(f);
    b.until(
        "the sensor's live figures",
        &format!(
            "document.querySelectorAll('#devices tbody tr').length === 2 && \
             document.querySelector('{row} .minute').textContent === '20' && \
             document.querySelector('{row} .rejected').textContent === '1'"
        ),
    )
    .await;
    let rows = b.fleet_rows().await;
    let mut ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    let mut mine = vec![f.sensor.as_str(), f.meter.as_str()];
    mine.sort_unstable();
    assert_eq!(ids, mine);
    let shown = rows.iter().find(|r| r["id"] == f.sensor.as_str()).unwrap();
    assert_eq!(shown["type"], "sensor");
    assert_eq!(shown["hour"], "18", "{shown}");
    let live = f.alices(&format!("/v1/devices/{}/live", f.sensor)).await;
    assert_eq!(live["events_last_minute"], 20, "{live}");
    assert!(live["last_error"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(shown["error"], live["last_error"], "{live}");

    b.until(
        "the fleet chart",
        "Number(document.getElementById('fleet-chart').dataset.points) > 0",
    )
    .await;
    b.shot("3-fleet").await;
    let (chart, table) = b.chart("fleet-chart", "fleet-data").await;
    let fleet = f
        .alices(&format!(
            "/v1/aggregates?group_by=type&{}",
            windows_query(&chart)
        ))
        .await;
    let buckets = fleet["buckets"].as_array().unwrap();
    let mut starts: Vec<i64> = buckets
        .iter()
        .map(|b| b["start_ms"].as_i64().unwrap())
        .collect();
    starts.dedup();
    assert_eq!(number(&chart["points"]) as usize, starts.len());
    assert_eq!(table.len(), starts.len());
    assert_eq!(chart["groups"], "telemetry", "the one event type sent");
    for (row, b) in table.iter().zip(buckets) {
        assert_eq!(row["startMs"], b["start_ms"].to_string());
        assert_eq!(row["cells"][1], b["count"].to_string());
    }
}

/// More events, over both paths: the live count rises on the page by itself.
async fn live_count_rises(b: &Browser, f: &mut Fleet) {
    f.send_http((0..5).map(|_| reading(0, 20.0)).collect())
        .await;
    f.send_mqtt((0..3).map(|_| reading(0, 21.0)).collect())
        .await;
    let row = sensor_row(f);
    b.until(
        "the live count to rise to 28",
        &format!("document.querySelector('{row} .minute').textContent === '28'"),
    )
    .await;
    b.shot("4-fleet-after-more-events").await;
}

/// The sensor's chart: temperature over 6 h in 1 h windows aligned to Kolkata's
/// midnight, so at :30 UTC; then the counts. What is plotted is what the API answers.
async fn device_chart(b: &Browser, f: &Fleet) {
    b.click(&format!("{} a", sensor_row(f))).await;
    b.until(
        "the device view",
        "!document.getElementById('device').hidden && \
         document.getElementById('device-name').textContent === 'greenhouse sensor' && \
         document.querySelectorAll('#metric option').length === 3",
    )
    .await;
    b.select("metric", "temperature").await;
    b.select("range", "21600000").await;
    b.select("window", "1h").await;
    // ICU, and so Chromium, may list India's zone under its old name; the server
    // knows both.
    let kolkata = b
        .js("return ['Asia/Kolkata', 'Asia/Calcutta'].find(z => document.querySelector(`#tz option[value=\"${z}\"]`));")
        .await;
    let kolkata = kolkata.as_str().expect("India's zone is offered");
    b.select("tz", kolkata).await;
    let box_ = "document.getElementById('device-chart').dataset";
    b.until(
        "the temperature chart",
        &format!(
            "{box_}.metric === 'temperature' && {box_}.window === '1h' && \
             {box_}.tz === '{kolkata}' && {box_}.mode === 'avg'"
        ),
    )
    .await;
    b.shot("5-device").await;
    let aggregates = |chart: Value| {
        let path = format!(
            "/v1/devices/{}/aggregates?metric=temperature&{}",
            f.sensor,
            windows_query(&chart)
        );
        async move { f.alices(&path).await["buckets"].as_array().unwrap().clone() }
    };
    let (chart, table) = b.chart("device-chart", "device-data").await;
    let buckets = aggregates(chart.clone()).await;
    assert!(buckets.len() >= 2, "{buckets:?}");
    assert_eq!(number(&chart["points"]) as usize, buckets.len());
    assert_eq!(table.len(), buckets.len());
    for (row, b) in table.iter().zip(&buckets) {
        let start = b["start_ms"].as_i64().unwrap();
        assert_eq!(start.rem_euclid(3_600_000), 1_800_000, "Kolkata hours");
        assert_eq!(row["startMs"], start.to_string());
        assert_eq!(row["cells"][1], b["count"].to_string());
        for (k, cell) in [("min", 2), ("avg", 3), ("max", 4)] {
            let want = b[k].as_f64().unwrap();
            assert_eq!(number(&row[k]), want, "{k} of {b}");
            let shown = number(&row["cells"][cell]);
            assert!(
                (shown - want).abs() <= want.abs() * 1e-5,
                "{k} shown {shown}, is {want}"
            );
        }
    }
    let latest = f.alices(&format!("/v1/devices/{}/latest", f.sensor)).await;
    let shown = b
        .js("return document.querySelector('#latest tr[data-metric=\"temperature\"]').dataset.value;")
        .await;
    assert_eq!(
        number(&shown),
        latest["metrics"]["temperature"]["value"].as_f64().unwrap()
    );

    b.select("mode", "count").await;
    b.until("the count chart", &format!("{box_}.mode === 'count'"))
        .await;
    let (chart, table) = b.chart("device-chart", "device-data").await;
    let counts: Vec<String> = aggregates(chart.clone())
        .await
        .iter()
        .map(|b| b["count"].to_string())
        .collect();
    let shown: Vec<&str> = table
        .iter()
        .map(|r| r["cells"][1].as_str().unwrap())
        .collect();
    assert_eq!(shown, counts);
    assert_eq!(number(&chart["points"]) as usize, counts.len());
}

/// Bob's device, asked for by id in Alice's page, is not found and nothing of it is
/// shown; after Alice signs out, Bob on the same tab sees his boiler only.
async fn other_users_devices(b: &Browser, f: &Fleet) {
    b.driver
        .goto(format!("{}/#/device/{}", b.base, f.boiler))
        .await
        .unwrap();
    b.until(
        "the refusal of Bob's device",
        "document.getElementById('device-name').textContent === 'Device not found'",
    )
    .await;
    let page = b.driver.source().await.unwrap();
    assert!(!page.contains("boiler"), "nothing of Bob's device is shown");
    b.shot("6-other-users-device").await;

    b.driver.goto(format!("{}/#/", b.base)).await.unwrap();
    let page = b.driver.source().await.unwrap();
    assert!(!page.contains(&f.boiler) && !page.contains("boiler"));
    b.click("#signout").await;
    b.shown("signin").await;
    let kept = b.js("return sessionStorage.getItem('iotpipe.key');").await;
    assert_eq!(kept, Value::Null);
    b.sign_in(&f.bob).await;
    b.until(
        "Bob's device",
        &format!(
            "document.querySelectorAll('#devices tbody tr').length === 1 && \
             document.querySelector('#devices tr[data-device-id=\"{}\"]')",
            f.boiler
        ),
    )
    .await;
    let page = b.driver.source().await.unwrap();
    for alices in [f.sensor.as_str(), &f.meter, "greenhouse", "water meter"] {
        assert!(!page.contains(alices), "{alices} shown to Bob");
    }
}

/// At phone width the page fits the screen (no sideways scrolling of the page), and
/// the page logged no script error or policy violation all along; the refused calls
/// (401, 404) were expected.
async fn phone_width_and_no_errors(b: &Browser) {
    b.driver.set_window_rect(0, 0, 390, 844).await.unwrap();
    b.until(
        "the phone layout",
        "document.documentElement.scrollWidth <= window.innerWidth",
    )
    .await;
    b.shot("7-fleet-phone").await;
    let log = b.driver.browser_log().await.unwrap();
    let errors: Vec<&str> = log
        .iter()
        .map(|e| e.message.as_str())
        .filter(|m| !m.contains("status of 401") && !m.contains("status of 404"))
        .collect();
    assert!(errors.is_empty(), "browser errors: {errors:#?}");
}
