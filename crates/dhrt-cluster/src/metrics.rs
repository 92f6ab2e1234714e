//! Request metrics, recorded lock-free on every operation and rendered in
//! the Prometheus text format for `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Operations that are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Get,
    Set,
    Delete,
    List,
    Drop,
}

const OPS: [(OpKind, &str); 5] = [
    (OpKind::Get, "get"),
    (OpKind::Set, "set"),
    (OpKind::Delete, "delete"),
    (OpKind::List, "list"),
    (OpKind::Drop, "drop"),
];

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Done (a get that found its key, a delete that removed one).
    Ok,
    /// A get or delete that found no key.
    Miss,
    /// Refused or failed.
    Error,
}

const OUTCOMES: [(Outcome, &str); 3] = [
    (Outcome::Ok, "ok"),
    (Outcome::Miss, "miss"),
    (Outcome::Error, "error"),
];

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5,
];

#[derive(Debug, Default)]
struct Series {
    /// Per bucket (not cumulative), then one for +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// The node's request metrics.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    series: [[Series; OUTCOMES.len()]; OPS.len()],
}

impl Metrics {
    /// Records one operation (`n` requests of it, for batched sets).
    pub(crate) fn record(&self, op: OpKind, outcome: Outcome, took: Duration, n: u64) {
        let o = OPS.iter().position(|(k, _)| *k == op).unwrap();
        let i = OUTCOMES.iter().position(|(k, _)| *k == outcome).unwrap();
        let s = &self.series[o][i];
        let secs = took.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        s.buckets[bucket].fetch_add(n, Ordering::Relaxed);
        s.count.fetch_add(n, Ordering::Relaxed);
        s.sum_ns
            .fetch_add(took.as_nanos() as u64 * n, Ordering::Relaxed);
    }

    /// The request series in Prometheus text format.
    pub(crate) fn render(&self, out: &mut String) {
        out.push_str("# HELP dhrt_request_duration_seconds Time to answer requests, by operation and outcome.\n");
        out.push_str("# TYPE dhrt_request_duration_seconds histogram\n");
        for (o, (_, op)) in OPS.iter().enumerate() {
            for (i, (_, outcome)) in OUTCOMES.iter().enumerate() {
                let s = &self.series[o][i];
                let count = s.count.load(Ordering::Relaxed);
                let labels = format!("op=\"{op}\",outcome=\"{outcome}\"");
                let mut cumulative = 0;
                for (b, le) in BUCKETS.iter().enumerate() {
                    cumulative += s.buckets[b].load(Ordering::Relaxed);
                    let _ = writeln!(
                        out,
                        "dhrt_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                    );
                }
                cumulative += s.buckets[BUCKETS.len()].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "dhrt_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
                );
                let sum = s.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
                let _ = writeln!(out, "dhrt_request_duration_seconds_sum{{{labels}}} {sum}");
                let _ = writeln!(
                    out,
                    "dhrt_request_duration_seconds_count{{{labels}}} {count}"
                );
            }
        }
        out.push_str("# HELP dhrt_requests_total Requests answered, by operation and outcome.\n");
        out.push_str("# TYPE dhrt_requests_total counter\n");
        for (o, (_, op)) in OPS.iter().enumerate() {
            for (i, (_, outcome)) in OUTCOMES.iter().enumerate() {
                let count = self.series[o][i].count.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "dhrt_requests_total{{op=\"{op}\",outcome=\"{outcome}\"}} {count}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_counts_add_up() {
        let m = Metrics::default();
        m.record(OpKind::Get, Outcome::Ok, Duration::from_micros(30), 1);
        m.record(OpKind::Get, Outcome::Ok, Duration::from_millis(3), 2);
        m.record(OpKind::Set, Outcome::Error, Duration::from_secs(5), 1);
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains(
                r#"dhrt_request_duration_seconds_bucket{op="get",outcome="ok",le="0.00005"} 1"#
            ),
            "{out}"
        );
        assert!(out.contains(
            r#"dhrt_request_duration_seconds_bucket{op="get",outcome="ok",le="0.005"} 3"#
        ));
        assert!(out.contains(
            r#"dhrt_request_duration_seconds_bucket{op="get",outcome="ok",le="+Inf"} 3"#
        ));
        assert!(out.contains(
            r#"dhrt_request_duration_seconds_bucket{op="set",outcome="error",le="2.5"} 0"#
        ));
        assert!(out.contains(
            r#"dhrt_request_duration_seconds_bucket{op="set",outcome="error",le="+Inf"} 1"#
        ));
        assert!(out.contains(r#"dhrt_requests_total{op="get",outcome="ok"} 3"#));
        assert!(out.contains(r#"dhrt_requests_total{op="delete",outcome="miss"} 0"#));
    }
}
