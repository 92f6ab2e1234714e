//! Watches over HTTP: Server-Sent Events (`Accept: text/event-stream`) or
//! one JSON object a line (`Accept: application/x-ndjson`), of one
//! collection (`GET /:collection`) or several (`GET /?watch=a,b`).
//!
//! Each collection's [`EventSource`] runs in a task of its own and hands
//! its batches to the stream's writer through a small channel, and the
//! writer hands rendered chunks to hyper through another: when the client
//! reads slowly, both fill and the sources simply stop reading the log
//! (which is their buffer); when it goes away, everything ends.

use bytes::Bytes;
use dhrt_proto::{ErrorKind, EventKind, EventSource, OpError, Token, WatchEvent, version_hex};
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Response};
use tokio::sync::mpsc;

use crate::body::{self, ResponseBody};
use crate::error::HttpError;
use crate::json;

/// A chunk is sent once it holds about this many bytes.
const CHUNK: usize = 16 * 1024;
/// How long a watch's last event may take to go out as the node stops.
const STOP_WRITE: std::time::Duration = std::time::Duration::from_millis(500);

/// A value larger than this is escaped and sent a piece at a time.
const BIG_VALUE: usize = 256 * 1024;
const PIECE: usize = 64 * 1024;

/// How events are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `text/event-stream`.
    Sse,
    /// `application/x-ndjson`.
    Ndjson,
}

impl Format {
    /// The format an `Accept` header asks for, if it asks for a stream.
    pub(crate) fn from_accept(value: &str) -> Option<Format> {
        value.split(',').find_map(|t| {
            let t = t.trim();
            if t.starts_with("text/event-stream") {
                Some(Format::Sse)
            } else if t.starts_with("application/x-ndjson") {
                Some(Format::Ndjson)
            } else {
                None
            }
        })
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Sse => "text/event-stream",
            Format::Ndjson => "application/x-ndjson",
        }
    }
}

/// Where each collection of a watch starts, from `since` (or the
/// `Last-Event-ID` header): one token for one collection, `name:token,...`
/// for several (what this stream's ids are).
pub(crate) fn parse_since(
    collections: &[String],
    since: &str,
    multi: bool,
) -> Result<Vec<Token>, HttpError> {
    if !multi {
        return Ok(vec![since.trim().parse::<Token>()?]);
    }
    let mut tokens = vec![None; collections.len()];
    for part in since.split(',').filter(|p| !p.is_empty()) {
        let (name, token) = part.split_once(':').ok_or_else(|| {
            HttpError::bad_request(format!(
                "the token of a watch of several collections is name:token,..., not {part:?}"
            ))
        })?;
        let i = collections.iter().position(|c| c == name).ok_or_else(|| {
            HttpError::bad_request(format!("the token names {name:?}, which is not watched"))
        })?;
        tokens[i] = Some(token.parse::<Token>()?);
    }
    tokens
        .into_iter()
        .zip(collections)
        .map(|(t, c)| {
            t.ok_or_else(|| HttpError::bad_request(format!("the token has no position for {c:?}")))
        })
        .collect()
}

/// The stream's resume string: the one token, or `name:token,...`.
fn resume(names: &[String], tokens: &[Token], multi: bool) -> String {
    if !multi {
        return tokens[0].to_string();
    }
    let mut s = String::new();
    for (i, (n, t)) in names.iter().zip(tokens).enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(n);
        s.push(':');
        s.push_str(&t.to_string());
    }
    s
}

/// Appends the JSON object of `e` to `out`, except the value of a large
/// set, which is returned to be sent in pieces after `out`.
fn render_json<'e>(
    out: &mut Vec<u8>,
    collection: &str,
    e: &'e WatchEvent,
    token: Option<&str>,
) -> Option<json::KeyValuePieces<'e>> {
    // Collection names, kinds, versions and tokens need no escaping.
    out.extend_from_slice(b"{\"Collection\":\"");
    out.extend_from_slice(collection.as_bytes());
    out.extend_from_slice(b"\",\"Kind\":\"");
    out.extend_from_slice(e.kind.as_str().as_bytes());
    out.push(b'"');
    if let Some(v) = e.version {
        out.extend_from_slice(b",\"Version\":\"");
        out.extend_from_slice(version_hex(v).as_bytes());
        out.push(b'"');
    }
    if let Some(t) = token {
        out.extend_from_slice(b",\"Token\":\"");
        out.extend_from_slice(t.as_bytes());
        out.push(b'"');
    }
    match (e.kind, &e.value) {
        (EventKind::Set | EventKind::Initial, Some(value)) => {
            out.push(b',');
            if value.len() > BIG_VALUE {
                let mut pieces = json::KeyValuePieces::new(&e.key, value, PIECE);
                // Without its opening brace: the object is already open.
                let first = pieces.next().expect("a first piece");
                out.extend_from_slice(&first[1..]);
                return Some(pieces);
            }
            let at = out.len();
            json::key_value(out, &e.key, value);
            out.remove(at);
        }
        (EventKind::Delete, _) => {
            out.push(b',');
            let kv = json::key_only(&e.key, None);
            out.extend_from_slice(&kv[1..kv.len() - 1]);
            out.push(b'}');
        }
        _ => out.push(b'}'),
    }
    None
}

