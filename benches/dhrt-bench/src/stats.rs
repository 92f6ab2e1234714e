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
    pub(crate) fn of(mut micros: Vec<u32>, elapsed: Duration) -> Summary {
        micros.sort_unstable();
        let ms = |us: u32| f64::from(us) / 1000.0;
        let pct = |p: f64| {
            if micros.is_empty() {
                0.0
            } else {
                ms(micros[((micros.len() - 1) as f64 * p).round() as usize])
            }
        };
        let n = micros.len();
        Summary {
            requests: n,
            rps: n as f64 / elapsed.as_secs_f64(),
            avg_ms: if n == 0 {
                0.0
            } else {
                micros.iter().map(|&u| f64::from(u)).sum::<f64>() / n as f64 / 1000.0
            },
            min_ms: micros.first().map_or(0.0, |&u| ms(u)),
            p50_ms: pct(0.50),
            p95_ms: pct(0.95),
            p99_ms: pct(0.99),
            max_ms: micros.last().map_or(0.0, |&u| ms(u)),
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
            (1..=100).map(|i| i * 1000).collect(),
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
}
