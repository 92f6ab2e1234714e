//! The listening side of a peer connection: the handshake (refusing anyone
//! who cannot prove the cluster secret), then sealed frames: requests
//! answered concurrently, at most [`MAX_IN_FLIGHT`] at a time per
//! connection, and gossip handed to the membership protocol. Every refusal
//! and every frame that fails to open is logged at warn with the peer's
//! address, and closes the connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use dhrt_proto::{ErrorKind, Gossip, OpError, PeerMessage, PeerOp, PeerReply, encode_frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::handshake::{self, Side};
use crate::session::{Sealer, Session};
use crate::sessions::Sessions;
use crate::throttle::LogThrottle;
use crate::wire::{Closed, plain_max, seal_frame, take_sealed};

/// The bytes of records in one page of a bucket listing (a larger record
/// goes alone): well under the frame limit.
const BUCKET_PAGE_BYTES: usize = 4 << 20;

/// Requests of one connection being answered at once. At the cap the
/// connection is not read until one is answered: a peer cannot make this
/// node hold more than this many requests and their answers.
pub(crate) const MAX_IN_FLIGHT: usize = 64;

/// Answers ready at once are sealed into one write up to this many bytes.
const ANSWERS_SHARE_A_WRITE: usize = 1 << 20;

/// How long a piece of answers ([`WRITE_PIECE`] bytes) may take to be
/// written before the connection is closed: a peer that stops reading
/// holds its answers no longer; one reading at 2 KiB/s goes on.
const WRITE_STALL: Duration = Duration::from_secs(30);
const WRITE_PIECE: usize = 64 << 10;

/// A frame that has been arriving this long gets a [`PeerMessage::Received`]
/// note back, and another every so often while it keeps arriving: the
/// dialer's sign that its bytes are still on their way (a large value on a
/// slow link) when none move on its side.
pub(crate) const NOTE_EVERY: Duration = Duration::from_millis(200);

/// A frame that is arriving must bring this many bytes in every
/// [`FRAME_STRETCH`], or the connection is closed: a peer that sends most
/// of a 16 MiB frame and then nothing does not hold it here for long
/// (dialers give up far sooner: they need 16 KiB a second).
const FRAME_STRETCH_BYTES: u64 = 10 << 10;
const FRAME_STRETCH: Duration = Duration::from_secs(10);

/// Serves a peer connection from `remote` whose preamble was consumed;
/// `buf` holds what was read after it. It takes one of `slots` once it has
/// proved the cluster secret, and tells `proven` then.
pub(crate) async fn serve_peer<S>(
    mut stream: S,
    remote: SocketAddr,
    mut buf: BytesMut,
    (cluster, sessions): (Arc<Cluster>, Arc<Sessions>),
    max_frame: u32,
    (slots, mut proven): (&Semaphore, dhrt_proto::Proven),
    shutdown: impl Future<Output = ()>,
) -> io::Result<Closed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    static REFUSED: LogThrottle = LogThrottle::new(Duration::from_secs(1));
    let refused = |reason: &dyn std::fmt::Display| {
        cluster.count_refused_peer();
        if let Some(left_out) = REFUSED.allow() {
            tracing::warn!(%remote, left_out, "refused a peer connection: {reason}");
        }
    };
    let handshake_timeout = Duration::from_secs(5);
    let me = Side {
        id: cluster.id(),
        secret: cluster.secret(),
        max_frame,
    };
    let (dialer, session) = match tokio::time::timeout(
        handshake_timeout,
        handshake::accept(&mut stream, &mut buf, me),
    )
    .await
    {
        Ok(Ok(Ok(accepted))) => accepted,
        Ok(Ok(Err(reason))) => {
            refused(&reason);
            return Ok(Closed::Protocol(reason));
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
            refused(&e);
            return Ok(Closed::Protocol(e.to_string()));
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(Closed::Idle),
    };
    // A peer slot is taken only once the dialer has proved the secret:
    // strangers cannot fill them (and until then, a stranger's connection
    // may be closed for a newcomer: `proven`).
    proven.now();
    let Ok(_slot) = slots.try_acquire() else {
        refused(&"the peer connection limit is reached (--max-peer-connections)");
        return Ok(Closed::Protocol("peer connection limit".into()));
    };
    let handler = {
        let cluster = cluster.clone();
        move |op| {
            let (cluster, sessions) = (cluster.clone(), sessions.clone());
            async move { handle(&cluster, &sessions, dialer, op).await }
        }
    };
    let connection = Connection {
        remote,
        max_frame,
        max_in_flight: MAX_IN_FLIGHT,
        answered: cluster.answered(),
    };
    connection
        .serve(
            stream,
            buf,
            session,
            handler,
            |g| cluster.on_gossip(dialer, g),
            shutdown,
        )
        .await
}

