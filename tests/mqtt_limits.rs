//! The built-in endpoint's limits against hostile or careless clients, over real
//! sockets: CONNECT size, keep-alive, connections per device and per address.

mod support;

use std::time::Duration;

use rumqttc::ConnectReturnCode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

#[tokio::test]
async fn a_connect_of_more_than_a_few_kib_is_refused_before_login() {
    let inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;
    // A valid device with an 8 KiB password: refused for its size, not its login.
    let mut s = TcpStream::connect(inst.mqtt()).await.unwrap();
    s.write_all(&connect_bytes(&o.device, &"x".repeat(8 * 1024), 30))
        .await
        .unwrap();
    // Closed unread: not even the refusal of a wrong password, which a CONNECT that
    // was read whole would get.
    let answer = expect_closed(&mut s).await;
    assert!(answer.is_empty(), "answered {answer:?}");
    // A normal login still works, and after it the full packet size applies.
    let mut d = Device::connect(inst.mqtt(), &o.device, &o.token);
    d.connected().await;
    let big = format!(
        "[{}]",
        vec![r#"{"type":"t","metrics":{"v":1}}"#; 200].join(",")
    );
    // Over the CONNECT limit, under the client library's own default of 10 KiB.
    assert!(big.len() > 4 * 1024 && big.len() < 10 * 1024);
    d.publish(topic(&o.device), rumqttc::QoS::AtLeastOnce, big)
        .await;
    d.pubacks(1).await;
}

#[tokio::test]
async fn a_device_asking_for_no_keep_alive_still_gets_the_servers() {
    let inst = TestServer::with_mqtt(|c| c.mqtt.max_keep_alive_secs = 1).await;
    let o = inst.api.owner().await;
    for asked in [0, 600] {
        let mut s = raw_login(inst.mqtt(), &o, asked).await;
        let started = Instant::now();
        // Silent: closed after one and a half of the server's keep-alive.
        expect_closed(&mut s).await;
        let after = started.elapsed();
        assert!(
            after >= Duration::from_millis(1_400) && after < Duration::from_secs(4),
            "keep-alive {asked}: closed after {after:?}"
        );
    }
}

#[tokio::test]
async fn one_device_cannot_hold_more_than_its_connections() {
    let inst = TestServer::with_mqtt(|c| c.mqtt.max_connections_per_device = 2).await;
    let o = inst.api.owner().await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut d = Device::connect(inst.mqtt(), &o.device, &o.token);
        d.connected().await;
        held.push(d);
    }
    let mut third = Device::connect(inst.mqtt(), &o.device, &o.token);
    match third.next().await {
        Seen::Refused(code) => assert_eq!(code, ConnectReturnCode::ServiceUnavailable),
        other => panic!("a third connection was let in: {other:?}"),
    }
    // Another device is not affected, and a freed slot is reused.
    let other = inst.api.owner().await;
    Device::connect(inst.mqtt(), &other.device, &other.token)
        .connected()
        .await;
    // A clean DISCONNECT: the event loop task would otherwise keep the socket open.
    let leaving = held.pop().unwrap();
    leaving.client.disconnect().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = Device::connect(inst.mqtt(), &o.device, &o.token);
        match again.next().await {
            Seen::ConnAck(ConnectReturnCode::Success) => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("the freed slot was not reused: {other:?}"),
        }
    }
}

#[tokio::test]
async fn one_address_cannot_hold_every_slot() {
    let inst = TestServer::with_mqtt(|c| c.mqtt.max_connections_per_ip = 3).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(inst.mqtt()).await.unwrap());
    }
    // The fourth is closed at once, without waiting for a CONNECT.
    let mut fourth = TcpStream::connect(inst.mqtt()).await.unwrap();
    let mut buf = [0u8; 8];
    let n = timeout(Duration::from_secs(2), fourth.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    drop(idle);
    // Slots come back as their connections end.
    let o = inst.api.owner().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut d = Device::connect(inst.mqtt(), &o.device, &o.token);
        match d.next().await {
            Seen::ConnAck(ConnectReturnCode::Success) => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("the address got no slot back: {other:?}"),
        }
    }
}

#[tokio::test]
async fn repeated_failed_logins_are_answered_slowly_and_refused() {
    let inst = TestServer::with_mqtt(|c| c.limits.failed_logins_per_minute = 3).await;
    let o = inst.api.owner().await;
    for i in 0..4 {
        let mut d = Device::connect(inst.mqtt(), &o.device, "ipd_wrong");
        match d.next().await {
            Seen::Refused(code) => {
                assert_eq!(code, ConnectReturnCode::BadUserNamePassword, "attempt {i}")
            }
            other => panic!("attempt {i}: {other:?}"),
        }
    }
    // Blocked now: even the right password is refused, after a pause, unheard.
    let started = Instant::now();
    let mut d = Device::connect(inst.mqtt(), &o.device, &o.token);
    match d.next().await {
        Seen::Refused(code) => assert_eq!(code, ConnectReturnCode::NotAuthorized),
        other => panic!("a blocked login went through: {other:?}"),
    }
    // The penalty is at most 2 s: refused after it, not held beyond it.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1_500) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    let metrics = inst.api.metrics().await;
    assert_eq!(
        metric(&metrics, "iotpipe_logins_failed_total{source=\"mqtt\"}"),
        4.0
    );
    assert_eq!(
        metric(&metrics, "iotpipe_logins_throttled_total{source=\"mqtt\"}"),
        1.0
    );
}

/// CPU time this process has used so far (user + system), from /proc.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_waiting_for_the_rest_of_a_connect_cost_no_cpu() {
    let inst = TestServer::with_mqtt(|_| {}).await;
    // Each sends the first two bytes of a CONNECT and waits: once, every such
    // connection was peeked at every 10 ms until its CONNECT timeout (measured on that
    // code: 660 ms of CPU in these 3 s).
    let mut held = Vec::new();
    for _ in 0..900 {
        let mut s = TcpStream::connect(inst.mqtt()).await.unwrap();
        s.write_all(&[0x10, 0x20]).await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_time();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_time() - before;
    eprintln!("900 waiting connections: {used:?} of CPU in 3 s");
    assert!(
        used < Duration::from_millis(300),
        "{used:?} of CPU in 3 s for 900 waiting connections"
    );
    drop(held);
}
