//! Conversion of format-1 collection files (no record sequence numbers) to
//! the current format, once, when they are opened.
//!
//! The records are copied in log order and numbered 1, 2, 3...: every seq
//! this process hands out afterwards is greater (its epoch is at least 1,
//! see `docs/format.md`). The new file is written beside the old one as a
//! compaction would be (`<name>.dhrt.compact`, fsynced, renamed over the
//! old name, the directory fsynced), so a crash at any point leaves one
//! whole file under the name: the old one (and the leftover is deleted on
//! the next open) or the new one. Damage is judged as recovery judges it:
//! below the durable watermark, or before valid records when there is no
//! watermark, it refuses the open and leaves the file alone; past it, the
//! torn tail is not carried over.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use crate::collection::COMPACT_SUFFIX;
use crate::error::{Error, Result};
use crate::record::{self, FileHeader, Kind};
use crate::version::Version;
use crate::watermark;

/// Length of a format-1 file header.
pub(crate) const V1_FILE_HEADER_LEN: usize = 16;
const V1_RECORD_HEADER_LEN: usize = 32;

/// Whether `buf` starts with a valid format-1 file header.
pub(crate) fn is_v1_header(buf: &[u8]) -> bool {
    buf.len() >= V1_FILE_HEADER_LEN
        && buf[..8] == record::FILE_MAGIC
        && u16::from_le_bytes([buf[8], buf[9]]) == 1
        && u32::from_le_bytes(buf[12..16].try_into().unwrap()) == crc32c::crc32c(&buf[..12])
}

/// A format-1 record at the start of `buf`: (kind, key, value, version,
/// length), `Err(None)` if `buf` ends first, `Err(Some(why))` if invalid.
#[allow(clippy::type_complexity)]
fn decode_v1(
    buf: &[u8],
) -> std::result::Result<(Kind, &[u8], &[u8], Version, usize), Option<&'static str>> {
    if buf.len() < V1_RECORD_HEADER_LEN {
        return Err(None);
    }
    let kind = Kind::from_u8(buf[4]).ok_or(Some("unknown record kind"))?;
    if buf[5..8] != [0, 0, 0] {
        return Err(Some("reserved bytes are not zero"));
    }
    let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap()) as usize;
    let u64_at = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap());
    let (key_len, value_len) = (u32_at(8), u32_at(12));
    let lengths_ok = match kind {
        Kind::Set => (1..=record::MAX_KEY_LEN).contains(&key_len),
        Kind::Tombstone => (1..=record::MAX_KEY_LEN).contains(&key_len) && value_len == 0,
        Kind::Drop => key_len == 0 && value_len == 0,
    };
    if !lengths_ok {
        return Err(Some("impossible lengths"));
    }
    let len = V1_RECORD_HEADER_LEN + key_len + value_len;
    if buf.len() < len {
        return Err(None);
    }
    if u32::from_le_bytes(buf[..4].try_into().unwrap()) != crc32c::crc32c(&buf[4..len]) {
        return Err(Some("checksum mismatch"));
    }
    let key = &buf[V1_RECORD_HEADER_LEN..V1_RECORD_HEADER_LEN + key_len];
    let value = &buf[V1_RECORD_HEADER_LEN + key_len..len];
    Ok((kind, key, value, Version::new(u64_at(16), u64_at(24)), len))
}

/// Converts the format-1 file at `path` to the current format in place
/// (see the module documentation). Returns how many records it carried.
pub(crate) fn convert_v1(path: &Path, dir: &Path, name: &str) -> Result<u64> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    let found_watermark = watermark::read(path)
        .map_err(|e| Error::io("read", watermark::path_for(path), e))?
        .map(|(offset, _)| offset);
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 4);
    let history = crate::collection::new_history();
    out.extend_from_slice(&record::file_header(FileHeader {
        history,
        purged_seq: 0,
    }));
    let mut at = V1_FILE_HEADER_LEN;
    let mut seq = 0u64;
    while at < bytes.len() {
        match decode_v1(&bytes[at..]) {
            Ok((kind, key, value, version, len)) => {
                seq += 1;
                record::encode(&mut out, kind, key, value, version, seq);
                at += len;
            }
            Err(why) => {
                let rest = &bytes[at..];
                let torn_tail = rest.iter().all(|&b| b == 0)
                    || match found_watermark {
                        Some(w) => at as u64 >= w,
                        None => !(at + 1..bytes.len()).any(|p| decode_v1(&bytes[p..]).is_ok()),
                    };
                if !torn_tail {
                    return Err(Error::Corrupt {
                        path: path.into(),
                        offset: at as u64,
                        reason: why.unwrap_or("record runs past the end of the file"),
                    });
                }
                tracing::warn!(path = %path.display(), offset = at, "format 1 file: not carrying over its torn tail");
                break;
            }
        }
    }
    let tmp = dir.join(format!("{name}{COMPACT_SUFFIX}"));
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        crate::log::sync_dir(dir)?;
        // The new file is durable whole.
        let w = watermark::path_for(path);
        let mut wf = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&w)?;
        wf.write_all(&watermark::encode(
            out.len() as u64,
            watermark::tag_for(path, history),
        ))?;
        wf.sync_all()
    };
    write().map_err(|e| Error::io("convert", path, e))?;
    tracing::info!(path = %path.display(), records = seq, "converted a format 1 collection file to format {}", record::FORMAT_VERSION);
    Ok(seq)
}