/// An authenticated peer connection's limits and whom it is with.
#[derive(Debug, Clone)]
struct Connection {
    remote: SocketAddr,
    max_frame: u32,
    max_in_flight: usize,
    /// Counts the bytes of the answers sent (the node's, for `/metrics`).
    answered: Arc<AtomicU64>,
}

impl Connection {
    /// Serves sealed frames after the handshake: each request is answered
    /// by `handle` on its own task, at most `max_in_flight` at once;
    /// gossip goes to `gossip`.
    async fn serve<S, H, F>(
        self,
        mut stream: S,
        mut buf: BytesMut,
        session: Session,
        handle: H,
        mut gossip: impl FnMut(Gossip),
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<Closed>
    where
        S: AsyncRead + AsyncWrite + Unpin,
        H: Fn(PeerOp) -> F,
        F: Future<Output = Result<PeerReply, OpError>> + Send + 'static,
    {
        let Session {
            mut sealer,
            mut opener,
        } = session;
        let remote = self.remote;
        // A peer that keeps sending what cannot be opened (it holds the
        // secret, yet speaks another version, or lies) reconnects as fast
        // as it is closed: one line a second, on one line each.
        static CLOSED: LogThrottle = LogThrottle::new(Duration::from_secs(1));
        let refuse = |reason: String| {
            let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
            if let Some(left_out) = CLOSED.allow() {
                tracing::warn!(%remote, left_out, "closed a peer connection: {reason}");
            }
            Ok(Closed::Protocol(reason))
        };
        // Each task sends one answer: the channel never holds more than
        // the requests in flight.
        let (tx, mut rx) = mpsc::channel(self.max_in_flight);
        let mut in_flight = 0;
        tokio::pin!(shutdown);
        let mut out = Vec::new();
        // Bytes read since the handshake, and since when the frame at the
        // head of `buf` has been arriving (`None`: no frame is).
        let (mut received, mut arriving) = (0u64, None::<Instant>);
        let mut noted = Instant::now();
        // Since when the frame arriving has had to bring
        // `FRAME_STRETCH_BYTES`, and what it had received then.
        let mut stretch = (Instant::now(), 0u64);
        // Whether the last turn was at the cap of requests in flight (the
        // connection not read meanwhile: no stretch runs).
        let mut was_capped = false;
        loop {
            while in_flight < self.max_in_flight {
                let msg = match take_sealed::<PeerMessage>(&mut buf, self.max_frame, &mut opener) {
                    Ok(Some(msg)) => msg,
                    Ok(None) => break,
                    Err(e) => return refuse(e.to_string()),
                };
                arriving = None;
                match msg {
                    PeerMessage::Gossip(g) => gossip(g),
                    PeerMessage::Request { id, op } => {
                        in_flight += 1;
                        let (answer, tx) = (handle(op), tx.clone());
                        tokio::spawn(async move {
                            let result = answer.await;
                            // The connection may be gone: nobody to tell.
                            let _ = tx.send((id, result)).await;
                        });
                    }
                    PeerMessage::Response { .. } => {
                        return refuse("a response on a listening connection".into());
                    }
                    PeerMessage::Received { .. } => {
                        return refuse("a progress note on a listening connection".into());
                    }
                }
            }
            if buf.is_empty() {
                arriving = None;
            } else if arriving.is_none() {
                arriving = Some(Instant::now());
                stretch = (Instant::now(), received);
            }
            let capped = in_flight >= self.max_in_flight;
            if capped || was_capped || received - stretch.1 >= FRAME_STRETCH_BYTES {
                stretch = (Instant::now(), received);
            }
            was_capped = capped;
            let stalled = stretch.0 + FRAME_STRETCH;
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(Closed::Shutdown),
                // Waiting for more of a frame, not for its answer's turn.
                () = tokio::time::sleep_until(stalled), if arriving.is_some() && !capped =>
                {
                    let why = format!(
                        "a frame brought fewer than {} KiB in {} s ({} bytes of it here)",
                        FRAME_STRETCH_BYTES >> 10,
                        FRAME_STRETCH.as_secs(),
                        buf.len()
                    );
                    tracing::warn!(remote = %self.remote, "closed a peer connection: {why}");
                    return Ok(Closed::TooSlow(why));
                }
                Some((id, result)) = rx.recv() => {
                    in_flight -= 1;
                    self.encode(id, result, &mut out, &mut sealer)?;
                    // Small answers share a write; large ones go one at a
                    // time (sealed, each is a copy: a peer that stops
                    // reading must not make this node seal every answer it
                    // has in flight at once).
                    while out.len() < ANSWERS_SHARE_A_WRITE
                        && let Ok((id, result)) = rx.try_recv()
                    {
                        in_flight -= 1;
                        self.encode(id, result, &mut out, &mut sealer)?;
                    }
                    if let Some(why) = write_unless_stalled(&mut stream, &out).await? {
                        tracing::warn!(remote = %self.remote, "closed a peer connection: {why}");
                        return Ok(Closed::TooSlow(why));
                    }
                    self.answered.fetch_add(out.len() as u64, Ordering::Relaxed);
                    out.clear();
                }
                // Backpressure: at the cap, read nothing more.
                n = read_more(&mut stream, &mut buf), if in_flight < self.max_in_flight => {
                    let n = n?;
                    if n == 0 {
                        return Ok(Closed::ByClient);
                    }
                    received += n as u64;
                    if arriving.is_some_and(|t| t.elapsed() >= NOTE_EVERY)
                        && noted.elapsed() >= NOTE_EVERY
                    {
                        noted = Instant::now();
                        let note = PeerMessage::Received { bytes: received };
                        encode_frame(&note, &mut out, plain_max(self.max_frame))
                            .expect("a note fits");
                        seal_frame(&mut out, 0, &mut sealer)?;
                        if let Some(why) = write_unless_stalled(&mut stream, &out).await? {
                            return Ok(Closed::TooSlow(why));
                        }
                        out.clear();
                    }
                }
            }
        }
    }

