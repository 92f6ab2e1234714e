//! `dhrt-bench`: load for a dhrt node over the binary protocol, with the
//! flags and CSV columns of `redis-benchmark`, so the two can be run side by
//! side:
//!
//! ```sh
//! dhrt-bench      --addr 127.0.0.1:7453 -t set,get -n 100000 -c 50 -d 100 -r 100000 -P 16 --csv
//! redis-benchmark -h 127.0.0.1 -p 6379  -t set,get -n 100000 -c 50 -d 100 -r 100000 -P 16 --csv
//! ```
//!
//! `-c` connections each send `-P` requests in one write and wait for all
//! their answers before sending more (redis-benchmark's pipelining); keys
//! are `key:NNNNNNNNNNNN` with a random number below `-r` (or
//! `key:__rand_int__` without `-r`), values `-d` bytes. Latency is per
//! request, from the write to the answer of its batch.
//!
//! Like redis-benchmark, each connection encodes one request and patches
//! the id and the key digits into it per request (`load.rs`); every answer
//! is decoded and checked, and any refusal stops the run with exit code 2.

mod load;
mod stats;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

use crate::load::{Connection, Kind, MAX_DEPTH, Template};
use crate::stats::Summary;

/// Load generator for dhrt (redis-benchmark's flags).
#[derive(Debug, Parser)]
#[command(name = "dhrt-bench", version, disable_help_flag = true)]
struct Args {
    /// The node.
    #[arg(long, env = "DHRT_ADDR", default_value = "127.0.0.1:7453")]
    addr: String,
    /// Tests to run, comma-separated: set, get.
    #[arg(short = 't', default_value = "set,get")]
    tests: String,
    /// Total requests per test.
    #[arg(short = 'n', default_value_t = 100_000)]
    requests: u64,
    /// Parallel connections.
    #[arg(short = 'c', default_value_t = 50)]
    clients: u64,
    /// Value size in bytes.
    #[arg(short = 'd', default_value_t = 3)]
    data_size: usize,
    /// Random keys below this number (0: one fixed key; at most 10^12).
    #[arg(short = 'r', default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000_000_000))]
    keyspace: u64,
    /// Walk the keyspace in order instead of at random: request i uses key
    /// i modulo -r, so `-n N -r N --sequential` writes N distinct keys
    /// (for loading a node).
    #[arg(long)]
    sequential: bool,
    /// Requests in flight per connection (1 to 250).
    #[arg(short = 'P', default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=MAX_DEPTH))]
    pipeline: u64,
    /// The collection to use.
    #[arg(long, default_value = "bench")]
    collection: String,
    /// Authenticate every connection with this token first.
    #[arg(long, env = "DHRT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Speak TLS, trusting this CA (PEM) for the node's certificate.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<String>,
    /// Print CSV like redis-benchmark --csv.
    #[arg(long)]
    csv: bool,
    /// Speak Redis's protocol (RESP) to a Redis server at --addr, so that
    /// Redis is measured with this very client and load (--sequential
    /// included; the collection is ignored).
    #[arg(long, conflicts_with_all = ["token", "tls_ca"])]
    redis: bool,
    /// Client threads (like redis-benchmark --threads; it, too, uses one by
    /// default).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print each batch slower than this many ms to stderr, with the
    /// time it was sent (to line stalls up with the server's log).
    #[arg(long, value_name = "MS")]
    report_slow_ms: Option<u64>,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Test {
    Set,
    Get,
}

impl Test {
    fn name(self) -> &'static str {
        match self {
            Test::Set => "SET",
            Test::Get => "GET",
        }
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Runs one test; returns every batch's latency in microseconds with its
/// number of requests, and the wall time.
async fn run(
    args: &Args,
    test: Test,
    connections: Vec<Connection>,
) -> Result<(Vec<(u32, u32)>, Duration, Vec<Connection>), String> {
    let issued = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let kind = match test {
        Test::Set => Kind::Set,
        Test::Get => Kind::Get,
    };
    let value = vec![b'x'; args.data_size];
    let template = Arc::new(if args.redis {
        Template::resp(kind, &value)
    } else {
        Template::new(kind, &args.collection, &value)
    });
    let started = Instant::now();
    let progress = (!args.csv).then(|| {
        let done = done.clone();
        let total = args.requests;
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let n = done.load(Ordering::Relaxed);
                let now = Instant::now();
                let rps = (n - last.1) as f64 / (now - last.0).as_secs_f64();
                eprint!("\r{}: rps={rps:.1} ({n}/{total})          ", test.name());
                last = (now, n);
            }
        })
    });
    let mut tasks = Vec::new();
    let clients = connections.len().max(1);
    for (c, mut connection) in connections.into_iter().enumerate() {
        let (issued, done, template) = (issued.clone(), done.clone(), template.clone());
        let sequential = args.sequential;
        let slow_us = args.report_slow_ms.map(|ms| ms * 1000);
        let (keyspace, total, depth) = (args.keyspace, args.requests, args.pipeline);
        let share = (total.div_ceil(depth) as usize / clients) * 2 + 1024;
        let mut rng = splitmix(c as u64);
        tasks.push(tokio::spawn(async move {
            // Room for twice this connection's share of the batches, taken
            // up front: growing it by copying stalls every connection this
            // thread serves (25 ms, copying 10M latencies one per request,
            // which was then measured as the server's).
            let mut latencies = Vec::with_capacity(share);
            loop {
                // Claim up to `depth` of the remaining requests and send them
                // in one write, as redis-benchmark -P does.
                let start = issued.fetch_add(depth, Ordering::Relaxed);
                if start >= total {
                    break;
                }
                let n = depth.min(total - start);
                let keys = (0..n).map(|i| {
                    if keyspace == 0 {
                        None
                    } else if sequential {
                        Some((start + i) % keyspace)
                    } else {
                        rng = splitmix(rng);
                        Some(rng % keyspace)
                    }
                });
                let t = connection.batch(&template, kind, keys).await?;
                let us = t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                if slow_us.is_some_and(|s| u64::from(us) > s) {
                    let sent = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .saturating_sub(Duration::from_micros(us.into()));
                    eprintln!(
                        "slow: sent at {:.3} s (Unix), {:.1} ms",
                        sent.as_secs_f64(),
                        f64::from(us) / 1000.0
                    );
                }
                latencies.push((us, n as u32));
                done.fetch_add(n, Ordering::Relaxed);
            }
            Ok::<_, String>((latencies, connection))
        }));
    }
    let mut all = Vec::with_capacity(args.requests.div_ceil(args.pipeline) as usize);
    let mut connections = Vec::with_capacity(tasks.len());
    let mut failed = None;
    for t in tasks {
        match t.await.expect("a load task panicked") {
            Ok((latencies, connection)) => {
                all.extend(latencies);
                connections.push(connection);
            }
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    let elapsed = started.elapsed();
    if let Some(p) = progress {
        p.abort();
        eprint!("\r{:60}\r", "");
    }
    match failed {
        Some(e) => Err(e),
        None => Ok((all, elapsed, connections)),
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let tests: Vec<Test> = match args
        .tests
        .split(',')
        .map(|t| match t.trim().to_ascii_lowercase().as_str() {
            "set" => Ok(Test::Set),
            "get" => Ok(Test::Get),
            other => Err(format!("unknown test {other:?} (known: set, get)")),
        })
        .collect()
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("dhrt-bench: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .expect("runtime");
    let result = runtime.block_on(async {
        let dial = load::Dial {
            addr: args.addr.clone(),
            tls: args.tls_ca.as_deref().map(load::tls_config).transpose()?,
            token: args.token.clone(),
            resp: args.redis,
        };
        let mut connections = Vec::new();
        for _ in 0..args.clients.max(1) {
            connections.push(Connection::open(&dial).await?);
        }
        if args.csv {
            println!(r#""test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms""#);
        }
        for test in tests {
            let (latencies, elapsed, back) = run(&args, test, connections).await?;
            connections = back;
            let s = Summary::of(latencies, elapsed);
            if args.csv {
                println!("{}", s.csv_row(test.name()));
            } else {
                println!("{}", s.report(test.name(), &args_line(&args)));
            }
            let _ = std::io::stdout().flush();
        }
        Ok::<_, String>(())
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dhrt-bench: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn args_line(a: &Args) -> String {
    format!(
        "{} requests, {} connections, {} in flight each, {}-byte values, keyspace {}",
        a.requests, a.clients, a.pipeline, a.data_size, a.keyspace
    )
}
