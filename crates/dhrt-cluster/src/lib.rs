//! `dhrt-cluster`: the node and the cluster. The [`Node`] facade implements
//! the client [`dhrt_proto::Operations`] over the local store and the
//! [`Cluster`]: membership and failure detection (a sans-I/O SWIM state
//! machine, [`Membership`]), replication with write concerns and hints,
//! fan-out reads, anti-entropy over digests, join handoff, re-sync, leave
//! and placement. [`serve_binary`] serves client and peer connections.
//! Peers are dialed through a [`Connector`] (TCP by default; the tests
//! plug in a simulated network). See docs/ARCHITECTURE.md.

#![forbid(unsafe_code)]

mod auth;
mod batch;
mod cluster;
mod combine;
mod damaged;
mod error;
mod handshake;
mod link;
mod membership;
mod metrics;
mod node;
mod pace;
mod peer_server;
mod placement;
mod queue;
mod relay;
mod server;
mod session;
mod sessions;
mod skew;
mod state;
mod stored;
mod throttle;
mod watch;
mod watch_conn;
mod watch_event;
mod wire;

pub use cluster::{Cluster, ClusterOptions, DEFAULT_MOVE_RATE, Identity};
pub use link::{ConnectFuture, Connector, LinkError, PeerStream, TcpConnector, keep_alive};
pub use membership::{Membership, MembershipConfig, Output, member_state};
pub use node::{MAX_VALUE, Node};
pub use placement::{Replicas, WriteAck};
pub use server::{BinaryLimits, Closed, serve_binary};
pub use state::check_state_file;
pub use throttle::LogThrottle;
pub use watch::{WatchCounts, WatchHub, WatchOptions};
