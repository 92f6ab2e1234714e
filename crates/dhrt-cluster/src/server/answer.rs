//! Answering a batch of binary-protocol requests: runs of sets to one
//! collection go to the log together, and the answers are encoded into a
//! buffer written out as it fills, beside the connection's guard.

use std::future::Future;
use std::io;

use bytes::Bytes;
use dhrt_proto::{
    Beside, Either, ErrorKind, OpError, OpRef, Operations, Reply, RequestRef, Response,
    dispatch_ref, encode_frame, encode_frame_shared,
};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{Closed, Item};
use crate::wire::IdleTimer;

/// Answers are written once this many bytes of them are ready: what one
/// connection holds in answers is this plus the largest single answer.
pub(super) const WRITE_BUDGET: usize = 256 * 1024;

/// Where a batch's answers go: encoded into `out`, written to the stream
/// whenever `out` reaches [`WRITE_BUDGET`]. A write waits beside the
/// connection's guard: a client that stops reading its answers is closed
/// after the idle timeout, and shutdown does not wait for it.
pub(super) struct Sink<'a, S, G> {
    pub(super) stream: &'a mut S,
    pub(super) out: &'a mut Vec<u8>,
    pub(super) max_frame: u32,
    pub(super) guard: &'a mut Beside<G>,
    /// Touched as answers are written, if they answer whole requests.
    pub(super) idle: Option<&'a IdleTimer>,
}

/// Why answering stopped.
pub(super) enum Stop {
    Io(io::Error),
    Closed(Closed),
}

impl<S: AsyncWrite + Unpin, G: Future<Output = Closed> + Unpin> Sink<'_, S, G> {
    #[inline]
    pub(super) async fn push(&mut self, response: Response) -> Result<(), Stop> {
        if let Ok(reply) = &response.result {
            let large = reply.large_values();
            if !large.is_empty()
                && let Ok(pieces) = encode_frame_shared(&response, &large, self.max_frame)
            {
                // The answers before it, then it, its large values as they
                // are (the log's pages): a client that stops reading holds
                // no copy of them in the node.
                self.flush().await?;
                for piece in pieces {
                    self.write(&piece).await?;
                }
                return Ok(());
            }
        }
        if let Err(e) = encode_frame(&response, self.out, self.max_frame) {
            let id = response.id;
            let fallback = match response.result {
                // The drop is done: an error would say it was refused.
                // The keys that fit, in order.
                Ok(Reply::Dropped(mut keys)) => {
                    let budget = (self.max_frame as usize).saturating_sub(1024);
                    let mut used = 0;
                    let fit = keys
                        .iter()
                        .take_while(|k| {
                            used += 8 + k.len();
                            used <= budget
                        })
                        .count();
                    keys.truncate(fit);
                    Response {
                        id,
                        result: Ok(Reply::Dropped(keys)),
                    }
                }
                _ => Response {
                    id,
                    result: Err(OpError::new(
                        ErrorKind::TooLarge,
                        format!("the response is too large: {e}"),
                    )),
                },
            };
            encode_frame(&fallback, self.out, self.max_frame)
                .expect("a short error, or keys cut to fit, fit in a frame");
        }
        if self.out.len() >= WRITE_BUDGET {
            self.flush().await?;
        }
        Ok(())
    }

    pub(super) async fn flush(&mut self) -> Result<(), Stop> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(self.out);
        let written = self.write(&out).await;
        // The buffer is kept (its allocation), empty.
        *self.out = out;
        self.out.clear();
        written
    }

    /// Writes `bytes` beside the guard.
    async fn write(&mut self, bytes: &[u8]) -> Result<(), Stop> {
        let write = self.stream.write_all(bytes);
        tokio::pin!(write);
        match self.guard.run(write).await {
            Either::Left(written) => written.map_err(Stop::Io)?,
            Either::Right(closed) => return Err(Stop::Closed(closed)),
        }
        // A client reading its answers is not idle, however long they take.
        if let Some(idle) = self.idle {
            idle.touch();
        }
        Ok(())
    }
}

/// An empty batch, keeping the allocation of `batch` for a batch that
/// borrows from the buffer anew.
pub(super) fn recycle<'b>(mut batch: Vec<Item<'_>>) -> Vec<Item<'b>> {
    batch.clear();
    // Collecting an emptied vector into one of the same layout reuses its
    // allocation.
    batch.into_iter().map(|_| unreachable!("emptied")).collect()
}

/// Answers a batch of requests in order (draining `batch` into `sink`).
/// Consecutive sets to one collection go to [`Operations::set_many`]
/// together (one lock, one write to the log); if that fails, they are
/// retried one by one so each gets its own answer.
pub(super) async fn answer<
    O: Operations,
    S: AsyncWrite + Unpin,
    G: Future<Output = Closed> + Unpin,
>(
    ops: &O,
    batch: &mut Vec<Item<'_>>,
    sink: &mut Sink<'_, S, G>,
) -> Result<(), Stop> {
    let mut items = batch.drain(..).peekable();
    while let Some(item) = items.next() {
        let request = match item {
            Ok(r) => r,
            Err(response) => {
                sink.push(response).await?;
                continue;
            }
        };
        let run_follows = matches!(
            (&request.op, items.peek()),
            (OpRef::Set { collection, .. }, Some(Ok(RequestRef { op: OpRef::Set { collection: next, .. }, .. })))
                if next == collection
        );
        if !run_follows {
            // A lone request: answered as it is.
            let response = Response {
                id: request.id,
                result: dispatch_ref(ops, request.op).await,
            };
            sink.push(response).await?;
            continue;
        }
        let OpRef::Set {
            collection,
            key,
            value,
        } = request.op
        else {
            unreachable!("a run starts with a set");
        };
        let mut run = vec![(request.id, key, value)];
        while let Some(Ok(RequestRef {
            op: OpRef::Set { collection: c, .. },
            ..
        })) = items.peek()
        {
            if *c != collection {
                break;
            }
            let Some(Ok(RequestRef {
                id,
                op: OpRef::Set { key, value, .. },
            })) = items.next()
            else {
                unreachable!("peeked a set");
            };
            run.push((id, key, value));
        }
        let entries = run
            .iter()
            .map(|(_, k, v)| (Bytes::copy_from_slice(k), Bytes::copy_from_slice(v)))
            .collect();
        let all = match ops.set_many(collection, entries).await {
            Ok(()) => Some(Ok(Reply::Stored)),
            // Saved, on fewer replicas than asked: every set says so
            // (retrying would write them again).
            Err(e) if e.kind == ErrorKind::WriteConcern => Some(Err(e)),
            Err(_) => None,
        };
        if let Some(result) = all {
            for (id, ..) in run {
                let result = result.clone();
                sink.push(Response { id, result }).await?;
            }
            continue;
        }
        for (id, key, value) in run {
            let op = OpRef::Set {
                collection,
                key,
                value,
            };
            let result = dispatch_ref(ops, op).await;
            sink.push(Response { id, result }).await?;
        }
    }
    Ok(())
}
