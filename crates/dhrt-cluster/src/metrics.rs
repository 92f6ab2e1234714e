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

/// Every series once: one shard of the metrics.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    series: [[Series; OUTCOMES.len()]; OPS.len()],
}

/// Shards of the counters: each thread counts into its own, so threads
/// answering requests at the same time do not fight over cache lines;
/// rendering adds the shards up.
const SHARDS: usize = 8;

/// The shard of the calling thread (threads are dealt shards in turn).
fn shard_index() -> usize {
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    MINE.with(|i| *i)
}

/// The node's request metrics.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    shards: [Shard; SHARDS],
}

/// One series summed over the shards.
#[derive(Default)]
struct Summed {
    buckets: [u64; BUCKETS.len() + 1],
    count: u64,
    sum_ns: u64,
}

impl Metrics {
    /// Records one operation (`n` requests of it, for batched sets).
    pub(crate) fn record(&self, op: OpKind, outcome: Outcome, took: Duration, n: u64) {
        let o = OPS.iter().position(|(k, _)| *k == op).unwrap();
        let i = OUTCOMES.iter().position(|(k, _)| *k == outcome).unwrap();
        let s = &self.shards[shard_index()].series[o][i];
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

    fn summed(&self, o: usize, i: usize) -> Summed {
        let mut total = Summed::default();
        for shard in &self.shards {
            let s = &shard.series[o][i];
            for (t, b) in total.buckets.iter_mut().zip(&s.buckets) {
                *t += b.load(Ordering::Relaxed);
            }
            total.count += s.count.load(Ordering::Relaxed);
            total.sum_ns += s.sum_ns.load(Ordering::Relaxed);
        }
        total
    }

    /// The request series in Prometheus text format.
    pub(crate) fn render(&self, out: &mut String) {
        out.push_str("# HELP dhrt_request_duration_seconds Time to answer requests, by operation and outcome.\n");
        out.push_str("# TYPE dhrt_request_duration_seconds histogram\n");
        for (o, (_, op)) in OPS.iter().enumerate() {
            for (i, (_, outcome)) in OUTCOMES.iter().enumerate() {
                let s = self.summed(o, i);
                let count = s.count;
                let labels = format!("op=\"{op}\",outcome=\"{outcome}\"");
                let mut cumulative = 0;
                for (b, le) in BUCKETS.iter().enumerate() {
                    cumulative += s.buckets[b];
                    let _ = writeln!(
                        out,
                        "dhrt_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                    );
                }
                cumulative += s.buckets[BUCKETS.len()];
                let _ = writeln!(
                    out,
                    "dhrt_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
                );
                let sum = s.sum_ns as f64 / 1e9;
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
                let count = self.summed(o, i).count;
                let _ = writeln!(
                    out,
                    "dhrt_requests_total{{op=\"{op}\",outcome=\"{outcome}\"}} {count}"
                );
            }
        }
    }
}

/// A per-collection gauge: name, help, and how to read it.
type Gauge = (
    &'static str,
    &'static str,
    fn(&dhrt_storage::CollectionStats) -> u64,
);

/// The store's gauges, the build and the uptime, in the Prometheus text
/// format.
pub(crate) fn render_store(
    out: &mut String,
    stats: &dhrt_storage::Stats,
    uptime: std::time::Duration,
) {
    use std::fmt::Write as _;
    let gauges: [Gauge; 2] = [
        ("dhrt_collection_keys", "Live keys per collection.", |c| {
            c.keys
        }),
        ("dhrt_collection_bytes", "Log bytes per collection.", |c| {
            c.bytes
        }),
    ];
    let counters: [Gauge; 1] = [(
        "dhrt_collection_damaged_records_total",
        "Records that failed their checksum since the collection was opened (each one's key answers damaged until a replica's copy is applied).",
        |c| c.damaged_records,
    )];
    let kinds = gauges.map(|g| (g, "gauge")).into_iter();
    for ((name, help, value), kind) in kinds.chain(counters.map(|g| (g, "counter"))) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for c in stats
            .collections
            .iter()
            .filter(|c| !c.name.starts_with('_'))
        {
            let _ = writeln!(out, "{name}{{collection=\"{}\"}} {}", c.name, value(c));
        }
    }
    out.push_str("# HELP dhrt_build_info The running build.\n# TYPE dhrt_build_info gauge\n");
    let _ = writeln!(
        out,
        "dhrt_build_info{{version=\"{}\",mode=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        stats.mode
    );
    out.push_str(
        "# HELP dhrt_uptime_seconds Seconds since the node started.\n# TYPE dhrt_uptime_seconds gauge\n",
    );
    let _ = writeln!(out, "dhrt_uptime_seconds {}", uptime.as_secs());
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

    #[test]
    fn counts_from_many_threads_add_up_across_shards() {
        let m = Metrics::default();
        std::thread::scope(|s| {
            for _ in 0..2 * SHARDS + 1 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        m.record(OpKind::Set, Outcome::Ok, Duration::from_micros(70), 2);
                    }
                });
            }
        });
        let total = 2 * (2 * SHARDS as u64 + 1) * 1000;
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains(&format!(
            r#"dhrt_request_duration_seconds_bucket{{op="set",outcome="ok",le="0.0001"}} {total}"#
        )));
        assert!(out.contains(&format!(
            r#"dhrt_requests_total{{op="set",outcome="ok"}} {total}"#
        )));
        let sum: f64 = out
            .lines()
            .find_map(|l| {
                l.strip_prefix(r#"dhrt_request_duration_seconds_sum{op="set",outcome="ok"} "#)
            })
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - total as f64 * 70e-6).abs() < 1e-9, "{sum}");
    }
}
