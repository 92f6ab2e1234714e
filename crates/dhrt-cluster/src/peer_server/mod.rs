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
        let refuse = |reason: String| {
            tracing::warn!(%remote, "closed a peer connection: {reason}");
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
            }
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(Closed::Shutdown),
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
                    // A peer that stops reading is let go; one reading
                    // slowly is not (each piece gets the time).
                    for piece in out.chunks(WRITE_PIECE) {
                        let write = tokio::time::timeout(WRITE_STALL, stream.write_all(piece));
                        if write.await.is_err() {
                            let why = format!("it read none of {} bytes of answers in 30 s", piece.len());
                            tracing::warn!(remote = %self.remote, "closed a peer connection: {why}");
                            return Ok(Closed::TooSlow(why));
                        }
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
                        stream.write_all(&out).await?;
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
        PeerOp::Apply(mutations) => cluster.apply_async(mutations).await.map(PeerReply::from),
        PeerOp::ApplyReporting(mutations) => {
            cluster.apply_async(mutations).await.map(|a| a.reporting())
        }
        PeerOp::Read { collection, key } => cluster.entry(&collection, &key, u32::MAX),
        PeerOp::Peek {
            collection,
            key,
            inline_max,
        } => cluster.entry(&collection, &key, inline_max),
        PeerOp::Digests(names) => cluster.digests(names).map(PeerReply::Digests),
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
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use tokio::io::DuplexStream;
    use tokio::sync::Semaphore;

    use super::*;
    use crate::session::Opener;
    use crate::wire::read_sealed;

    const MAX: u32 = 1 << 20;

    fn connection(max_in_flight: usize) -> Connection {
        Connection {
            remote: "192.0.2.1:7453".parse().unwrap(),
            max_frame: MAX,
            max_in_flight,
            answered: Arc::default(),
        }
    }

    /// The dialer's end of a connection past the handshake.
    struct Dialer {
        stream: DuplexStream,
        buf: BytesMut,
        sealer: Sealer,
        opener: Opener,
    }

    /// A connection past the handshake whose listening end is served, at
    /// most `max_in_flight` requests at once, by `handle`.
    async fn served<H, F>(
        max_in_flight: usize,
        handle: H,
    ) -> (Dialer, tokio::task::JoinHandle<io::Result<Closed>>)
    where
        H: Fn(PeerOp) -> F + Send + 'static,
        F: Future<Output = Result<PeerReply, OpError>> + Send + 'static,
    {
        let (mut d, mut l) = tokio::io::duplex(1 << 20);
        let side = |id| Side {
            id,
            secret: b"a cluster secret of at least 32 bytes",
            max_frame: MAX,
        };
        let (mut db, mut lb) = (BytesMut::new(), BytesMut::new());
        let (dialed, accepted) = tokio::join!(
            handshake::dial(&mut d, &mut db, side(1)),
            handshake::accept(&mut l, &mut lb, side(2)),
        );
        let server = tokio::spawn(connection(max_in_flight).serve(
            l,
            lb,
            accepted.unwrap().unwrap().1,
            handle,
            |_| {},
            std::future::pending(),
        ));
        let Session { sealer, opener } = dialed.unwrap().1;
        let dialer = Dialer {
            stream: d,
            buf: db,
            sealer,
            opener,
        };
        (dialer, server)
    }

    fn read(id: u64) -> Vec<u8> {
        let msg = PeerMessage::Request {
            id,
            op: PeerOp::Read {
                collection: "c".into(),
                key: Bytes::from(id.to_string()),
            },
        };
        let mut frame = Vec::new();
        encode_frame(&msg, &mut frame, plain_max(MAX)).unwrap();
        frame
    }

    fn sealed(frame: Vec<u8>, sealer: &mut Sealer) -> Vec<u8> {
        let mut frame = frame;
        seal_frame(&mut frame, 0, sealer).unwrap();
        frame
    }

    async fn response(d: &mut DuplexStream, buf: &mut BytesMut, opener: &mut Opener) -> u64 {
        match read_sealed(d, buf, MAX, opener).await.unwrap() {
            Some(PeerMessage::Response { id, result: Ok(_) }) => id,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_frame_altered_in_transit_closes_the_connection_unused() {
        let handled = Arc::new(AtomicUsize::new(0));
        let handler = {
            let handled = handled.clone();
            move |_| {
                handled.fetch_add(1, Ordering::SeqCst);
                async { Ok(PeerReply::Entry(None)) }
            }
        };
        let (dialer, server) = served(8, handler).await;
        let Dialer {
            stream: mut dialer,
            buf: mut dialer_buf,
            mut sealer,
            mut opener,
        } = dialer;
        // A sound frame is answered.
        dialer
            .write_all(&sealed(read(1), &mut sealer))
            .await
            .unwrap();
        assert_eq!(response(&mut dialer, &mut dialer_buf, &mut opener).await, 1);
        // One flipped bit past the length prefix.
        let mut altered = sealed(read(2), &mut sealer);
        altered[9] ^= 0x10;
        dialer.write_all(&altered).await.unwrap();
        let closed = server.await.unwrap().unwrap();
        let Closed::Protocol(why) = closed else {
            panic!("{closed:?}")
        };
        assert!(why.contains("failed to open"), "{why}");
        assert_eq!(
            handled.load(Ordering::SeqCst),
            1,
            "nothing of it was acted on"
        );
        // The listener hung up.
        let rest = read_sealed::<PeerMessage, _>(&mut dialer, &mut dialer_buf, MAX, &mut opener);
        assert!(rest.await.unwrap().is_none());
    }

    #[tokio::test]
    async fn at_most_the_cap_of_requests_is_in_flight_and_all_are_answered() {
        const CAP: usize = 4;
        const SENT: u64 = 50;
        // Handlers that wait for the gate: none finishes until it opens.
        let started = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let handler = {
            let (started, gate) = (started.clone(), gate.clone());
            move |_| {
                started.fetch_add(1, Ordering::SeqCst);
                let gate = gate.clone();
                async move {
                    gate.acquire().await.unwrap().forget();
                    Ok(PeerReply::Entry(None))
                }
            }
        };
        let (dialer, _server) = served(CAP, handler).await;
        let Dialer {
            stream: mut dialer,
            buf: mut dialer_buf,
            mut sealer,
            mut opener,
        } = dialer;
        let mut burst = Vec::new();
        for id in 1..=SENT {
            burst.extend_from_slice(&sealed(read(id), &mut sealer));
        }
        dialer.write_all(&burst).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while started.load(Ordering::SeqCst) < CAP {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never reached the cap"
            );
            tokio::task::yield_now().await;
        }
        // Every byte is there to be read, and the server takes no more.
        for _ in 0..1000 {
            tokio::task::yield_now().await;
        }
        assert_eq!(started.load(Ordering::SeqCst), CAP);
        // One answered: exactly one more is taken.
        gate.add_permits(1);
        response(&mut dialer, &mut dialer_buf, &mut opener).await;
        while started.load(Ordering::SeqCst) < CAP + 1 {
            assert!(tokio::time::Instant::now() < deadline, "no request taken");
            tokio::task::yield_now().await;
        }
        for _ in 0..1000 {
            tokio::task::yield_now().await;
        }
        assert_eq!(started.load(Ordering::SeqCst), CAP + 1);
        // The gate opens: everything is answered.
        gate.add_permits(SENT as usize);
        let mut answered = vec![];
        for _ in 1..SENT {
            answered.push(response(&mut dialer, &mut dialer_buf, &mut opener).await);
        }
        answered.sort_unstable();
        answered.dedup();
        assert_eq!(answered.len() as u64, SENT - 1);
        assert_eq!(started.load(Ordering::SeqCst), SENT as usize);
    }

    /// A frame that takes long to arrive (a large value on a slow link) gets
    /// notes of the bytes read so far, every [`NOTE_EVERY`] while it
    /// arrives; one that arrives at once gets none.
    #[tokio::test(start_paused = true)]
    async fn a_frame_that_arrives_slowly_is_noted_as_it_arrives() {
        let handler = |_| async { Ok(PeerReply::Entry(None)) };
        let (dialer, _server) = served(8, handler).await;
        let Dialer {
            stream: dialer,
            buf: mut dialer_buf,
            mut sealer,
            mut opener,
        } = dialer;
        let (mut rd, mut wr) = tokio::io::split(dialer);
        let mut next = async || {
            read_sealed::<PeerMessage, _>(&mut rd, &mut dialer_buf, MAX, &mut opener)
                .await
                .unwrap()
                .unwrap()
        };
        // Arriving at once: answered, no note.
        let small = sealed(read(1), &mut sealer);
        wr.write_all(&small).await.unwrap();
        let msg = next().await;
        assert!(
            matches!(msg, PeerMessage::Response { id: 1, .. }),
            "{msg:?}"
        );
        // 600 KiB in 20 pieces, one every 60 ms: 1.14 s on the way.
        let big = PeerMessage::Request {
            id: 2,
            op: PeerOp::Read {
                collection: "c".into(),
                key: Bytes::from(vec![7u8; 600 << 10]),
            },
        };
        let mut frame = Vec::new();
        encode_frame(&big, &mut frame, plain_max(MAX)).unwrap();
        let frame = sealed(frame, &mut sealer);
        let (before, len) = (small.len() as u64, frame.len() as u64);
        tokio::spawn(async move {
            for piece in frame.chunks(frame.len().div_ceil(20)) {
                wr.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            wr
        });
        let mut notes = vec![];
        loop {
            match next().await {
                PeerMessage::Received { bytes } => notes.push(bytes),
                PeerMessage::Response { id: 2, .. } => break,
                other => panic!("{other:?}"),
            }
        }
        assert!((3..=6).contains(&notes.len()), "notes: {notes:?}");
        assert!(notes.windows(2).all(|w| w[0] < w[1]), "{notes:?}");
        assert!(
            notes[0] > before && notes[notes.len() - 1] < before + len,
            "{notes:?}"
        );
    }

    /// A dialer holding this node's own id (a copied data directory, or a
    /// forged handshake on loopback) cannot join as it.
    #[tokio::test]
    async fn a_join_under_this_nodes_own_id_is_refused() {
        let store = dhrt_storage::Store::memory(dhrt_storage::Options::default());
        let me = crate::Identity {
            id: 7,
            name: "me".into(),
            addr: "127.0.0.1:7453".into(),
        };
        let cluster = Cluster::single(store.clone(), me);
        let hub = crate::WatchHub::new(store, crate::WatchOptions::default());
        let sessions = Sessions::new(hub);
        let update = dhrt_proto::MemberUpdate {
            id: 7,
            name: "twin".into(),
            addr: "127.0.0.1:7454".into(),
            incarnation: 1,
            liveness: dhrt_proto::Liveness::Alive,
            syncing: false,
            collections: None,
        };
        let answer = handle(&cluster, &sessions, 7, PeerOp::Join(update)).await;
        match answer {
            Err(e) => assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}"),
            Ok(reply) => panic!("joined: {reply:?}"),
        }
        assert_eq!(cluster.members().len(), 1);
    }
}
