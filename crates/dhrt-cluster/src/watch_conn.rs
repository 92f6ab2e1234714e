//! A binary connection turned into a watch's stream (see
//! `server.rs`, which hands it over, and `docs/protocol.md`).

use std::future::Future;
use std::io;

use bytes::{Bytes, BytesMut};
use dhrt_proto::{
    Beside, Either, ErrorKind, OpError, Reply, Response, encode_frame, encode_frame_shared,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::{Closed, IdleTimer};
use std::sync::Arc;

/// Streams a watch on a connection: each batch of events is one
/// [`Reply::Events`] answer to request `id`, written before the next batch
/// is read from the log (TCP's flow control is the watch's: a client that
/// reads slowly makes the node read the log slowly, and one that stops is
/// closed after the idle timeout or once it falls too far behind). An error
/// ends the watch with an error answer. Nothing more may come from the
/// client: more bytes close the connection, and so does its end.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_watch<S, G>(
    stream: S,
    buf: BytesMut,
    (id, mut source): (u64, Box<dyn dhrt_proto::EventSource>),
    max_frame: u32,
    mut guard: Beside<G>,
    idle: Arc<IdleTimer>,
    mut recheck: impl FnMut() -> Result<(), OpError> + Send + 'static,
    runtime: Option<tokio::runtime::Handle>,
) -> io::Result<Closed>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    G: Future<Output = Closed> + Unpin,
{
    if !buf.is_empty() {
        return Ok(Closed::Protocol(
            "requests after a watch on one connection".into(),
        ));
    }
    // The events are read, encoded and written by a task on the watch
    // runtime (low CPU priority in dhrtd): when the CPU is short, watchers
    // fall behind instead of taking it from the connections that write.
    // This task keeps the reading half, to see the client leave, and the
    // guard (shutdown, idle timeout), and ends the writer when either
    // fires.
    let (mut read, mut write) = tokio::io::split(stream);
    // Ended by the node (fallen too far behind) while its client reads
    // nothing: its last batch and the reason cannot go out, and the
    // connection is not kept for them until the idle timeout.
    let ended = source.ended();
    // The watch's place among the node's open watches stays with this
    // task, which sees the client leave, not with the writer, which runs
    // at a lower priority and could hold it for seconds after.
    let _slot = source.take_slot();
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let progress = written.clone();
    // Why the guard ended the watch (the node stopping), for the writer to
    // say last.
    let (end_tx, mut end_rx) = tokio::sync::oneshot::channel::<OpError>();
    let writer = async move {
        // At once: the watch is open, and where it starts.
        let open = vec![dhrt_proto::WatchEvent {
            kind: dhrt_proto::EventKind::Progress,
            key: Bytes::new(),
            value: None,
            version: None,
            token: Some(source.token()),
        }];
        for piece in encode_events(id, open, max_frame) {
            write.write_all(&piece).await?;
        }
        // Polled until it completes, never after: the reading side may end
        // (and drop its sender) before this task is aborted.
        let mut end_open = true;
        loop {
            let batch = tokio::select! {
                biased;
                why = &mut end_rx, if end_open => match why {
                    Ok(why) => Err(why),
                    Err(_) => {
                        end_open = false;
                        continue;
                    }
                },
                batch = source.next_batch() => batch,
            };
            let batch = batch.and_then(|b| recheck().map(|()| b));
            let end = batch.is_err();
            let out = match batch {
                Ok(events) => encode_events(id, events, max_frame),
                Err(e) => vec![error_frame(id, e, max_frame)],
            };
            // Piece by piece, the large values as the log's pages: a client
            // that stops reading holds no copy of them in the node.
            for piece in out {
                write.write_all(&piece).await?;
                progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            idle.touch();
            if end {
                let _ = write.shutdown().await;
                return Ok::<_, io::Error>(());
            }
        }
    };
    let mut task = match runtime {
        Some(rt) => rt.spawn(writer),
        None => tokio::spawn(writer),
    };
    let mut scratch = [0u8; 64];
    let stalled = dhrt_proto::ended_unread(ended, &written, || {
        tokio::time::sleep(dhrt_proto::ENDED_QUIET)
    });
    let outcome = {
        let watched = async {
            tokio::select! {
                done = &mut task => Ok(Ok(done)),
                n = read.read(&mut scratch) => Ok(Err(n)),
                () = stalled => Err(()),
            }
        };
        tokio::pin!(watched);
        guard.run(watched).await
    };
    let closed = match outcome {
        Either::Right(closed) => {
            // Said to the client as HTTP watches say it, so that it
            // resumes elsewhere instead of taking the close for a fault;
            // a client that does not read is not waited for long.
            let why = match &closed {
                Closed::Shutdown => {
                    Some("the watch ended: the node is shutting down; resume from the last token")
                }
                Closed::Idle => Some(
                    "the watch ended: nothing was sent within the idle timeout; resume from the last token",
                ),
                _ => None,
            };
            if let Some(why) = why
                && end_tx
                    .send(OpError::new(ErrorKind::Unavailable, why))
                    .is_ok()
            {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), &mut task).await;
            }
            Ok(closed)
        }
        Either::Left(Ok(Ok(Ok(Ok(()))))) => Ok(Closed::ByClient),
        Either::Left(Ok(Ok(Ok(Err(e))))) => Err(e),
        Either::Left(Ok(Ok(Err(join)))) => Err(io::Error::other(join)),
        Either::Left(Ok(Err(Ok(0)))) => Ok(Closed::ByClient),
        Either::Left(Ok(Err(Ok(_)))) => Ok(Closed::Protocol(
            "requests after a watch on one connection".into(),
        )),
        Either::Left(Ok(Err(Err(e)))) => Err(e),
        Either::Left(Err(())) => Ok(Closed::TooSlow(
            "a watch ended by the node could not be sent to its client, which reads nothing".into(),
        )),
    };
    task.abort();
    closed
}

/// Encodes `events` as `Reply::Events` answers to `id`, as many frames as
/// they need (one event alone if it is too large to share one), in pieces
/// that share the large values instead of copying them.
fn encode_events(id: u64, events: Vec<dhrt_proto::WatchEvent>, max_frame: u32) -> Vec<Bytes> {
    let encode = |events: Vec<dhrt_proto::WatchEvent>| {
        let response = Response {
            id,
            result: Ok(Reply::Events(events)),
        };
        let Ok(reply) = &response.result else {
            unreachable!("built above")
        };
        encode_frame_shared(&response, &reply.large_values(), max_frame).map_err(|_| response)
    };
    let events = match encode(events) {
        Ok(pieces) => return pieces,
        Err(Response {
            result: Ok(Reply::Events(events)),
            ..
        }) => events,
        Err(_) => unreachable!("built as events"),
    };
    let mut out = Vec::new();
    for e in events {
        match encode(vec![e]) {
            Ok(pieces) => out.extend(pieces),
            Err(_) => out.push(error_frame(
                id,
                OpError::new(ErrorKind::TooLarge, "an event is larger than a frame"),
                max_frame,
            )),
        }
    }
    out
}

/// The frame of an error answer to `id`.
fn error_frame(id: u64, e: OpError, max_frame: u32) -> Bytes {
    let mut out = Vec::new();
    encode_frame(&Response { id, result: Err(e) }, &mut out, max_frame)
        .expect("a short error fits in a frame");
    out.into()
}
