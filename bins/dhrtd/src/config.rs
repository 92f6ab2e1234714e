//! Configuration: flags, `DHRT_<NAME>` environment variables, and a TOML file
//! given with `--config`, in that order of precedence, over the defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use dhrt_cluster::{Replicas, WriteAck};
use serde::Deserialize;

/// The dhrt node daemon.
#[derive(Debug, Parser)]
#[command(name = "dhrtd", version, about = "The dhrt node daemon")]
pub(crate) struct Args {
    /// The node's one endpoint, serving HTTP and the binary protocol.
    #[arg(long, env = "DHRT_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// The address peers and clients use to reach this node.
    #[arg(long, env = "DHRT_ADVERTISE", value_name = "ADDR")]
    advertise: Option<String>,
    /// Where collection files live.
    #[arg(long, env = "DHRT_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Keep everything in memory: no files, nothing survives a restart.
    #[arg(long, env = "DHRT_MEMORY", value_parser = clap::builder::BoolishValueParser::new())]
    memory: bool,
    /// Durability: always (fsync before acknowledging), interval (fsync
    /// every second), never (leave it to the OS).
    #[arg(long, env = "DHRT_SYNC", value_name = "always|interval|never")]
    sync: Option<String>,
    /// Human name of the node in stats.
    #[arg(long, env = "DHRT_NAME")]
    name: Option<String>,
    /// Most client connections served at once; more are refused.
    #[arg(long, env = "DHRT_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Most peer connections served at once, apart from the clients' (a
    /// client flood never locks peers out).
    #[arg(long, env = "DHRT_MAX_PEER_CONNECTIONS")]
    max_peer_connections: Option<usize>,
    /// MiB of large values this node holds in memory at once for its
    /// clients, all connections together: requests (HTTP bodies, binary
    /// frames) while they arrive, and values relayed from other nodes
    /// until the client has read them; a request or relayed read that
    /// would go past it is refused (503, or Unavailable). Default 1024
    #[arg(long, value_name = "MIB", env = "DHRT_MAX_INFLIGHT_MIB")]
    max_inflight_mib: Option<usize>,
    /// Most collections this node creates; past it, a write to a new one is
    /// refused (503). Default: what its open-files limit leaves after the
    /// connections, two files a collection, so that it can always start
    /// again.
    #[arg(long, env = "DHRT_MAX_COLLECTIONS")]
    max_collections: Option<usize>,
    /// Disk space kept in reserve (a file, RESERVE, in the data directory)
    /// and given up when the disk fills, so that deletes, drops and
    /// compaction still have room while new values are refused (503).
    /// 0: no reserve. Default: 1% of the file system, 1 to 64 MiB
    #[arg(long, env = "DHRT_DISK_RESERVE_MIB", value_name = "MIB")]
    disk_reserve_mib: Option<u64>,
    /// A client connection (HTTP keep-alive or binary) with no request for
    /// this many seconds is closed.
    #[arg(long, env = "DHRT_IDLE_TIMEOUT_SECS", value_name = "N")]
    idle_timeout_secs: Option<u64>,
    /// Log format: text or json (filter with DHRT_LOG, e.g. DHRT_LOG=debug).
    #[arg(long, env = "DHRT_LOG_FORMAT", value_name = "text|json")]
    log_format: Option<String>,
    /// Join the cluster that ADDR belongs to (any member; repeat or
    /// separate with commas to give several).
    #[arg(
        long,
        visible_alias = "join",
        env = "DHRT_NODE",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    node: Vec<String>,
    /// Write concern: all (every replica hosting the collection), quorum
    /// (a majority of them), or local (this node). Not met within
    /// --timeout-ms (plus the value's bytes at 1 MiB/s): the write is saved
    /// and the client is told on how many replicas (HTTP 504).
    #[arg(long, env = "DHRT_WRITE_ACK", value_name = "all|quorum|local")]
    write_ack: Option<String>,
    /// Per-peer request timeout in milliseconds.
    #[arg(long, env = "DHRT_TIMEOUT_MS", value_name = "N")]
    timeout_ms: Option<u64>,
    /// Shared secret every peer must prove it knows.
    #[arg(
        long,
        env = "DHRT_CLUSTER_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    cluster_secret: Option<String>,
    /// The tokens clients may use, each with its role (make lines with
    /// `dhrt-cli token`); re-read on SIGHUP. Without it, only clients on
    /// loopback are served, unless --no-auth.
    #[arg(long, env = "DHRT_AUTH_FILE", value_name = "FILE")]
    auth_file: Option<PathBuf>,
    /// Serve every client that can reach the port, without a token, as
    /// admin: they can read, write and drop everything.
    #[arg(long, env = "DHRT_NO_AUTH", value_parser = clap::builder::BoolishValueParser::new())]
    no_auth: bool,
    /// TLS on the one port, for HTTP, the binary protocol and peers: the
    /// certificate chain (PEM). With it, plain text is served on loopback
    /// only.
    #[arg(long, env = "DHRT_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "DHRT_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require TLS clients to present a certificate signed by this CA (PEM);
    /// plain-text clients on loopback are served without one.
    #[arg(
        long,
        env = "DHRT_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_client_ca: Option<PathBuf>,
    /// How many members own each collection: all (every member, the
    /// default) or a number. Collections are placed on their owners by
    /// rendezvous hashing and handed over when members join or leave.
    /// Every member must be started with the same value.
    #[arg(long, env = "DHRT_REPLICAS", value_name = "N|all")]
    replicas: Option<String>,
    /// MiB per second this node sends to move collections to their owners
    /// (a handover after a join, a leave or a change of replication factor;
    /// the streamed handoff of a newcomer), and, apart, that anti-entropy
    /// repairs send and take; 0 for no limit. Client writes and their
    /// replication are never paced.
    #[arg(long, env = "DHRT_MOVE_RATE_MIB", value_name = "MIB_PER_S")]
    move_rate_mib: Option<u64>,
    /// Host only these collections (comma-separated); default all.
    #[arg(
        long,
        env = "DHRT_COLLECTIONS",
        value_name = "A,B",
        value_delimiter = ','
    )]
    collections: Vec<String>,
    /// How long deletes are remembered (tombstones kept) before compaction
    /// purges them; a node away longer than this re-syncs fully on return.
    #[arg(long, env = "DHRT_TOMBSTONE_GRACE_SECS", value_name = "N")]
    tombstone_grace_secs: Option<u64>,
    /// Writes kept per unreachable peer until it returns; beyond this,
    /// anti-entropy repairs it.
    #[arg(long, env = "DHRT_MAX_HINTS", value_name = "N")]
    max_hints: Option<usize>,
    /// Bytes of writes kept per unreachable peer (keys and values), as well
    /// as --max-hints; beyond either, anti-entropy repairs it.
    #[arg(long, env = "DHRT_MAX_HINT_BYTES", value_name = "N")]
    max_hint_bytes: Option<usize>,
    /// The largest offset allowed between two nodes' clocks, in ms: a peer's
    /// write stamped further ahead is refused, and a node whose clock is
    /// further off from its peers' refuses client writes (503).
    #[arg(long, env = "DHRT_MAX_CLOCK_OFFSET_MS", value_name = "N")]
    max_clock_offset_ms: Option<u64>,
    /// Fault injection for tests: shift this node's wall clock by N ms.
    #[arg(
        long,
        env = "DHRT_CLOCK_OFFSET_MS",
        value_name = "N",
        hide = true,
        allow_hyphen_values = true
    )]
    clock_offset_ms: Option<i64>,
    /// A watcher further behind than this many bytes of changes, that
    /// catches up none of it for --watch-lag-grace-secs, is closed with a
    /// reason (it can resume from its last token).
    #[arg(long, env = "DHRT_WATCH_MAX_LAG_BYTES", value_name = "N")]
    watch_max_lag_bytes: Option<u64>,
    /// See --watch-max-lag-bytes.
    #[arg(long, env = "DHRT_WATCH_LAG_GRACE_SECS", value_name = "N")]
    watch_lag_grace_secs: Option<u64>,
    /// Watches open at once on this node, at most (more get 503).
    #[arg(long, env = "DHRT_MAX_WATCHERS", value_name = "N")]
    max_watchers: Option<usize>,
    /// A watcher with nothing to send gets a progress event (a fresh
    /// token, and an SSE heartbeat) this often.
    #[arg(long, env = "DHRT_WATCH_PROGRESS_SECS", value_name = "N")]
    watch_progress_secs: Option<u64>,
    /// The largest value a client may write through this node, in bytes:
    /// from 1 to 16777216 (16 MiB, the default and the most a node stores).
    /// Larger values get 413 (TooLarge). Values replicated from peers are
    /// taken up to 16 MiB whatever this says.
    #[arg(long, env = "DHRT_MAX_VALUE_BYTES", value_name = "N")]
    max_value_bytes: Option<usize>,
    /// Web pages of ORIGIN (scheme://host, with a port if any; * for any) may call
    /// the API and follow feeds from a browser; repeat or separate with
    /// commas. A request from a page of any other origin is refused (403).
    #[arg(
        long,
        env = "DHRT_CORS_ORIGIN",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    cors_origin: Vec<String>,
    /// A TOML file with any of the settings above (kebab-case keys).
    #[arg(long, env = "DHRT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

