//! Watches on this node: each one a cursor over a collection's log
//! ([`dhrt_storage::Watch`]), woken when the collection changes.
//!
//! The write path only signals: the store calls [`WatchHub::changed`] after
//! each write, which costs one atomic load when nobody watches, and
//! otherwise a map lookup and one `Notify::notify_one` for the collection's
//! *feed*. A feed's own task then wakes the collection's watchers (so a
//! write never pays for a thousand wake-ups), and each watcher reads the
//! log itself, at its own pace: the log is the buffer, so a slow watcher
//! holds no memory and costs writers nothing. A watcher that falls more
//! than `max_lag_bytes` of log behind is closed with a reason; it can
//! resume with its last token.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dhrt_proto::{
    ErrorKind, EventKind, EventSource, OpError, Token, WatchEvent, WatchRequest, WatchStart,
};
use dhrt_storage::{Position, Store, WatchFrom};
use tokio::sync::Notify;

use crate::error::op_error;
use crate::watch_event::{Copies, Tally, event, token};

mod stats;

pub use stats::WatchCounts;
use stats::{Place, WatcherStat};

/// Settings of the watches of a node.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// A watcher further behind than this many bytes of log is closed.
    pub max_lag_bytes: u64,
    /// A watcher with nothing to send sends a progress event this often.
    pub progress_every: Duration,
    /// Bytes of keys and values read per batch.
    pub batch_bytes: usize,
    /// Watches open at once on the node, at most; more are refused (503).
    pub max_watchers: usize,
    /// Bytes of large values the node's watchers may hold as copies, all
    /// together: beyond it, a waiting large value is the log's pages.
    pub copy_budget: usize,
    /// A watcher past `max_lag_bytes` is closed only if it has not caught
    /// up any of it for this long (one reading faster than the writes are
    /// made goes on).
    pub lag_grace: Duration,
    /// Where watchers read the log and wake: a runtime of their own, whose
    /// threads run at a lower CPU priority (dhrtd makes one), so that when
    /// the CPU is short, watchers fall behind rather than writers slow
    /// down. `None`: the caller's runtime.
    pub runtime: Option<tokio::runtime::Handle>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            max_lag_bytes: 256 << 20,
            progress_every: Duration::from_secs(10),
            batch_bytes: 256 << 10,
            max_watchers: 65_536,
            copy_budget: 64 << 20,
            lag_grace: Duration::from_secs(30),
            runtime: None,
        }
    }
}

/// The watchers of one collection.
#[derive(Debug, Default)]
struct Feed {
    /// Signalled by writers; the feed's task waits on it.
    signal: Notify,
    /// Wakes every watcher of the collection.
    wake: Notify,
    watchers: AtomicUsize,
    stop: AtomicBool,
}

/// Feeds by collection, split in shards by name so that opening or closing
/// a watch, and a write's lookup, lock one small map.
const FEED_SHARDS: usize = 64;

/// Every watch of a node.
#[derive(Debug)]
pub struct WatchHub {
    store: Store,
    options: WatchOptions,
    feeds: [Mutex<HashMap<String, Arc<Feed>>>; FEED_SHARDS],
    /// Watches open: their places, held by their connections.
    watchers: Arc<AtomicUsize>,
    /// Watches whose tasks run (reading this node's logs, or following
    /// another node's): open ones, and those whose client left while their
    /// task has not run since. About twice `max_watchers` at most.
    tasks: Arc<AtomicUsize>,
    stats: Mutex<Vec<std::sync::Weak<WatcherStat>>>,
    started: Instant,
    opened: AtomicU64,
    events: AtomicU64,
    closed_lagging: AtomicU64,
    refused_gone: AtomicU64,
    copies: Arc<Copies>,
}

impl WatchHub {
    /// The hub of `store`'s watches; it listens to the store's changes.
    pub fn new(store: Store, options: WatchOptions) -> Arc<WatchHub> {
        let copies = Copies::new(options.copy_budget);
        let hub = Arc::new(WatchHub {
            store: store.clone(),
            options,
            feeds: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            watchers: Arc::default(),
            tasks: Arc::default(),
            stats: Mutex::new(Vec::new()),
            started: Instant::now(),
            opened: AtomicU64::new(0),
            events: AtomicU64::new(0),
            closed_lagging: AtomicU64::new(0),
            refused_gone: AtomicU64::new(0),
            copies,
        });
        let weak = Arc::downgrade(&hub);
        store.on_change(move |collection| {
            if let Some(hub) = weak.upgrade() {
                hub.changed(collection);
            }
        });
        hub
    }

