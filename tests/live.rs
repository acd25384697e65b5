//! One live-backend suite (counters and rate limits), run against the in-process
//! backend and against the real Redis of this machine under a random key prefix.

mod support;

use std::sync::Arc;

use iotpipe::live::local::LocalLive;
use iotpipe::live::redis::RedisLive;
use iotpipe::live::{DeviceCount, LimitKind, Live, RateLimits};
use support::{clear_redis, REDIS};
use uuid::Uuid;

fn no_limits() -> RateLimits {
    RateLimits {
        device_per_sec: 0,
        user_per_sec: 0,
    }
}

fn redis(limits: RateLimits, prefix: &str) -> Arc<RedisLive> {
    RedisLive::open(REDIS, prefix, limits).unwrap()
}

fn prefix() -> String {
    support::redis_prefix()
}

/// Counters: totals, receipt-time windows, rejections, per-user figures.
async fn counters_behave(live: &dyn Live) {
    let (d1, d2) = (Uuid::new_v4(), Uuid::new_v4());
    let user = 41;
    let t = 1_800_000_000_000;
    assert_eq!(live.device(d1, t).await.events_total, 0);
    assert_eq!(live.device(d1, t).await.last_seen, None);
    live.record_ingested(&[
        DeviceCount {
            user_id: user,
            device_id: d1,
            new_events: 5,
            received_ms: t,
        },
        DeviceCount {
            user_id: user,
            device_id: d2,
            new_events: 2,
            received_ms: t + 500,
        },
    ])
    .await;
    live.record_ingested(&[DeviceCount {
        user_id: user,
        device_id: d1,
        new_events: 3,
        received_ms: t + 30_000,
    }])
    .await;
    live.record_rejected(user, d1, 4, "invalid: ts").await;
    live.record_rejected(user, d1, 1, "rate_limited (429)")
        .await;

    let d = live.device(d1, t + 30_000).await;
    assert_eq!(d.events_total, 8);
    assert_eq!(d.rejected_total, 5);
    assert_eq!(d.events_last_minute, 8);
    assert_eq!(d.last_seen.as_deref(), Some("2027-01-15T08:00:30.000Z"));
    assert_eq!(d.last_error.as_deref(), Some("rate_limited (429)"));
    // The first flush leaves the minute after 60 s; the second stays.
    assert_eq!(live.device(d1, t + 61_000).await.events_last_minute, 3);
    assert_eq!(live.device(d1, t + 91_000).await.events_last_minute, 0);
    assert_eq!(live.device(d1, t + 91_000).await.events_total, 8);

    let u = live.user(user, t + 30_000).await;
    assert_eq!(u.events_total, 10);
    assert_eq!(u.events_last_minute, 10);
    assert_eq!(u.devices_active_5m, 2);
    assert_eq!(live.user(user, t + 301_000).await.devices_active_5m, 1);
    assert_eq!(live.user(user, t + 331_000).await.devices_active_5m, 0);
    assert_eq!(live.user(user + 1, t).await.events_total, 0);
    live.ping().await.expect("ping");
}

/// Limits: the contract's debt accounting, for device and user budgets.
async fn limits_behave(make: impl Fn(RateLimits) -> Arc<dyn Live>) {
    let live = make(RateLimits {
        device_per_sec: 10,
        user_per_sec: 0,
    });
    let d = Uuid::new_v4();
    let t = 5_000_000;
    // A request larger than the burst gets through, then the budget is in debt.
    assert!(live.admit(1, d, 11, t).await.is_ok());
    let refused = live.admit(1, d, 1, t).await.unwrap_err();
    assert_eq!(refused.limit, LimitKind::Device);
    assert!((refused.retry_after_ms - 100.0).abs() < 1e-6, "{refused:?}");
    assert!(live.admit(1, d, 1, t + 100).await.is_ok());
    assert!(live.admit(1, Uuid::new_v4(), 1, t).await.is_ok());

    let live = make(RateLimits {
        device_per_sec: 0,
        user_per_sec: 10,
    });
    let user = 77;
    assert!(live.admit(user, Uuid::new_v4(), 8, t).await.is_ok());
    assert!(live.admit(user, Uuid::new_v4(), 8, t).await.is_ok());
    let refused = live.admit(user, Uuid::new_v4(), 1, t).await.unwrap_err();
    assert_eq!(refused.limit, LimitKind::User);
    assert!((refused.retry_after_ms - 600.0).abs() < 1e-6, "{refused:?}");

    // A refused request is not charged: the device budget stays clean when the user
    // budget refuses.
    let live = make(RateLimits {
        device_per_sec: 5,
        user_per_sec: 5,
    });
    let (u, d1, d2) = (9, Uuid::new_v4(), Uuid::new_v4());
    assert!(live.admit(u, d1, 6, t).await.is_ok());
    assert_eq!(
        live.admit(u, d2, 1, t).await.unwrap_err().limit,
        LimitKind::User
    );
    // Long idle refills both, never beyond the burst: one burst is not yet debt, one
    // more event is.
    assert!(live.admit(u, d2, 5, t + 60_000).await.is_ok());
    assert!(live.admit(u, d2, 1, t + 60_000).await.is_ok());
    assert!(live.admit(u, d2, 1, t + 60_000).await.is_err());
}