/// The same settings, as a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct File {
    listen: Option<SocketAddr>,
    advertise: Option<String>,
    data_dir: Option<PathBuf>,
    memory: Option<bool>,
    sync: Option<String>,
    name: Option<String>,
    max_connections: Option<usize>,
    max_peer_connections: Option<usize>,
    max_inflight_mib: Option<usize>,
    max_collections: Option<usize>,
    disk_reserve_mib: Option<u64>,
    idle_timeout_secs: Option<u64>,
    log_format: Option<String>,
    node: Option<Vec<String>>,
    write_ack: Option<String>,
    timeout_ms: Option<u64>,
    cluster_secret: Option<String>,
    auth_file: Option<PathBuf>,
    no_auth: Option<bool>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    collections: Option<Vec<String>>,
    replicas: Option<String>,
    move_rate_mib: Option<u64>,
    tombstone_grace_secs: Option<u64>,
    max_hints: Option<usize>,
    max_hint_bytes: Option<usize>,
    max_clock_offset_ms: Option<u64>,
    watch_max_lag_bytes: Option<u64>,
    watch_lag_grace_secs: Option<u64>,
    max_watchers: Option<usize>,
    watch_progress_secs: Option<u64>,
    cors_origin: Option<Vec<String>>,
    max_value_bytes: Option<usize>,
}

