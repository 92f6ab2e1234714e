//! Whether the members compute owners with the same replication factor.
//!
//! Each member computes a collection's owners from its own default factor
//! (the cluster's default set through the API, else its `--replicas`). A
//! member started with another `--replicas` than its peers finds itself no
//! owner of collections they count it an owner of, hands its copies to the
//! owners it computes and releases them: the others then hold one copy
//! where they count two, and one failure loses the collection. So before a
//! settling round releases anything, a member asks each live peer its
//! factor (`PeerOp::Replicas`), and while one differs, or cannot say (a
//! build before this), it releases nothing and says why, once a minute.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dhrt_proto::{Liveness, PeerOp, PeerReply};

use super::Cluster;
use crate::placement::Replicas;

/// A peer's answer (or its failure to give one: a build before this
/// closes the connection on the request) is asked again after this long.
const SAID_FOR: Duration = Duration::from_secs(60);
/// A peer that named another factor, or whose answer is older than a
/// change of this node's own (a default set through the API reaches the
/// members one after the other), is asked again after this long.
const RECHECK: Duration = Duration::from_secs(1);
/// How often the disagreement is logged.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// What the peers said.
#[derive(Debug, Default)]
pub(crate) struct Factors {
    /// Per peer: when it said, this node's factor then, and what it said
    /// (`None`: it could not say).
    said: Mutex<HashMap<u64, Said>>,
    logged: Mutex<Option<Instant>>,
}

#[derive(Debug, Clone, Copy)]
struct Said {
    at: Instant,
    mine: Option<u16>,
    theirs: Option<Option<u16>>,
}

fn show(factor: Option<u16>) -> String {
    factor.map_or_else(|| "all".to_string(), |n| n.to_string())
}

impl Cluster {
    /// This node's default replication factor as peers compare it (the
    /// answer to `PeerOp::Replicas`): `None` for `all`.
    pub(crate) fn default_factor(&self) -> Option<u16> {
        match self.default_replicas() {
            Replicas::All => None,
            Replicas::N(n) => Some(n),
        }
    }

    /// Why this node must not release copies now: a live peer computes
    /// owners with another default replication factor, or could not say
    /// which. `None` when every live peer agrees.
    pub(super) async fn factors_disagree(self: &Arc<Self>) -> Option<String> {
        let mine = self.default_factor();
        let live: Vec<u64> = {
            let m = self.membership.lock().unwrap();
            let me = m.me().id;
            m.members()
                .filter(|u| u.id != me && matches!(u.liveness, Liveness::Alive | Liveness::Suspect))
                .map(|u| u.id)
                .collect()
        };
        let due: Vec<u64> = {
            let said = self.moves.factors.said.lock().unwrap();
            live.iter()
                .copied()
                .filter(|id| {
                    said.get(id).is_none_or(|s| {
                        let quick = s.mine != mine || s.theirs.is_some_and(|f| f != mine);
                        s.at.elapsed() >= if quick { RECHECK } else { SAID_FOR }
                    })
                })
                .collect()
        };
        let mut asks = tokio::task::JoinSet::new();
        for id in due {
            let Some(peer) = self.peer(id) else { continue };
            let timeout = self.options.timeout;
            asks.spawn(async move { (id, peer.link.request(PeerOp::Replicas, timeout).await) });
        }
        while let Some(joined) = asks.join_next().await {
            let Ok((id, reply)) = joined else { continue };
            let theirs = match reply {
                Ok(PeerReply::Replicas(f)) => Some(f),
                _ => None,
            };
            let said = Said {
                at: Instant::now(),
                mine,
                theirs,
            };
            self.moves.factors.said.lock().unwrap().insert(id, said);
        }
        let said = self.moves.factors.said.lock().unwrap();
        let why = live.iter().find_map(|id| match said.get(id).map(|s| s.theirs) {
            Some(Some(f)) if f == mine => None,
            Some(Some(f)) => Some(format!(
                "member {id:016x} computes owners with a replication factor of {}, this node with {}",
                show(f),
                show(mine)
            )),
            _ => Some(format!(
                "member {id:016x} did not say which replication factor it computes owners with"
            )),
        })?;
        drop(said);
        let mut logged = self.moves.factors.logged.lock().unwrap();
        if logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            *logged = Some(Instant::now());
            tracing::error!(
                "{why}: this node keeps every copy it would hand over and release, so that one failure cannot lose a collection the others count on it for; start every member with the same --replicas, or set the cluster's default, which wins over it: dhrt-cli replicas '*' N"
            );
        }
        Some(format!("{why}: kept"))
    }
}