/// A source's batch, its index, and its turn: the source reads no more
/// until the batch is written.
type Batch = (
    usize,
    Result<Vec<WatchEvent>, OpError>,
    tokio::sync::OwnedSemaphorePermit,
);

/// Renders and sends events; `Err` when the client went away.
struct Writer {
    tx: mpsc::Sender<Result<Bytes, body::BoxError>>,
    /// Chunks handed to the body so far: whether the client still reads.
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    buf: Vec<u8>,
    format: Format,
    /// Between the first and the last byte of an event.
    mid_event: bool,
}

impl Writer {
    async fn flush(&mut self) -> Result<(), ()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        // A copy of exactly its size: the buffer stays, at its capacity,
        // and what waits in the body for a slow client is no larger than
        // what it says.
        let chunk = Bytes::copy_from_slice(&self.buf);
        self.buf.clear();
        if self.buf.capacity() > 4 * CHUNK {
            // Grown by one large event (a value escaped whole): not kept
            // for the life of the watch.
            self.buf = Vec::with_capacity(CHUNK + 4096);
        }
        self.tx.send(Ok(chunk)).await.map_err(|_| ())?;
        self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn event(
        &mut self,
        collection: &str,
        e: &WatchEvent,
        token: Option<&str>,
    ) -> Result<(), ()> {
        self.mid_event = true;
        if self.format == Format::Sse {
            if e.kind == EventKind::Progress {
                self.buf.extend_from_slice(b": heartbeat\n");
            }
            if let Some(t) = token {
                self.buf.extend_from_slice(b"id: ");
                self.buf.extend_from_slice(t.as_bytes());
                self.buf.push(b'\n');
            }
            self.buf.extend_from_slice(b"event: ");
            self.buf.extend_from_slice(e.kind.as_str().as_bytes());
            self.buf.extend_from_slice(b"\ndata: ");
        }
        if let Some(pieces) = render_json(&mut self.buf, collection, e, token) {
            self.flush().await?;
            for piece in pieces {
                self.tx.send(Ok(Bytes::from(piece))).await.map_err(|_| ())?;
                self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.buf.extend_from_slice(if self.format == Format::Sse {
            b"\n\n"
        } else {
            b"\n"
        });
        self.mid_event = false;
        if self.buf.len() >= CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    async fn error(&mut self, e: &OpError) -> Result<(), ()> {
        if self.format == Format::Sse {
            self.buf.extend_from_slice(b"event: error\ndata: ");
        }
        self.buf.extend_from_slice(&json::error(&e.message));
        self.buf.extend_from_slice(if self.format == Format::Sse {
            b"\n\n"
        } else {
            b"\n"
        });
        self.flush().await
    }
}

/// How a watch learns that the node stops.
pub(crate) struct Stop {
    /// Cancelled when the node stops.
    pub(crate) stopping: tokio_util::sync::CancellationToken,
    /// Cancelled by the watch to close its connection, when its client
    /// reads nothing and its last event cannot go out.
    pub(crate) close_connection: Option<tokio_util::sync::CancellationToken>,
}

/// The streamed response of a watch of `sources` (opened already, so that
/// a refusal such as 410 was answered as a status).
pub(crate) fn stream(
    mut sources: Vec<(String, Box<dyn EventSource>)>,
    multi: bool,
    format: Format,
    snapshot: bool,
    mut recheck: Box<dyn FnMut() -> Result<(), OpError> + Send>,
    runtime: Option<tokio::runtime::Handle>,
    stop: Stop,
) -> Response<ResponseBody> {
    let Stop {
        stopping,
        close_connection,
    } = stop;
    let runtime = runtime.unwrap_or_else(tokio::runtime::Handle::current);
    // The watches' places among the node's open watches go with the body,
    // which hyper drops as soon as the client leaves: the tasks below run
    // at a lower priority, and under a full CPU would hold them for
    // seconds after it (a churn of watches then kept new ones out).
    let slots = sources
        .iter_mut()
        .filter_map(|(_, s)| s.take_slot())
        .collect();
    let (tx, body) = body::channel_holding(2, slots);
    let names: Vec<String> = sources.iter().map(|(n, _)| n.clone()).collect();
    let mut tokens: Vec<Token> = sources.iter().map(|(_, s)| s.token()).collect();
    // Snapshots not yet complete: until every one is, no event carries a
    // token (an EventSource reconnecting with one would skip the rest of
    // a snapshot); the client then starts a snapshot again.
    let mut unsynced = if snapshot { sources.len() } else { 0 };
    // Each source reads its next batch only once the writer has rendered
    // the one before (and handed it to the body): a watcher that reads
    // nothing holds at most one batch a collection, not a queue of them.
    let (etx, mut erx) = mpsc::channel::<Batch>(sources.len());
    let mut ended: Vec<_> = sources.iter().map(|(_, s)| s.ended()).collect();
    let any_ended = std::future::poll_fn(move |cx| {
        if ended.iter_mut().any(|e| e.as_mut().poll(cx).is_ready()) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    });
    for (i, (_, mut source)) in sources.into_iter().enumerate() {
        let etx = etx.clone();
        let turn = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
        runtime.spawn(async move {
            loop {
                let batch = tokio::select! {
                    b = async {
                        let permit = turn.clone().acquire_owned().await.ok()?;
                        Some((source.next_batch().await, permit))
                    } => b,
                    _ = etx.closed() => return,
                };
                let Some((batch, permit)) = batch else { return };
                let end = batch.is_err();
                if etx.send((i, batch, permit)).await.is_err() || end {
                    return;
                }
            }
        });
    }
    drop(etx);
    runtime.spawn(async move {
        let closed = tx.clone();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut w = Writer {
            tx,
            sent: sent.clone(),
            buf: Vec::with_capacity(CHUNK + 4096),
            format,
            mid_event: false,
        };
        let watchdog = dhrt_proto::ended_unread(any_ended, &sent, || {
            tokio::time::sleep(dhrt_proto::ENDED_QUIET)
        });
        tokio::pin!(watchdog);
        let mut ended_by_source = false;
        let stopped = {
            let run = std::pin::pin!(async {
                if format == Format::Sse {
                    // An EventSource reconnects after a second.
                    w.buf.extend_from_slice(b"retry: 1000\n\n");
                }
                // At once, so that the client knows the stream is open and
                // holds a token before any change: a progress event per
                // collection.
                let id = (unsynced == 0).then(|| resume(&names, &tokens, multi));
                for (i, name) in names.iter().enumerate() {
                    let open = WatchEvent {
                        kind: EventKind::Progress,
                        key: Bytes::new(),
                        value: None,
                        version: None,
                        token: Some(tokens[i]),
                    };
                    if w.event(name, &open, id.as_deref()).await.is_err() {
                        return false;
                    }
                }
                if w.flush().await.is_err() {
                    return false;
                }
                loop {
                    let next = tokio::select! {
                        n = erx.recv() => n,
                        _ = closed.closed() => return false,
                    };
                    // The permit goes back (and the source reads on)
                    // once the batch is rendered and handed to the body.
                    let Some((i, batch, _turn)) = next else {
                        return false;
                    };
                    let from_source = batch.is_err();
                    let batch = batch.and_then(|b| recheck().map(|()| b));
                    match batch {
                        Ok(events) => {
                            for e in &events {
                                if e.kind == EventKind::Synced {
                                    unsynced = unsynced.saturating_sub(1);
                                }
                                let token = match e.token {
                                    Some(t) => {
                                        tokens[i] = t;
                                        (unsynced == 0).then(|| resume(&names, &tokens, multi))
                                    }
                                    None => None,
                                };
                                if w.event(&names[i], e, token.as_deref()).await.is_err() {
                                    return false;
                                }
                            }
                            if w.flush().await.is_err() {
                                return false;
                            }
                        }
                        Err(e) => {
                            return w.error(&e).await.is_ok() && from_source;
                        }
                    }
                }
            });
            // However far the writer is (waiting for a change, or for a
            // client that reads nothing to make room), a stop ends it.
            tokio::select! {
                ended = run => {
                    ended_by_source = ended;
                    false
                }
                () = stopping.cancelled() => true,
                () = &mut watchdog => {
                    // The node ended the watch and its client reads
                    // nothing: what was read and why cannot go out, and
                    // the connection is not kept for them.
                    if let Some(close) = &close_connection {
                        close.cancel();
                    }
                    false
                }
            }
        };
        if ended_by_source {
            // The reason was handed over and the body ends; but for a
            // client that reads nothing the rest can sit in the server's
            // buffer, the connection kept for it until the idle timeout.
            // The watchdog goes on (its quiet may have begun just before
            // the last chunk: two of them at most); a client that read it
            // all then loses an idle connection, nothing more.
            drop((w, closed));
            tokio::select! {
                () = &mut watchdog => {
                    if let Some(close) = &close_connection {
                        close.cancel();
                    }
                }
                () = tokio::time::sleep(dhrt_proto::ENDED_QUIET * 2 + std::time::Duration::from_secs(1)) => {}
                () = stopping.cancelled() => {}
            }
            return;
        }
        if stopped {
            let stop = OpError::new(
                ErrorKind::Unavailable,
                "the watch ended: the node is shutting down; resume from the last token",
            );
            if w.mid_event {
                // An event cut short: the error goes on a line of its own.
                w.buf.clear();
                w.buf.push(b'\n');
            }
            // A client that reads nothing does not hold the stop: its
            // connection is closed instead, at once if the sentence cannot
            // be handed over, else once what is still buffered had a
            // moment to go out (the socket's buffers may not have been
            // full yet: the body would end, and the connection wait for a
            // client that never reads it).
            let handed = tokio::time::timeout(STOP_WRITE, w.error(&stop))
                .await
                .is_ok();
            drop(w);
            if let Some(close) = close_connection {
                if handed {
                    tokio::time::sleep(STOP_WRITE * 4).await;
                }
                close.cancel();
            }
        }
    });
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}
