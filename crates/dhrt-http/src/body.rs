//! Response bodies: whole buffers, or a stream of chunks fed through a
//! channel (collection listings). An `Err` chunk aborts the response, so a
//! client never mistakes a listing cut by a failure for a complete one.
//!
//! One enum instead of a boxed trait object: a whole body, by far the most
//! common, costs no allocation and tells hyper its exact length.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// Errors that abort a streamed body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response.
#[derive(Debug)]
pub struct ResponseBody(Kind);

#[derive(Debug)]
enum Kind {
    /// A whole body, until it is sent.
    Full(Option<Bytes>),
    /// Chunks from a channel, and what lives as long as the body (a
    /// watch's place among the node's open watches).
    Channel {
        rx: mpsc::Receiver<Result<Bytes, BoxError>>,
        _held: Held,
    },
}

/// Kept alive with a streamed body, dropped with it: hyper drops the body
/// as soon as its connection closes.
struct Held(Vec<Box<dyn Send + Sync>>);

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Held({})", self.0.len())
    }
}

/// A whole body.
pub(crate) fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    let bytes = bytes.into();
    ResponseBody(Kind::Full((!bytes.is_empty()).then_some(bytes)))
}

/// A body streamed from a channel, and its sending end.
pub(crate) fn channel(capacity: usize) -> (mpsc::Sender<Result<Bytes, BoxError>>, ResponseBody) {
    channel_holding(capacity, Vec::new())
}

/// A body streamed from a channel that keeps `held` until it is dropped.
pub(crate) fn channel_holding(
    capacity: usize,
    held: Vec<Box<dyn Send + Sync>>,
) -> (mpsc::Sender<Result<Bytes, BoxError>>, ResponseBody) {
    let (tx, rx) = mpsc::channel(capacity);
    (
        tx,
        ResponseBody(Kind::Channel {
            rx,
            _held: Held(held),
        }),
    )
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.0 {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Channel { rx, .. } => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.0, Kind::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Channel { .. } => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn a_whole_body_has_its_exact_length_and_one_frame() {
        let body = full("hello");
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        let empty = full("");
        assert_eq!(empty.size_hint().exact(), Some(0));
        assert!(empty.is_end_stream());
    }

    #[tokio::test]
    async fn a_channel_body_streams_its_chunks_and_an_error_aborts_it() {
        let (tx, body) = channel(4);
        assert_eq!(body.size_hint().exact(), None);
        tx.send(Ok("a".into())).await.unwrap();
        tx.send(Ok("b".into())).await.unwrap();
        drop(tx);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "ab");
        let (tx, body) = channel(4);
        tx.send(Ok("a".into())).await.unwrap();
        tx.send(Err("broken".into())).await.unwrap();
        assert!(body.collect().await.is_err());
    }
}
