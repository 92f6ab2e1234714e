//! `dhrt-cluster`: the node. Today: the [`Node`] facade that implements the
//! client [`dhrt_proto::Operations`] over the local store, and the
//! binary-protocol connection server. Membership, replication,
//! anti-entropy, join handoff and placement join here next (see
//! docs/ARCHITECTURE.md).

mod auth;
mod cluster;
mod link;
mod membership;
mod metrics;
mod node;
mod peer_server;
mod server;
mod wire;

pub use cluster::{Cluster, ClusterOptions, WriteAck};
pub use link::LinkError;
pub use membership::{Membership, MembershipConfig, Output, member_state};
pub use node::{Identity, Node};
pub use server::{BinaryLimits, Closed, serve_binary};
