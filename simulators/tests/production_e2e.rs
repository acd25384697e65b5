//! Production mode end to end: two `iotpipe serve` processes share Cassandra (a fresh
//! keyspace on the node of `scripts/cassandra`), MariaDB (a fresh database), Redis (a
//! random key prefix) and a private Mosquitto to which both subscribe with `$share`.
//! The simulator drives three fleets at once: over HTTP to each instance, and over
//! MQTT through the broker. One instance is killed with SIGKILL mid-run and started
//! again. Then every fleet must verify: nothing acknowledged lost, nothing stored
//! twice, aggregates equal to what was acknowledged.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use iotpipe_sim::api::Api;
use iotpipe_sim::chaos::Chaos;
use iotpipe_sim::profile::Profile;
use iotpipe_sim::proto::mqtt::MqttSettings;
use iotpipe_sim::provision::Fleet;
use iotpipe_sim::rate::Rate;
use iotpipe_sim::run::{run, Finished, Limit, Protocol, RunOptions};
use iotpipe_sim::verify::{verify, Verification};
use support::{free_port, Broker, Process, Production, ADMIN, CASSANDRA, REDIS};
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

const RUN: Duration = Duration::from_secs(20);
const KILL_AFTER: Duration = Duration::from_secs(7);

/// The shared backends of one run (a fresh database, keyspace and key prefix), and a
/// private broker; removed again at the end.
struct Backends {
    production: Production,
    broker: Broker,
}

impl Backends {
    async fn new() -> Self {
        Self {
            production: Production::new("e2e").await,
            broker: Broker::start().await,
        }
    }

    fn env(&self, http: SocketAddr) -> Vec<(&'static str, String)> {
        let p = &self.production;
        vec![
            ("IOTPIPE_SCYLLA_NODES", CASSANDRA.into()),
            ("IOTPIPE_SCYLLA_KEYSPACE", p.store.keyspace.clone()),
            ("IOTPIPE_SCYLLA_REPLICATION", p.store.replication.clone()),
            ("IOTPIPE_REGISTRY_URL", p.db.url.clone()),
            ("IOTPIPE_REDIS_URL", REDIS.into()),
            ("IOTPIPE_REDIS_PREFIX", p.prefix.clone()),
            ("IOTPIPE_MQTT_URL", self.broker.url()),
            ("IOTPIPE_HTTP_ADDR", http.to_string()),
        ]
    }
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn options(protocol: Protocol) -> RunOptions {
    RunOptions {
        protocol,
        batch: 4,
        rate: Rate::PerDevice(20.0),
        ramp: Duration::from_millis(500),
        limit: Limit {
            duration: Some(RUN),
            count: None,
        },
        chaos: Chaos {
            late: 0.05,
            late_by_ms: 5_000,
            duplicates: 0.05,
            invalid: 0.0,
        },
        profiles: vec![Profile::SmartMeter, Profile::EnvSensor],
        ledger: true,
        progress: false,
        seed: 11,
        connect_concurrency: 4,
    }
}

async fn fleet(api: &Api, devices: usize) -> (Fleet, String) {
    let key = Fleet::create_user(api, ADMIN).await.expect("user");
    let fleet = Fleet::create(api, &key, devices, &options(http()).profiles)
        .await
        .expect("devices");
    (fleet, key)
}

fn http() -> Protocol {
    Protocol::Http {
        concurrency: 8,
        retries: 30,
    }
}

/// Verifies a fleet until it passes: what the broker acknowledged reaches iotpipe a
/// little after the run ends.
async fn verified(api: &Api, key: &str, fleet: &Fleet, f: &Finished) -> Verification {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = verify(api, key, fleet, &f.tally, &options(http()).profiles, 1_000).await;
        if v.pass || Instant::now() > deadline {
            return v;
        }
        sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_lose_nothing_acknowledged_when_one_is_killed() {
    let backends = Backends::new().await;
    let (addr_a, addr_b) = (free_addr(), free_addr());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Schema through the binary, as an operator would create it.
    let mut migrate = support::iotpipe();
    migrate
        .arg("migrate")
        .env("IOTPIPE_DATA_DIR", dir_a.path())
        .envs(backends.env(addr_a));
    let out = migrate.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let a = Process::spawn(dir_a.path(), &backends.env(addr_a)).await;
    let b = Process::spawn(dir_b.path(), &backends.env(addr_b)).await;
    let api_a = Api::new(&format!("http://{addr_a}"), 8).unwrap();
    let api_b = Api::new(&format!("http://{addr_b}"), 8).unwrap();

    let (fleet_a, key_a) = fleet(&api_a, 3).await;
    let (fleet_b, key_b) = fleet(&api_b, 3).await;
    let (fleet_m, key_m) = fleet(&api_b, 3).await;
    let mqtt = Protocol::Mqtt(MqttSettings {
        host: "127.0.0.1".into(),
        port: backends.broker.port,
        qos: rumqttc::QoS::AtLeastOnce,
        inflight: 20,
        topic: "devices/{id}/events".into(),
    });

    let stop = CancellationToken::new();
    let (over_http, over_mqtt) = (options(http()), options(mqtt));
    let runs = async {
        tokio::join!(
            run(&api_a, &fleet_a, &over_http, stop.clone()),
            run(&api_b, &fleet_b, &over_http, stop.clone()),
            run(&api_b, &fleet_m, &over_mqtt, stop.clone()),
        )
    };
    let chaos = async {
        sleep(KILL_AFTER).await;
        a.kill9();
        sleep(Duration::from_secs(1)).await;
        Process::spawn(dir_a.path(), &backends.env(addr_a)).await
    };
    let ((ra, rb, rm), a) = tokio::join!(runs, chaos);
    let (ra, rb, rm) = (ra.unwrap(), rb.unwrap(), rm.unwrap());
    for f in [&ra, &rb, &rm] {
        assert!(f.report.events.acked > 0, "{:?}", f.report.events);
    }
    // Requests cut by the kill are in doubt, never counted as acknowledged.
    eprintln!(
        "fleet a (HTTP to the killed instance): {:?}",
        ra.report.events
    );

    for (api, key, fleet, finished) in [
        (&api_b, &key_a, &fleet_a, &ra),
        (&api_a, &key_b, &fleet_b, &rb),
        (&api_a, &key_m, &fleet_m, &rm),
    ] {
        let v = verified(api, key, fleet, finished).await;
        assert!(v.pass, "{}", v.render());
        assert!(
            v.expected_once > 0 && v.windows_compared > 0,
            "{}",
            v.render()
        );
        // The fleet aggregate over the whole run counts each acknowledged event once,
        // plus those in doubt (cut by the kill) that were stored after all.
        let total = fleet_total(api, key).await;
        assert_eq!(
            total,
            v.expected_once + v.in_doubt_stored,
            "aggregate {total}: {}",
            v.render()
        );
    }
    drop((a, b));
    backends.production.cleanup().await;
}

/// Every event of the user's devices over the last hour, from `/v1/aggregates`.
async fn fleet_total(api: &Api, key: &str) -> u64 {
    let now = chrono::Utc::now();
    let from = (now - chrono::Duration::hours(1)).to_rfc3339();
    let to = (now + chrono::Duration::minutes(10)).to_rfc3339();
    let url = format!(
        "{}/v1/aggregates?from={}&to={}&window=2h&group_by=device",
        api.base(),
        urlencode(&from),
        urlencode(&to)
    );
    let v: serde_json::Value = reqwest::Client::new()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["buckets"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum()
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}
