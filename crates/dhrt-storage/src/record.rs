//! The on-disk record format (docs/format.md), as pure encode/decode over
//! byte slices. No I/O here.

use crate::version::Version;

/// Magic bytes at the start of every collection file.
pub(crate) const FILE_MAGIC: [u8; 8] = *b"DHRTLOG\0";
/// Format version written into the file header.
pub(crate) const FORMAT_VERSION: u16 = 1;
/// Length of the file header.
pub(crate) const FILE_HEADER_LEN: usize = 16;
/// Length of a record header.
pub(crate) const RECORD_HEADER_LEN: usize = 32;
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
    fn from_u8(b: u8) -> Option<Kind> {
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
}

impl Header {
    /// Total length of the record this header starts.
    pub(crate) fn record_len(&self) -> usize {
        RECORD_HEADER_LEN + self.key_len as usize + self.value_len as usize
    }
}

/// The 16-byte file header.
pub(crate) fn file_header() -> [u8; FILE_HEADER_LEN] {
    let mut h = [0u8; FILE_HEADER_LEN];
    h[..8].copy_from_slice(&FILE_MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&h[..12]);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a file header; the error says what is wrong.
pub(crate) fn check_file_header(buf: &[u8]) -> Result<(), String> {
    if buf.len() < FILE_HEADER_LEN {
        return Err(format!("{} bytes, shorter than the header", buf.len()));
    }
    if buf[..8] != FILE_MAGIC {
        return Err("bad magic".into());
    }
    let crc = u32::from_le_bytes(buf[12..16].try_into().unwrap());
    if crc != crc32c::crc32c(&buf[..12]) {
        return Err("header checksum mismatch".into());
    }
    let version = u16::from_le_bytes([buf[8], buf[9]]);
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}, this build reads {FORMAT_VERSION}"
        ));
    }
    Ok(())
}

/// Appends one record to `buf`.
pub(crate) fn encode(buf: &mut Vec<u8>, kind: Kind, key: &[u8], value: &[u8], version: Version) {
    let start = buf.len();
    buf.reserve(RECORD_HEADER_LEN + key.len() + value.len());
    buf.extend_from_slice(&[0; 4]); // crc, filled below
    buf.push(kind as u8);
    buf.extend_from_slice(&[0; 3]);
    buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
    buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
    buf.extend_from_slice(&version.ts.to_le_bytes());
    buf.extend_from_slice(&version.node.to_le_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(value);
    let crc = crc32c::crc32c(&buf[start + 4..]);
    buf[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The CRC stored at the start of the record at the start of `buf`: a
/// fingerprint of the whole record (kind, key, version and value), which
/// the anti-entropy digest and the equal-version tie-break use.
#[inline]
pub(crate) fn stored_crc(buf: &[u8]) -> u32 {
    u32::from_le_bytes(buf[..4].try_into().unwrap())
}

/// The length of the record at `offset` in `buf` if its header parses and
/// the record fits in `buf` (whatever its CRC says).
pub(crate) fn header_len_within(buf: &[u8], offset: u64) -> Option<u64> {
    let at = buf.get(offset as usize..)?;
    if at.len() < RECORD_HEADER_LEN {
        return None;
    }
    let len = parse_header(at).ok()?.record_len();
    (len <= at.len()).then_some(len as u64)
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

fn parse_header(buf: &[u8]) -> Result<Header, &'static str> {
    let kind = Kind::from_u8(buf[4]).ok_or("unknown record kind")?;
    if buf[5..8] != [0, 0, 0] {
        return Err("reserved bytes are not zero");
    }
    let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap());
    let header = Header {
        kind,
        key_len: u32_at(8),
        value_len: u32_at(12),
        version: Version::new(u64_at(16), u64_at(24)),
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
    let crc = u32::from_le_bytes(buf[..4].try_into().unwrap());
    if crc != crc32c::crc32c(&buf[4..len]) {
        return Decoded::Invalid("checksum mismatch");
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
        encode(&mut buf, Kind::Set, b"key", b"value", v);
        assert_eq!(buf.len(), RECORD_HEADER_LEN + 8);
        match decode(&buf) {
            Decoded::Record { header, key, value } => {
                assert_eq!(header.kind, Kind::Set);
                assert_eq!(header.version, v);
                assert_eq!((key, value), (&b"key"[..], &b"value"[..]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_truncation_is_incomplete_and_every_bit_flip_is_caught() {
        let mut buf = Vec::new();
        encode(&mut buf, Kind::Set, b"k", b"some value", Version::new(1, 2));
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
        let h = file_header();
        check_file_header(&h).unwrap();
        let mut bad = h;
        bad[9] ^= 1;
        assert!(check_file_header(&bad).is_err());
        assert!(check_file_header(&h[..10]).is_err());
    }
}
