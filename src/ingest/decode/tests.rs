use super::*;
use crate::model;

const NOW: i64 = 1_795_000_000_000;

fn opts() -> DecodeOptions {
    DecodeOptions {
        max_events: 10,
        now_ms: NOW,
        retention: Retention::default(),
    }
}

fn invalid(body: &str) -> (usize, String, String) {
    match decode(body.as_bytes(), Format::Json, opts()) {
        Err(DecodeError::Invalid {
            index,
            field,
            reason,
            ..
        }) => (index, field, reason),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn a_single_object_and_an_array_decode_alike() {
    let one = r#"{"type":"t","ts":1795000000000,"metrics":{"a":1.5},"attrs":{"fw":"1"}}"#;
    let a = decode(one.as_bytes(), Format::Json, opts()).unwrap();
    let b = decode(format!("[{one}]").as_bytes(), Format::Json, opts()).unwrap();
    assert_eq!(a[0].event.metrics, b[0].event.metrics);
    assert_eq!(a[0].event.metrics, vec![("a".to_owned(), 1.5)]);
    assert_eq!(a[0].event.attrs, vec![("fw".to_owned(), "1".to_owned())]);
    assert_eq!(a[0].event.ts_ms, 1_795_000_000_000);
}

#[test]
fn missing_ts_defaults_to_receipt_and_missing_id_is_assigned() {
    let d = decode(br#"{"type":"t"}"#, Format::Json, opts()).unwrap();
    assert_eq!(d[0].event.ts_ms, NOW);
    assert!(!d[0].event.id.is_nil());
}

#[test]
fn uuids_in_any_standard_spelling_are_equal() {
    let body = r#"[{"type":"t","id":"7D0C1B2A-0000-4000-8000-00000000000A"},
                  {"type":"t","id":"7d0c1b2a00004000800000000000000a"},
                  {"type":"t","id":"urn:uuid:7d0c1b2a-0000-4000-8000-00000000000a"}]"#;
    let d = decode(body.as_bytes(), Format::Json, opts()).unwrap();
    assert_eq!(d[0].event.id, d[1].event.id);
    assert_eq!(d[1].event.id, d[2].event.id);
}

#[test]
fn an_unknown_top_level_field_is_named() {
    let (index, field, reason) = invalid(r#"[{"type":"t"},{"type":"t","color":"red"}]"#);
    assert_eq!(index, 1);
    assert_eq!(field, "color");
    assert!(reason.contains("unknown field"), "{reason}");
}

#[test]
fn a_float_ts_is_refused() {
    let (index, field, _) = invalid(r#"{"type":"t","ts":1795000000000.5}"#);
    assert_eq!((index, field.as_str()), (0, "ts"));
}

#[test]
fn ts_in_the_future_or_before_2000_is_refused() {
    let future = NOW + model::MAX_FUTURE_MS + 1;
    let (_, field, reason) = invalid(&format!(r#"{{"type":"t","ts":{future}}}"#));
    assert_eq!(field, "ts");
    assert!(reason.contains("future"));
    let (_, field, _) = invalid(r#"{"type":"t","ts":"1999-12-31T23:59:59.999Z"}"#);
    assert_eq!(field, "ts");
    let edge = NOW + model::MAX_FUTURE_MS;
    assert!(decode(
        format!(r#"{{"type":"t","ts":{edge}}}"#).as_bytes(),
        Format::Json,
        opts()
    )
    .is_ok());
}

#[test]
fn a_metric_that_is_not_a_finite_number_is_named() {
    let (index, field, _) = invalid(r#"[{"type":"t","metrics":{"temp":"hot"}}]"#);
    assert_eq!((index, field.as_str()), (0, "metrics.temp"));
    let (_, field, _) = invalid(r#"[{"type":"t","metrics":{"temp":1e999}}]"#);
    assert_eq!(field, "metrics.temp");
}

#[test]
fn type_is_required_and_checked() {
    let (_, field, reason) = invalid(r#"{"ts":1795000000000}"#);
    assert_eq!((field.as_str(), reason.as_str()), ("type", "is required"));
    let (_, field, _) = invalid(r#"{"type":"has space"}"#);
    assert_eq!(field, "type");
    let (_, field, _) = invalid(r#"{"type":7}"#);
    assert_eq!(field, "type");
}

#[test]
fn attr_limits_count_utf8_bytes() {
    let ok = "é".repeat(512); // 1024 bytes
    let body = format!(r#"{{"type":"t","attrs":{{"a":"{ok}"}}}}"#);
    assert!(decode(body.as_bytes(), Format::Json, opts()).is_ok());
    let long = format!("{ok}x");
    let (_, field, _) = invalid(&format!(r#"{{"type":"t","attrs":{{"a":"{long}"}}}}"#));
    assert_eq!(field, "attrs.a");
}

#[test]
fn metric_names_and_counts_are_checked() {
    let (_, field, _) = invalid(r#"{"type":"t","metrics":{"bad name":1}}"#);
    assert_eq!(field, "metrics.bad name");
    let many: Vec<String> = (0..65).map(|i| format!(r#""m{i}":1"#)).collect();
    let (_, field, _) = invalid(&format!(
        r#"{{"type":"t","metrics":{{{}}}}}"#,
        many.join(",")
    ));
    assert!(field.starts_with("metrics"), "{field}");
}

#[test]
fn too_many_events_is_its_own_error() {
    let body = format!("[{}]", [r#"{"type":"t"}"#; 11].join(","));
    assert_eq!(
        decode(body.as_bytes(), Format::Json, opts()),
        Err(DecodeError::TooMany { limit: 10 })
    );
}

#[test]
fn ndjson_skips_blank_lines_when_counting_the_index() {
    let body = "{\"type\":\"a\"}\n\n  \n{\"type\":\"b\"}\n{\"type\":\"c\",\"x\":1}\n";
    match decode(body.as_bytes(), Format::NdJson, opts()) {
        Err(DecodeError::Invalid { index, field, .. }) => {
            assert_eq!((index, field.as_str()), (2, "x"))
        }
        other => panic!("{other:?}"),
    }
    let ok = decode(
        b"{\"type\":\"a\"}\n\n{\"type\":\"b\"}",
        Format::NdJson,
        opts(),
    )
    .unwrap();
    assert_eq!(ok.len(), 2);
}

#[test]
fn malformed_json_is_a_400_naming_where() {
    let (index, _, _) = invalid(r#"[{"type":"a"},{"type":"b""#);
    assert_eq!(index, 1);
    let (_, field, _) = invalid("42");
    assert_eq!(field, "body");
}

#[test]
fn a_duplicated_field_is_named() {
    let (_, field, reason) = invalid(r#"{"type":"t","type":"u"}"#);
    assert_eq!(field, "type", "{reason}");
    let (index, field, _) = invalid(r#"[{"type":"t"},{"type":"t","ts":1,"ts":2}]"#);
    assert_eq!((index, field.as_str()), (1, "ts"));
}

#[test]
fn an_empty_array_is_fine() {
    assert!(decode(b"[]", Format::Json, opts()).unwrap().is_empty());
}

#[test]
fn an_event_older_than_the_raw_tier_is_refused_naming_ts() {
    let opts = DecodeOptions {
        retention: Retention::new([Some(86_400_000), None, None, None]),
        ..opts()
    };
    let old = NOW - 86_400_000;
    match decode(
        format!(r#"{{"type":"t","ts":{old}}}"#).as_bytes(),
        Format::Json,
        opts,
    ) {
        Err(DecodeError::Invalid { field, reason, .. }) => {
            assert_eq!(field, "ts");
            assert!(reason.contains("retention.raw"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let fresh = format!(r#"{{"type":"t","ts":{}}}"#, old + 1);
    assert!(decode(fresh.as_bytes(), Format::Json, opts).is_ok());
}