/// Durability, as the storage engine takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sync {
    Always,
    Interval,
    Never,
}

impl Sync {
    /// As `--sync` spells it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Sync::Always => "always",
            Sync::Interval => "interval",
            Sync::Never => "never",
        }
    }
}

/// Who may be a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Auth {
    /// Clients on loopback only (no auth file).
    LoopbackOnly,
    /// The tokens of this file.
    File(PathBuf),
    /// Anyone (`--no-auth`).
    Open,
}

/// The shortest cluster secret accepted, in bytes.
pub(crate) const MIN_SECRET: usize = 32;

/// The resolved configuration.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) listen: SocketAddr,
    /// Origins whose web pages may call the API.
    pub(crate) cors: dhrt_http::Cors,
    /// The largest value a client may write.
    pub(crate) max_value: usize,
    pub(crate) advertise: String,
    pub(crate) data_dir: PathBuf,
    /// `--data-dir` given with `--memory`, which keeps no files.
    pub(crate) data_dir_ignored: bool,
    pub(crate) memory: bool,
    pub(crate) sync: Sync,
    pub(crate) name: String,
    pub(crate) max_connections: usize,
    pub(crate) max_peer_connections: usize,
    /// Bytes of large requests held at once while they arrive.
    pub(crate) max_inflight: usize,
    /// `None`: derived from the open-files limit at start.
    pub(crate) max_collections: Option<usize>,
    /// `None`: 1% of the file system, 1 to 64 MiB.
    pub(crate) disk_reserve: Option<u64>,
    pub(crate) idle_timeout: Duration,
    pub(crate) json_logs: bool,
    pub(crate) shutdown_grace: Duration,
    pub(crate) seeds: Vec<String>,
    pub(crate) write_ack: WriteAck,
    pub(crate) timeout: Duration,
    pub(crate) cluster_secret: Option<String>,
    /// The `--config` file the cluster secret was read from, if it was.
    pub(crate) secret_file: Option<PathBuf>,
    pub(crate) auth: Auth,
    /// Certificate, key, and client CA if any.
    pub(crate) tls: Option<(PathBuf, PathBuf, Option<PathBuf>)>,
    pub(crate) collections: Option<Vec<String>>,
    pub(crate) replicas: Replicas,
    /// Bytes per second; 0 for no limit.
    pub(crate) move_rate: u64,
    pub(crate) tombstone_grace: Duration,
    pub(crate) max_hints: usize,
    pub(crate) max_hint_bytes: usize,
    pub(crate) max_clock_offset: Duration,
    pub(crate) clock_offset_ms: i64,
    pub(crate) watch: dhrt_cluster::WatchOptions,
}