    /// Appends the sealed response to request `id`; one too large to send
    /// becomes a `TooLarge` error.
    fn encode(
        &self,
        id: u64,
        result: Result<PeerReply, OpError>,
        out: &mut Vec<u8>,
        sealer: &mut Sealer,
    ) -> io::Result<()> {
        let start = out.len();
        let max = plain_max(self.max_frame);
        if let Err(e) = encode_frame(&PeerMessage::Response { id, result }, out, max) {
            let too_large = PeerMessage::Response {
                id,
                result: Err(OpError::new(ErrorKind::TooLarge, e.to_string())),
            };
            encode_frame(&too_large, out, max).expect("a short error fits");
        }
        seal_frame(out, start, sealer)
    }
}

/// Writes `bytes` in pieces, each within [`WRITE_STALL`]: a peer that stops
/// reading is let go, one reading slowly is not. `Some(why)` if it stopped.
async fn write_unless_stalled<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
) -> io::Result<Option<String>> {
    for piece in bytes.chunks(WRITE_PIECE) {
        match tokio::time::timeout(WRITE_STALL, stream.write_all(piece)).await {
            Ok(written) => written?,
            Err(_) => {
                return Ok(Some(format!(
                    "it read none of {} bytes in 30 s",
                    piece.len()
                )));
            }
        }
    }
    Ok(None)
}