#[tokio::test]
async fn local_live_passes_the_shared_suite() {
    counters_behave(&LocalLive::new(no_limits())).await;
    limits_behave(|l| Arc::new(LocalLive::new(l))).await;
}

#[tokio::test]
async fn redis_live_passes_the_shared_suite() {
    let p = prefix();
    let live = redis(no_limits(), &p);
    counters_behave(live.as_ref()).await;
    assert!(live.is_up());
    clear_redis(REDIS, &p).await;
    limits_behave(|l| redis(l, &prefix())).await;
}

#[tokio::test]
async fn redis_limits_are_shared_by_every_instance() {
    let p = prefix();
    let limits = RateLimits {
        device_per_sec: 10,
        user_per_sec: 0,
    };
    let (a, b) = (redis(limits, &p), redis(limits, &p));
    let d = Uuid::new_v4();
    let t = 9_000_000;
    assert!(a.admit(1, d, 10, t).await.is_ok());
    assert!(b.admit(1, d, 1, t).await.is_ok());
    // Instance b's charge put the shared budget in debt, so a refuses too.
    assert_eq!(
        a.admit(1, d, 1, t).await.unwrap_err().limit,
        LimitKind::Device
    );
}

#[tokio::test]
async fn concurrent_admissions_across_instances_never_overshoot() {
    let p = prefix();
    let limits = RateLimits {
        device_per_sec: 100,
        user_per_sec: 0,
    };
    let instances: Vec<_> = (0..4).map(|_| redis(limits, &p)).collect();
    let d = Uuid::new_v4();
    let t = 7_000_000;
    let mut tasks = Vec::new();
    for live in &instances {
        for _ in 0..50 {
            let live = live.clone();
            tasks.push(tokio::spawn(
                async move { live.admit(1, d, 1, t).await.is_ok() },
            ));
        }
    }
    let mut admitted = 0;
    for task in tasks {
        admitted += usize::from(task.await.unwrap());
    }
    // At one instant, exactly the burst (100) plus the one that tips it into debt.
    assert_eq!(admitted, 101);
}

/// Counts the writes a client makes towards Redis: a pipelined request goes out as
/// one write, so this counts round trips.
async fn counting_proxy(upstream: u16) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let writes = Arc::new(AtomicUsize::new(0));
    let counter = writes.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let outbound = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                    .await
                    .unwrap();
                let (mut in_r, mut in_w) = inbound.into_split();
                let (mut out_r, mut out_w) = outbound.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut out_r, &mut in_w).await;
                });
                let mut buf = vec![0u8; 1 << 20];
                while let Ok(n) = in_r.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    if out_w.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, writes)
}

#[tokio::test]
async fn a_flush_costs_one_redis_round_trip_whatever_its_size() {
    use std::sync::atomic::Ordering;
    let (port, writes) = counting_proxy(6379).await;
    let p = prefix();
    let live = RedisLive::open(&format!("redis://127.0.0.1:{port}/0"), &p, no_limits()).unwrap();
    live.ping().await.unwrap(); // connects (and sends its handshake)
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let before = writes.load(Ordering::SeqCst);
    let counts: Vec<DeviceCount> = (0..20)
        .map(|i| DeviceCount {
            user_id: 1 + i % 3,
            device_id: Uuid::new_v4(),
            new_events: 100,
            received_ms: 1_800_000_000_000,
        })
        .collect();
    live.record_ingested(&counts).await;
    let after = writes.load(Ordering::SeqCst);
    // 20 devices are about 200 commands; unpipelined that would be 200 round trips.
    assert_eq!(after - before, 1, "writes for one flush");
    let u = live.user(1, 1_800_000_000_000).await;
    assert_eq!(u.events_total, 700);
    assert_eq!(u.devices_active_5m, 7);
    assert!(live.is_up());
    clear_redis(REDIS, &p).await;
}

#[tokio::test]
async fn a_redis_down_at_start_degrades_to_local_state_then_takes_over() {
    let port = support::free_port();
    let limits = RateLimits {
        device_per_sec: 10,
        user_per_sec: 0,
    };
    let live = RedisLive::open(&format!("redis://127.0.0.1:{port}/0"), &prefix(), limits).unwrap();
    let d = Uuid::new_v4();
    // Nothing listens: the first call fails over to the local limiter at once.
    assert!(live.admit(1, d, 11, 0).await.is_ok());
    assert_eq!(
        live.admit(1, d, 1, 0).await.unwrap_err().limit,
        LimitKind::Device
    );
    assert!(!live.is_up());
    assert!(live.ping().await.is_err());
    live.record_ingested(&[DeviceCount {
        user_id: 1,
        device_id: d,
        new_events: 4,
        received_ms: 1_000,
    }])
    .await;
    assert_eq!(live.device(d, 1_000).await.events_total, 4);

    let _redis = support::start_redis(port).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !live.is_up() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(live.is_up(), "the probe switched back to Redis");
    live.ping().await.unwrap();
    // The count made while down was pushed to Redis.
    assert_eq!(live.device(d, 1_000).await.events_total, 4);
}
