//! `dhrtd`, the dhrt node daemon: reads its configuration, opens the store,
//! serves HTTP and the binary protocol on one endpoint, and on SIGINT,
//! SIGTERM, SIGHUP or SIGQUIT stops accepting, finishes the requests in
//! flight, flushes, and exits 0. The logic lives in the library crates.

mod config;
mod listener;

use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use dhrt_cluster::{BinaryLimits, Cluster, ClusterOptions, Identity, Node};
use dhrt_storage::{Options, Store, SyncMode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Args, Config, Sync};

fn main() -> ExitCode {
    let config = match Config::load(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dhrtd: {e:#}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.json_logs);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dhrtd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("dhrtd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DHRT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A random 64-bit id (std's hasher keys come from the OS's randomness).
fn random_id() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// The node id kept in `<data-dir>/node.id`, created on first start.
fn node_id(dir: &Path) -> anyhow::Result<u64> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("node.id");
    match std::fs::read_to_string(&path) {
        Ok(text) => u64::from_str_radix(text.trim(), 16)
            .with_context(|| format!("{} is not a node id", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = random_id();
            let tmp = dir.join("node.id.tmp");
            std::fs::write(&tmp, format!("{id:016x}\n"))
                .and_then(|()| std::fs::rename(&tmp, &path))?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

async fn signalled() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut hup = signal(SignalKind::hangup()).expect("install SIGHUP handler");
    let mut quit = signal(SignalKind::quit()).expect("install SIGQUIT handler");
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
        _ = quit.recv() => "SIGQUIT",
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let sync = match config.sync {
        Sync::Always => SyncMode::Always,
        Sync::Interval => SyncMode::Interval(Duration::from_secs(1)),
        Sync::Never => SyncMode::Never,
    };
    let (store, id) = if config.memory {
        let id = random_id();
        (
            Store::memory(Options {
                sync,
                node_id: id,
                tombstone_grace: config.tombstone_grace,
                clock_offset_ms: config.clock_offset_ms,
                ..Options::default()
            }),
            id,
        )
    } else {
        let id = node_id(&config.data_dir)?;
        let options = Options {
            sync,
            node_id: id,
            tombstone_grace: config.tombstone_grace,
            clock_offset_ms: config.clock_offset_ms,
            ..Options::default()
        };
        let store = Store::open(&config.data_dir, options)
            .with_context(|| format!("opening the data directory {}", config.data_dir.display()))?;
        for r in store.recovery().iter().filter(|r| r.truncated_bytes > 0) {
            tracing::warn!(collection = %r.collection, bytes = r.truncated_bytes, "cut a torn tail during recovery");
        }
        for r in store.recovery().iter().filter(|r| r.reserved_bytes > 0) {
            tracing::info!(collection = %r.collection, bytes = r.reserved_bytes, "gave back reserved space");
        }
        (store, id)
    };
    let cluster = Cluster::new(
        store.clone(),
        Identity {
            id,
            name: config.name.clone(),
            addr: config.advertise.clone(),
        },
        ClusterOptions {
            write_ack: config.write_ack,
            timeout: config.timeout,
            secret: config.cluster_secret.clone(),
            collections: config.collections.clone(),
            seeds: config.seeds.clone(),
            state_file: (!config.memory).then(|| config.data_dir.join("cluster.state")),
            max_hints: config.max_hints,
            max_clock_ahead: config.max_clock_offset,
            ..ClusterOptions::default()
        },
    );
    let node = Arc::new(Node::new(cluster.clone()));
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    if !config.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %config.listen,
            "LISTENING ON A NON-LOOPBACK ADDRESS: anyone who can reach it can read and write every key"
        );
        if config.cluster_secret.is_none() {
            tracing::warn!(
                listen = %config.listen,
                "NO CLUSTER SECRET ON A NON-LOOPBACK ADDRESS: anyone who can reach this port can join the cluster and replicate writes into it; set --cluster-secret"
            );
        }
    }
    let servers = Arc::new(listener::Servers {
        node: node.clone(),
        http: dhrt_http::Api::new(node.clone(), dhrt_http::Limits::default()),
        binary: BinaryLimits::default(),
        first_byte_timeout: Duration::from_secs(10),
    });
    tracing::info!(
        listen = %config.listen,
        id = %format!("{id:016x}"),
        name = %config.name,
        mode = if config.memory { "memory" } else { "persisted" },
        data_dir = %config.data_dir.display(),
        sync = ?config.sync,
        "dhrtd is serving"
    );
    cluster.start();
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        let which = signalled().await;
        tracing::info!(
            signal = which,
            "shutting down: finishing requests in flight"
        );
        trigger.cancel();
    });
    listener::run(
        listener,
        servers,
        config.max_connections,
        shutdown,
        config.shutdown_grace,
    )
    .await;
    node.store().sync().context("final flush")?;
    cluster.leave().await;
    tracing::info!("told the cluster this node is leaving");
    tracing::info!("flushed; exiting");
    Ok(())
}
