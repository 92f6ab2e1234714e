//! The on-disk record format (docs/format.md), as pure encode/decode over
//! byte slices. No I/O here.

use crate::version::Version;

/// Magic bytes at the start of every collection file.
pub(crate) const FILE_MAGIC: [u8; 8] = *b"DHRTLOG\0";
/// Format version written into the file header.
pub(crate) const FORMAT_VERSION: u16 = 2;
/// Length of the file header.
pub(crate) const FILE_HEADER_LEN: usize = 32;
/// Length of a record header.
pub(crate) const RECORD_HEADER_LEN: usize = 40;
/// The longest key, in bytes (64 KiB).
pub const MAX_KEY_LEN: usize = 64 * 1024;

/// What a record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// The key has this value.
    Set = 1,
    /// The key was deleted.
    Tombstone = 2,
    /// Every key of the collection with an older version was dropped.
    Drop = 3,
}

impl Kind {
    pub(crate) fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Set),
            2 => Some(Kind::Tombstone),
            3 => Some(Kind::Drop),
            _ => None,
        }
    }
}

/// A decoded record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) kind: Kind,
    pub(crate) key_len: u32,
    pub(crate) value_len: u32,
    pub(crate) version: Version,
    /// The record's place in this node's history of the collection: greater
    /// for every record appended later, kept by compaction (see
    /// `docs/format.md`). Node-local: replicas number the same write
    /// differently.
    pub(crate) seq: u64,
}

impl Header {
    /// Total length of the record this header starts.
    pub(crate) fn record_len(&self) -> usize {
        RECORD_HEADER_LEN + self.key_len as usize + self.value_len as usize
    }
}

/// What a file header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileHeader {
    /// Names this node's history of the collection (random, kept by
    /// compaction): a position from another history means nothing here.
    pub(crate) history: u64,
    /// Compaction purged tombstones or drops up to this seq: a position
    /// below it cannot be resumed exactly.
    pub(crate) purged_seq: u64,
}

/// The 32-byte file header.
pub(crate) fn file_header(h: FileHeader) -> [u8; FILE_HEADER_LEN] {
    let mut b = [0u8; FILE_HEADER_LEN];
    b[..8].copy_from_slice(&FILE_MAGIC);
    b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[12..20].copy_from_slice(&h.history.to_le_bytes());
    b[20..28].copy_from_slice(&h.purged_seq.to_le_bytes());
    let crc = crc32c::crc32c(&b[..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

/// What the first bytes of a collection file are.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FileKind {
    /// This build's format.
    Current(FileHeader),
    /// Format version 1 (no record sequence numbers), converted on open.
    V1,
}

/// Checks a file header; the error says what is wrong.
pub(crate) fn check_file_header(buf: &[u8]) -> Result<FileKind, String> {
    if buf.len() >= crate::migrate::V1_FILE_HEADER_LEN && crate::migrate::is_v1_header(buf) {
        return Ok(FileKind::V1);
    }
    if buf.len() < FILE_HEADER_LEN {
        return Err(format!("{} bytes, shorter than the header", buf.len()));
    }
    if buf[..8] != FILE_MAGIC {
        return Err("bad magic".into());
    }
    let crc = u32::from_le_bytes(buf[28..32].try_into().unwrap());
    if crc != crc32c::crc32c(&buf[..28]) {
        return Err("header checksum mismatch".into());
    }
    let version = u16::from_le_bytes([buf[8], buf[9]]);
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}, this build reads {FORMAT_VERSION} (and converts 1)"
        ));
    }
    Ok(FileKind::Current(FileHeader {
        history: u64::from_le_bytes(buf[12..20].try_into().unwrap()),
        purged_seq: u64::from_le_bytes(buf[20..28].try_into().unwrap()),
    }))
}

/// The 24-bit check of a seq kept in bytes 5..8 of a record header.
#[inline]
fn seq_check(seq: u64) -> [u8; 3] {
    let c = crc32c::crc32c(&seq.to_le_bytes()).to_le_bytes();
    [c[0], c[1], c[2]]
}

/// The content CRC of a record: its kind, lengths, version, key and value,
/// not its seq (which differs between replicas holding the same record).
#[inline]
pub(crate) fn content_crc(record: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&record[4..5]), &record[16..])
}

