//! A binary connection turned into a watch's stream (see
//! `server.rs`, which hands it over, and `docs/protocol.md`).

use std::future::Future;
use std::io;

use bytes::{Bytes, BytesMut};
use dhrt_proto::{Beside, Either, ErrorKind, OpError, Reply, Response, encode_frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::{Closed, IdleTimer};

/// Streams a watch on a connection: each batch of events is one
/// [`Reply::Events`] answer to request `id`, written before the next batch
/// is read from the log (TCP's flow control is the watch's: a client that
/// reads slowly makes the node read the log slowly, and one that stops is
/// closed after the idle timeout or once it falls too far behind). An error
/// ends the watch with an error answer. Nothing more may come from the
/// client: more bytes close the connection, and so does its end.
pub(crate) async fn serve_watch<S, G>(
    stream: S,
    buf: BytesMut,
    (id, mut source): (u64, Box<dyn dhrt_proto::EventSource>),
    max_frame: u32,
    mut guard: Beside<G>,
    idle: &IdleTimer,
    mut recheck: impl FnMut() -> Result<(), OpError>,
) -> io::Result<Closed>
where
    S: AsyncRead + AsyncWrite + Unpin,
    G: Future<Output = Closed> + Unpin,
{
    if !buf.is_empty() {
        return Ok(Closed::Protocol(
            "requests after a watch on one connection".into(),
        ));
    }
    let (mut read, mut write) = tokio::io::split(stream);
    let mut out = Vec::with_capacity(16 * 1024);
    let mut scratch = [0u8; 64];
    // At once: the watch is open, and where it starts.
    let mut first = Some(vec![dhrt_proto::WatchEvent {
        kind: dhrt_proto::EventKind::Progress,
        key: Bytes::new(),
        value: None,
        version: None,
        token: Some(source.token()),
    }]);
    loop {
        if let Some(events) = first.take() {
            encode_events(id, events, &mut out, max_frame);
            let written = write.write_all(&out);
            tokio::pin!(written);
            match guard.run(written).await {
                Either::Left(r) => r?,
                Either::Right(closed) => return Ok(closed),
            }
            out.clear();
            continue;
        }
        let next = async {
            tokio::select! {
                batch = source.next_batch() => Ok(batch),
                n = read.read(&mut scratch) => Err(n),
            }
        };
        tokio::pin!(next);
        let batch = match guard.run(next).await {
            Either::Right(closed) => return Ok(closed),
            Either::Left(Err(Ok(0))) => return Ok(Closed::ByClient),
            Either::Left(Err(Ok(_))) => {
                return Ok(Closed::Protocol(
                    "requests after a watch on one connection".into(),
                ));
            }
            Either::Left(Err(Err(e))) => return Err(e),
            Either::Left(Ok(batch)) => batch,
        };
        // A large event's buffer is not kept for the watch's life.
        if out.capacity() > 1 << 20 {
            out = Vec::with_capacity(16 * 1024);
        }
        out.clear();
        let batch = batch.and_then(|b| recheck().map(|()| b));
        let end = batch.is_err();
        match batch {
            Ok(events) => encode_events(id, events, &mut out, max_frame),
            Err(e) => encode_frame(&Response { id, result: Err(e) }, &mut out, max_frame)
                .expect("a short error fits in a frame"),
        }
        let written = write.write_all(&out);
        tokio::pin!(written);
        match guard.run(written).await {
            Either::Left(r) => r?,
            Either::Right(closed) => return Ok(closed),
        }
        idle.touch();
        if end {
            let _ = write.shutdown().await;
            return Ok(Closed::ByClient);
        }
    }
}

/// Encodes `events` as `Reply::Events` answers to `id`, as many frames as
/// they need (one event alone if it is too large to share one).
fn encode_events(id: u64, events: Vec<dhrt_proto::WatchEvent>, out: &mut Vec<u8>, max_frame: u32) {
    let start = out.len();
    let response = Response {
        id,
        result: Ok(Reply::Events(events)),
    };
    if encode_frame(&response, out, max_frame).is_ok() {
        return;
    }
    out.truncate(start);
    let Ok(Reply::Events(events)) = response.result else {
        unreachable!("built above")
    };
    for e in events {
        let one = Response {
            id,
            result: Ok(Reply::Events(vec![e])),
        };
        if encode_frame(&one, out, max_frame).is_err() {
            let too_large = Response {
                id,
                result: Err(OpError::new(
                    ErrorKind::TooLarge,
                    "an event is larger than a frame",
                )),
            };
            encode_frame(&too_large, out, max_frame).expect("a short error fits in a frame");
        }
    }
}
