//! Watch benchmark: write-to-event latency, and what watchers cost writers.
//!
//! * Latency: one connection writes `--rate` sets a second to `--write`;
//!   `--watchers` connections watch the collection on `--watch` (the same
//!   node, or another). Each value carries the time it was sent (ns since
//!   the run began, this process's monotonic clock), so every watcher
//!   measures write-to-event latency for every event it receives.
//! * Throughput (`--max-writes`): `--clients` connections pipelining
//!   `--pipeline` sets each, as fast as the node answers, for `--seconds`,
//!   with the watchers attached; run it with `--watchers 0` beside it for
//!   the ratio.
//!
//! Binary protocol only (`dhrt-proto`), like `dhrt-bench`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use clap::Parser;
use dhrt_proto::{
    DEFAULT_MAX_FRAME, Decoded, EventKind, Op, Reply, Request, Response, WatchRequest, WatchStart,
    decode_frame, encode_frame, preamble,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Parser)]
#[command(
    name = "dhrt-watch-bench",
    about = "Write-to-event latency and the cost of watchers"
)]
struct Args {
    /// The node written to.
    #[arg(long, default_value = "127.0.0.1:7453")]
    write: String,
    /// The node watched (the same or another).
    #[arg(long, default_value = "127.0.0.1:7453")]
    watch: String,
    /// Watch connections.
    #[arg(long, default_value_t = 1)]
    watchers: usize,
    /// Sets a second (latency mode).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long the writers run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Bytes per value (at least 8: the send time).
    #[arg(long, default_value_t = 64)]
    value_size: usize,
    /// Distinct keys written (round robin).
    #[arg(long, default_value_t = 10_000)]
    keyspace: u64,
    /// The collection.
    #[arg(long, default_value = "watchbench")]
    collection: String,
    /// Write as fast as possible instead of at `--rate`.
    #[arg(long)]
    max_writes: bool,
    /// Writer connections (with --max-writes).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Sets in flight per writer connection (with --max-writes).
    #[arg(long, default_value_t = 16)]
    pipeline: usize,
    /// The CPU priority (nice) of the threads reading the watches. They
    /// stand for clients on other machines; on the node's machine, at 0
    /// they take CPU from the writers being measured.
    #[arg(long, default_value_t = 0)]
    readers_nice: i32,
}

async fn connect(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_nodelay(true).unwrap();
    s.write_all(&preamble()).await.unwrap();
    s
}