/// Appends one record to `buf`.
pub(crate) fn encode(
    buf: &mut Vec<u8>,
    kind: Kind,
    key: &[u8],
    value: &[u8],
    version: Version,
    seq: u64,
) {
    let start = buf.len();
    buf.reserve(RECORD_HEADER_LEN + key.len() + value.len());
    buf.extend_from_slice(&[0; 4]); // crc, filled below
    buf.push(kind as u8);
    buf.extend_from_slice(&seq_check(seq));
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
    buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
    buf.extend_from_slice(&version.ts.to_le_bytes());
    buf.extend_from_slice(&version.node.to_le_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(value);
    let crc = content_crc(&buf[start..]);
    buf[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The CRC stored at the start of the record at the start of `buf`: a
/// fingerprint of the record's content (kind, key, version and value, not
/// its node-local seq), which the anti-entropy digest and the equal-version
/// tie-break use.
#[inline]
pub(crate) fn stored_crc(buf: &[u8]) -> u32 {
    u32::from_le_bytes(buf[..4].try_into().unwrap())
}

/// The result of decoding the record at the start of a slice.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded<'a> {
    /// A whole, valid record.
    Record {
        header: Header,
        key: &'a [u8],
        value: &'a [u8],
    },
    /// The slice ends before the record does (a torn tail, or the end).
    Incomplete,
    /// The bytes are not a valid record.
    Invalid(&'static str),
}

/// Reads only the header of the record at the start of `buf`, without
/// checking the CRC. For records the index already points at.
#[inline]
pub(crate) fn peek_header(buf: &[u8]) -> Header {
    parse_header(buf).expect("index points at a valid record")
}

pub(crate) fn parse_header(buf: &[u8]) -> Result<Header, &'static str> {
    if buf.len() < RECORD_HEADER_LEN {
        return Err("shorter than a record header");
    }
    let kind = Kind::from_u8(buf[4]).ok_or("unknown record kind")?;
    let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap());
    let seq = u64_at(8);
    if buf[5..8] != seq_check(seq) {
        return Err("sequence number check mismatch");
    }
    let header = Header {
        kind,
        key_len: u32_at(16),
        value_len: u32_at(20),
        version: Version::new(u64_at(24), u64_at(32)),
        seq,
    };
    let key_len = header.key_len as usize;
    match kind {
        Kind::Set | Kind::Tombstone if key_len == 0 || key_len > MAX_KEY_LEN => {
            Err("key length out of range")
        }
        Kind::Tombstone if header.value_len != 0 => Err("tombstone with a value"),
        Kind::Drop if key_len != 0 || header.value_len != 0 => Err("drop record with a payload"),
        _ => Ok(header),
    }
}

/// Why [`decode`] refuses a well-formed record whose content CRC fails.
pub(crate) const CHECKSUM_MISMATCH: &str = "checksum mismatch";

/// Decodes the record at the start of `buf`, checking its CRC.
pub(crate) fn decode(buf: &[u8]) -> Decoded<'_> {
    if buf.len() < RECORD_HEADER_LEN {
        return Decoded::Incomplete;
    }
    let header = match parse_header(buf) {
        Ok(h) => h,
        Err(why) => return Decoded::Invalid(why),
    };
    let len = header.record_len();
    if buf.len() < len {
        return Decoded::Incomplete;
    }
    if stored_crc(buf) != content_crc(&buf[..len]) {
        return Decoded::Invalid(CHECKSUM_MISMATCH);
    }
    let key_end = RECORD_HEADER_LEN + header.key_len as usize;
    Decoded::Record {
        header,
        key: &buf[RECORD_HEADER_LEN..key_end],
        value: &buf[key_end..len],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        let v = Version::new(123 << 16, 9);
        encode(&mut buf, Kind::Set, b"key", b"value", v, 77);
        assert_eq!(buf.len(), RECORD_HEADER_LEN + 8);
        match decode(&buf) {
            Decoded::Record { header, key, value } => {
                assert_eq!(header.kind, Kind::Set);
                assert_eq!(header.version, v);
                assert_eq!(header.seq, 77);
                assert_eq!((key, value), (&b"key"[..], &b"value"[..]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_truncation_is_incomplete_and_every_bit_flip_is_caught() {
        let mut buf = Vec::new();
        encode(
            &mut buf,
            Kind::Set,
            b"k",
            b"some value",
            Version::new(1, 2),
            1 << 40 | 5,
        );
        for cut in 0..buf.len() {
            assert_eq!(decode(&buf[..cut]), Decoded::Incomplete, "cut at {cut}");
        }
        for bit in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                !matches!(decode(&bad), Decoded::Record { .. }),
                "flip of bit {bit} went unnoticed"
            );
        }
    }

    #[test]
    fn file_header_checks() {
        let fh = FileHeader {
            history: 0xfeed,
            purged_seq: 9,
        };
        let h = file_header(fh);
        assert_eq!(check_file_header(&h).unwrap(), FileKind::Current(fh));
        let mut bad = h;
        bad[9] ^= 1;
        assert!(check_file_header(&bad).is_err());
        assert!(check_file_header(&h[..10]).is_err());
    }

    #[test]
    fn the_content_crc_ignores_the_seq() {
        let v = Version::new(5 << 16, 1);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode(&mut a, Kind::Set, b"k", b"v", v, 1);
        encode(&mut b, Kind::Set, b"k", b"v", v, 1 << 41 | 3);
        assert_ne!(a, b);
        assert_eq!(stored_crc(&a), stored_crc(&b));
        let mut c = Vec::new();
        encode(&mut c, Kind::Set, b"k", b"w", v, 1);
        assert_ne!(stored_crc(&a), stored_crc(&c));
    }
}
