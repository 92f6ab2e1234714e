//! Watches of collections this node does not store (`--collections`),
//! relayed from a node that does.
//!
//! The follower (this node, where the client watches) opens a *session* on
//! a host with [`PeerOp::WatchOpen`] and long-polls it with
//! [`PeerOp::WatchNext`]: the host's own watch of its log (a session)
//! does all the work, so the guarantees are the host's: winners only,
//! versions increasing per key, snapshot then changes, and the host's
//! tokens, passed through untouched. A token therefore resumes exactly on
//! the node that issued it, whether the client comes back through a
//! follower or to that node itself; on any other node it is `Gone`
//! (another history), never a silent gap. A follower tries every host in
//! order until one takes the token.
//!
//! A follower reads one batch ahead of its client at most: the client's
//! pace sets the polling, and the host's lag limit closes a watch that
//! falls too far behind, as for a local one. The host's side is
//! `sessions`. Polls ride links of their
//! own ([`WATCHES_PER_LINK`] watches each), so they never queue behind
//! replication, nor replication behind them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dhrt_proto::{
    ErrorKind, EventKind, EventSource, Inflight, OpError, PeerOp, PeerReply, Token, WatchEvent,
    WatchRequest, WatchStart,
};

use crate::cluster::Cluster;
use crate::link::{Link, LinkError};
use crate::stored::WhileStored;
use crate::watch::WatchHub;
use crate::watch_event::Tally;

/// How long a host holds one `WatchNext` open when nothing happens.
const POLL_WAIT: Duration = Duration::from_secs(2);
/// Watches whose polls share one link: each has at most one poll in flight,
/// and a peer connection answers 64 requests at once
/// (`peer_server::MAX_IN_FLIGHT`); the rest is room for opens and closes.
const WATCHES_PER_LINK: usize = 48;

/// A link to a host and how many watches poll over it.
#[derive(Debug)]
struct PollLink {
    link: Arc<Link>,
    users: Arc<AtomicUsize>,
}

/// A watch's use of a [`PollLink`], given back on drop.
#[derive(Debug)]
struct LinkUse(Arc<AtomicUsize>);

impl Drop for LinkUse {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Opens watches of collections this node does not store, on the nodes
/// that do.
#[derive(Debug)]
pub(crate) struct Relay {
    cluster: Arc<Cluster>,
    hub: Arc<WatchHub>,
    /// Poll links by host id, each with the address it dials.
    links: Mutex<HashMap<u64, (String, Vec<PollLink>)>>,
    /// The node-wide budget of large values in flight: a batch read from a
    /// host holds its share until its client has read it.
    inflight: Arc<Inflight>,
}

impl Relay {
    pub(crate) fn new(
        cluster: Arc<Cluster>,
        hub: Arc<WatchHub>,
        inflight: Arc<Inflight>,
    ) -> Arc<Relay> {
        Arc::new(Relay {
            cluster,
            hub,
            links: Mutex::new(HashMap::new()),
            inflight,
        })
    }

    /// A link to host `id` at `addr` with room for one more watch.
    fn link(&self, id: u64, addr: &str) -> (Arc<Link>, LinkUse) {
        let mut links = self.links.lock().unwrap();
        let (at, pool) = links
            .entry(id)
            .or_insert_with(|| (addr.to_string(), Vec::new()));
        if at != addr {
            *at = addr.to_string();
            pool.clear();
        }
        // Links nobody polls over are let go (their connections close),
        // but one: the next watch need not dial.
        let mut spare = false;
        pool.retain(|p| {
            let used = p.users.load(Ordering::Acquire) > 0 || Arc::strong_count(&p.link) > 1;
            used || !std::mem::replace(&mut spare, true)
        });
        let spare = pool
            .iter()
            .find(|p| p.users.load(Ordering::Acquire) < WATCHES_PER_LINK);
        let p = match spare {
            Some(p) => p,
            None => {
                pool.push(PollLink {
                    link: Arc::new(Link::to_member(addr.to_string(), id, self.cluster.dialer())),
                    users: Arc::default(),
                });
                pool.last().unwrap()
            }
        };
        p.users.fetch_add(1, Ordering::AcqRel);
        (p.link.clone(), LinkUse(p.users.clone()))
    }

