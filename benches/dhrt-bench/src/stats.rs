//! Latency summaries in redis-benchmark's terms.

use std::time::Duration;

/// What one test measured.
#[derive(Debug)]
pub(crate) struct Summary {
    requests: usize,
    rps: f64,
    avg_ms: f64,
    min_ms: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    elapsed: Duration,
}

impl Summary {
    /// `batches` holds each batch's latency in microseconds and how many
    /// requests it carried (each request of a pipelined batch took the
    /// batch's time).
    pub(crate) fn of(mut batches: Vec<(u32, u32)>, elapsed: Duration) -> Summary {
        batches.sort_unstable();
        let ms = |us: u32| f64::from(us) / 1000.0;
        let n: u64 = batches.iter().map(|&(_, k)| u64::from(k)).sum();
        // The latency of the request at rank `rank` (from 0) in order.
        let at = |rank: u64| {
            let mut seen = 0;
            for &(us, k) in &batches {
                seen += u64::from(k);
                if rank < seen {
                    return ms(us);
                }
            }
            0.0
        };
        let pct = |p: f64| {
            if n == 0 {
                0.0
            } else {
                at(((n - 1) as f64 * p).round() as u64)
            }
        };
        let total_us: f64 = batches
            .iter()
            .map(|&(us, k)| f64::from(us) * f64::from(k))
            .sum();
        Summary {
            requests: n as usize,
            rps: n as f64 / elapsed.as_secs_f64(),
            avg_ms: if n == 0 {
                0.0
            } else {
                total_us / n as f64 / 1000.0
            },
            min_ms: batches.first().map_or(0.0, |&(us, _)| ms(us)),
            p50_ms: pct(0.50),
            p95_ms: pct(0.95),
            p99_ms: pct(0.99),
            max_ms: batches.last().map_or(0.0, |&(us, _)| ms(us)),
            elapsed,
        }
    }

    /// A row of `redis-benchmark --csv`.
    pub(crate) fn csv_row(&self, test: &str) -> String {
        format!(
            r#""{test}","{:.2}","{:.3}","{:.3}","{:.3}","{:.3}","{:.3}","{:.3}""#,
            self.rps, self.avg_ms, self.min_ms, self.p50_ms, self.p95_ms, self.p99_ms, self.max_ms
        )
    }

    /// The human report.
    pub(crate) fn report(&self, test: &str, setup: &str) -> String {
        format!(
            "====== {test} ======\n  {} requests completed in {:.2} seconds\n  {setup}\n  \
             throughput: {:.2} requests per second\n  latency (msec): avg {:.3}  min {:.3}  p50 {:.3}  p95 {:.3}  p99 {:.3}  max {:.3}\n",
            self.requests,
            self.elapsed.as_secs_f64(),
            self.rps,
            self.avg_ms,
            self.min_ms,
            self.p50_ms,
            self.p95_ms,
            self.p99_ms,
            self.max_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_the_csv_row() {
        let s = Summary::of(
            (1..=100).map(|i| (i * 1000, 1)).collect(),
            Duration::from_secs(2),
        );
        assert_eq!(s.requests, 100);
        assert_eq!(s.rps, 50.0);
        assert_eq!(
            (s.min_ms, s.p50_ms, s.p99_ms, s.max_ms),
            (1.0, 51.0, 99.0, 100.0)
        );
        assert_eq!(
            s.csv_row("SET"),
            r#""SET","50.00","50.500","1.000","51.000","95.000","99.000","100.000""#
        );
    }

    /// A batch of k requests counts k times, as k single requests would.
    #[test]
    fn a_batch_counts_once_per_request() {
        let batched = Summary::of(
            vec![(3000, 98), (1000, 1), (90_000, 1)],
            Duration::from_secs(1),
        );
        let single = Summary::of(
            std::iter::repeat_n((3000, 1), 98)
                .chain([(1000, 1), (90_000, 1)])
                .collect(),
            Duration::from_secs(1),
        );
        assert_eq!(batched.requests, 100);
        assert_eq!(
            (
                batched.min_ms,
                batched.p50_ms,
                batched.p99_ms,
                batched.max_ms,
                batched.avg_ms
            ),
            (
                single.min_ms,
                single.p50_ms,
                single.p99_ms,
                single.max_ms,
                single.avg_ms
            )
        );
        assert_eq!(
            (batched.p50_ms, batched.p99_ms, batched.max_ms),
            (3.0, 3.0, 90.0)
        );
    }
}
