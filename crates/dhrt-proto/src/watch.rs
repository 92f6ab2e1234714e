//! Watching a collection: the request, the events, the resume token, and
//! the [`EventSource`] a node hands its servers. Semantics are in
//! `docs/protocol.md` ("Watch").

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::message::OpError;
use crate::peer::Stamp;

/// A resume token: a place in one node's history of one collection.
/// Printed as 32 hex digits. Tokens are node-local: on another node (or
/// after the collection's file was recreated) resuming from one is refused
/// with [`crate::ErrorKind::Gone`] and the client takes a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Token {
    /// The node's history id of the collection (0: before it existed).
    pub history: u64,
    /// The place in that history.
    pub seq: u64,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.history, self.seq)
    }
}

impl FromStr for Token {
    type Err = OpError;

    fn from_str(s: &str) -> Result<Self, OpError> {
        let bad = || {
            OpError::new(
                crate::ErrorKind::InvalidInput,
                format!("a resume token is 32 hex digits, not {s:?}"),
            )
        };
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(Token {
            history: u64::from_str_radix(&s[..16], 16).map_err(|_| bad())?,
            seq: u64::from_str_radix(&s[16..], 16).map_err(|_| bad())?,
        })
    }
}

/// Where a watch starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchStart {
    /// With the changes applied from now on.
    Now,
    /// With every change after this token (a token this node handed out).
    After(Token),
    /// With the current value of every live key ([`EventKind::Initial`]),
    /// then [`EventKind::Synced`], then every change since.
    Snapshot,
}

/// A watch of one collection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRequest {
    /// The collection (it need not exist yet).
    pub collection: String,
    /// Where to start.
    pub start: WatchStart,
    /// Only keys starting with this (drops are always sent).
    pub prefix: Option<Bytes>,
}

/// What an event says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// The key was set to the value.
    Set,
    /// The key was deleted.
    Delete,
    /// Every key with an older version than the drop's was removed.
    Drop,
    /// A key's current value, part of the snapshot a watch started with.
    Initial,
    /// The snapshot is complete; changes follow.
    Synced,
    /// Nothing to report; the token is fresh.
    Progress,
}

impl EventKind {
    /// The lowercase name used in SSE and JSON (`"set"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Set => "set",
            EventKind::Delete => "delete",
            EventKind::Drop => "drop",
            EventKind::Initial => "initial",
            EventKind::Synced => "synced",
            EventKind::Progress => "progress",
        }
    }
}

/// One event of a watch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    /// What happened.
    pub kind: EventKind,
    /// The key (empty for drop, synced and progress events).
    pub key: Bytes,
    /// The value (set and initial events).
    pub value: Option<Bytes>,
    /// The change's version (set, delete, drop and initial events).
    pub version: Option<Stamp>,
    /// Resume after this event (every kind but initial: a snapshot cannot
    /// be resumed halfway).
    pub token: Option<Token>,
}

/// A running watch: what a node hands the server that streams it.
pub trait EventSource: Send {
    /// The next events: waits until some are available, or until it is
    /// time for a [`EventKind::Progress`] event. An error ends the watch
    /// (its message says why: resuming impossible, fallen too far behind,
    /// the node shutting down).
    fn next_batch(
        &mut self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<WatchEvent>, OpError>> + Send + '_>>;

    /// The token that resumes after everything returned so far.
    fn token(&self) -> Token;

    /// Resolves once the source has ended the watch on its own side (the
    /// watcher fell too far behind) while what it read last still waits
    /// to be taken: a server stuck writing to a client that reads nothing
    /// learns of the end without taking it, and need not keep the
    /// connection for it. Never resolves by default.
    fn ended(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        Box::pin(std::future::pending())
    }

    /// Hands over the watch's place among the node's open watches (its
    /// `--max-watchers`), for the server to hold where it learns first
    /// that the client left (with the connection, not in the task that
    /// reads the log, which runs at a lower priority and can be starved
    /// for seconds): dropping it gives the place back. `None` by default,
    /// and once handed over.
    fn take_slot(&mut self) -> Option<Box<dyn Send + Sync>> {
        None
    }
}

/// How long a watch its source ended may send nothing more (what it read
/// last, the reason) before the server closes its connection.
pub const ENDED_QUIET: std::time::Duration = std::time::Duration::from_secs(10);

/// Resolves once `ended` ([`EventSource::ended`]) has, and `sent` (what
/// the server has written of the watch so far, in any unit) has then stood
/// still for a `quiet()` ([`ENDED_QUIET`] on the server's timer): a watch
/// the node ended whose client reads nothing, so its connection need not
/// be kept for it. A client that reads, but too slowly to free room for
/// the server's next write in a `quiet()`, loses it too.
pub async fn ended_unread<Q: Future<Output = ()>>(
    ended: impl Future<Output = ()>,
    sent: &std::sync::atomic::AtomicU64,
    mut quiet: impl FnMut() -> Q,
) {
    use std::sync::atomic::Ordering;
    ended.await;
    loop {
        let before = sent.load(Ordering::Relaxed);
        quiet().await;
        if sent.load(Ordering::Relaxed) == before {
            return;
        }
    }
}

impl fmt::Debug for dyn EventSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventSource({})", self.token())
    }
}

/// A version as 32 hex digits (timestamp, then node id): strings that sort
/// as the versions do.
pub fn version_hex(v: Stamp) -> String {
    format!("{:016x}{:016x}", v.ts, v.node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        let t = Token {
            history: 0xdead_beef,
            seq: 1 << 41 | 7,
        };
        let s = t.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<Token>().unwrap(), t);
        for bad in ["", "xyz", &s[..31], &format!("{s}0"), &s.replace('d', "g")] {
            assert!(bad.parse::<Token>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn version_strings_sort_as_versions() {
        let a = Stamp { ts: 5, node: 9 };
        let b = Stamp { ts: 6, node: 1 };
        let c = Stamp {
            ts: 1 << 60,
            node: 0,
        };
        assert!(version_hex(a) < version_hex(b));
        assert!(version_hex(b) < version_hex(c));
    }
}