    /// Called after every write that changed `collection`.
    #[inline]
    pub fn changed(&self, collection: &str) {
        if self.tasks.load(Ordering::Relaxed) == 0 {
            return;
        }
        if let Some(feed) = self.shard(collection).lock().unwrap().get(collection) {
            feed.signal.notify_one();
        }
    }

    fn shard(&self, collection: &str) -> &Mutex<HashMap<String, Arc<Feed>>> {
        let h = collection.bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        &self.feeds[h % FEED_SHARDS]
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    /// Opens a watch of a collection this node stores (`here`), or says
    /// where to watch it.
    pub(crate) fn open_checked(
        self: &Arc<Self>,
        request: &WatchRequest,
        here: bool,
    ) -> Result<Box<dyn EventSource>, OpError> {
        dhrt_storage::validate_collection_name(&request.collection).map_err(op_error)?;
        if !here {
            return Err(OpError::new(
                ErrorKind::Unavailable,
                format!(
                    "this node does not store collection {:?} (--collections): watch it on a node that does",
                    request.collection
                ),
            ));
        }
        self.open(request)
    }

    /// The watch runtime, if there is one.
    pub(crate) fn runtime(&self) -> Option<tokio::runtime::Handle> {
        self.options.runtime.clone()
    }

    /// Opens a watch (the caller checked the collection name and rights).
    pub fn open(self: &Arc<Self>, request: &WatchRequest) -> Result<Box<dyn EventSource>, OpError> {
        let from = match &request.start {
            WatchStart::Now => WatchFrom::Now,
            WatchStart::Snapshot => WatchFrom::Snapshot,
            WatchStart::After(t) => WatchFrom::After(Position {
                history: t.history,
                seq: t.seq,
            }),
        };
        // Taken first, given back by whoever holds it last (or here, if
        // the watch does not open).
        let (slot, task) = self.reserve()?;
        let watch = self
            .store
            .watch(&request.collection, from, request.prefix.as_deref())
            .map_err(|e| self.watch_error(e))?;
        let feed = self.feed(&request.collection);
        let stat = Arc::new(WatcherStat::default());
        self.track(&stat);
        self.opened.fetch_add(1, Ordering::Relaxed);
        let mut w = NodeWatch {
            hub: self.clone(),
            feed,
            name: request.collection.clone(),
            watch,
            slot: Some(Place::new(slot, stat.clone())),
            stat,
            next_progress: Instant::now() + self.options.progress_every,
            lagging: None,
            _task: task,
        };
        let Some(runtime) = &self.options.runtime else {
            return Ok(Box::new(w));
        };
        let slot = w.slot.take();
        // Read on the watch runtime, handed over one batch at a time: the
        // caller renders and sends only what the watcher managed to read.
        let token = w.token();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let closed = Arc::new(Mutex::new(None));
        let reason = closed.clone();
        let ended = tokio_util::sync::CancellationToken::new();
        let end_it = ended.clone();
        runtime.spawn(async move {
            loop {
                // Room first, then the read: a watcher that stops reading
                // holds the batch in the channel and the one it renders,
                // not a third read ahead. While its connection is stuck in
                // a write, the lag rule still applies, so that a watch
                // nobody reads does not keep its place in the log (and the
                // file a compaction replaced) until the connection's idle
                // timeout.
                let permit = loop {
                    tokio::select! {
                        permit = tx.reserve() => match permit {
                            Ok(permit) => break permit,
                            Err(_) => return,
                        },
                        () = tokio::time::sleep(LAG_CHECK_EVERY) => {
                            // Off the file a compaction replaced, if one
                            // did: the batches waiting hold copies.
                            w.watch.follow();
                            w.stat
                                .lag_bytes
                                .store(w.watch.lag_bytes(), Ordering::Relaxed);
                            if let Err(e) = w.check_lag() {
                                *reason.lock().unwrap() = Some(e);
                                end_it.cancel();
                                return;
                            }
                        }
                    }
                };
                let batch = tokio::select! {
                    b = w.next() => b,
                    () = tx.closed() => return,
                };
                let end = batch.is_err();
                permit.send(batch);
                if end {
                    end_it.cancel();
                    return;
                }
            }
        });
        Ok(Box::new(Pumped {
            rx,
            token,
            closed,
            ended,
            slot,
        }))
    }

    /// Takes a place among the node's open watches, and one among its
    /// watch tasks: those of watches whose client left go on until they
    /// next run (at a lower priority: under a full CPU, seconds later), and
    /// a churn must not pile them up.
    fn reserve(&self) -> Result<(Tally, Tally), OpError> {
        let max = self.options.max_watchers;
        let (task, running) = Tally::take(&self.tasks);
        if running >= max.saturating_mul(2) {
            return Err(OpError::new(
                ErrorKind::Unavailable,
                format!(
                    "this node is still closing watches whose clients left ({running} still run, for a limit of {max} open): try again shortly"
                ),
            ));
        }
        let (slot, open) = Tally::take(&self.watchers);
        if open >= max {
            return Err(OpError::new(
                ErrorKind::Unavailable,
                format!("this node has {max} watches open, its limit: try another node or later"),
            ));
        }
        Ok((slot, task))
    }

    /// The place and the task of a watch this node relays from another
    /// (counted with the local ones, given back on drop).
    pub(crate) fn relay_slot(self: &Arc<Self>) -> Result<(Tally, Tally), OpError> {
        let taken = self.reserve()?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        Ok(taken)
    }

    /// Counts events a relayed watch passed on, and a refused resume.
    pub(crate) fn count_relayed(&self, events: u64, gone: bool) {
        self.events.fetch_add(events, Ordering::Relaxed);
        if gone {
            self.refused_gone.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How often an idle watcher hears a progress event.
    pub(crate) fn progress_every(&self) -> Duration {
        self.options.progress_every
    }

    fn watch_error(&self, e: dhrt_storage::Error) -> OpError {
        match e {
            dhrt_storage::Error::ResumeGone { .. } => {
                self.refused_gone.fetch_add(1, Ordering::Relaxed);
                OpError::new(ErrorKind::Gone, e.to_string())
            }
            other => op_error(other),
        }
    }

    /// The feed of `collection`, created (with its task) if it has none.
    fn feed(&self, collection: &str) -> Arc<Feed> {
        let mut map = self.shard(collection).lock().unwrap();
        if let Some(f) = map.get(collection) {
            f.watchers.fetch_add(1, Ordering::Relaxed);
            return f.clone();
        }
        let feed = Arc::new(Feed::default());
        feed.watchers.store(1, Ordering::Relaxed);
        map.insert(collection.to_string(), feed.clone());
        drop(map);
        let task = feed.clone();
        let spawn_on = self
            .options
            .runtime
            .clone()
            .unwrap_or_else(tokio::runtime::Handle::current);
        spawn_on.spawn(async move {
            loop {
                task.signal.notified().await;
                if task.stop.load(Ordering::Acquire) {
                    return;
                }
                task.wake.notify_waiters();
                // With many watchers, wake them at most once per window
                // (5 µs a watcher, at most 10 ms): each wake-up then reads
                // a batch instead of one event, and the wake-ups cost a
                // bounded share of the CPU whatever the write rate. A
                // write during the window leaves a permit: nothing is
                // missed, only gathered. One watcher is woken at once.
                let n = task.watchers.load(Ordering::Relaxed) as u64;
                if n > 1 {
                    tokio::time::sleep(Duration::from_micros((n * 5).min(10_000))).await;
                }
            }
        });
        feed
    }

    fn release(&self, collection: &str, feed: &Arc<Feed>) {
        let mut map = self.shard(collection).lock().unwrap();
        if feed.watchers.fetch_sub(1, Ordering::AcqRel) == 1 {
            map.remove(collection);
            feed.stop.store(true, Ordering::Release);
            feed.signal.notify_one();
        }
    }
}

/// How often a watch whose client is not taking its batches checks the
/// lag rule.
const LAG_CHECK_EVERY: Duration = Duration::from_millis(500);

/// One open watch.
struct NodeWatch {
    hub: Arc<WatchHub>,
    feed: Arc<Feed>,
    name: String,
    watch: dhrt_storage::Watch,
    stat: Arc<WatcherStat>,
    next_progress: Instant,
    /// Since when it has been more than the lag limit behind without
    /// catching up, and by how much then.
    lagging: Option<(Instant, u64)>,
    /// Its place among the open watches, unless handed over.
    slot: Option<Place>,
    _task: Tally,
}

impl Drop for NodeWatch {
    fn drop(&mut self) {
        self.hub.release(&self.name, &self.feed);
    }
}

impl NodeWatch {
    /// Ends the watch if it has been past the lag limit for the grace
    /// period without catching up any of it.
    fn check_lag(&mut self) -> Result<(), OpError> {
        let known = self.watch.lag_bytes_known();
        let limit = self.hub.options.max_lag_bytes;
        if known.is_some_and(|l| l <= limit) {
            self.lagging = None;
            return Ok(());
        }
        // Past the limit (measured in the file a compaction put in place of
        // the one it last read, if one did); not told in a snapshot.
        let over = known.is_some();
        // Progress is judged in records, which compaction does not shrink.
        let behind = self.watch.records_behind();
        let now = Instant::now();
        match self.lagging {
            None if !over => {}
            Some((_, then)) if behind < then => self.lagging = Some((now, behind)),
            Some((since, _)) if now.duration_since(since) >= self.hub.options.lag_grace => {
                self.hub.closed_lagging.fetch_add(1, Ordering::Relaxed);
                return Err(OpError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "this watch fell too far behind ({behind} changes unread, more than the limit of {limit} bytes, and its client took not one batch of them in {} s): resume from the last token you received, or take a snapshot",
                        self.hub.options.lag_grace.as_secs()
                    ),
                ));
            }
            Some(_) => {}
            None => self.lagging = Some((now, behind)),
        }
        Ok(())
    }

    async fn next(&mut self) -> Result<Vec<WatchEvent>, OpError> {
        loop {
            let feed = self.feed.clone();
            let notified = feed.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.check_lag()?;
            let events = self
                .watch
                .poll(self.hub.options.batch_bytes)
                .map_err(|e| self.hub.watch_error(e))?;
            self.stat
                .lag_bytes
                .store(self.watch.lag_bytes(), Ordering::Relaxed);
            if !events.is_empty() {
                // Behind from now until a read finds nothing left (a
                // watcher that stops reading stays behind in the stats).
                let _ = self.stat.behind_since.compare_exchange(
                    0,
                    self.hub.now_ms(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                self.hub
                    .events
                    .fetch_add(events.len() as u64, Ordering::Relaxed);
                self.next_progress = Instant::now() + self.hub.options.progress_every;
                return Ok(events
                    .into_iter()
                    .map(|e| event(e, &self.hub.copies))
                    .collect());
            }
            self.stat.behind_since.store(0, Ordering::Relaxed);
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(self.next_progress.into()) => {
                    self.next_progress = Instant::now() + self.hub.options.progress_every;
                    return Ok(vec![WatchEvent {
                        kind: EventKind::Progress,
                        key: Default::default(),
                        value: None,
                        version: None,
                        token: Some(token(self.watch.position())),
                    }]);
                }
            }
        }
    }
}

/// A watch read on the watch runtime: its batches, as they are read.
struct Pumped {
    rx: tokio::sync::mpsc::Receiver<Result<Vec<WatchEvent>, OpError>>,
    token: Token,
    /// Why the reading side ended the watch while a batch waited for the
    /// client (it fell too far behind), for after that batch.
    closed: Arc<Mutex<Option<OpError>>>,
    /// Cancelled when the reading side ended the watch with an error.
    ended: tokio_util::sync::CancellationToken,
    /// Its place among the open watches, unless handed over.
    slot: Option<Place>,
}

impl EventSource for Pumped {
    fn next_batch(
        &mut self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<WatchEvent>, OpError>> + Send + '_>> {
        Box::pin(async move {
            let batch = match self.rx.recv().await {
                Some(batch) => batch,
                None => Err(self.closed.lock().unwrap().take().unwrap_or_else(|| {
                    OpError::new(
                        ErrorKind::Unavailable,
                        "the watch ended: the node is shutting down",
                    )
                })),
            }?;
            if let Some(t) = batch.iter().rev().find_map(|e| e.token) {
                self.token = t;
            }
            Ok(batch)
        })
    }

    fn token(&self) -> Token {
        self.token
    }

    fn ended(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        Box::pin(self.ended.clone().cancelled_owned())
    }

    fn take_slot(&mut self) -> Option<Box<dyn Send + Sync>> {
        Place::boxed(&mut self.slot)
    }
}

impl EventSource for NodeWatch {
    fn next_batch(
        &mut self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<WatchEvent>, OpError>> + Send + '_>> {
        Box::pin(self.next())
    }

    fn token(&self) -> Token {
        token(self.watch.position())
    }

    fn take_slot(&mut self) -> Option<Box<dyn Send + Sync>> {
        Place::boxed(&mut self.slot)
    }
}