    /// Opens a watch: of the local log when this node stores the
    /// collection, otherwise followed on a node that does.
    pub(crate) async fn watch(
        self: &Arc<Self>,
        request: WatchRequest,
    ) -> Result<Box<dyn EventSource>, OpError> {
        if !self.cluster.stores_locally(&request.collection) {
            return self.open(request).await;
        }
        // Ended once this node stops storing the collection (a move, a
        // change of replication factor, or, for a node storing it only
        // while no owner is alive, an owner back): writes go elsewhere then.
        let inner = match self.hub.open(&request) {
            // Stored here only while none of its owners is alive: a token
            // this node cannot resume is theirs (or older than this node's
            // copy), and resumes once one is back. Not "take a snapshot".
            Err(e)
                if e.kind == ErrorKind::Gone
                    && matches!(request.start, WatchStart::After(_))
                    && !self.cluster.hosts_here(&request.collection)
                    && !self.cluster.owners(&request.collection).is_empty() =>
            {
                return Err(OpError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "this node does not own collection {:?}, and none of its owners, which issued this token, is up: retry, and the watch resumes once one is back (or take a snapshot)",
                        request.collection
                    ),
                ));
            }
            opened => opened?,
        };
        let cluster = self.cluster.clone();
        let collection = request.collection.clone();
        Ok(WhileStored::boxed(
            inner,
            request.collection,
            Box::new(move || cluster.stores_locally(&collection)),
        ))
    }

    /// Opens a watch on the first host that takes it, on a task of its own:
    /// a client gone before the host answered does not leave the host's
    /// session open (the finished task drops the watch, which closes it).
    async fn open(
        self: &Arc<Self>,
        request: WatchRequest,
    ) -> Result<Box<dyn EventSource>, OpError> {
        let me = self.clone();
        tokio::spawn(async move { me.open_on_a_host(request).await })
            .await
            .unwrap_or_else(|e| {
                Err(OpError::new(
                    ErrorKind::Internal,
                    format!("opening a relayed watch failed: {e}"),
                ))
            })
    }

    /// Opens a watch on the first host that takes it: one that cannot
    /// resume the token (it did not issue it) says `Gone`, and the next
    /// is asked. `Gone` only if every host said so.
    async fn open_on_a_host(
        self: &Arc<Self>,
        request: WatchRequest,
    ) -> Result<Box<dyn EventSource>, OpError> {
        let (slot, task) = self.hub.relay_slot()?;
        let hosts = self.cluster.watch_hosts(&request.collection);
        let mut gone = None;
        let mut failed = None;
        for (host, addr) in hosts {
            let (link, link_use) = self.link(host, &addr);
            let opened = link
                .request(
                    PeerOp::WatchOpen(request.clone()),
                    self.cluster.peer_timeout(),
                )
                .await;
            match opened {
                Ok(PeerReply::WatchOpened { session, token }) => {
                    return Ok(Box::new(RemoteWatch {
                        relay: self.clone(),
                        slot: Some(slot),
                        _task: task,
                        _link_use: link_use,
                        host,
                        link,
                        session,
                        collection: request.collection,
                        prefix: request.prefix,
                        token,
                        resumable: request.start != WatchStart::Snapshot,
                        next_progress: Instant::now() + self.hub.progress_every(),
                    }));
                }
                Ok(other) => failed = Some(format!("node {host:016x} answered {other:?}")),
                Err(LinkError::Remote { error, .. }) => match error.kind {
                    ErrorKind::Gone => gone = Some(error),
                    ErrorKind::InvalidInput | ErrorKind::TooLarge => return Err(error),
                    _ => failed = Some(format!("node {host:016x}: {}", error.message)),
                },
                Err(e) => failed = Some(e.to_string()),
            }
        }
        match (gone, failed) {
            (Some(g), None) => {
                self.hub.count_relayed(0, true);
                Err(g)
            }
            (_, Some(why)) => Err(OpError::new(
                ErrorKind::Unavailable,
                format!(
                    "this node does not store collection {:?}, and no node that does took the watch ({why}): retry",
                    request.collection
                ),
            )),
            (None, None) => Err(OpError::new(
                ErrorKind::Unavailable,
                format!(
                    "this node does not store collection {:?}, and no node that does is reachable: retry",
                    request.collection
                ),
            )),
        }
    }
}

/// A watch followed on another node.
struct RemoteWatch {
    relay: Arc<Relay>,
    slot: Option<Tally>,
    _task: Tally,
    _link_use: LinkUse,
    host: u64,
    link: Arc<Link>,
    session: u64,
    collection: String,
    prefix: Option<Bytes>,
    /// The host's token after everything returned so far.
    token: Token,
    /// Whether `token` resumes (a snapshot's does from `Synced` on).
    resumable: bool,
    next_progress: Instant,
}

