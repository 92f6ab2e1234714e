//! Where the damage in a record that fails its CRC lies, when it is one
//! byte: the difference between the stored and the computed CRC32C (the
//! syndrome) is a linear function of the bits that changed, so a single
//! damaged byte can be found, and undone, by walking the syndrome back
//! through the content one byte at a time.
//!
//! Recovery uses it to tell a damaged record's key and version before it
//! drops the record as superseded (`recover.rs`). Damage of several bytes
//! is taken for one byte with a chance of about `n / 2^24` in `n` bytes of
//! content (a random syndrome matching one of 255 byte patterns at one of
//! `n` places), so recovery locates damage only in short records, and
//! checks their frame apart from the CRC.

use crate::record::{self, RECORD_HEADER_LEN};

/// The reflected CRC32C polynomial.
const POLY: u32 = 0x82F6_3B78;

/// The byte-at-a-time table: `TABLE[b]` is the CRC register (from zero, no
/// final inversion) after the one byte `b`.
const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// `TABLE`'s index by the top byte of its entry: the top bytes of a
/// reflected CRC table are all different, so this undoes a table step.
const BY_TOP: [u8; 256] = {
    let mut inv = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        inv[(TABLE[i] >> 24) as usize] = i as u8;
        i += 1;
    }
    inv
};

/// One damaged byte of a record, found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Damage {
    /// In the stored CRC itself: the content is as written.
    InCrc,
    /// At `offset` in the record; XOR-ing `flip` into it restores it.
    At { offset: usize, flip: u8 },
}

/// The one damaged byte that explains why `record` (a whole record, its
/// header parsed) fails its CRC, if exactly one byte does. `None` when the
/// record passes, or when no single byte, or more than one, explains it.
/// Its content is `kind` (byte 4) then bytes 16 to the end (the seq is not
/// covered); a byte of it that changed adds `Z^n(TABLE[flip])` to the CRC,
/// `Z` being one zero byte through the register and `n` the bytes after it.
pub(crate) fn one_damaged_byte(record: &[u8]) -> Option<Damage> {
    let syndrome = record::stored_crc(record) ^ record::content_crc(record);
    if syndrome == 0 {
        return None;
    }
    let mut found = (0..4)
        .any(|lane| syndrome & !(0xff << (8 * lane)) == 0)
        .then_some(Damage::InCrc);
    let content = 1 + record.len() - 16;
    let mut r = syndrome;
    for after in 0..content {
        let b = BY_TOP[(r >> 24) as usize];
        if TABLE[usize::from(b)] == r {
            let at = content - 1 - after;
            let offset = if at == 0 { 4 } else { 16 + at - 1 };
            if found.is_some() {
                // Two explanations: none is sure.
                return None;
            }
            found = Some(Damage::At { offset, flip: b });
        }
        // Undo one zero byte: r = Z(prev) = (prev >> 8) ^ TABLE[prev & 0xff].
        r = ((r ^ TABLE[usize::from(b)]) << 8) | u32::from(b);
    }
    found
}

/// The header and key of a damaged record as they were written, if its
/// damage is one located byte that leaves its frame (lengths, seq) as it
/// was: the header bytes `0..RECORD_HEADER_LEN + key_len`, repaired, and
/// the damage found.
pub(crate) fn repaired_head(record: &[u8], key_len: usize) -> Option<(Vec<u8>, Damage)> {
    let mut head = record[..RECORD_HEADER_LEN + key_len].to_vec();
    let damage = one_damaged_byte(record)?;
    match damage {
        Damage::InCrc => {}
        // The lengths drew the record's bounds: if one was damaged, the CRC
        // was computed over the wrong bytes and the byte found means
        // nothing.
        Damage::At { offset, .. } if (16..24).contains(&offset) => return None,
        Damage::At { offset, flip } => {
            if let Some(byte) = head.get_mut(offset) {
                *byte ^= flip;
            }
        }
    }
    Some((head, damage))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Kind, encode};
    use crate::version::Version;

    fn a_record(value_len: usize) -> Vec<u8> {
        let mut buf = Vec::new();
        let value: Vec<u8> = (0..value_len).map(|i| (i * 7 + 3) as u8).collect();
        encode(
            &mut buf,
            Kind::Set,
            b"key:000000000008",
            &value,
            Version::new(123 << 16, 9),
            77,
        );
        buf
    }

    #[test]
    fn the_table_is_crc32c_and_its_top_bytes_are_all_different() {
        let mut c = !0u32;
        for &b in b"123456789" {
            c = (c >> 8) ^ TABLE[((c ^ u32::from(b)) & 0xff) as usize];
        }
        assert_eq!(!c, crc32c::crc32c(b"123456789"));
        for (i, &e) in TABLE.iter().enumerate() {
            assert_eq!(usize::from(BY_TOP[(e >> 24) as usize]), i);
        }
    }

    #[test]
    fn every_single_damaged_byte_is_found_and_undone() {
        for value_len in [0, 1, 100, 4000] {
            let good = a_record(value_len);
            assert_eq!(one_damaged_byte(&good), None);
            for offset in (0..4).chain(4..5).chain(16..good.len()) {
                for flip in [0x01, 0x80, 0x5a, 0xff] {
                    let mut bad = good.clone();
                    bad[offset] ^= flip;
                    let expected = if offset < 4 {
                        Damage::InCrc
                    } else {
                        Damage::At { offset, flip }
                    };
                    assert_eq!(
                        one_damaged_byte(&bad),
                        Some(expected),
                        "value {value_len}, offset {offset}, flip {flip:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn damage_of_several_bytes_or_of_a_length_is_not_taken_for_one_byte() {
        let good = a_record(100);
        let mut bad = good.clone();
        bad[60..63].copy_from_slice(b"XYZ");
        assert_eq!(one_damaged_byte(&bad), None);
        let mut bad = good.clone();
        bad[50] ^= 1;
        bad[90] ^= 1;
        assert_eq!(one_damaged_byte(&bad), None);
        // A length byte: found, but not trusted to repair.
        let mut bad = good.clone();
        bad[20] ^= 0x01;
        let header_len = RECORD_HEADER_LEN + 16;
        assert_eq!(repaired_head(&bad, 16), None);
        // A key byte: repaired.
        let mut bad = good.clone();
        bad[RECORD_HEADER_LEN + 15] ^= 0x01;
        let (head, damage) = repaired_head(&bad, 16).unwrap();
        assert_eq!(head, &good[..header_len]);
        assert_eq!(
            damage,
            Damage::At {
                offset: RECORD_HEADER_LEN + 15,
                flip: 1
            }
        );
    }
}
