//! Device profiles: what a simulated device measures, and how its readings move from
//! one event to the next. Every model keeps state per device (a meter's counter only
//! grows, a tracker moves from where it was), so a fleet looks like devices, not
//! noise.

use std::collections::BTreeMap;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

/// Why a profile cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(
        "unknown profile {0:?}: expected smart-meter, env-sensor, gps-tracker or template:FILE"
    )]
    Unknown(String),
    #[error("cannot read template {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("template {path}: {reason}")]
    Template { path: String, reason: String },
}

/// One reading: the event body without id and ts.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub kind: String,
    pub metrics: Vec<(String, f64)>,
    pub attrs: Vec<(String, String)>,
}

/// A kind of device.
#[derive(Debug, Clone)]
pub enum Profile {
    /// Water meter as in ThingsBoard's performance tests: pulse counter, leakage flag
    /// and battery level.
    SmartMeter,
    /// Indoor climate: temperature, humidity and CO2 drifting around a set point.
    EnvSensor,
    /// A vehicle: position, speed and heading, in metrics and (position) in attrs.
    GpsTracker,
    /// A user-supplied JSON template.
    Template(Template),
}

impl Profile {
    /// `smart-meter`, `env-sensor`, `gps-tracker` or `template:PATH`.
    ///
    /// # Errors
    ///
    /// An unknown name, or a template file that cannot be read or is invalid.
    pub fn parse(spec: &str) -> Result<Self, ProfileError> {
        match spec {
            "smart-meter" => Ok(Profile::SmartMeter),
            "env-sensor" => Ok(Profile::EnvSensor),
            "gps-tracker" => Ok(Profile::GpsTracker),
            other => match other.strip_prefix("template:") {
                Some(path) => Template::load(Path::new(path)).map(Profile::Template),
                None => Err(ProfileError::Unknown(other.to_owned())),
            },
        }
    }

    /// The name, also used as the device type at provisioning.
    pub fn name(&self) -> &str {
        match self {
            Profile::SmartMeter => "smart-meter",
            Profile::EnvSensor => "env-sensor",
            Profile::GpsTracker => "gps-tracker",
            Profile::Template(_) => "template",
        }
    }

    /// The metric whose windowed aggregates verification compares: one that every
    /// event of the profile carries.
    pub fn primary_metric(&self) -> &str {
        match self {
            Profile::SmartMeter => "pulse_counter",
            Profile::EnvSensor => "temperature",
            Profile::GpsTracker => "speed",
            Profile::Template(t) => &t.primary,
        }
    }

    /// A fresh device of this profile. `index` numbers the device in the fleet.
    pub fn model(&self, index: usize, seed: u64) -> DeviceModel {
        let mut rng = StdRng::seed_from_u64(seed);
        let state = match self {
            Profile::SmartMeter => State::Meter {
                pulses: rng.random_range(0..50_000) as f64,
                leak_left: 0,
                battery: rng.random_range(70.0..100.0),
            },
            Profile::EnvSensor => {
                let base = rng.random_range(19.0..23.5);
                State::Env {
                    base,
                    temperature: base,
                    humidity: rng.random_range(35.0..60.0),
                    co2: rng.random_range(420.0..700.0),
                }
            }
            Profile::GpsTracker => State::Gps {
                lat: rng.random_range(52.40..52.60),
                lon: rng.random_range(13.20..13.60),
                speed: rng.random_range(0.0..60.0),
                heading: rng.random_range(0.0..360.0),
            },
            Profile::Template(t) => State::Template {
                template: t.clone(),
                values: t.metrics.values().map(|m| m.initial(&mut rng)).collect(),
            },
        };
        DeviceModel {
            index,
            seq: 0,
            rng,
            state,
        }
    }
}

