//! The query parameters of the read endpoints: the structs they are parsed into (which
//! the OpenAPI document describes) and the checks that turn each bad one into a 400
//! naming it.

use serde::Deserialize;
use utoipa::IntoParams;

// `Fill` and `GroupBy` are named only in `#[param(value_type)]`.
use super::fill::Fill;
use super::{Grid, GroupBy, Range, MAX_WINDOWS};
use crate::config::parse_duration_ms;
use crate::http::error::ApiError;
use crate::model::{now_ms, parse_instant};

// The parameters' patterns (`#[param(pattern)]` takes literals only) state what the
// parsers accept: `from` and `to` are integer ms or RFC 3339 ([`parse_instant`] takes
// nothing else), a `window` an integer and a unit, `tz` the characters of IANA names,
// `percentiles` one to ten plain decimals. A value matching them may still be refused
// (a 13th month, `0s`, an unknown zone, a percentile of 100), one not matching always is.

/// The query of `GET /v1/devices/{id}/events`. Every field is kept as sent and
/// checked by the handler, so that a bad one is a 400 naming it.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// The oldest instant, inclusive: RFC 3339 or integer ms. Default: the whole past.
    #[param(
        pattern = "^([+-]?[0-9]{1,19}|[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2}))$"
    )]
    pub(super) from: Option<String>,
    /// The end, exclusive. Default: now + 5 minutes.
    #[param(
        pattern = "^([+-]?[0-9]{1,19}|[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2}))$"
    )]
    pub(super) to: Option<String>,
    /// Only events of this type.
    #[serde(rename = "type")]
    #[param(pattern = "^[A-Za-z0-9_.:-]{1,64}$")]
    pub(super) kind: Option<String>,
    /// Events per page, 1 to 10,000 (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 10000)]
    pub(super) limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub(super) cursor: Option<String>,
    /// `json` (paged, the default), or `ndjson` (`jsonl`) or `csv`: the whole range streamed,
    /// without `limit` or `cursor`. Wins over the `Accept` header.
    #[param(pattern = "^(json|ndjson|jsonl|csv)$")]
    pub(super) format: Option<String>,
}

/// The query of `GET /v1/devices/{id}/aggregates`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeviceAggregatesQuery {
    /// The first instant, inclusive: RFC 3339 or integer ms.
    #[param(value_type = String, pattern = "^([+-]?[0-9]{1,19}|[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2}))$")]
    pub(super) from: Option<String>,
    /// The end, exclusive; after `from`. At most 10,000 windows in between.
    #[param(value_type = String, pattern = "^([+-]?[0-9]{1,19}|[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2}))$")]
    pub(super) to: Option<String>,
    /// The window: an integer followed by `s`, `m`, `h` or `d`.
    #[param(value_type = String, pattern = "^[0-9]+[smhd]$")]
    pub(super) window: Option<String>,
    /// Figures of this metric; without it, buckets hold counts only.
    #[param(pattern = "^[A-Za-z0-9_.:-]{1,64}$")]
    pub(super) metric: Option<String>,
    /// Only events of this type.
    #[serde(rename = "type")]
    #[param(pattern = "^[A-Za-z0-9_.:-]{1,64}$")]
    pub(super) kind: Option<String>,
    /// An IANA time zone: windows align to its local midnight.
    #[param(pattern = "^[A-Za-z0-9_+/-]+$")]
    pub(super) tz: Option<String>,
    /// How empty windows are listed (default `none`: left out).
    #[param(value_type = Option<Fill>)]
    pub(super) fill: Option<String>,
    /// Up to 10 percentiles strictly between 0 and 100, comma-separated; needs `metric`.
    #[param(pattern = "^ *[0-9]+(\\.[0-9]+)? *(, *[0-9]+(\\.[0-9]+)? *){0,9}$")]
    pub(super) percentiles: Option<String>,
}

/// The query of `GET /v1/aggregates`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GroupedAggregatesQuery {
    /// The first instant, inclusive: RFC 3339 or integer ms.
    #[param(value_type = String, pattern = "^([+-]?[0-9]{1,19}|[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2}))$")]
    pub(super) from: Option<String>,
    /// The end, exclusive; after `from`. At most 10,000 windows in between.
    #[param(value_type = String, pattern = "^([+-]?[0-9]{1,19}|[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2}))$")]
    pub(super) to: Option<String>,
    /// The window: an integer followed by `s`, `m`, `h` or `d`.
    #[param(value_type = String, pattern = "^[0-9]+[smhd]$")]
    pub(super) window: Option<String>,
    /// Groups by device type (default) or by device.
    #[param(value_type = Option<GroupBy>)]
    pub(super) group_by: Option<String>,
    /// Only events of this type.
    #[serde(rename = "type")]
    #[param(pattern = "^[A-Za-z0-9_.:-]{1,64}$")]
    pub(super) kind: Option<String>,
    /// An IANA time zone: windows align to its local midnight.
    #[param(pattern = "^[A-Za-z0-9_+/-]+$")]
    pub(super) tz: Option<String>,
    /// With `group_by=device`: devices per page, 1 to 1,000.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub(super) device_limit: Option<String>,
    /// With `group_by=device`: the page starts after this device id
    /// (`next_after_device` of the previous page).
    #[param(value_type = Option<Uuid>)]
    pub(super) after_device: Option<String>,
}

