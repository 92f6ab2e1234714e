//! Response bodies: whole buffers, or a stream of chunks fed through a
//! channel (collection listings). An `Err` chunk aborts the response, so a
//! client never mistakes a listing cut by a failure for a complete one.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;

/// Errors that abort a streamed body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response.
pub type ResponseBody = BoxBody<Bytes, BoxError>;

/// A whole body.
pub(crate) fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A body streamed from a channel, and its sending end.
pub(crate) fn channel(capacity: usize) -> (mpsc::Sender<Result<Bytes, BoxError>>, ResponseBody) {
    let (tx, rx) = mpsc::channel(capacity);
    (tx, ChannelBody(rx).boxed())
}

struct ChannelBody(mpsc::Receiver<Result<Bytes, BoxError>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|r| r.map(Frame::data)))
    }
}
