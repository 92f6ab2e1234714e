//! Reading and writing whole frames on a stream: the buffering half of the
//! peer protocol (the pure decoding half is `dhrt_proto`, the pure crypto
//! `crate::session`). Handshake frames are plain; every later frame is
//! sealed: `length u32 LE | ciphertext | tag`, the length counting
//! ciphertext and tag and bounded by the frame limit.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use dhrt_proto::{Decoded, FRAME_HEADER_LEN, decode_frame, encode_frame, frame_bounds};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::session::{Opener, Sealer, TAG_LEN};

/// Decodes the next message from `buf` if a whole frame is there.
pub(crate) fn take_msg<T: DeserializeOwned>(
    buf: &mut BytesMut,
    max_frame: u32,
) -> io::Result<Option<T>> {
    match decode_frame::<T>(buf, max_frame).map_err(invalid)? {
        Decoded::Complete { msg, len } => {
            buf.advance(len);
            Ok(Some(msg))
        }
        Decoded::Incomplete { .. } => Ok(None),
    }
}

/// Reads until a whole message is buffered; `None` when the stream ends.
pub(crate) async fn read_msg<T: DeserializeOwned, S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_frame: u32,
) -> io::Result<Option<T>> {
    loop {
        if let Some(msg) = take_msg(buf, max_frame)? {
            return Ok(Some(msg));
        }
        buf.reserve(64 * 1024);
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Encodes and writes one message.
pub(crate) async fn write_msg<T: Serialize, S: AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &T,
    max_frame: u32,
) -> io::Result<()> {
    let mut out = Vec::new();
    encode_frame(msg, &mut out, max_frame).map_err(invalid)?;
    stream.write_all(&out).await
}

/// The largest plaintext payload of a sealed frame of at most `max_frame`
/// bytes.
pub(crate) fn plain_max(max_frame: u32) -> u32 {
    max_frame.saturating_sub(TAG_LEN as u32)
}

/// Seals the plain frame at `out[start..]` (encoded with at most
/// [`plain_max`] bytes of payload) in place: the payload is encrypted, the
/// tag appended, the length prefix rewritten.
pub(crate) fn seal_frame(out: &mut Vec<u8>, start: usize, sealer: &mut Sealer) -> io::Result<()> {
    sealer
        .seal(out, start + FRAME_HEADER_LEN)
        .map_err(invalid)?;
    let len = out.len() - start - FRAME_HEADER_LEN;
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Opens and decodes the next sealed message in `buf` if a whole frame is
/// there. A frame that fails to open is an `InvalidData` error: the caller
/// closes the connection, and nothing of the frame is used.
pub(crate) fn take_sealed<T: DeserializeOwned>(
    buf: &mut BytesMut,
    max_frame: u32,
    opener: &mut Opener,
) -> io::Result<Option<T>> {
    let (range, len) = match frame_bounds(buf, max_frame).map_err(invalid)? {
        Decoded::Complete { msg, len } => (msg, len),
        Decoded::Incomplete { .. } => return Ok(None),
    };
    let plain = opener.open(&mut buf[range]).map_err(invalid)?;
    let msg = dhrt_proto::decode(plain).map_err(invalid)?;
    buf.advance(len);
    Ok(Some(msg))
}

/// Reads until a whole sealed message is buffered; `None` when the stream
/// ends.
pub(crate) async fn read_sealed<T: DeserializeOwned, S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_frame: u32,
    opener: &mut Opener,
) -> io::Result<Option<T>> {
    loop {
        if let Some(msg) = take_sealed(buf, max_frame, opener)? {
            return Ok(Some(msg));
        }
        buf.reserve(64 * 1024);
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

pub(crate) fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Why a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// The client closed it.
    ByClient,
    /// Nothing arrived within the idle timeout.
    Idle,
    /// The node is shutting down.
    Shutdown,
    /// The client broke the protocol (bad preamble, bad length, unreadable
    /// request); the reason is logged.
    Protocol(String),
    /// The client was too slow: a frame (or the preamble) arrived slower
    /// than the minimum rate, or a client that must show a token had not
    /// shown a valid one in time. The reason is logged.
    TooSlow(String),
    /// The node's budget of bytes being received was full: the unfinished
    /// frame was refused (answered, if its id could be read).
    Busy(String),
}

/// A connection's idle deadline: one timer, pushed forward lazily. Arming a
/// fresh timeout around every read would cost two timer-wheel updates per
/// request; instead each read notes the time, and a timer that fires early
/// is re-armed for what remains. Shared by the reading loop (which
/// touches it) and the connection's guard (which waits on it).
pub(crate) struct IdleTimer {
    epoch: tokio::time::Instant,
    /// Nanoseconds since `epoch` at the last arrival.
    last: AtomicU64,
    limit: Duration,
}

impl IdleTimer {
    pub(crate) fn new(limit: Duration) -> Self {
        IdleTimer {
            epoch: tokio::time::Instant::now(),
            last: AtomicU64::new(0),
            limit,
        }
    }

    /// Something arrived.
    pub(crate) fn touch(&self) {
        let since = self.epoch.elapsed().as_nanos() as u64;
        self.last.store(since, Ordering::Relaxed);
    }

    /// Completes once nothing arrived for the limit.
    pub(crate) async fn expired(&self) {
        let sleep = tokio::time::sleep(self.limit);
        tokio::pin!(sleep);
        loop {
            sleep.as_mut().await;
            let last = self.epoch + Duration::from_nanos(self.last.load(Ordering::Relaxed));
            let deadline = last + self.limit;
            if deadline <= tokio::time::Instant::now() {
                return;
            }
            sleep.as_mut().reset(deadline);
        }
    }
}
