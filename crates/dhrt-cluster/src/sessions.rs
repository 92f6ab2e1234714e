//! The host's side of a relayed watch (see `relay`): watch sessions that
//! peers open on this node for their clients, read with long polls, cut
//! into replies by bytes, and closed when their follower says so or stops
//! polling.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dhrt_proto::{ErrorKind, EventSource, OpError, PeerReply, WatchEvent, WatchRequest};

use crate::stored::{Stored, WhileStored};
use crate::watch::WatchHub;

/// The longest wait a host grants one `WatchNext`.
const MAX_POLL_WAIT: Duration = Duration::from_secs(10);
/// A session its follower has not read for this long is closed.
const SESSION_TTL: Duration = Duration::from_secs(30);
/// Bytes of keys and values in one reply beyond its first event (a local
/// watcher's batch): well under the frame limit, which the largest single
/// event fits.
pub(crate) const REPLY_BYTES: usize = 256 << 10;

/// The watch sessions peers opened on this node.
#[derive(Debug)]
pub(crate) struct Sessions {
    hub: Arc<WatchHub>,
    map: Mutex<HashMap<u64, Arc<SessionEntry>>>,
    sweeping: std::sync::Once,
}

#[derive(Debug)]
struct SessionEntry {
    owner: u64,
    /// When a poll last ended.
    used: Mutex<Instant>,
    state: tokio::sync::Mutex<SessionState>,
}

struct SessionState {
    source: Box<dyn EventSource>,
    /// Read from the watch and not sent yet (a reply is cut by bytes).
    pending: VecDeque<WatchEvent>,
}

impl std::fmt::Debug for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionState({} pending)", self.pending.len())
    }
}

fn no_session(session: u64) -> OpError {
    OpError::new(
        ErrorKind::NotFound,
        format!("no watch session {session:016x} here (closed, expired, or this node restarted)"),
    )
}

impl Sessions {
    pub(crate) fn new(hub: Arc<WatchHub>) -> Arc<Sessions> {
        Arc::new(Sessions {
            hub,
            map: Mutex::new(HashMap::new()),
            sweeping: std::sync::Once::new(),
        })
    }

    /// Opens a session of peer `owner` watching a collection this node
    /// stores (`stored`; otherwise the follower asks another host). The
    /// session ends once this node no longer stores it.
    pub(crate) fn open(
        self: &Arc<Self>,
        owner: u64,
        request: WatchRequest,
        stored: Stored,
    ) -> Result<PeerReply, OpError> {
        self.start_sweeping();
        let source = self.hub.open_checked(&request, stored())?;
        let source = WhileStored::boxed(source, request.collection.clone(), stored);
        let token = source.token();
        let entry = Arc::new(SessionEntry {
            owner,
            used: Mutex::new(Instant::now()),
            state: tokio::sync::Mutex::new(SessionState {
                source,
                pending: VecDeque::new(),
            }),
        });
        // Random, never a counter: a follower that still holds a session
        // of this node's previous run must get `NotFound`, not another
        // watch's session that reuses its number.
        let mut map = self.map.lock().unwrap();
        let session = loop {
            let id: u64 = rand::random();
            if !map.contains_key(&id) {
                break id;
            }
        };
        map.insert(session, entry);
        Ok(PeerReply::WatchOpened { session, token })
    }

    fn entry(&self, owner: u64, session: u64) -> Result<Arc<SessionEntry>, OpError> {
        self.map
            .lock()
            .unwrap()
            .get(&session)
            .filter(|e| e.owner == owner)
            .cloned()
            .ok_or_else(|| no_session(session))
    }

    /// The next events of a session: those left from the last read, or
    /// what the watch yields within `wait_ms`. An error ends the session.
    pub(crate) async fn next(
        &self,
        owner: u64,
        session: u64,
        wait_ms: u32,
    ) -> Result<PeerReply, OpError> {
        let entry = self.entry(owner, session)?;
        let wait = Duration::from_millis(u64::from(wait_ms)).min(MAX_POLL_WAIT);
        let mut state = entry.state.lock().await;
        if state.pending.is_empty() {
            match tokio::time::timeout(wait, state.source.next_batch()).await {
                Ok(Ok(batch)) => state.pending.extend(batch),
                Ok(Err(e)) => {
                    self.map.lock().unwrap().remove(&session);
                    return Err(e);
                }
                Err(_) => {}
            }
        }
        let mut reply = Vec::new();
        let mut bytes = 0;
        while let Some(e) = state.pending.front() {
            let size = e.key.len() + e.value.as_ref().map_or(0, Bytes::len);
            if !reply.is_empty() && bytes + size > REPLY_BYTES {
                break;
            }
            bytes += size;
            reply.extend(state.pending.pop_front());
        }
        *entry.used.lock().unwrap() = Instant::now();
        Ok(PeerReply::Events(reply))
    }

    /// Closes a session (one already gone is no error).
    pub(crate) fn close(&self, owner: u64, session: u64) -> PeerReply {
        let mut map = self.map.lock().unwrap();
        if map.get(&session).is_some_and(|e| e.owner == owner) {
            map.remove(&session);
        }
        PeerReply::WatchClosed
    }

