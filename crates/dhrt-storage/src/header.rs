//! A collection file whose 32-byte header fails its checks while the log
//! after it is sound: a byte changed in the header (bit rot, a stray
//! write), not a file of some other kind. Its records hold everything the
//! collection holds, so the header is rebuilt from what can be trusted
//! rather than the node refusing to start over it (the only remedy would
//! be to move the file away and lose the collection, on a node without
//! replicas).
//!
//! What the header holds besides its fixed bytes (magic, version, zero) is
//! the collection's `history` (what watch positions are relative to, and
//! what the durable watermark is tagged with) and `purged_seq` (below which
//! a watch cannot resume exactly). Each is kept only where it is known to
//! be intact:
//!
//! - damage confined to the fixed bytes: once they are put back, the
//!   header's checksum holds, so `history` and `purged_seq` are exact;
//! - otherwise `history` is kept if the watermark's tag (a checksum over
//!   the file name and the history) still matches it, and `purged_seq`
//!   becomes the log's last seq: no position from before the damage is
//!   resumed as exact (a watcher takes a snapshot, as after a compaction);
//! - a `history` that cannot be confirmed is replaced by a new one, and the
//!   watermark, which cannot be tied to this log any more, is left out (the
//!   log is trusted whole, as after a restore): every earlier watch
//!   position is then refused as from another history.

use std::path::Path;

use crate::record::{self, Decoded, FILE_HEADER_LEN, FILE_MAGIC, FileHeader, FileKind};
use crate::watermark;

/// The header to write in place of a damaged one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rebuilt {
    /// The new header. Its `purged_seq` is final only if `exact`; else it
    /// is to be raised to the log's last seq once the log is scanned.
    pub(crate) header: FileHeader,
    /// Both `history` and `purged_seq` came through intact.
    pub(crate) exact: bool,
    /// The durable watermark can be trusted: it is tagged for this
    /// history, or untagged (written before tags); or there is none (none
    /// readable), so none to leave out.
    pub(crate) watermark_kept: bool,
}

