//! The connection preamble and length-prefixed frames, as pure functions over
//! byte slices: they answer "complete", "incomplete" or an error, and never
//! touch a socket. Buffering lives with the connection.
//!
//! ```text
//! preamble (8 bytes, client → server, once):  D4 'H' 'R' 'T' | version u16 LE | channel u8 | 0
//! frame (both directions, repeated):          length u32 LE | bincode payload (length bytes)
//! ```
//!
//! Each channel has its own version: the client channel speaks
//! [`PROTOCOL_VERSION`], the peer channel [`PEER_PROTOCOL_VERSION`].

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;
use crate::error::ProtoError;

/// The first bytes of a binary connection. The first byte is not ASCII, so no
/// HTTP request starts like this.
pub const MAGIC: [u8; 4] = [0xD4, b'H', b'R', b'T'];
/// The version of the client channel this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The version of the peer channel this build speaks. 2: the dialer proves
/// first, and every frame after the handshake is sealed.
pub const PEER_PROTOCOL_VERSION: u16 = 2;
/// Length of the preamble.
pub const PREAMBLE_LEN: usize = 8;
/// Length of a frame's length prefix.
pub const FRAME_HEADER_LEN: usize = 4;
/// The default largest frame payload: room for a 16 MiB value and its key.
pub const DEFAULT_MAX_FRAME: u32 = 17 << 20;

/// Which protocol a binary connection speaks after its preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// A client: [`crate::Request`]s and [`crate::Response`]s (byte 6 = 0).
    Client,
    /// Another node: a handshake, then [`crate::PeerMessage`]s (byte 6 = 1).
    Peer,
}

/// The preamble a client sends first.
pub fn preamble() -> [u8; PREAMBLE_LEN] {
    channel_preamble(Channel::Client)
}

/// The preamble of a connection on `channel`.
pub fn channel_preamble(channel: Channel) -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..4].copy_from_slice(&MAGIC);
    p[4..6].copy_from_slice(&channel.version().to_le_bytes());
    p[6] = match channel {
        Channel::Client => 0,
        Channel::Peer => 1,
    };
    p
}

impl Channel {
    /// The version of this channel that this build speaks.
    pub fn version(self) -> u16 {
        match self {
            Channel::Client => PROTOCOL_VERSION,
            Channel::Peer => PEER_PROTOCOL_VERSION,
        }
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preamble {
    /// A binary-protocol connection of this version; the preamble is
    /// [`PREAMBLE_LEN`] bytes long.
    Binary {
        /// The client's protocol version.
        version: u16,
        /// Client or peer.
        channel: Channel,
    },
    /// Not the dhrt magic: treat the connection as HTTP.
    NotBinary,
    /// Too few bytes to tell yet.
    Incomplete,
}

/// Reads the start of a connection.
pub fn read_preamble(buf: &[u8]) -> Result<Preamble, ProtoError> {
    let n = buf.len().min(MAGIC.len());
    if buf[..n] != MAGIC[..n] {
        return Ok(Preamble::NotBinary);
    }
    if buf.len() < PREAMBLE_LEN {
        return Ok(Preamble::Incomplete);
    }
    let version = u16::from_le_bytes([buf[4], buf[5]]);
    let channel = match buf[6] {
        0 => Channel::Client,
        1 => Channel::Peer,
        other => return Err(ProtoError::Malformed(format!("unknown channel {other}"))),
    };
    if version != channel.version() {
        return Err(ProtoError::UnsupportedVersion(version));
    }
    Ok(Preamble::Binary { version, channel })
}

/// The result of looking for a frame at the start of a buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded<T> {
    /// A whole frame: the message and how many bytes it took.
    Complete {
        /// The message.
        msg: T,
        /// Bytes consumed, prefix included.
        len: usize,
    },
    /// The frame is not all there: at least `needed` more bytes are.
    Incomplete {
        /// How many more bytes are needed at least.
        needed: usize,
    },
}

/// Where the next frame's payload lies in `buf`, if it is all there.
///
/// A length above `max_frame` is an error even before the payload arrives,
/// so a lying length never makes anyone buffer gigabytes.
pub fn frame_bounds(
    buf: &[u8],
    max_frame: u32,
) -> Result<Decoded<std::ops::Range<usize>>, ProtoError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(Decoded::Incomplete {
            needed: FRAME_HEADER_LEN - buf.len(),
        });
    }
    let len = u32::from_le_bytes(buf[..4].try_into().unwrap());
    if len > max_frame {
        return Err(ProtoError::FrameTooLarge {
            len: len.into(),
            max: max_frame,
        });
    }
    if len == 0 {
        return Err(ProtoError::Malformed("empty frame".into()));
    }
    let end = FRAME_HEADER_LEN + len as usize;
    if buf.len() < end {
        return Ok(Decoded::Incomplete {
            needed: end - buf.len(),
        });
    }
    Ok(Decoded::Complete {
        msg: FRAME_HEADER_LEN..end,
        len: end,
    })
}