    /// Sessions open now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    /// Closes, every few seconds, the sessions nobody polls (a follower
    /// that died or lost its link never says goodbye).
    fn start_sweeping(self: &Arc<Self>) {
        self.sweeping.call_once(|| {
            let weak: Weak<Sessions> = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SESSION_TTL / 6);
                loop {
                    tick.tick().await;
                    let Some(me) = weak.upgrade() else { return };
                    me.sweep(SESSION_TTL);
                }
            });
        });
    }

    fn sweep(&self, ttl: Duration) {
        let now = Instant::now();
        self.map.lock().unwrap().retain(|_, e| {
            // One being polled is in use, whatever its stamp says.
            e.state.try_lock().is_err() || now.duration_since(*e.used.lock().unwrap()) < ttl
        });
    }
}

#[cfg(test)]
mod tests {
    use dhrt_storage::{Options, Store};

    use super::*;
    use crate::watch::WatchOptions;
    use dhrt_proto::{Token, WatchStart};

    fn sessions() -> (Store, Arc<Sessions>) {
        let store = Store::memory(Options::default());
        let hub = WatchHub::new(store.clone(), WatchOptions::default());
        (store, Sessions::new(hub))
    }

    fn open(s: &Arc<Sessions>, owner: u64, start: WatchStart) -> u64 {
        let request = WatchRequest {
            collection: "c".into(),
            start,
            prefix: None,
        };
        match s.open(owner, request, Box::new(|| true)).unwrap() {
            PeerReply::WatchOpened { session, .. } => session,
            other => panic!("{other:?}"),
        }
    }

    async fn events(s: &Sessions, owner: u64, session: u64) -> Vec<WatchEvent> {
        match s.next(owner, session, 200).await.unwrap() {
            PeerReply::Events(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_session_is_its_owners_alone_and_is_cut_by_bytes() {
        let (store, s) = sessions();
        let session = open(&s, 7, WatchStart::Now);
        // Another peer cannot read or close it.
        let err = s.next(8, session, 10).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        s.close(8, session);
        assert_eq!(s.len(), 1);
        // Nothing yet: an empty reply once the wait is over.
        assert!(events(&s, 7, session).await.is_empty());
        // Three values of 600 KiB: a reply holds one past the first only
        // while under REPLY_BYTES, so they come in three replies, in order.
        let big = vec![b'v'; 600 << 10];
        for k in [b"a", b"b", b"c"] {
            store.set("c", k, &big).unwrap();
        }
        let mut keys = Vec::new();
        while keys.len() < 3 {
            let got = events(&s, 7, session).await;
            assert!(!got.is_empty());
            let bytes: usize = got.iter().map(|e| e.value.as_ref().unwrap().len()).sum();
            assert!(got.len() == 1 || bytes <= REPLY_BYTES, "{bytes}");
            keys.extend(got.iter().map(|e| e.key.clone()));
        }
        assert_eq!(keys, [&b"a"[..], b"b", b"c"]);
        s.close(7, session);
        assert_eq!(s.len(), 0);
        assert_eq!(
            s.next(7, session, 10).await.unwrap_err().kind,
            ErrorKind::NotFound
        );
    }

    #[tokio::test]
    async fn a_session_of_a_previous_run_is_not_found_after_a_restart() {
        // A follower still holding a session of this node's last run, and
        // this node restarted (new sessions) and opening the follower's
        // other watches: the old session must not name one of them.
        let (_store, before) = sessions();
        let old = open(&before, 7, WatchStart::Now);
        let (_store, after) = sessions();
        let fresh: Vec<u64> = (0..64).map(|_| open(&after, 7, WatchStart::Now)).collect();
        assert!(!fresh.contains(&old));
        assert_eq!(
            after.next(7, old, 10).await.unwrap_err().kind,
            ErrorKind::NotFound
        );
    }

    #[tokio::test]
    async fn an_unpolled_session_is_swept_and_a_polled_one_kept() {
        let (_store, s) = sessions();
        let idle = open(&s, 1, WatchStart::Now);
        let busy = open(&s, 1, WatchStart::Now);
        assert_eq!(s.hub.counts().watchers, 2);
        // One is being polled while the sweep runs.
        let poll = {
            let s = s.clone();
            tokio::spawn(async move { s.next(1, busy, 300).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.sweep(Duration::ZERO);
        assert_eq!(
            s.next(1, idle, 10).await.unwrap_err().kind,
            ErrorKind::NotFound
        );
        assert!(poll.await.unwrap().is_ok());
        assert_eq!(s.len(), 1);
        // Its host-side watch was closed with it.
        assert_eq!(s.hub.counts().watchers, 1);
    }

    #[tokio::test]
    async fn an_open_the_host_cannot_honour_is_refused() {
        let (store, s) = sessions();
        store.set("c", b"k", b"v").unwrap();
        let request = WatchRequest {
            collection: "c".into(),
            start: WatchStart::After(Token { history: 1, seq: 5 }),
            prefix: None,
        };
        assert_eq!(
            s.open(1, request, Box::new(|| true)).unwrap_err().kind,
            ErrorKind::Gone
        );
        let request = WatchRequest {
            collection: "c".into(),
            start: WatchStart::Now,
            prefix: None,
        };
        let err = s.open(1, request, Box::new(|| false)).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unavailable, "not stored here");
        assert_eq!(s.len(), 0);
    }
}