pub(super) fn instant(value: Option<&String>, name: &str) -> Result<Option<i64>, ApiError> {
    value
        .map(|v| {
            parse_instant(v)
                .ok_or_else(|| ApiError::field(name, "must be an RFC 3339 instant or integer ms"))
        })
        .transpose()
}

pub(super) fn required_range(
    from: Option<&String>,
    to: Option<&String>,
) -> Result<Range, ApiError> {
    let from = instant(from, "from")?.ok_or_else(|| ApiError::field("from", "is required"))?;
    let to = instant(to, "to")?.ok_or_else(|| ApiError::field("to", "is required"))?;
    if to <= from {
        return Err(ApiError::field("to", "must be after from"));
    }
    Ok(Range {
        from_ms: from,
        to_ms: to,
    })
}

pub(super) fn window(raw: Option<&String>, range: Range) -> Result<i64, ApiError> {
    let raw = raw.ok_or_else(|| ApiError::field("window", "is required"))?;
    let window = parse_duration_ms(raw).ok_or_else(|| {
        ApiError::field(
            "window",
            "must be an integer followed by s, m, h or d, at least 1s",
        )
    })?;
    if range.window_count(window) > MAX_WINDOWS {
        return Err(ApiError::field(
            "window",
            format!("the range spans more than {MAX_WINDOWS} windows"),
        ));
    }
    Ok(window)
}

/// The windows of an aggregate: `from`, `to`, `window` and `tz`. The contract counts
/// windows over the range as asked (saturating, so that no range wraps the count);
/// what is read is clamped to when events can exist.
pub(super) fn grid(
    from: Option<&String>,
    to: Option<&String>,
    window_param: Option<&String>,
    tz: Option<&String>,
) -> Result<(i64, Grid, Range), ApiError> {
    let asked = required_range(from, to)?;
    let window_ms = window(window_param, asked)?;
    let range = Range::bounded(asked.from_ms, asked.to_ms, now_ms());
    let grid = match tz {
        None => Grid::utc(range, window_ms),
        Some(name) => {
            let tz: chrono_tz::Tz = name.parse().map_err(|_| {
                ApiError::field(
                    "tz",
                    "is not a known time zone: use an IANA name such as Europe/Berlin",
                )
            })?;
            Grid::zoned(range, window_ms, tz)
                .map_err(|e| ApiError::field("window", e.to_string()))?
        }
    };
    Ok((window_ms, grid, range))
}

/// The most percentiles one query may ask for.
const MAX_PERCENTILES: usize = 10;

/// `percentiles=50,90,99.9`: each in (0, 100), with a metric. Returns the answer's
/// field names (`p50`, `p99.9`) and quantiles.
pub(super) fn percentiles(
    raw: Option<&String>,
    with_metric: bool,
) -> Result<Vec<(String, f64)>, ApiError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    if !with_metric {
        return Err(ApiError::field("percentiles", "needs a metric"));
    }
    let mut out = Vec::new();
    for part in raw.split(',') {
        // Plain decimals only, as the document's pattern says: f64's parser would also
        // take `5e1`, `inf` or `+50`, which the document calls malformed.
        let part = part.trim_matches(' ');
        let p: f64 = Some(part)
            .filter(|p| is_plain_decimal(p))
            .and_then(|p| p.parse().ok())
            .filter(|p: &f64| *p > 0.0 && *p < 100.0)
            .ok_or_else(|| {
                ApiError::field(
                    "percentiles",
                    "must be a comma-separated list of numbers strictly between 0 and 100",
                )
            })?;
        out.push((format!("p{p}"), p / 100.0));
    }
    if out.len() > MAX_PERCENTILES {
        return Err(ApiError::field(
            "percentiles",
            format!("at most {MAX_PERCENTILES} may be asked for"),
        ));
    }
    Ok(out)
}

/// `12` or `99.9`: digits, and optionally a point and more digits.
pub(super) fn is_plain_decimal(s: &str) -> bool {
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    match s.split_once('.') {
        None => digits(s),
        Some((int, frac)) => digits(int) && digits(frac),
    }
}

pub(super) fn kind(kind: Option<&String>) -> Result<Option<String>, ApiError> {
    match kind {
        None => Ok(None),
        Some(t) if crate::model::is_valid_name(t) => Ok(Some(t.clone())),
        Some(_) => Err(ApiError::field("type", "is not a valid event type")),
    }
}