/// A custom profile, read from JSON:
///
/// ```json
/// {"type": "pump",
///  "metrics": {"pressure": {"min": 1.0, "max": 3.5}, "rpm": 1450,
///              "level": {"walk": [0, 100], "step": 2}, "runtime_s": {"counter": 5}},
///  "attrs": {"site": "north", "serial": "pump-{device}"}}
/// ```
///
/// A number is a constant; `min`/`max` is uniform; `walk` is a bounded random walk
/// with at most `step` per event; `counter` grows by 0 to `counter` per event. In
/// attrs, `{device}` is the device's index and `{seq}` the event's sequence number.
#[derive(Debug, Clone)]
pub struct Template {
    kind: String,
    metrics: BTreeMap<String, MetricSpec>,
    attrs: BTreeMap<String, String>,
    primary: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
enum MetricSpec {
    Constant(f64),
    Uniform { min: f64, max: f64 },
    Walk { walk: [f64; 2], step: f64 },
    Counter { counter: u32 },
}

impl MetricSpec {
    fn initial(&self, rng: &mut StdRng) -> f64 {
        match *self {
            MetricSpec::Constant(v) => v,
            MetricSpec::Uniform { min, max } => uniform(rng, min, max),
            MetricSpec::Walk { walk: [lo, hi], .. } => uniform(rng, lo, hi),
            MetricSpec::Counter { .. } => 0.0,
        }
    }

    fn next(&self, rng: &mut StdRng, last: f64) -> f64 {
        match *self {
            MetricSpec::Constant(v) => v,
            MetricSpec::Uniform { min, max } => uniform(rng, min, max),
            MetricSpec::Walk {
                walk: [lo, hi],
                step,
            } => (last + uniform(rng, -step, step)).clamp(lo, hi),
            MetricSpec::Counter { counter } => last + f64::from(rng.random_range(0..=counter)),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateFile {
    #[serde(rename = "type")]
    kind: String,
    metrics: BTreeMap<String, MetricSpec>,
    #[serde(default)]
    attrs: BTreeMap<String, String>,
}

impl Template {
    /// Reads and checks a template file.
    ///
    /// # Errors
    ///
    /// An unreadable file, bad JSON, or names that iotpipe would refuse.
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| ProfileError::Template {
            path: shown,
            reason,
        })
    }

    /// Parses template JSON (see the type's documentation).
    ///
    /// # Errors
    ///
    /// The reason, in words.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: TemplateFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if !valid_name(&file.kind) {
            return Err(format!("type {:?} is not a valid event type", file.kind));
        }
        // Verification needs a metric that every event carries; all template metrics
        // are in every event, so the first one will do.
        let primary = file
            .metrics
            .keys()
            .next()
            .cloned()
            .ok_or("a template needs at least one metric")?;
        for name in file.metrics.keys().chain(file.attrs.keys()) {
            if !valid_name(name) {
                return Err(format!("{name:?} is not a valid metric or attr name"));
            }
        }
        for (name, spec) in &file.metrics {
            let ok = match *spec {
                MetricSpec::Constant(v) => v.is_finite(),
                MetricSpec::Uniform { min, max } => {
                    min.is_finite() && max.is_finite() && min <= max
                }
                MetricSpec::Walk {
                    walk: [lo, hi],
                    step,
                } => {
                    lo.is_finite() && hi.is_finite() && lo <= hi && step.is_finite() && step >= 0.0
                }
                MetricSpec::Counter { .. } => true,
            };
            if !ok {
                return Err(format!(
                    "metric {name:?}: bounds must be finite with min <= max"
                ));
            }
        }
        Ok(Self {
            kind: file.kind,
            metrics: file.metrics,
            attrs: file.attrs,
            primary,
        })
    }
}

/// The metric, attr and type name rule of the API contract.
pub fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
}

#[derive(Debug)]
enum State {
    Meter {
        pulses: f64,
        /// Events left in the current leak; 0 means no leak.
        leak_left: u32,
        battery: f64,
    },
    Env {
        base: f64,
        temperature: f64,
        humidity: f64,
        co2: f64,
    },
    Gps {
        lat: f64,
        lon: f64,
        speed: f64,
        heading: f64,
    },
    Template {
        template: Template,
        values: Vec<f64>,
    },
}

/// One simulated device's sensor state.
#[derive(Debug)]
pub struct DeviceModel {
    index: usize,
    seq: u64,
    rng: StdRng,
    state: State,
}

fn uniform(rng: &mut StdRng, lo: f64, hi: f64) -> f64 {
    if lo >= hi {
        lo
    } else {
        rng.random_range(lo..hi)
    }
}

/// Rounds to `places` decimals: devices report fixed precision, and short numbers
/// keep payloads realistic.
fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

