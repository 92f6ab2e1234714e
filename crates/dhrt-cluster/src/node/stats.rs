//! What `GET /` and `stats` show of a node.

use dhrt_proto::{DiskInfo, NodeInfo, NodeStats};

use super::Node;

impl Node {
    pub(super) async fn op_stats(&self) -> NodeStats {
        let stats = self.store.stats();
        let id = format!("{:016x}", self.identity.id);
        NodeStats {
            node: NodeInfo {
                id: id.clone(),
                name: self.identity.name.clone(),
                addr: self.identity.addr.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                mode: stats.mode.to_string(),
                data_dir: stats
                    .data_dir
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                uptime_s: self.started.elapsed().as_secs(),
            },
            collections: stats
                .collections
                .into_iter()
                .filter(|c| c.keys > 0 && !c.name.starts_with('_'))
                .map(|c| self.cluster.collection_info(c))
                .collect(),
            members: self.cluster.members(),
            sync: self.cluster.sync_info(),
            clock: self.cluster.clock_info(),
            watch: self.watches.info(),
            disk: self
                .store
                .disk_full()
                .map(|(full, free_bytes)| DiskInfo { full, free_bytes }),
        }
    }
}