async fn read_more<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut BytesMut) -> io::Result<usize> {
    buf.reserve(64 * 1024);
    stream.read_buf(buf).await
}

async fn handle(
    cluster: &Arc<Cluster>,
    sessions: &Arc<Sessions>,
    dialer: u64,
    op: PeerOp,
) -> Result<PeerReply, OpError> {
    match op {
        PeerOp::Apply(mutations) => cluster
            .apply_async(mutations, false)
            .await
            .map(PeerReply::from),
        PeerOp::ApplyReporting(mutations) => cluster
            .apply_async(mutations, true)
            .await
            .map(|a| a.reporting()),
        PeerOp::Read { collection, key } => cluster.entry(&collection, &key, u32::MAX),
        PeerOp::Peek {
            collection,
            key,
            inline_max,
        } => cluster.entry(&collection, &key, inline_max),
        PeerOp::Digests(_) | PeerOp::DigestsAfter { .. } if cluster.has_left() => {
            Err(OpError::new(
                ErrorKind::Unavailable,
                "this node has left the cluster: it holds no copy for anyone",
            ))
        }
        PeerOp::Digests(names) => cluster.digests(names).map(PeerReply::Digests),
        PeerOp::DigestsAfter { after } => cluster.digests_after(after).map(PeerReply::Digests),
        PeerOp::Horizon => Ok(PeerReply::Horizon(cluster.horizon())),
        PeerOp::Contact => Ok(PeerReply::Contact(cluster.data_contact())),
        PeerOp::Replicas => Ok(PeerReply::Replicas(cluster.default_factor())),
        PeerOp::Buckets {
            collection,
            buckets,
            from,
        } => cluster
            .bucket_records(&collection, &buckets, from, BUCKET_PAGE_BYTES)
            .map(|(records, next)| PeerReply::Records { records, next }),
        PeerOp::Join(update) if update.id != dialer => Err(OpError::new(
            ErrorKind::InvalidInput,
            format!("node {dialer:016x} asked to join as {:016x}", update.id),
        )),
        PeerOp::Join(_) if dialer == cluster.id() => Err(OpError::new(
            ErrorKind::InvalidInput,
            format!("node {dialer:016x} is this node: it cannot join itself"),
        )),
        PeerOp::Join(update) => match update.check() {
            Ok(()) => Ok(PeerReply::Members(cluster.on_join(update))),
            Err(why) => Err(OpError::new(ErrorKind::InvalidInput, why)),
        },
        PeerOp::Handoff { collection } => cluster
            .stream_collection(dialer, &collection)
            .await
            .map(PeerReply::HandoffDone),
        PeerOp::WatchOpen(request) => {
            let (cluster, collection) = (cluster.clone(), request.collection.clone());
            let stored = Box::new(move || cluster.stores_locally(&collection));
            sessions.open(dialer, request, stored)
        }
        PeerOp::WatchNext { session, wait_ms } => sessions.next(dialer, session, wait_ms).await,
        PeerOp::WatchClose { session } => Ok(sessions.close(dialer, session)),
        PeerOp::List {
            collection,
            after,
            limit,
        } => crate::cluster::list_local(
            cluster.store(),
            &collection,
            after.as_deref(),
            limit.min(dhrt_proto::MAX_PAGE),
        )
        .map(PeerReply::Page),
    }
}

#[cfg(test)]
mod tests;