/// Decodes the frame at the start of `buf`.
pub fn decode_frame<T: DeserializeOwned>(
    buf: &[u8],
    max_frame: u32,
) -> Result<Decoded<T>, ProtoError> {
    match frame_bounds(buf, max_frame)? {
        Decoded::Complete { msg: range, len } => Ok(Decoded::Complete {
            msg: codec::decode(&buf[range])?,
            len,
        }),
        Decoded::Incomplete { needed } => Ok(Decoded::Incomplete { needed }),
    }
}

/// Appends `msg` as one frame to `out`. Fails, leaving `out` as it was, if
/// the payload would exceed `max_frame`.
pub fn encode_frame<T: Serialize>(
    msg: &T,
    out: &mut Vec<u8>,
    max_frame: u32,
) -> Result<(), ProtoError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    if let Err(e) = codec::encode(msg, &mut *out) {
        out.truncate(start);
        return Err(e);
    }
    let len = out.len() - start - FRAME_HEADER_LEN;
    if len > max_frame as usize {
        out.truncate(start);
        return Err(ProtoError::FrameTooLarge {
            len: len as u64,
            max: max_frame,
        });
    }
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Byte strings at least this long are worth sharing rather than copying
/// into a frame.
pub const SHARE_AT_LEAST: usize = 64 * 1024;

/// [`encode_frame`], except that each of `shared` (byte strings `msg`
/// holds, such as a large value read from a log's map) goes into the frame
/// as itself, its reference counted, not copied: the frame is the
/// concatenation of the returned pieces, in order, byte for byte what
/// [`encode_frame`] writes. What a connection holds while a slow client
/// reads the frame is then the small pieces; the value's bytes stay where
/// they were (pages of a file, for a value from a log). A string of
/// `shared` that `msg` does not hold, or one shorter than
/// [`SHARE_AT_LEAST`], is ignored.
pub fn encode_frame_shared<T: Serialize>(
    msg: &T,
    shared: &[&Bytes],
    max_frame: u32,
) -> Result<Vec<Bytes>, ProtoError> {
    let mut w = Splicer {
        shared,
        done: Vec::new(),
        current: vec![0; FRAME_HEADER_LEN],
        len: 0,
    };
    codec::encode(msg, &mut w)?;
    let Splicer {
        mut done,
        current,
        len,
        ..
    } = w;
    if len > max_frame as usize {
        return Err(ProtoError::FrameTooLarge {
            len: len as u64,
            max: max_frame,
        });
    }
    done.push(Piece::Own(current));
    let Some(Piece::Own(first)) = done.first_mut() else {
        unreachable!("the first piece is the header's")
    };
    first[..FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(done
        .into_iter()
        .filter_map(|p| match p {
            Piece::Own(v) if v.is_empty() => None,
            Piece::Own(v) => Some(Bytes::from(v)),
            Piece::Shared(b) => Some(b),
        })
        .collect())
}

enum Piece {
    Own(Vec<u8>),
    Shared(Bytes),
}

/// The writer of [`encode_frame_shared`]: copies what it is given, except
/// a write that is exactly one of the shared strings.
struct Splicer<'a> {
    shared: &'a [&'a Bytes],
    done: Vec<Piece>,
    current: Vec<u8>,
    /// Payload bytes so far.
    len: usize,
}

impl std::io::Write for Splicer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.len += buf.len();
        if buf.len() >= SHARE_AT_LEAST
            && let Some(b) = self
                .shared
                .iter()
                .find(|b| b.as_ptr() == buf.as_ptr() && b.len() == buf.len())
        {
            self.done
                .push(Piece::Own(std::mem::take(&mut self.current)));
            self.done.push(Piece::Shared((*b).clone()));
        } else {
            self.current.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