impl DeviceModel {
    /// The next reading.
    pub fn next_sample(&mut self) -> Sample {
        self.seq += 1;
        let rng = &mut self.rng;
        match &mut self.state {
            State::Meter {
                pulses,
                leak_left,
                battery,
            } => {
                // A leak makes water flow continuously, so the counter runs faster.
                if *leak_left == 0 && rng.random_bool(0.002) {
                    *leak_left = rng.random_range(20..100);
                }
                let flow = if *leak_left > 0 {
                    *leak_left -= 1;
                    rng.random_range(2..6)
                } else {
                    rng.random_range(0..3)
                };
                *pulses += f64::from(flow);
                if rng.random_bool(0.01) {
                    *battery = (*battery - 0.1).max(5.0);
                }
                Sample {
                    kind: "meter".into(),
                    metrics: vec![
                        ("pulse_counter".into(), *pulses),
                        ("leakage".into(), f64::from(u8::from(*leak_left > 0))),
                        ("battery_level".into(), round(*battery, 1)),
                    ],
                    attrs: vec![
                        ("fw".into(), "3.2.1".into()),
                        ("medium".into(), "water".into()),
                    ],
                }
            }
            State::Env {
                base,
                temperature,
                humidity,
                co2,
            } => {
                // Noise plus a pull back to the set point: drifts, never runs away.
                *temperature += uniform(rng, -0.15, 0.15) + 0.05 * (*base - *temperature);
                *humidity = (*humidity + uniform(rng, -0.5, 0.5)).clamp(20.0, 80.0);
                // CO2 builds up while a room is occupied, and drops on ventilation.
                *co2 = if rng.random_bool(0.005) {
                    rng.random_range(420.0..500.0)
                } else {
                    (*co2 + uniform(rng, -3.0, 6.0)).clamp(400.0, 2500.0)
                };
                Sample {
                    kind: "environment".into(),
                    metrics: vec![
                        ("temperature".into(), round(*temperature, 2)),
                        ("humidity".into(), round(*humidity, 1)),
                        ("co2".into(), round(*co2, 0)),
                    ],
                    attrs: vec![("room".into(), format!("room-{}", self.index % 40))],
                }
            }
            State::Gps {
                lat,
                lon,
                speed,
                heading,
            } => {
                *speed = (*speed + uniform(rng, -5.0, 5.0)).clamp(0.0, 110.0);
                *heading = (*heading + uniform(rng, -15.0, 15.0)).rem_euclid(360.0);
                // One second of travel per event, on a locally flat earth.
                let km = *speed / 3600.0;
                let rad = heading.to_radians();
                *lat += km / 111.0 * rad.cos();
                *lon += km / (111.0 * lat.to_radians().cos()) * rad.sin();
                let (la, lo) = (round(*lat, 6), round(*lon, 6));
                Sample {
                    kind: "location".into(),
                    metrics: vec![
                        ("lat".into(), la),
                        ("lon".into(), lo),
                        ("speed".into(), round(*speed, 1)),
                        ("heading".into(), round(*heading, 0)),
                    ],
                    attrs: vec![
                        ("lat".into(), format!("{la:.6}")),
                        ("lon".into(), format!("{lo:.6}")),
                        ("vehicle".into(), format!("truck-{}", self.index)),
                    ],
                }
            }
            State::Template { template, values } => {
                let metrics = template
                    .metrics
                    .iter()
                    .zip(values.iter_mut())
                    .map(|((name, spec), last)| {
                        *last = spec.next(rng, *last);
                        (name.clone(), round(*last, 3))
                    })
                    .collect();
                let attrs = template
                    .attrs
                    .iter()
                    .map(|(k, v)| {
                        let v = v
                            .replace("{device}", &self.index.to_string())
                            .replace("{seq}", &self.seq.to_string());
                        (k.clone(), v)
                    })
                    .collect();
                Sample {
                    kind: template.kind.clone(),
                    metrics,
                    attrs,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric(s: &Sample, name: &str) -> f64 {
        s.metrics
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
            .unwrap()
    }

    #[test]
    fn a_meter_counter_never_goes_back_and_its_flags_are_boolean() {
        let mut m = Profile::SmartMeter.model(0, 7);
        let mut last = -1.0;
        for _ in 0..5_000 {
            let s = m.next_sample();
            let p = metric(&s, "pulse_counter");
            assert!(p >= last, "{p} < {last}");
            last = p;
            assert!([0.0, 1.0].contains(&metric(&s, "leakage")));
            assert!((5.0..=100.0).contains(&metric(&s, "battery_level")));
        }
    }

    #[test]
    fn env_readings_drift_but_stay_plausible() {
        let mut m = Profile::EnvSensor.model(3, 11);
        let first = metric(&m.next_sample(), "temperature");
        let mut prev = first;
        for _ in 0..20_000 {
            let s = m.next_sample();
            let t = metric(&s, "temperature");
            assert!((t - prev).abs() < 1.0, "jump {prev} -> {t}");
            assert!((10.0..35.0).contains(&t), "{t}");
            assert!((20.0..=80.0).contains(&metric(&s, "humidity")));
            assert!((400.0..=2500.0).contains(&metric(&s, "co2")));
            prev = t;
        }
    }

    #[test]
    fn a_tracker_moves_a_plausible_distance_per_event() {
        let mut m = Profile::GpsTracker.model(1, 5);
        let mut prev = m.next_sample();
        for _ in 0..1_000 {
            let s = m.next_sample();
            let d = (metric(&s, "lat") - metric(&prev, "lat")).abs()
                + (metric(&s, "lon") - metric(&prev, "lon")).abs();
            // 110 km/h for one second is about 0.0003 degrees (more in lon at 52°N).
            assert!(d < 0.002, "moved {d} degrees in one event");
            assert!((0.0..=110.0).contains(&metric(&s, "speed")));
            let lat_attr: f64 = s
                .attrs
                .iter()
                .find(|(k, _)| k == "lat")
                .unwrap()
                .1
                .parse()
                .unwrap();
            assert_eq!(lat_attr, metric(&s, "lat"));
            prev = s;
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_device() {
        let mut a = Profile::EnvSensor.model(0, 42);
        let mut b = Profile::EnvSensor.model(0, 42);
        for _ in 0..100 {
            assert_eq!(a.next_sample(), b.next_sample());
        }
    }

    #[test]
    fn templates_follow_their_specs() {
        let t = Template::parse(
            r#"{"type": "pump", "metrics": {"pressure": {"min": 1.0, "max": 3.5}, "rpm": 1450,
                "level": {"walk": [0, 100], "step": 2}, "runtime_s": {"counter": 5}},
                "attrs": {"serial": "pump-{device}", "n": "{seq}"}}"#,
        )
        .unwrap();
        let p = Profile::Template(t);
        assert_eq!(p.primary_metric(), "level");
        let mut m = p.model(9, 1);
        let mut runtime = 0.0;
        let mut level: Option<f64> = None;
        for i in 1..=500 {
            let s = m.next_sample();
            assert_eq!(s.kind, "pump");
            assert!((1.0..=3.5).contains(&metric(&s, "pressure")));
            assert_eq!(metric(&s, "rpm"), 1450.0);
            let r = metric(&s, "runtime_s");
            assert!(r >= runtime && r <= runtime + 5.0);
            runtime = r;
            let l = metric(&s, "level");
            assert!((0.0..=100.0).contains(&l));
            if let Some(prev) = level {
                assert!((l - prev).abs() <= 2.0 + 1e-9);
            }
            level = Some(l);
            assert!(s.attrs.contains(&("serial".into(), "pump-9".into())));
            assert!(s.attrs.contains(&("n".into(), i.to_string())));
        }
    }

    #[test]
    fn bad_templates_are_refused_with_a_reason() {
        for (text, why) in [
            (r#"{"type": "x", "metrics": {}}"#, "at least one metric"),
            (r#"{"type": "bad type", "metrics": {"a": 1}}"#, "type"),
            (r#"{"type": "x", "metrics": {"bad name": 1}}"#, "bad name"),
            (
                r#"{"type": "x", "metrics": {"a": {"min": 3, "max": 1}}}"#,
                "min <= max",
            ),
            (
                r#"{"type": "x", "metrics": {"a": 1}, "colour": 1}"#,
                "colour",
            ),
        ] {
            let err = Template::parse(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
        assert!(matches!(
            Profile::parse("toaster"),
            Err(ProfileError::Unknown(_))
        ));
    }
}