impl Config {
    /// Whether this node talks to peers. Not with an auth file and no
    /// cluster secret: a peer proving the empty secret could read and write
    /// everything the tokens guard (on loopback only, as a node beyond it
    /// does not start without a secret; still any local user or tunnel).
    pub(crate) fn takes_peers(&self) -> bool {
        !(matches!(self.auth, Auth::File(_)) && self.cluster_secret.is_none())
    }

    pub(crate) fn load(args: Args) -> anyhow::Result<Config> {
        let file: File = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => File::default(),
        };
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:7453".parse().unwrap());
        let sync = match args.sync.or(file.sync).as_deref().unwrap_or("interval") {
            "always" => Sync::Always,
            "interval" => Sync::Interval,
            "never" => Sync::Never,
            other => bail!("--sync must be always, interval or never, not {other:?}"),
        };
        let json_logs = match args
            .log_format
            .or(file.log_format)
            .as_deref()
            .unwrap_or("text")
        {
            "text" => false,
            "json" => true,
            other => bail!("--log-format must be text or json, not {other:?}"),
        };
        let write_ack: WriteAck = args
            .write_ack
            .or(file.write_ack)
            .as_deref()
            .unwrap_or("all")
            .parse()
            .map_err(|e| anyhow::anyhow!("--write-ack: {e}"))?;
        let timeout_ms = args.timeout_ms.or(file.timeout_ms).unwrap_or(500);
        if timeout_ms == 0 {
            bail!("--timeout-ms must be at least 1");
        }
        let max_inflight_mib = args
            .max_inflight_mib
            .or(file.max_inflight_mib)
            .unwrap_or(1024);
        if max_inflight_mib < 17 {
            // One request at the 16 MiB value limit, and its framing,
            // must fit, or such a value could never be written.
            bail!("--max-inflight-mib must be at least 17 (a value at the 16 MiB limit must fit)");
        }
        let max_clock_offset = Duration::from_millis(
            args.max_clock_offset_ms
                .or(file.max_clock_offset_ms)
                .unwrap_or(60_000),
        );
        if max_clock_offset < Duration::from_millis(100) {
            bail!("--max-clock-offset-ms must be at least 100");
        }
        let idle_timeout = Duration::from_secs(
            args.idle_timeout_secs
                .or(file.idle_timeout_secs)
                .unwrap_or(300),
        );
        if idle_timeout.is_zero() {
            bail!("--idle-timeout-secs must be at least 1");
        }
        let seeds = if args.node.is_empty() {
            file.node.unwrap_or_default()
        } else {
            args.node
        };
        let cors = dhrt_http::Cors::new(&if args.cors_origin.is_empty() {
            file.cors_origin.unwrap_or_default()
        } else {
            args.cors_origin
        })
        .map_err(|e| anyhow::anyhow!(e))?;
        let max_value = args
            .max_value_bytes
            .or(file.max_value_bytes)
            .unwrap_or(dhrt_cluster::MAX_VALUE);
        if !(1..=dhrt_cluster::MAX_VALUE).contains(&max_value) {
            bail!(
                "--max-value-bytes must be from 1 to {} (16 MiB, the most a node stores), not {max_value}",
                dhrt_cluster::MAX_VALUE
            );
        }
        for seed in &seeds {
            check_host_port(seed).map_err(|why| anyhow::anyhow!("--node {seed:?}: {why}"))?;
        }
        let collections = if args.collections.is_empty() {
            file.collections
        } else {
            Some(args.collections)
        };
        if let Some(c) = &collections {
            for name in c {
                dhrt_storage::validate_collection_name(name)
                    .map_err(|e| anyhow::anyhow!("--collections: {e}"))?;
            }
        }
        let replicas: Replicas = args
            .replicas
            .or(file.replicas)
            .as_deref()
            .unwrap_or("all")
            .parse()
            .map_err(|e| anyhow::anyhow!("--replicas: {e}"))?;
        let secret_file = args
            .config
            .clone()
            .filter(|_| args.cluster_secret.is_none() && file.cluster_secret.is_some());
        let cluster_secret = args
            .cluster_secret
            .or(file.cluster_secret)
            .filter(|s| !s.is_empty());
        match &cluster_secret {
            Some(s) if s.len() < MIN_SECRET => bail!(
                "the cluster secret is {} bytes; it must be at least {MIN_SECRET} \
                 (`dhrt-cli secret` prints a fresh one)",
                s.len()
            ),
            None if !listen.ip().is_loopback() => bail!(
                "dhrtd listens on {listen}, beyond loopback, without a cluster secret: \
                 anyone who can reach that port could join the cluster and read or \
                 rewrite its data. Give every node the same --cluster-secret (or \
                 DHRT_CLUSTER_SECRET) of at least {MIN_SECRET} bytes; `dhrt-cli secret` \
                 prints a fresh one"
            ),
            _ => {}
        }
        let auth = match (
            args.auth_file.or(file.auth_file),
            args.no_auth || file.no_auth.unwrap_or(false),
        ) {
            (Some(_), true) => bail!("--auth-file and --no-auth contradict each other: choose one"),
            (Some(path), false) => Auth::File(path),
            (None, true) => Auth::Open,
            (None, false) => Auth::LoopbackOnly,
        };
        if matches!(auth, Auth::File(_)) && cluster_secret.is_none() && !seeds.is_empty() {
            bail!(
                "--node with --auth-file needs a cluster secret: without one, anyone who \
                 can reach the port could join as a peer and skip the tokens. Give every \
                 node the same --cluster-secret (or DHRT_CLUSTER_SECRET) of at least \
                 {MIN_SECRET} bytes; `dhrt-cli secret` prints a fresh one"
            );
        }
        let tls = match (
            args.tls_cert.or(file.tls_cert),
            args.tls_key.or(file.tls_key),
            args.tls_client_ca.or(file.tls_client_ca),
        ) {
            (Some(cert), Some(key), ca) => Some((cert, key, ca)),
            (None, None, None) => None,
            _ => bail!("TLS needs both --tls-cert and --tls-key (and --tls-client-ca needs them)"),
        };
        let advertise = args
            .advertise
            .or(file.advertise)
            .unwrap_or_else(|| listen.to_string());
        let name = args.name.or(file.name).unwrap_or_else(|| advertise.clone());
        // What peers take from a member (they refuse anything else).
        dhrt_proto::MemberUpdate {
            id: 0,
            name: name.clone(),
            addr: advertise.clone(),
            incarnation: 0,
            liveness: dhrt_proto::Liveness::Alive,
            syncing: false,
            collections: collections.clone(),
        }
        .check()
        .map_err(|e| anyhow::anyhow!("--name, --advertise or --collections: {e}"))?;
        Ok(Config {
            listen,
            cors,
            max_value,
            name,
            advertise,
            data_dir_ignored: (args.memory || file.memory.unwrap_or(false))
                && (args.data_dir.is_some() || file.data_dir.is_some()),
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./dhrt-data")),
            memory: args.memory || file.memory.unwrap_or(false),
            sync,
            max_connections: args
                .max_connections
                .or(file.max_connections)
                .unwrap_or(10_000),
            max_peer_connections: args
                .max_peer_connections
                .or(file.max_peer_connections)
                .unwrap_or(1024),
            max_inflight: max_inflight_mib.saturating_mul(1 << 20),
            max_collections: args.max_collections.or(file.max_collections),
            disk_reserve: args
                .disk_reserve_mib
                .or(file.disk_reserve_mib)
                .map(|m| m.saturating_mul(1 << 20)),
            idle_timeout,
            json_logs,
            shutdown_grace: Duration::from_secs(10),
            seeds,
            write_ack,
            timeout: Duration::from_millis(timeout_ms),
            cluster_secret,
            secret_file,
            auth,
            tls,
            collections,
            replicas,
            move_rate: args
                .move_rate_mib
                .or(file.move_rate_mib)
                .map_or(dhrt_cluster::DEFAULT_MOVE_RATE, |m| {
                    m.saturating_mul(1 << 20)
                }),
            tombstone_grace: Duration::from_secs(
                args.tombstone_grace_secs
                    .or(file.tombstone_grace_secs)
                    .unwrap_or(24 * 3600),
            ),
            max_hints: args.max_hints.or(file.max_hints).unwrap_or(1_000_000),
            max_hint_bytes: args
                .max_hint_bytes
                .or(file.max_hint_bytes)
                .unwrap_or(256 << 20),
            max_clock_offset,
            clock_offset_ms: args.clock_offset_ms.unwrap_or(0),
            watch: {
                let d = dhrt_cluster::WatchOptions::default();
                dhrt_cluster::WatchOptions {
                    max_lag_bytes: args
                        .watch_max_lag_bytes
                        .or(file.watch_max_lag_bytes)
                        .unwrap_or(d.max_lag_bytes),
                    progress_every: args
                        .watch_progress_secs
                        .or(file.watch_progress_secs)
                        .map_or(d.progress_every, |s| Duration::from_secs(s.clamp(1, 3600)))
                        // A watcher with nothing to say must still speak
                        // before the idle timeout would close it.
                        .min(idle_timeout / 2)
                        .max(Duration::from_millis(500)),
                    lag_grace: args
                        .watch_lag_grace_secs
                        .or(file.watch_lag_grace_secs)
                        .map_or(d.lag_grace, Duration::from_secs),
                    max_watchers: args
                        .max_watchers
                        .or(file.max_watchers)
                        .unwrap_or(d.max_watchers),
                    ..d
                }
            },
        })
    }
}

