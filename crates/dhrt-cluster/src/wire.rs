//! Reading and writing whole frames on a stream: the buffering half of the
//! peer protocol (the pure decoding half is `dhrt_proto`).

use std::io;

use bytes::{Buf, BytesMut};
use dhrt_proto::{Decoded, decode_frame, encode_frame};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
}