/// The header to rebuild for the file at `path` whose bytes are `buf`, if
/// its header is damaged and what follows is a dhrt log: a sound record
/// right after the header, or nothing but zeros (space reserved, never
/// written) after a header whose magic is intact. `None` for anything
/// else: a file of another kind is left alone.
pub(crate) fn rebuild(
    path: &Path,
    buf: &[u8],
    watermark: Option<(u64, u32)>,
    new_history: impl FnOnce() -> u64,
) -> Option<Rebuilt> {
    if buf.len() < FILE_HEADER_LEN {
        return None;
    }
    let (head, rest) = buf.split_at(FILE_HEADER_LEN);
    if head[28..32] == crc32c::crc32c(&head[..28]).to_le_bytes() {
        // Not damaged: a header this build does not read (another format
        // version) is refused as it is.
        return None;
    }
    let log_follows = matches!(record::decode(rest), Decoded::Record { .. });
    let nothing_follows = head[..8] == FILE_MAGIC && rest.iter().all(|&b| b == 0);
    if !log_follows && !nothing_follows {
        return None;
    }
    let tagged_for = |history: u64| {
        watermark.is_none_or(|(_, tag)| tag == 0 || tag == watermark::tag_for(path, history))
    };
    // The fixed bytes put back: if the checksum then holds, the rest of
    // the header is what was written.
    let mut fixed = [0u8; FILE_HEADER_LEN];
    fixed.copy_from_slice(head);
    fixed[..12].copy_from_slice(
        &record::file_header(FileHeader {
            history: 1,
            purged_seq: 0,
        })[..12],
    );
    if let Ok(FileKind::Current(header)) = record::check_file_header(&fixed) {
        return Some(Rebuilt {
            header,
            exact: true,
            watermark_kept: tagged_for(header.history),
        });
    }
    let history = u64::from_le_bytes(head[12..20].try_into().unwrap());
    let confirmed = history != 0
        && watermark.is_some_and(|(_, tag)| tag != 0 && tag == watermark::tag_for(path, history));
    let untagged = matches!(watermark, Some((_, 0)));
    Some(Rebuilt {
        header: FileHeader {
            history: if confirmed { history } else { new_history() },
            purged_seq: 0,
        },
        exact: false,
        watermark_kept: watermark.is_none() || confirmed || untagged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Kind;
    use crate::version::Version;

    const PATH: &str = "/data/c.dhrt";

    fn log(history: u64, purged_seq: u64) -> Vec<u8> {
        let mut buf = record::file_header(FileHeader {
            history,
            purged_seq,
        })
        .to_vec();
        record::encode(&mut buf, Kind::Set, b"k", b"v", Version::new(5, 1), 1);
        buf
    }

    fn tag(history: u64) -> Option<(u64, u32)> {
        Some((32, watermark::tag_for(Path::new(PATH), history)))
    }

    fn rebuilt(buf: &[u8], watermark: Option<(u64, u32)>) -> Option<Rebuilt> {
        rebuild(Path::new(PATH), buf, watermark, || 99)
    }

    #[test]
    fn damage_to_the_fixed_bytes_is_repaired_exactly() {
        for at in [0, 7, 8, 11] {
            let mut buf = log(41, 17);
            buf[at] ^= 0x10;
            assert!(record::check_file_header(&buf).is_err());
            let r = rebuilt(&buf, tag(41)).unwrap();
            assert_eq!(
                (
                    r.header.history,
                    r.header.purged_seq,
                    r.exact,
                    r.watermark_kept
                ),
                (41, 17, true, true),
                "byte {at}"
            );
            // A watermark tagged for another history is not trusted.
            assert!(!rebuilt(&buf, tag(42)).unwrap().watermark_kept);
        }
    }

    #[test]
    fn a_history_confirmed_by_the_watermark_is_kept_and_the_purge_mark_raised() {
        for at in [20, 27, 28, 31] {
            let mut buf = log(41, 17);
            buf[at] ^= 0x01;
            let r = rebuilt(&buf, tag(41)).unwrap();
            assert_eq!(
                (r.header.history, r.exact, r.watermark_kept),
                (41, false, true),
                "byte {at}"
            );
        }
    }

    #[test]
    fn an_unconfirmed_history_is_replaced_and_the_watermark_left_out() {
        let mut buf = log(41, 17);
        buf[13] ^= 0x01;
        let r = rebuilt(&buf, tag(41)).unwrap();
        assert_eq!(
            (r.header.history, r.exact, r.watermark_kept),
            (99, false, false)
        );
        // No watermark: nothing to confirm the history with, and none to
        // leave out.
        let r = rebuilt(&buf, None).unwrap();
        assert_eq!((r.header.history, r.watermark_kept), (99, true));
        // An untagged watermark (written before tags) is kept as it is.
        let r = rebuilt(&buf, Some((32, 0))).unwrap();
        assert_eq!((r.header.history, r.watermark_kept), (99, true));
    }

    #[test]
    fn a_file_that_is_not_a_damaged_log_is_left_alone() {
        // Damage that reaches the first record.
        let mut buf = log(41, 17);
        buf[13] ^= 1;
        buf[40] ^= 1;
        assert_eq!(rebuilt(&buf, None), None);
        // Another kind of file.
        assert_eq!(rebuilt(&[7u8; 200], None), None);
        assert_eq!(rebuilt(b"DHRTLOG\0 but then text", None), None);
        // A header of another format version, intact: not damage.
        let mut future = log(41, 17);
        future[8] = 3;
        let crc = crc32c::crc32c(&future[..28]);
        future[28..32].copy_from_slice(&crc.to_le_bytes());
        assert!(record::check_file_header(&future).is_err());
        assert_eq!(rebuilt(&future, tag(41)), None);
        // A header with nothing after it but reserved zeros is a log.
        let mut empty = log(41, 0)[..FILE_HEADER_LEN].to_vec();
        empty.extend_from_slice(&[0u8; 4096]);
        empty[20] ^= 4;
        assert!(rebuilt(&empty, None).is_some());
        empty[0] ^= 4;
        assert_eq!(rebuilt(&empty, None), None, "its magic damaged too");
    }
}
