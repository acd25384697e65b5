//! The registry endpoints over a real socket: users, devices, auth, isolation.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::json;
use support::TestServer;

#[tokio::test]
async fn only_the_admin_creates_users_and_secrets_are_shown_once() {
    let t = TestServer::start().await;
    let (status, _, v) = t
        .call(
            Method::POST,
            "/v1/users",
            Some(&t.admin),
            Some(json!({"username": "ann", "email": "ann@example.com"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(v["username"], "ann");
    assert_eq!(v["email"], "ann@example.com");
    assert!(v["id"].is_i64());
    let key = v["api_key"].as_str().unwrap();
    assert!(key.len() >= 32, "at least 128 bits: {key}");
    let created = v["created_at"].as_str().unwrap();
    assert_eq!(created.len(), "2026-11-21T10:00:00.123Z".len());
    assert!(created.ends_with('Z'));

    // A user key or no key is not the admin.
    for secret in [Some(key), None, Some("ipa_nope")] {
        let (status, _, v) = t
            .call(
                Method::POST,
                "/v1/users",
                secret,
                Some(json!({"username": "bob", "email": "b@example.com"})),
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{secret:?}");
        assert!(v["error"].is_string());
    }

    // The username is unique.
    let (status, _, v) = t
        .call(
            Method::POST,
            "/v1/users",
            Some(&t.admin),
            Some(json!({"username": "ann", "email": "other@example.com"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
}

#[tokio::test]
async fn secrets_are_stored_hashed() {
    let t = TestServer::start().await;
    let (_, key) = t.user("ann").await;
    let (_, token) = t.device(&key, "d").await;
    let db = std::fs::read(t.dir.path().join("registry.db")).unwrap();
    let wal = std::fs::read(t.dir.path().join("registry.db-wal")).unwrap_or_default();
    for secret in [&key, &token] {
        let needle = secret.as_bytes();
        for file in [&db, &wal] {
            assert!(
                !file.windows(needle.len()).any(|w| w == needle),
                "a secret is stored in clear"
            );
        }
    }
}

#[tokio::test]
async fn bad_user_bodies_name_the_field() {
    let t = TestServer::start().await;
    let cases = [
        (json!({"username": "a b", "email": "a@x.io"}), "username"),
        (json!({"username": "ab", "email": "nope"}), "email"),
        (
            json!({"username": "ab", "email": "a@x.io", "admin": true}),
            "admin",
        ),
        (json!({"email": "a@x.io"}), "username"),
        (json!(["not", "an", "object"]), "body"),
    ];
    for (body, field) in cases {
        let (status, _, v) = t
            .call(
                Method::POST,
                "/v1/users",
                Some(&t.admin),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(v["field"], field, "{body} → {v}");
    }
}

#[tokio::test]
async fn devices_are_created_listed_shown_and_deleted() {
    let t = TestServer::start().await;
    let (_, key) = t.user("ann").await;
    let (status, _, created) = t
        .call(
            Method::POST,
            "/v1/devices",
            Some(&key),
            Some(json!({"name": "boiler", "type": "thermo"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = created["id"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok());
    assert_eq!(created["type"], "thermo");
    assert!(created["token"].as_str().unwrap().len() >= 32);

    let (status, v) = t.get("/v1/devices", &key).await;
    assert_eq!(status, StatusCode::OK);
    let list = v["devices"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], id);
    assert!(list[0].get("token").is_none(), "tokens are shown once");

    let (status, v) = t.get(&format!("/v1/devices/{id}"), &key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["name"], "boiler");

    // Another spelling of the same UUID is the same device.
    let upper = id.to_uppercase();
    let (status, _) = t.get(&format!("/v1/devices/{upper}"), &key).await;
    assert_eq!(status, StatusCode::OK);

    let (status, _, _) = t
        .call(
            Method::DELETE,
            &format!("/v1/devices/{id}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = t.get(&format!("/v1/devices/{id}"), &key).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = t
        .call(
            Method::DELETE,
            &format!("/v1/devices/{id}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_deleted_devices_token_is_refused_at_once() {
    let t = TestServer::start().await;
    let (_, key) = t.user("ann").await;
    let (id, token) = t.device(&key, "d").await;
    let (status, _) = t.ingest(&token, json!({"type": "t"})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = t
        .call(
            Method::DELETE,
            &format!("/v1/devices/{id}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, v) = t.ingest(&token, json!({"type": "t"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    for path in ["events", "aggregates?from=0&to=1000&window=1s", "live"] {
        let (status, _) = t.get(&format!("/v1/devices/{id}/{path}"), &key).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
}

#[tokio::test]
async fn users_never_see_each_others_devices_either_way() {
    let t = TestServer::start().await;
    let (_, ann) = t.user("ann").await;
    let (_, bob) = t.user("bob").await;
    let (ann_dev, ann_token) = t.device(&ann, "a").await;
    let (bob_dev, _) = t.device(&bob, "b").await;
    let (status, _) = t.ingest(&ann_token, json!({"type": "t"})).await;
    assert_eq!(status, StatusCode::OK);

    for (key, other) in [(&ann, &bob_dev), (&bob, &ann_dev)] {
        for path in [
            format!("/v1/devices/{other}"),
            format!("/v1/devices/{other}/events"),
            format!("/v1/devices/{other}/aggregates?from=0&to=1000&window=1s"),
            format!("/v1/devices/{other}/live"),
        ] {
            let (status, v) = t.get(&path, key).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {v}");
        }
        let (status, _, _) = t
            .call(
                Method::DELETE,
                &format!("/v1/devices/{other}"),
                Some(key),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (_, list) = t.get("/v1/devices", key).await;
        assert_eq!(list["devices"].as_array().unwrap().len(), 1);
    }
    // A device that does not exist looks exactly the same.
    let (status, v) = t
        .get(&format!("/v1/devices/{}", uuid::Uuid::new_v4()), &ann)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(v, json!({"error": "not found"}));
    // Bob's grouped aggregates do not include Ann's events.
    let now = support::now_ms();
    let (status, v) = t
        .get(
            &format!(
                "/v1/aggregates?from={}&to={}&window=1h&group_by=device",
                now - 3_600_000,
                now + 1000
            ),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["buckets"], json!([]));
}

#[tokio::test]
async fn the_wrong_kind_of_secret_is_a_401() {
    let t = TestServer::start().await;
    let (_, key) = t.user("ann").await;
    let (_, token) = t.device(&key, "d").await;
    // A device token cannot manage devices or read; the admin token is not a user.
    for secret in [&token, &t.admin] {
        let (status, _) = t.get("/v1/devices", secret).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = t.get("/v1/live", secret).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, v) = t.ingest(&t.admin, json!({"type": "t"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    let (status, _) = t.get("/v1/devices", "ipk_notakey").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn repeated_failed_logins_are_slowed_down_with_429_and_retry_after() {
    let t = TestServer::start_with(|c| c.limits.failed_logins_per_minute = 5).await;
    let (_, key) = t.user("eve").await;
    // Five wrong keys are plain 401s; the sixth failure blocks the address.
    for i in 0..6 {
        let (s, _) = t.get("/v1/devices", &format!("ipk_wrong{i}")).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    let (s, headers, v) = t
        .call(reqwest::Method::GET, "/v1/devices", Some("ipk_wrong"), None)
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["limit"], "login", "{v}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    // While blocked, the address gets no answer about any secret, a valid one included:
    // a guesser learns nothing from trying.
    let (s, _) = t.get("/v1/devices", &key).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    // Failures are counted where operators look.
    let metrics = t.metrics().await;
    let failed = support::metric(&metrics, "iotpipe_logins_failed_total{source=\"http\"}");
    assert_eq!(failed, 6.0, "{metrics}");
    let throttled = support::metric(&metrics, "iotpipe_logins_throttled_total{source=\"http\"}");
    assert_eq!(throttled, 2.0);
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let t = TestServer::start().await;
    let (_, key) = t.user("cas").await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = t
            .http
            .get(format!("{}/v1/devices", t.base))
            .header("Authorization", format!("{scheme} {key}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{scheme}");
    }
    let r = t
        .http
        .get(format!("{}/v1/devices", t.base))
        .header("Authorization", format!("Basic {key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_user_key_can_be_rotated_and_the_old_one_stops_at_once() {
    let t = TestServer::start().await;
    let (id, old) = t.user("rot").await;
    let (other_id, other) = t.user("oth").await;
    let rotate = |who: i64, secret: String| {
        let t = &t;
        async move {
            t.call(
                Method::POST,
                &format!("/v1/users/{who}/rotate-key"),
                Some(&secret),
                None,
            )
            .await
        }
    };
    // Another user's id looks like a missing one.
    let (s, _, _) = rotate(other_id, old.clone()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, v) = rotate(id, old.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let new = v["api_key"].as_str().unwrap().to_owned();
    assert!(new.starts_with("ipk_") && new != old);
    assert_eq!(t.get("/v1/devices", &old).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(t.get("/v1/devices", &new).await.0, StatusCode::OK);
    // The admin may rotate any user's key; an unknown user is a 404.
    let (s, _, v) = rotate(other_id, t.admin.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        t.get("/v1/devices", &other).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, _, _) = rotate(999_999, t.admin.clone()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}
