//! The Prometheus text parser.

/// The value of one series in a Prometheus text page, e.g.
/// `iotpipe_events_rejected_total{source="mqtt",reason="invalid"}`: the labels given
/// must all match, in any order, and the page may carry more. Panics when no series
/// matches: every series of the contract exists from start-up.
pub fn metric(page: &str, series: &str) -> f64 {
    let split = |s: &str| match s.split_once('{') {
        Some((n, l)) => (n.to_owned(), Some(l.trim_end_matches('}').to_owned())),
        None => (s.to_owned(), None),
    };
    let (name, labels) = split(series);
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (kname, klabels) = split(key);
        if kname != name {
            continue;
        }
        let matches = match (&labels, &klabels) {
            (None, None) => true,
            (Some(want), Some(have)) => want.split(',').all(|w| have.split(',').any(|h| h == w)),
            _ => false,
        };
        if matches {
            return value.parse().unwrap();
        }
    }
    panic!("no series {series} in /metrics:\n{page}")
}
