//! `dhrtd`, the dhrt node daemon: reads its configuration, opens the store,
//! serves HTTP and the binary protocol on one endpoint, re-reads its auth
//! file on SIGHUP, and on SIGINT, SIGTERM or SIGQUIT stops accepting,
//! finishes the requests in flight, flushes, and exits 0. The logic lives in
//! the library crates.

mod alloc;
mod config;
mod listener;
mod tls;

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

use crate::config::{Args, Auth, Config, Sync};
use dhrt_proto::Access;

fn main() -> ExitCode {
    alloc::no_huge_pages();
    private_files();
    let args = Args::parse();
    if let Err(before) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        // Versions are stamped with the time, and the HTTP server's Date
        // header (hyper) panics on such a time, failing every request.
        eprintln!(
            "dhrtd: the system clock reads {} s before 1970: set the clock (NTP) and start again",
            before.duration().as_secs_f64().ceil()
        );
        return ExitCode::FAILURE;
    }
    let config = match Config::load(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dhrtd: {e:#}");
            return ExitCode::from(2);
        }
    };
    let access = match &config.auth {
        Auth::LoopbackOnly => Access::loopback_only(),
        Auth::Open => Access::open(),
        Auth::File(path) => match config::read_tokens(path) {
            Ok(tokens) => Access::tokens(tokens),
            Err(e) => {
                eprintln!("dhrtd: {e:#}");
                return ExitCode::from(2);
            }
        },
    };
    let tls = match &config.tls {
        None => None,
        Some((cert, key, ca)) => match tls::Tls::load(cert, key, ca.as_deref()) {
            Ok(tls) => Some(tls),
            Err(e) => {
                eprintln!("dhrtd: {e:#}");
                return ExitCode::from(2);
            }
        },
    };
    init_logging(config.json_logs);
    alloc::purge_off_request_threads();
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
    // Watchers read the log on threads of their own, at a lower priority:
    // when the CPU is short, they fall behind a little rather than slow
    // writers.
    let watch_runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
        .thread_name("dhrt-watch")
        .on_thread_start(lower_priority)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dhrtd: cannot start the watch runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut config = config;
    config.watch.runtime = Some(watch_runtime.handle().clone());
    let result = runtime.block_on(run(config, access, tls));
    watch_runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("dhrtd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The listening socket, with room for a burst of connections (a thousand
/// watchers reconnecting at once after a restart): a full accept queue
/// drops handshakes, which clients then retry only after seconds.
fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Lowers the calling thread to nice 10: with the CPU short it gets about
/// a tenth of a writer thread's share, so watchers fall behind writers but
/// never stop. (In the idle class, `SCHED_IDLE`, 100 watchers under a
/// write load taking both cores got their events 197-350 ms late at the
/// 99th percentile, up to 570 ms, and a new watch could stay silent for a
/// minute; at nice 10, 21-26 ms and at most 61 ms, for the same write
/// throughput: docs/benchmarks.md, session 41.) Failing leaves it as it
/// was.
fn lower_priority() {
    // SAFETY: plain integers; on Linux a thread id with PRIO_PROCESS names
    // that thread only.
    #[allow(unsafe_code)]
    let _ = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, WATCH_NICE)
    };
}

/// The watch threads' nice value.
const WATCH_NICE: libc::c_int = 10;

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

/// Every file and directory this process creates (the data directory,
/// collection logs, `node.id`, `cluster.state`, ...) is its user's alone:
/// the values in a log are readable by anyone who can open it, with no
/// token.
fn private_files() {
    // SAFETY: umask only sets the process's file-creation mask; it cannot
    // fail, and no other thread runs yet.
    #[allow(unsafe_code)]
    unsafe {
        libc::umask(0o077);
    }
}

/// Warns when other users of this machine can reach the data directory
/// (one made before this build, or by hand): its logs hold every value.
fn check_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(dir) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "the data directory {} is open to other users of this machine (mode {mode:o}), who can read every value in its files without a token: chmod 700 it",
                dir.display()
            );
        }
    }
}

