//! Digests of this node's collections for its peers: by name, or a page
//! at a time in name order, each answer cut before the frame limit.

use dhrt_proto::{CollectionDigest, ErrorKind, OpError};

use super::{Cluster, stamp};

impl Cluster {
    /// The digests of `names` (all collections when empty). An answer that
    /// could not be sent (past the frame limit) is refused as soon as it
    /// grows past it, not built whole: a peer naming one collection a
    /// million times must not make this node hold gigabytes.
    pub(crate) fn digests(&self, names: Vec<String>) -> Result<Vec<CollectionDigest>, OpError> {
        // Members ask for one by name, or for all.
        const MOST_NAMED: usize = 256;
        let names = if names.is_empty() {
            self.store.all_collections()
        } else if names.len() > MOST_NAMED {
            return Err(OpError::new(
                ErrorKind::InvalidInput,
                format!("{} collections named, more than {MOST_NAMED}", names.len()),
            ));
        } else {
            names
        };
        let max = self.dialer.max_frame as usize;
        let (out, cut) = self.digests_within(names, max)?;
        if cut {
            return Err(OpError::new(
                ErrorKind::TooLarge,
                format!("the digests asked for pass the {max}-byte frame limit"),
            ));
        }
        Ok(out)
    }

    /// A page of the digests of every collection this node has, in name
    /// order, of the names after `after`: as many as fit in
    /// [`DIGEST_PAGE_BYTES`] (at least one). Empty once past the last.
    pub(crate) fn digests_after(
        &self,
        after: Option<String>,
    ) -> Result<Vec<CollectionDigest>, OpError> {
        let mut names = self.store.all_collections();
        if let Some(after) = after {
            names.retain(|c| *c > after);
        }
        Ok(self.digests_within(names, DIGEST_PAGE_BYTES)?.0)
    }

    /// The digests of `names`, in order, until the next would take the
    /// answer past `max` bytes as encoded (the first is always taken);
    /// also whether any were left out.
    fn digests_within(
        &self,
        names: Vec<String>,
        max: usize,
    ) -> Result<(Vec<CollectionDigest>, bool), OpError> {
        let stats = self.store.stats();
        let mut size = 0usize;
        let mut out = Vec::new();
        for c in names {
            let d = self.store.digest(&c).map_err(crate::error::op_error)?;
            // As encoded: a varint per bucket, the name, a few fields.
            size += 32 + c.len() + d.buckets.iter().map(|&b| varint_len(b)).sum::<usize>();
            if size > max && !out.is_empty() {
                return Ok((out, true));
            }
            // Stats come in name order.
            let entries = stats
                .collections
                .binary_search_by(|s| s.name.as_str().cmp(&c))
                .map_or(0, |i| {
                    let s = &stats.collections[i];
                    s.keys + s.tombstones
                });
            out.push(CollectionDigest {
                collection: c,
                buckets: d.buckets,
                dropped_at: d.dropped_at.map(stamp),
                entries,
            });
        }
        Ok((out, false))
    }
}

/// About how many bytes of digests a [`dhrt_proto::PeerOp::DigestsAfter`] page holds:
/// some hundred large collections' (a digest is at most about 9 KiB).
pub(crate) const DIGEST_PAGE_BYTES: usize = 1 << 20;

/// The bytes of `v` as a varint in the peer protocol's encoding.
fn varint_len(v: u64) -> usize {
    match v {
        0..=250 => 1,
        251..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}