async fn read_response(s: &mut TcpStream, buf: &mut BytesMut) -> Option<Response> {
    loop {
        match decode_frame::<Response>(buf, DEFAULT_MAX_FRAME) {
            Ok(Decoded::Complete { msg, len }) => {
                buf.advance(len);
                return Some(msg);
            }
            Ok(Decoded::Incomplete { needed }) => buf.reserve(needed.max(64 * 1024)),
            Err(e) => panic!("bad frame: {e}"),
        }
        if s.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

fn set_frame(out: &mut Vec<u8>, id: u64, collection: &str, key: u64, value: Bytes) {
    let request = Request {
        id,
        op: Op::Set {
            collection: collection.to_string(),
            key: Bytes::from(format!("k{key:08}")),
            value,
        },
    };
    encode_frame(&request, out, DEFAULT_MAX_FRAME).unwrap();
}

fn value(start: Instant, size: usize) -> Bytes {
    let mut v = vec![b'.'; size.max(8)];
    v[..8].copy_from_slice(&(start.elapsed().as_nanos() as u64).to_le_bytes());
    Bytes::from(v)
}

/// One watcher: its latencies (µs) and whether the node ended its watch.
async fn watcher(
    addr: String,
    collection: String,
    start: Instant,
    ready: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> (Vec<u32>, Option<String>) {
    let mut s = connect(&addr).await;
    let mut out = Vec::new();
    let request = Request {
        id: 1,
        op: Op::Watch(WatchRequest {
            collection,
            start: WatchStart::Now,
            prefix: None,
        }),
    };
    encode_frame(&request, &mut out, DEFAULT_MAX_FRAME).unwrap();
    s.write_all(&out).await.unwrap();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut lat = Vec::new();
    let mut counted = false;
    loop {
        let r = tokio::select! {
            r = read_response(&mut s, &mut buf) => r,
            _ = tokio::time::sleep(Duration::from_millis(200)), if stop.load(Ordering::Relaxed) => return (lat, None),
        };
        let Some(r) = r else {
            return (lat, Some("the node closed the watch".into()));
        };
        match r.result {
            Ok(Reply::Events(events)) => {
                if !counted {
                    counted = true;
                    ready.fetch_add(1, Ordering::Relaxed);
                }
                let now = start.elapsed().as_nanos() as u64;
                for e in events {
                    if e.kind == EventKind::Set
                        && let Some(v) = e.value
                        && v.len() >= 8
                    {
                        let sent = u64::from_le_bytes(v[..8].try_into().unwrap());
                        lat.push((now.saturating_sub(sent) / 1000).min(u64::from(u32::MAX)) as u32);
                    }
                }
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => return (lat, Some(e.message)),
        }
    }
}

/// Writes at `rate` a second for `seconds`; returns how many.
async fn paced_writer(args: Arc<Args>, start: Instant) -> u64 {
    let mut s = connect(&args.write).await;
    let mut buf = BytesMut::new();
    let total = args.rate * args.seconds;
    let every = Duration::from_nanos(1_000_000_000 / args.rate.max(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut out = Vec::new();
    for i in 0..total {
        tick.tick().await;
        out.clear();
        set_frame(
            &mut out,
            i,
            &args.collection,
            i % args.keyspace,
            value(start, args.value_size),
        );
        s.write_all(&out).await.unwrap();
        let r = read_response(&mut s, &mut buf).await.expect("an answer");
        assert!(r.result.is_ok(), "{:?}", r.result);
    }
    total
}

/// Writes as fast as the node answers, `pipeline` in flight; returns how
/// many completed before `until`.
async fn fast_writer(args: Arc<Args>, start: Instant, until: Instant, n: u64) -> u64 {
    let mut s = connect(&args.write).await;
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut done = 0u64;
    let mut id = 0u64;
    while Instant::now() < until {
        out.clear();
        for _ in 0..args.pipeline {
            id += 1;
            let key = (n * 1_000_003 + id) % args.keyspace;
            set_frame(
                &mut out,
                id,
                &args.collection,
                key,
                value(start, args.value_size),
            );
        }
        s.write_all(&out).await.unwrap();
        for _ in 0..args.pipeline {
            let r = read_response(&mut s, &mut buf).await.expect("an answer");
            assert!(r.result.is_ok(), "{:?}", r.result);
            done += 1;
        }
    }
    done
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    f64::from(sorted[((sorted.len() - 1) as f64 * p).round() as usize]) / 1000.0
}

fn main() {
    let args = Arc::new(Args::parse());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // The watchers' readers on a runtime of their own, so that the writers
    // here are not queued behind a thousand reading tasks.
    let nice = args.readers_nice;
    let readers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(move || {
            if nice != 0 {
                // SAFETY: plain integers; PRIO_PROCESS 0 is this thread.
                #[allow(unsafe_code)]
                let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
            }
        })
        .enable_all()
        .build()
        .unwrap();
    let readers = readers.handle().clone();
    rt.block_on(async move {
        let start = Instant::now();
        let ready = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut watchers = Vec::new();
        for _ in 0..args.watchers {
            watchers.push(readers.spawn(watcher(
                args.watch.clone(),
                args.collection.clone(),
                start,
                ready.clone(),
                stop.clone(),
            )));
            if watchers.len() % 100 == 0 {
                tokio::task::yield_now().await;
            }
        }
        // Every watch open (its first event, the start token, arrived).
        let deadline = Instant::now() + Duration::from_secs(30);
        while ready.load(Ordering::Relaxed) < args.watchers as u64 {
            assert!(
                Instant::now() < deadline,
                "{} of {} watches opened",
                ready.load(Ordering::Relaxed),
                args.watchers
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let began = Instant::now();
        let writes = if args.max_writes {
            let until = began + Duration::from_secs(args.seconds);
            let tasks: Vec<_> = (0..args.clients as u64)
                .map(|n| tokio::spawn(fast_writer(args.clone(), start, until, n)))
                .collect();
            let mut total = 0;
            for t in tasks {
                total += t.await.unwrap();
            }
            total
        } else {
            paced_writer(args.clone(), start).await
        };
        let write_secs = began.elapsed().as_secs_f64();
        // Let the last events arrive.
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        let mut closed = Vec::new();
        for w in watchers {
            let (lat, ended) = w.await.unwrap();
            all.extend(lat);
            closed.extend(ended);
        }
        all.sort_unstable();
        let expected = writes * args.watchers as u64;
        println!(
            "writes: {writes} in {write_secs:.2} s = {:.0}/s ({} mode, {}-byte values)",
            writes as f64 / write_secs,
            if args.max_writes { "max" } else { "paced" },
            args.value_size
        );
        if args.watchers > 0 {
            println!(
                "watchers: {} on {} (writes to {}); events delivered {} of {} expected ({:.2}%), {:.0} events/s",
                args.watchers,
                args.watch,
                args.write,
                all.len(),
                expected,
                100.0 * all.len() as f64 / expected.max(1) as f64,
                all.len() as f64 / write_secs
            );
            println!(
                "write-to-event latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                pct(&all, 0.50),
                pct(&all, 0.90),
                pct(&all, 0.99),
                pct(&all, 0.999),
                pct(&all, 1.0)
            );
            if !closed.is_empty() {
                println!("watches ended by the node: {} (first: {})", closed.len(), closed[0]);
            }
        }
    });
}
