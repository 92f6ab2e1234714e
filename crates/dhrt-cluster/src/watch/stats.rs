//! What a node says about its watches (`GET /`, `/metrics`), and the place
//! each open watch holds, which decides whether its lag still counts.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::WatchHub;
use crate::watch_event::Tally;

/// What the hub knows of one watcher, for stats.
#[derive(Debug, Default)]
pub(super) struct WatcherStat {
    /// When it last had events left unread after a read (ms since the
    /// hub started, plus one), or 0 while it is caught up.
    pub(super) behind_since: AtomicU64,
    pub(super) lag_bytes: AtomicU64,
    /// Its place among the open watches was given back (its client left):
    /// its task may not have run since, but its lag no longer counts.
    left: AtomicBool,
}

/// An open watch's place among the node's open watches, held by the watch
/// or by its connection: given back, the watch stops counting, its lag
/// included.
pub(super) struct Place {
    _open: Tally,
    stat: Arc<WatcherStat>,
}

impl Place {
    pub(super) fn new(open: Tally, stat: Arc<WatcherStat>) -> Place {
        Place { _open: open, stat }
    }

    /// For [`dhrt_proto::EventSource::take_slot`].
    pub(super) fn boxed(place: &mut Option<Place>) -> Option<Box<dyn Send + Sync>> {
        Some(Box::new(place.take()?))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.stat.left.store(true, Ordering::Relaxed);
    }
}

/// What `GET /` and `/metrics` say about watches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchCounts {
    /// Watches open now.
    pub watchers: u64,
    /// Watch tasks running: the open watches', and those of watches whose
    /// client left that have not wound down yet.
    pub tasks: u64,
    /// Events sent since the node started (progress events not counted).
    pub events: u64,
    /// How long the slowest open watcher has been behind, in ms (0: all
    /// caught up).
    pub slowest_lag_ms: u64,
    /// Bytes of log the slowest open watcher had left to read at its last
    /// read.
    pub slowest_lag_bytes: u64,
    /// Watches closed for falling too far behind.
    pub closed_lagging: u64,
    /// Watches refused or ended because their token could not be resumed.
    pub gone: u64,
}

impl WatchHub {
    /// What `GET /` says about watches.
    pub(crate) fn info(&self) -> dhrt_proto::WatchInfo {
        let c = self.counts();
        dhrt_proto::WatchInfo {
            watchers: c.watchers,
            events_sent: c.events,
            slowest_lag_ms: c.slowest_lag_ms,
            slowest_lag_bytes: c.slowest_lag_bytes,
        }
    }

    /// Keeps `stat` for [`counts`](Self::counts) while the watch is open.
    pub(super) fn track(&self, stat: &Arc<WatcherStat>) {
        let mut stats = self.stats.lock().unwrap();
        stats.retain(|s| s.upgrade().is_some_and(|s| !s.left.load(Ordering::Relaxed)));
        stats.push(Arc::downgrade(stat));
    }

    /// The counts for stats and metrics. A watch whose client left is not
    /// counted, though its task (on a starved watch runtime) may hold its
    /// cursor until it next runs.
    pub fn counts(&self) -> WatchCounts {
        let now = self.now_ms();
        let mut counts = WatchCounts {
            watchers: self.watchers.load(Ordering::Relaxed) as u64,
            tasks: self.tasks.load(Ordering::Relaxed) as u64,
            events: self.events.load(Ordering::Relaxed),
            closed_lagging: self.closed_lagging.load(Ordering::Relaxed),
            gone: self.refused_gone.load(Ordering::Relaxed),
            ..WatchCounts::default()
        };
        for s in self
            .stats
            .lock()
            .unwrap()
            .iter()
            .filter_map(|s| s.upgrade())
            .filter(|s| !s.left.load(Ordering::Relaxed))
        {
            let since = s.behind_since.load(Ordering::Relaxed);
            if since != 0 {
                counts.slowest_lag_ms = counts.slowest_lag_ms.max(now.saturating_sub(since));
            }
            counts.slowest_lag_bytes = counts
                .slowest_lag_bytes
                .max(s.lag_bytes.load(Ordering::Relaxed));
        }
        counts
    }

    /// Appends the watch metrics (Prometheus text format) to `out`.
    pub fn render_metrics(&self, out: &mut String) {
        let c = self.counts();
        let _ = write!(
            out,
            "# HELP dhrt_watchers Watches open on this node.\n# TYPE dhrt_watchers gauge\ndhrt_watchers {}\n\
             # HELP dhrt_watch_tasks Watch tasks running: the open watches', and those of watches whose client left, winding down.\n# TYPE dhrt_watch_tasks gauge\ndhrt_watch_tasks {}\n\
             # HELP dhrt_watch_events_total Watch events sent (progress events not counted).\n# TYPE dhrt_watch_events_total counter\ndhrt_watch_events_total {}\n\
             # HELP dhrt_watch_slowest_lag_seconds How long the slowest watcher has been behind.\n# TYPE dhrt_watch_slowest_lag_seconds gauge\ndhrt_watch_slowest_lag_seconds {:.3}\n\
             # HELP dhrt_watch_slowest_lag_bytes Bytes of log the slowest watcher had left at its last read.\n# TYPE dhrt_watch_slowest_lag_bytes gauge\ndhrt_watch_slowest_lag_bytes {}\n\
             # HELP dhrt_watch_closed_total Watches ended by the node, by reason.\n# TYPE dhrt_watch_closed_total counter\n\
             dhrt_watch_closed_total{{reason=\"lagging\"}} {}\ndhrt_watch_closed_total{{reason=\"gone\"}} {}\n",
            c.watchers,
            c.tasks,
            c.events,
            c.slowest_lag_ms as f64 / 1000.0,
            c.slowest_lag_bytes,
            c.closed_lagging,
            c.gone,
        );
    }
}
