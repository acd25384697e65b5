//! End to end: a real iotpipe in-process (temp dir, port 0), a short chaotic fleet,
//! and the verification verdict, both when the store is faithful and when it holds
//! something it should not.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use iotpipe_sim::api::Api;
use iotpipe_sim::chaos::{format_ts, Chaos};
use iotpipe_sim::profile::Profile;
use iotpipe_sim::proto::mqtt::{self, MqttSettings};
use iotpipe_sim::provision::Fleet;
use iotpipe_sim::rate::Rate;
use iotpipe_sim::run::{run, Finished, Limit, Protocol, RunOptions};
use iotpipe_sim::tally::Expect;
use iotpipe_sim::verify::{verify, Problem};
use support::TestServer;
use tokio_util::sync::CancellationToken;

/// A server with the built-in MQTT endpoint; its MQTT address.
async fn start() -> (TestServer, String) {
    let server = TestServer::with_mqtt(|_| {}).await;
    let mqtt_addr = server.mqtt().to_string();
    (server, mqtt_addr)
}

fn profiles() -> Vec<Profile> {
    vec![Profile::SmartMeter, Profile::EnvSensor, Profile::GpsTracker]
}

fn options(protocol: Protocol, chaos: Chaos) -> RunOptions {
    RunOptions {
        protocol,
        batch: 4,
        rate: Rate::PerDevice(40.0),
        ramp: Duration::from_millis(500),
        limit: Limit {
            duration: Some(Duration::from_secs(3)),
            count: None,
        },
        chaos,
        profiles: profiles(),
        ledger: true,
        progress: false,
        seed: 7,
        connect_concurrency: 4,
    }
}

const CHAOS: Chaos = Chaos {
    late: 0.1,
    late_by_ms: 5_000,
    duplicates: 0.1,
    invalid: 0.05,
};

const HTTP: Protocol = Protocol::Http {
    concurrency: 16,
    retries: 10,
};

async fn fleet(api: &Api, admin: &str, devices: usize) -> (Fleet, String) {
    let key = Fleet::create_user(api, admin).await.expect("user");
    let fleet = Fleet::create(api, &key, devices, &profiles())
        .await
        .expect("devices");
    (fleet, key)
}

fn assert_chaos_happened(f: &Finished) {
    let e = &f.report.events;
    assert!(e.acked > 0, "{e:?}");
    assert!(
        e.resent > 0 && e.late > 0 && e.invalid > 0,
        "chaos did not happen: {e:?}"
    );
    assert_eq!(e.failed, 0, "{:?}", f.report.reasons);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chaotic_fleet_verifies_over_http_and_mqtt() {
    let (mut server, mqtt_addr) = start().await;
    let api = Api::new(&server.base, 16).unwrap();

    let (http_fleet, key) = fleet(&api, &server.admin, 6).await;
    let finished = run(
        &api,
        &http_fleet,
        &options(HTTP, CHAOS),
        CancellationToken::new(),
    )
    .await
    .expect("the run starts");
    assert_chaos_happened(&finished);
    // Each invalid event is refused on its own: exactly the invalid ones.
    assert_eq!(
        finished.report.events.rejected,
        finished.report.events.invalid
    );
    let v = verify(&api, &key, &http_fleet, &finished.tally, &profiles(), 1_000).await;
    assert!(v.pass, "{}", v.render());
    assert!(
        v.expected_once > 0 && v.stored == v.expected_once,
        "{}",
        v.render()
    );
    assert_eq!(v.expected_absent, finished.report.events.invalid);
    assert!(v.windows_compared >= 6, "{}", v.render());

    // MQTT, through the built-in endpoint: a probe that fails is a failure of the
    // test, never a reason to skip this leg.
    let (mqtt_fleet, key) = fleet(&api, &server.admin, 3).await;
    let d = &mqtt_fleet.devices[0];
    mqtt::probe(&mqtt_addr, &d.id, &d.token)
        .await
        .unwrap_or_else(|e| panic!("the MQTT endpoint at {mqtt_addr} refused a device: {e}"));
    let (host, port) = MqttSettings::parse_addr(&mqtt_addr).unwrap();
    let settings = MqttSettings {
        host,
        port,
        qos: rumqttc::QoS::AtLeastOnce,
        inflight: 20,
        topic: "devices/{id}/events".into(),
    };
    let opts = options(Protocol::Mqtt(settings), CHAOS);
    let finished = run(&api, &mqtt_fleet, &opts, CancellationToken::new())
        .await
        .expect("the MQTT run starts");
    assert_chaos_happened(&finished);
    let v = verify(&api, &key, &mqtt_fleet, &finished.tally, &profiles(), 1_000).await;
    assert!(v.pass, "{}", v.render());
    assert!(v.expected_once > 0, "{}", v.render());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_fails_when_the_store_holds_what_it_should_not() {
    let (mut server, _) = start().await;
    let api = Api::new(&server.base, 16).unwrap();
    let (fleet, key) = fleet(&api, &server.admin, 3).await;
    let chaos = Chaos {
        invalid: 0.1,
        ..Chaos::NONE
    };
    let finished = run(
        &api,
        &fleet,
        &options(HTTP, chaos),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let before = verify(&api, &key, &fleet, &finished.tally, &profiles(), 1_000).await;
    assert!(before.pass, "{}", before.render());

    // Corrupt device 0's stored data through the API, in two real ways: an event the
    // simulator never sent, inside the run's range; and a valid event stored under
    // the id of an event the server refused.
    let (acked_ts, refused_id) = {
        let ledger = finished.tally.ledger(0).unwrap().lock().unwrap();
        let mut acked = None;
        let mut refused = None;
        for (id, expect, event) in ledger.expectations() {
            match (expect, event) {
                (Expect::Once, Some(e)) => acked = Some(e.ts_ms),
                (Expect::Never, None) => refused = Some(id),
                _ => {}
            }
        }
        (
            acked.expect("an acked event"),
            refused.expect("a refused event"),
        )
    };
    let token = &fleet.devices[0].token;
    let extra = uuid::Uuid::new_v4();
    let body = serde_json::json!([
        {"id": extra, "ts": format_ts(acked_ts), "type": "meter",
         "metrics": {"pulse_counter": 1e9}},
        {"id": refused_id, "ts": format_ts(acked_ts), "type": "meter",
         "metrics": {"pulse_counter": 2.0}},
    ]);
    let answer = api
        .ingest(token, serde_json::to_vec(&body).unwrap().into())
        .await;
    assert!(
        matches!(answer, iotpipe_sim::api::IngestAnswer::Accepted),
        "{answer:?}"
    );

    let after = verify(&api, &key, &fleet, &finished.tally, &profiles(), 1_000).await;
    assert!(
        !after.pass,
        "verification missed the corruption:\n{}",
        after.render()
    );
    let device = fleet.devices[0].id.clone();
    assert!(
        after.problems.contains(&Problem::Unexpected {
            device: device.clone(),
            id: extra
        }),
        "{}",
        after.render()
    );
    assert!(
        after.problems.contains(&Problem::StoredButRefused {
            device: device.clone(),
            id: refused_id
        }),
        "{}",
        after.render()
    );
    assert!(
        after.problems.iter().any(|p| matches!(p, Problem::WindowDiffers { device: d, field: "count", .. } if *d == device)),
        "the aggregates should disagree too:\n{}",
        after.render()
    );
    // The other devices are untouched.
    assert!(
        after
            .problems
            .iter()
            .all(|p| format!("{p}").starts_with(&device)),
        "{}",
        after.render()
    );
    server.stop().await;
}
