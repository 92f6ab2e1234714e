//! Side-by-side storage benchmark: dhrt-storage, redb, fjall and sled on the
//! same workload, each engine in its own process so peak RSS is its own.
//!
//! Workload (per engine): N sets of 16-byte keys with 100-byte values in one
//! thread; N random gets; N operations of a 90/10 get/set mix on 2 threads;
//! close; on-disk size; reopen time; heap and peak RSS.
//!
//! Usage: `dhrt-storage-bench [--n 1000000] [--engines dhrt,redb,fjall,sled] [--dir DIR]`

mod alloc;
mod engines;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use engines::open_engine;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

const VALUE_LEN: usize = 100;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The i-th key: 16 bytes of hex, in a scrambled order.
fn key(i: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    let h = splitmix(i);
    for (j, b) in k.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[((h >> (j * 4)) & 15) as usize];
    }
    k
}

fn value(i: u64) -> [u8; VALUE_LEN] {
    let mut v = [0u8; VALUE_LEN];
    let mut h = i;
    for chunk in v.chunks_mut(8) {
        h = splitmix(h);
        chunk.copy_from_slice(&h.to_le_bytes()[..chunk.len()]);
    }
    v
}

fn dir_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            dir_size(&entry.path())
        } else {
            meta.blocks() * 512
        };
    }
    total
}

fn peak_rss_kib() -> i64 {
    // SAFETY: getrusage fills the struct we pass; all-zero is a valid start.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage struct.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss
}

fn child(engine_name: &str, n: u64, dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let heap_before = alloc::current();
    let engine = open_engine(engine_name, dir);

    // 1. Load: N sets, one thread.
    let start = Instant::now();
    let mut batch = Vec::with_capacity(1000);
    for i in 0..n {
        batch.push((key(i), value(i)));
        if batch.len() == 1000 {
            engine.set_batch(&batch);
            batch.clear();
        }
    }
    engine.set_batch(&batch);
    let set_secs = start.elapsed().as_secs_f64();
    let heap_after_load = alloc::current();

    // 2. Random gets, one thread.
    let mut rng = 0x1234_5678u64;
    let start = Instant::now();
    let mut found = 0u64;
    let mut checksum = 0u64;
    for _ in 0..n {
        rng = splitmix(rng);
        let i = rng % n;
        if let Some(b) = engine.get(&key(i)) {
            found += 1;
            checksum = checksum.wrapping_add(b as u64);
        }
    }
    let get_secs = start.elapsed().as_secs_f64();
    assert_eq!(found, n, "{engine_name}: missing keys");

    // 3. 90/10 get/set mix on two threads.
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let engine = &engine;
            s.spawn(move || {
                let mut rng = 0xdead_beef ^ t;
                let mut sets = 0u64;
                for _ in 0..n / 2 {
                    rng = splitmix(rng);
                    let i = rng % n;
                    if (rng >> 32) % 10 == 0 {
                        engine.set_one(&key(i), &value(i + 1), sets);
                        sets += 1;
                    } else {
                        std::hint::black_box(engine.get(&key(i)));
                    }
                }
            });
        }
    });
    let mix_secs = start.elapsed().as_secs_f64();
    engine.close();
    drop(engine);
    let disk = dir_size(dir);

    // 4. Reopen until the first get answers.
    let start = Instant::now();
    let engine = open_engine(engine_name, dir);
    assert!(engine.get(&key(0)).is_some());
    let reopen_secs = start.elapsed().as_secs_f64();
    drop(engine);

    let nf = n as f64;
    println!(
        "RESULT engine={engine_name} n={n} sets_per_s={:.0} gets_per_s={:.0} mix_ops_per_s={:.0} reopen_ms={:.0} disk_mib={:.1} heap_per_key={:.1} peak_rss_mib={:.1} checksum={checksum}",
        nf / set_secs,
        nf / get_secs,
        (n / 2 * 2) as f64 / mix_secs,
        reopen_secs * 1000.0,
        disk as f64 / (1 << 20) as f64,
        heap_after_load.saturating_sub(heap_before) as f64 / nf,
        peak_rss_kib() as f64 / 1024.0,
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut n = 1_000_000u64;
    let mut engines = "dhrt,redb,fjall,sled".to_string();
    let mut dir = std::env::temp_dir().join("dhrt-storage-bench");
    let mut child_engine = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--n" => n = args.next().unwrap().parse().unwrap(),
            "--engines" => engines = args.next().unwrap(),
            "--dir" => dir = PathBuf::from(args.next().unwrap()),
            "--child" => child_engine = args.next(),
            "-h" | "--help" => {
                println!("dhrt-storage-bench [--n N] [--engines dhrt,redb,fjall,sled] [--dir DIR]");
                return;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    if let Some(engine) = child_engine {
        child(&engine, n, &dir);
        return;
    }
    let exe = std::env::current_exe().unwrap();
    println!(
        "| engine | sets/s | random gets/s | 90/10 mix ops/s (2 threads) | reopen ms | disk MiB | heap B/key | peak RSS MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for engine in engines.split(',') {
        let out = Command::new(&exe)
            .args(["--child", engine, "--n", &n.to_string(), "--dir"])
            .arg(dir.join(engine))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Some(line) = stdout.lines().find(|l| l.starts_with("RESULT ")) else {
            eprintln!("{engine} failed: {}", String::from_utf8_lossy(&out.stderr));
            continue;
        };
        let field = |name: &str| {
            line.split(' ')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .unwrap_or("?")
                .to_string()
        };
        println!(
            "| {engine} | {} | {} | {} | {} | {} | {} | {} |",
            field("sets_per_s"),
            field("gets_per_s"),
            field("mix_ops_per_s"),
            field("reopen_ms"),
            field("disk_mib"),
            field("heap_per_key"),
            field("peak_rss_mib"),
        );
        let _ = std::fs::remove_dir_all(dir.join(engine));
    }
}