impl Drop for RemoteWatch {
    fn drop(&mut self) {
        let link = self.link.clone();
        let op = PeerOp::WatchClose {
            session: self.session,
        };
        let timeout = self.relay.cluster.peer_timeout();
        // Not awaited: a host that misses it closes the session itself.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = link.request(op, timeout).await;
            });
        }
    }
}

impl RemoteWatch {
    fn failed(&self, why: impl std::fmt::Display) -> OpError {
        OpError::new(
            ErrorKind::Unavailable,
            format!(
                "this watch followed node {:016x}, which stores collection {:?}, and lost it ({why}): resume from the last token you received (a snapshot not yet synced starts again)",
                self.host, self.collection
            ),
        )
    }

    /// Opens the session again from the token, on the same host (it forgot
    /// the session: it restarted, or went unpolled too long).
    async fn reopen(&mut self) -> Result<(), OpError> {
        let request = WatchRequest {
            collection: self.collection.clone(),
            start: WatchStart::After(self.token),
            prefix: self.prefix.clone(),
        };
        match self
            .link
            .request(
                PeerOp::WatchOpen(request),
                self.relay.cluster.peer_timeout(),
            )
            .await
        {
            Ok(PeerReply::WatchOpened { session, .. }) => {
                self.session = session;
                Ok(())
            }
            Ok(other) => Err(self.failed(format!("it answered {other:?}"))),
            Err(LinkError::Remote { error, .. }) if error.kind == ErrorKind::Gone => {
                self.relay.hub.count_relayed(0, true);
                Err(error)
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    async fn next(&mut self) -> Result<Vec<WatchEvent>, OpError> {
        let timeout = POLL_WAIT
            + self
                .relay
                .cluster
                .peer_timeout()
                .max(Duration::from_secs(2));
        loop {
            let op = PeerOp::WatchNext {
                session: self.session,
                wait_ms: POLL_WAIT.as_millis() as u32,
            };
            match self.link.request(op, timeout).await {
                Ok(PeerReply::Events(events)) if events.is_empty() => {
                    if self.resumable && Instant::now() >= self.next_progress {
                        self.next_progress = Instant::now() + self.relay.hub.progress_every();
                        return Ok(vec![WatchEvent {
                            kind: EventKind::Progress,
                            key: Bytes::new(),
                            value: None,
                            version: None,
                            token: Some(self.token),
                        }]);
                    }
                }
                Ok(PeerReply::Events(mut events)) => {
                    // In this node's memory until the client has read it;
                    // refused past the budget (the client resumes from the
                    // last token it received: these events come again).
                    let parts = events
                        .iter_mut()
                        .flat_map(|e| std::iter::once(&mut e.key).chain(e.value.as_mut()))
                        .collect();
                    if let Err(e) = self.relay.inflight.hold_all(parts) {
                        return Err(OpError::new(
                            ErrorKind::Unavailable,
                            format!(
                                "the next changes of collection {:?}, relayed from node {:016x}: {e}; resume from the last token you received",
                                self.collection, self.host
                            ),
                        ));
                    }
                    if let Some(t) = events.iter().rev().find_map(|e| e.token) {
                        self.token = t;
                    }
                    if events.iter().any(|e| e.kind == EventKind::Synced) {
                        self.resumable = true;
                    }
                    let counted = events
                        .iter()
                        .filter(|e| e.kind != EventKind::Progress)
                        .count();
                    self.relay.hub.count_relayed(counted as u64, false);
                    self.next_progress = Instant::now() + self.relay.hub.progress_every();
                    return Ok(events);
                }
                Ok(other) => return Err(self.failed(format!("it answered {other:?}"))),
                Err(LinkError::Remote { error, .. }) if error.kind == ErrorKind::NotFound => {
                    if !self.resumable {
                        return Err(self.failed("the host forgot the snapshot halfway"));
                    }
                    self.reopen().await?;
                }
                Err(LinkError::Remote { error, .. }) => {
                    if error.kind == ErrorKind::Gone {
                        self.relay.hub.count_relayed(0, true);
                    }
                    return Err(error);
                }
                Err(e) => return Err(self.failed(e)),
            }
        }
    }
}

impl EventSource for RemoteWatch {
    fn next_batch(
        &mut self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<WatchEvent>, OpError>> + Send + '_>> {
        Box::pin(self.next())
    }

    fn token(&self) -> Token {
        self.token
    }

    fn take_slot(&mut self) -> Option<Box<dyn Send + Sync>> {
        Tally::boxed(&mut self.slot)
    }
}
