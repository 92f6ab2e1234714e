//! The cluster's metrics, in the Prometheus text format.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Cluster, Peer};
use crate::membership::member_state;

impl Cluster {
    /// Cluster metrics in the Prometheus text format: members by state,
    /// per-peer replication queues and acknowledged writes, anti-entropy
    /// activity, and whether this node is syncing.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let table = self.membership.lock().unwrap().table();
        let _ = writeln!(
            out,
            "# HELP dhrt_cluster_members Members this node knows, itself included, by state.\n# TYPE dhrt_cluster_members gauge"
        );
        for state in ["healthy", "unhealthy", "dead", "left", "syncing"] {
            let n = table
                .iter()
                .filter(|u| member_state(u).as_str() == state)
                .count();
            let _ = writeln!(out, "dhrt_cluster_members{{state=\"{state}\"}} {n}");
        }
        let peers: Vec<Arc<Peer>> = self.peers.lock().unwrap().values().cloned().collect();
        let _ = writeln!(
            out,
            "# HELP dhrt_replication_queue Writes queued for a peer (in flight, or hints while it is away).\n# TYPE dhrt_replication_queue gauge"
        );
        let queues: Vec<(usize, usize)> = peers
            .iter()
            .map(|p| {
                let q = p.queue.lock().unwrap();
                (q.len(), q.bytes())
            })
            .collect();
        for (p, (queued, _)) in peers.iter().zip(&queues) {
            let _ = writeln!(
                out,
                "dhrt_replication_queue{{peer=\"{}\"}} {queued}",
                p.link.addr()
            );
        }
        let _ = writeln!(
            out,
            "# HELP dhrt_replication_queue_bytes Bytes of the writes queued for a peer (bounded by max_hint_bytes).\n# TYPE dhrt_replication_queue_bytes gauge"
        );
        for (p, (_, bytes)) in peers.iter().zip(&queues) {
            let _ = writeln!(
                out,
                "dhrt_replication_queue_bytes{{peer=\"{}\"}} {bytes}",
                p.link.addr()
            );
        }
        let _ = writeln!(
            out,
            "# HELP dhrt_replication_acked_total Writes a peer acknowledged since this node started.\n# TYPE dhrt_replication_acked_total counter"
        );
        for p in &peers {
            let _ = writeln!(
                out,
                "dhrt_replication_acked_total{{peer=\"{}\"}} {}",
                p.link.addr(),
                p.acked.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP dhrt_anti_entropy_rounds_total Digest comparisons completed with a peer.\n# TYPE dhrt_anti_entropy_rounds_total counter\ndhrt_anti_entropy_rounds_total {}",
            self.ae_rounds.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP dhrt_anti_entropy_records_total Records exchanged by anti-entropy.\n# TYPE dhrt_anti_entropy_records_total counter\ndhrt_anti_entropy_records_total{{direction=\"pulled\"}} {}\ndhrt_anti_entropy_records_total{{direction=\"pushed\"}} {}",
            self.ae_pulled.load(Ordering::Relaxed),
            self.ae_pushed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP dhrt_syncing Whether this node is receiving a handoff or re-syncing.\n# TYPE dhrt_syncing gauge\ndhrt_syncing {}",
            u8::from(self.sync.running.load(Ordering::Relaxed))
        );
        let under = self
            .store
            .all_collections()
            .iter()
            .filter(|c| self.placement(c).2)
            .count();
        let _ = writeln!(
            out,
            "# HELP dhrt_collections_under_replicated Collections held here that fewer members can own than their replication factor asks, or with a dead owner.\n# TYPE dhrt_collections_under_replicated gauge\ndhrt_collections_under_replicated {under}"
        );
        let _ = writeln!(
            out,
            "# HELP dhrt_moves_in_progress Copies held here that this node does not own, being handed over to their owners.\n# TYPE dhrt_moves_in_progress gauge\ndhrt_moves_in_progress {}\n# HELP dhrt_moved_records_total Records this node sent to move collections (handovers, handoff streams).\n# TYPE dhrt_moved_records_total counter\ndhrt_moved_records_total {}\n# HELP dhrt_moved_bytes_total Bytes of those records.\n# TYPE dhrt_moved_bytes_total counter\ndhrt_moved_bytes_total {}",
            self.moves.in_progress(),
            self.moves.records.load(Ordering::Relaxed),
            self.moves.bytes.load(Ordering::Relaxed)
        );
        let clock = self.clock_info();
        let _ = writeln!(
            out,
            "# HELP dhrt_clock_skewed Whether this node's clock is off from its peers' by more than the allowed offset (client writes are refused).\n# TYPE dhrt_clock_skewed gauge\ndhrt_clock_skewed {}\n# HELP dhrt_clock_ahead_ms How far this node's clock is ahead of the median of its peers' (negative: behind).\n# TYPE dhrt_clock_ahead_ms gauge\ndhrt_clock_ahead_ms {}",
            u8::from(clock.skewed),
            clock.ahead_ms
        );
        let _ = writeln!(
            out,
            "# HELP dhrt_clock_offset_ms How far each peer's clock is ahead of this node's (negative: behind).\n# TYPE dhrt_clock_offset_ms gauge"
        );
        for m in self.members() {
            if let Some(o) = m.clock_offset_ms {
                let _ = writeln!(out, "dhrt_clock_offset_ms{{peer=\"{}\"}} {o}", m.addr);
            }
        }
        if let Some((full, free)) = self.store.disk_full() {
            let _ = writeln!(
                out,
                "# HELP dhrt_disk_full Whether the data directory's disk is full: its reserve given up, new values refused (503), deletes and drops taken.\n# TYPE dhrt_disk_full gauge\ndhrt_disk_full {}\n# HELP dhrt_disk_free_bytes Bytes free on the data directory's disk at the last look (every 100 ms).\n# TYPE dhrt_disk_free_bytes gauge\ndhrt_disk_free_bytes {free}",
                u8::from(full)
            );
        }
        let held = self.synced.oldest.load(Ordering::Acquire);
        let _ = writeln!(
            out,
            "# HELP dhrt_tombstones_held_seconds Age of the oldest among the last anti-entropy rounds with each member: deletes stamped since (less the allowed clock offset) are kept past their grace period until every member is known to have them (0: no member; grows while a member is down or unreachable).\n# TYPE dhrt_tombstones_held_seconds gauge\ndhrt_tombstones_held_seconds {}",
            match held {
                u64::MAX => 0,
                // Every delete since this node started.
                0 => self.now_ms() / 1000,
                from => self.wall_ms().saturating_sub(from) / 1000,
            }
        );
        let _ = writeln!(
            out,
            "# HELP dhrt_refused_future_total Records from peers refused because they were stamped too far ahead of this node's clock.\n# TYPE dhrt_refused_future_total counter\ndhrt_refused_future_total {}",
            self.refused_future.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP dhrt_peer_refused_total Peer connections refused: no proof of the cluster secret, a frame that did not open, or no peer slot left.\n# TYPE dhrt_peer_refused_total counter\ndhrt_peer_refused_total {}",
            self.refused_peers.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP dhrt_peer_answered_bytes_total Bytes of the answers this node sent to its peers' requests (acknowledgements, values read, anti-entropy and listing pages).\n# TYPE dhrt_peer_answered_bytes_total counter\ndhrt_peer_answered_bytes_total {}",
            self.answered.load(Ordering::Relaxed)
        );
    }
}