/// Reads the tokens of an auth file.
pub(crate) fn read_tokens(path: &std::path::Path) -> anyhow::Result<dhrt_proto::auth::Tokens> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    dhrt_proto::auth::Tokens::parse(&text)
        .with_context(|| format!("the auth file {}", path.display()))
}

/// Whether `addr` is a peer address: `host:port` (an IPv6 host in
/// brackets), with a port from 1 to 65535. The host is not resolved here:
/// a name that does not resolve yet is retried while the node runs.
fn check_host_port(addr: &str) -> Result<(), &'static str> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or("an address is host:port, and this has no port")?;
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("an address is host:port, and this has no host");
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err("an IPv6 address goes in brackets: [::1]:7453");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err("the port must be a number from 1 to 65535"),
    }
}

#[cfg(test)]
mod tests {
    use super::check_host_port;

    #[test]
    fn a_peer_address_is_host_and_port() {
        for good in [
            "127.0.0.1:7453",
            "node-1.example:7453",
            "[::1]:7453",
            "localhost:1",
        ] {
            assert_eq!(check_host_port(good), Ok(()), "{good}");
        }
        for bad in [
            "notaddr",
            "localhost",
            "host:notaport",
            "host:0",
            "host:65536",
            ":7453",
            "::1:7453",
            "a b:7453",
            "",
        ] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
    }
}
