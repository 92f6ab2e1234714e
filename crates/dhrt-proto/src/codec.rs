//! The only two functions that touch bincode. Every decode has a byte limit:
//! an unlimited decode of a 20-byte hostile frame that claims a terabyte-long
//! vector would try to allocate it and abort the process.

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::error::ProtoError;

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_little_endian()
        .with_varint_encoding()
}

/// Encodes `msg` and writes it to `out` (appends it, to a `Vec`). Each
/// byte string of `msg` is handed to `out` in one `write` of the slice it
/// is: [`crate::encode_frame_shared`] tells a value's bytes apart by that.
pub fn encode<T: Serialize, W: std::io::Write>(msg: &T, out: W) -> Result<(), ProtoError> {
    options()
        .serialize_into(out, msg)
        .map_err(|e| ProtoError::Encode(e.to_string()))
}

/// Decodes exactly one `T` from `bytes`, reading at most `bytes.len()` bytes
/// and refusing trailing bytes. `T` may borrow from `bytes` (a
/// [`RequestRef`](crate::RequestRef) does: no copy of names, keys, values).
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ProtoError> {
    options()
        .with_limit(bytes.len() as u64)
        .reject_trailing_bytes()
        .deserialize(bytes)
        .map_err(|e| ProtoError::Malformed(describe(&e)))
}

/// What went wrong decoding, in words: bincode says "io error: " and
/// nothing more when the bytes end early.
fn describe(e: &bincode::Error) -> String {
    match &**e {
        bincode::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "it ends before its last field".to_string()
        }
        _ => e.to_string(),
    }
}

/// The id at the start of an encoded [`crate::Request`], even when the rest
/// does not decode (an unknown operation from a newer client, a corrupt
/// field), so the server can answer that request with an error.
pub fn request_id(payload: &[u8]) -> Option<u64> {
    options()
        .with_limit(payload.len() as u64)
        .allow_trailing_bytes()
        .deserialize(payload)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_cut_short_says_so() {
        let mut bytes = Vec::new();
        encode(&("collection".to_string(), 7u64), &mut bytes).unwrap();
        bytes.truncate(bytes.len() - 1);
        let e = decode::<(String, u64)>(&bytes).unwrap_err().to_string();
        assert_eq!(e, "malformed frame: it ends before its last field");
    }
}