/// The permission bits of `path`, if it can be read.
fn mode_of(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    Some(std::fs::metadata(path).ok()?.permissions().mode() & 0o7777)
}

/// Warns about the files that guard the node when other users of this
/// machine can read the secret in one, or change the tokens in another;
/// and about tokens that would cross the network in clear.
fn check_guards(config: &Config, tls: bool) {
    if let Some(path) = &config.secret_file
        && let Some(mode) = mode_of(path).filter(|m| m & 0o044 != 0)
    {
        tracing::warn!(
            "the config file {} holds the cluster secret and other users of this machine can read it (mode {mode:o}); with it they can join the cluster as a peer and read or rewrite everything: chmod 600 it",
            path.display()
        );
    }
    if let Auth::File(path) = &config.auth {
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        for (what, at) in [
            ("auth file", path.as_path()),
            ("auth file's directory", parent),
        ] {
            // A sticky directory (/tmp) lets nobody replace another's file.
            if let Some(mode) = mode_of(at).filter(|m| m & 0o022 != 0 && m & 0o1000 == 0) {
                tracing::warn!(
                    "the {what} {} can be changed by other users of this machine (mode {mode:o}): any of them could add an admin token, taken at the next SIGHUP: chmod go-w it",
                    at.display()
                );
            }
        }
        if !tls && !config.listen.ip().is_loopback() {
            tracing::warn!(
                listen = %config.listen,
                "tokens cross the network in clear: this node serves clients beyond loopback without TLS, so anyone on the path can read a token and use it (give --tls-cert and --tls-key)"
            );
        }
    }
}

/// The node id kept in `<data-dir>/node.id`, created on first start.
fn node_id(dir: &Path) -> anyhow::Result<u64> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("node.id");
    match std::fs::read_to_string(&path) {
        // Empty: a power loss after the first start, before the file's
        // bytes reached the disk (so before anything was acknowledged).
        Ok(text) if text.trim().is_empty() => {
            let id = new_node_id(dir, &path)?;
            // With data beside it, the file was emptied some other way.
            let why = if dir.join("cluster.state").exists() {
                "the file was emptied or damaged; the data beside it is kept, and members that knew this node by its old id see a new member at its address"
            } else {
                "the machine lost power soon after the first start"
            };
            tracing::warn!(
                "{} was empty ({why}): this node takes the new id {id:016x}",
                path.display()
            );
            Ok(id)
        }
        Ok(text) => u64::from_str_radix(text.trim(), 16)
            .with_context(|| format!("{} is not a node id", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => new_node_id(dir, &path),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes a new random id to `path` durably: the file, then its name.
fn new_node_id(dir: &Path, path: &Path) -> anyhow::Result<u64> {
    use std::io::Write;
    let id = random_id();
    let tmp = dir.join("node.id.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{id:016x}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// Waits for a signal to stop; re-reads the auth file on each SIGHUP
/// meanwhile.
/// Installed before the node serves, so that no signal meets the default
/// action (which would end the process without a flush).
fn signalled(
    auth: Auth,
    access: Arc<Access>,
) -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    let mut quit = signal(SignalKind::quit()).context("installing a SIGQUIT handler")?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = int.recv() => return "SIGINT",
                _ = term.recv() => return "SIGTERM",
                _ = quit.recv() => return "SIGQUIT",
                _ = hup.recv() => reload(&auth, &access),
            }
        }
    })
}

/// The most collections a node creates by default: what `open_files`
/// leaves after the client connections, the peer connections (as many
/// dialed as accepted: two each way per member) and 512 more descriptors
/// (listeners, threads, a compaction's new file, watches), two files a
/// collection; if the connections alone could take the whole limit, a
/// quarter of it.
fn collections_within(open_files: u64, connections: usize, peers: usize) -> usize {
    let reserve = (connections as u64)
        .saturating_add((peers as u64).saturating_mul(2))
        .saturating_add(512);
    let spare = if open_files >= reserve.saturating_add(128) {
        open_files - reserve
    } else {
        open_files / 2
    };
    usize::try_from(spare / 2).unwrap_or(usize::MAX)
}

/// SIGHUP: the auth file again. A file that does not parse changes
/// nothing: the node keeps the tokens it has.
fn reload(auth: &Auth, access: &Access) {
    let Auth::File(path) = auth else {
        tracing::info!("SIGHUP: no auth file to re-read");
        return;
    };
    match config::read_tokens(path) {
        Ok(tokens) => {
            let count = tokens.len();
            access.replace(tokens);
            tracing::info!(file = %path.display(), tokens = count, "SIGHUP: re-read the auth file");
        }
        Err(e) => tracing::error!("SIGHUP: kept the tokens in use: {e:#}"),
    }
}

async fn run(config: Config, access: Arc<Access>, tls: Option<tls::Tls>) -> anyhow::Result<()> {
    // Every collection keeps two files open, every connection one socket:
    // the soft limit (often 1024) goes up to the hard one, as Redis and Go
    // servers do, so that a node with many collections can start again.
    let open_files = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::info!(limit, "open files allowed");
            limit
        }
        Err(e) => {
            tracing::warn!("could not raise the open-files limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    };
    let max_collections = config.max_collections.unwrap_or_else(|| {
        collections_within(
            open_files,
            config.max_connections,
            config.max_peer_connections,
        )
    });
    let sync = match config.sync {
        Sync::Always => SyncMode::Always,
        Sync::Interval => SyncMode::Interval(Duration::from_secs(1)),
        Sync::Never => SyncMode::Never,
    };
    if std::env::args().any(|a| a == "--cluster-secret" || a.starts_with("--cluster-secret=")) {
        tracing::warn!(
            "the cluster secret is on the command line, where every user of this machine can \
             read it (ps, /proc): give it in DHRT_CLUSTER_SECRET or the --config file instead"
        );
    }
    check_guards(&config, tls.is_some());
    if config.data_dir_ignored {
        tracing::warn!(
            data_dir = %config.data_dir.display(),
            "--memory keeps no files: --data-dir is ignored"
        );
    }
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
        check_private(&config.data_dir);
        let options = Options {
            sync,
            node_id: id,
            tombstone_grace: config.tombstone_grace,
            clock_offset_ms: config.clock_offset_ms,
            max_collections,
            disk_reserve: config.disk_reserve,
            ..Options::default()
        };
        let store = Store::open(&config.data_dir, options)
            .with_context(|| format!("opening the data directory {}", config.data_dir.display()))?;
        let held = store.counted_collections();
        if held > max_collections {
            tracing::warn!(
                held,
                max_collections,
                "this node holds more collections than it would create now (its open-files limit is lower, or --max-collections): no new one will be created"
            );
        }
        for r in store.recovery().iter().filter(|r| r.truncated_bytes > 0) {
            tracing::warn!(collection = %r.collection, bytes = r.truncated_bytes, "cut a torn tail during recovery");
        }
        for r in store.recovery().iter().filter(|r| r.reserved_bytes > 0) {
            tracing::info!(collection = %r.collection, bytes = r.reserved_bytes, "gave back reserved space");
        }
        alloc::give_back_freed_memory();
        (store, id)
    };
    let state_file =
        (!config.memory && config.takes_peers()).then(|| config.data_dir.join("cluster.state"));
    if let Some(path) = &state_file {
        dhrt_cluster::check_state_file(
            path,
            !config.seeds.is_empty(),
            !store.all_collections().is_empty(),
        )
        .map_err(anyhow::Error::msg)?;
    }
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
            replicas: config.replicas,
            move_rate: config.move_rate,
            seeds: config.seeds.clone(),
            // A node that takes no peers remembers none (it would dial them).
            state_file,
            max_hints: config.max_hints,
            max_hint_bytes: config.max_hint_bytes,
            max_clock_ahead: config.max_clock_offset,
            takes_peers: config.takes_peers(),
            connector: match &tls {
                Some(tls) => tls.peers.clone(),
                None => Arc::new(dhrt_cluster::TcpConnector),
            },
            ..ClusterOptions::default()
        },
    );
    let inflight = dhrt_proto::Inflight::new(config.max_inflight);
    let node = Arc::new(
        Node::with_watch_options(cluster.clone(), config.watch.clone())
            .with_max_value(config.max_value)
            .with_inflight(inflight.clone()),
    );
    let listener = bind(config.listen).with_context(|| format!("binding {}", config.listen))?;
    match &config.auth {
        Auth::Open if !config.listen.ip().is_loopback() => tracing::warn!(
            listen = %config.listen,
            "--no-auth ON A NON-LOOPBACK ADDRESS: anyone who can reach it can read, write and drop every collection"
        ),
        Auth::Open => {
            tracing::warn!("--no-auth: every local user can read, write and drop every collection")
        }
        Auth::LoopbackOnly if !config.listen.ip().is_loopback() => tracing::warn!(
            listen = %config.listen,
            "no auth file: only clients on loopback are served; others get 401 (see --auth-file)"
        ),
        Auth::File(path) if access.token_count() == 0 => tracing::warn!(
            file = %path.display(),
            "the auth file grants no token: every client is refused"
        ),
        _ => {}
    }
    let stopping = listener::Stopping::default();
    let servers = Arc::new(listener::Servers {
        node: node.clone(),
        http: dhrt_http::Api::new(
            node.clone(),
            dhrt_http::Limits {
                access: access.clone(),
                idle_timeout: config.idle_timeout,
                cors: config.cors.clone(),
                max_body: config.max_value,
                inflight: inflight.clone(),
                stopping: stopping.clients.clone(),
                watch_runtime: node.watch_runtime(),
                ..dhrt_http::Limits::default()
            },
        ),
        binary: BinaryLimits {
            access: access.clone(),
            idle_timeout: config.idle_timeout,
            peer_slots: Arc::new(tokio::sync::Semaphore::new(config.max_peer_connections)),
            takes_peers: config.takes_peers(),
            inflight,
            ..BinaryLimits::default()
        },
        first_byte_timeout: Duration::from_secs(10),
        tls,
    });
    let signal = signalled(config.auth.clone(), access)?;
    tracing::info!(
        listen = %config.listen,
        id = %format!("{id:016x}"),
        name = %config.name,
        mode = if config.memory { "memory" } else { "persisted" },
        data_dir = %if config.memory { std::path::Path::new("") } else { &config.data_dir }.display(),
        sync = config.sync.as_str(),
        "dhrtd is serving"
    );
    cluster.start();
    let serving = tokio::spawn(listener::run(
        listener,
        servers,
        listener::Slots {
            clients: config.max_connections,
            peers: config.max_peer_connections,
        },
        stopping.clone(),
    ));
    let which = signal.await;
    tracing::info!(
        signal = which,
        "shutting down: finishing requests in flight"
    );
    stopping.stop_clients(config.shutdown_grace).await;
    // Peers are still served: the leave hands collections over and spreads
    // the news through them.
    cluster.leave().await;
    tracing::info!("told the cluster this node is leaving");
    stopping.peers.cancel();
    let _ = serving.await;
    // Not left to the store's drop: a watch task may hold the last handle
    // on a runtime the process does not wait for.
    let store = node.store().clone();
    tokio::task::spawn_blocking(move || store.compact_damaged())
        .await
        .context("compacting damaged records out")?;
    node.store().sync().context("final flush")?;
    tracing::info!("flushed; exiting");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::collections_within;

    #[test]
    fn collections_fit_the_open_files_left_by_the_connections() {
        // 20,000 files, 10,000 + 2 × 1,024 connections (the peer ones
        // accepted and dialed): (20,000 - 12,560) / 2.
        assert_eq!(collections_within(20_000, 10_000, 1024), 3_720);
        // Twice as many collections as files can never be opened again;
        // with the defaults, a node never creates more than fit.
        for limit in [256, 1024, 4096, 65_536, 1 << 20] {
            let n = collections_within(limit, 10_000, 1024) as u64;
            assert!(2 * n <= limit, "{limit}: {n}");
            assert!(n >= limit / 8, "{limit}: {n}");
        }
        // No limit (RLIM_INFINITY): no practical cap.
        assert!(collections_within(u64::MAX, 10_000, 1024) > 1 << 40);
    }
}
