//! The binary-protocol server: one connection, its preamble, then frames of
//! pipelined requests, each answered through [`dispatch`]. Frame parsing is
//! `dhrt_proto`'s pure decoder; this module only buffers and does I/O.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use dhrt_proto::{
    Access, Beside, Channel, DEFAULT_MAX_FRAME, Decoded, Either, ErrorKind, OpError, OpRef,
    Operations, PREAMBLE_LEN, Preamble, Proven, Reply, RequestRef, Response, Role, Standing,
    frame_bounds, read_preamble, request_id,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::Semaphore;

use dhrt_proto::auth::Remembered;

use crate::node::Node;
use crate::peer_server::serve_peer;
pub use crate::wire::Closed;
use crate::wire::IdleTimer;

mod answer;
use answer::{Sink, Stop, WRITE_BUDGET, answer, recycle};

/// Limits of a binary connection, and who may use it.
#[derive(Debug, Clone)]
pub struct BinaryLimits {
    /// The largest frame payload accepted or sent.
    pub max_frame: u32,
    /// A connection with no complete request for this long is closed.
    pub idle_timeout: Duration,
    /// A frame (and the preamble) must arrive within this, plus a second
    /// for every [`frame_min_rate`](Self::frame_min_rate) bytes of it
    /// received, and at that rate in every stretch of this long too; a
    /// client that must show a token (a node with an auth
    /// file, or a remote client of a node without one) must have shown a
    /// valid one this long after connecting. Slower, the connection is
    /// closed: a stranger cannot hold a connection slot for the idle
    /// timeout by trickling a frame or by saying nothing after the
    /// preamble.
    pub frame_grace: Duration,
    /// The slowest rate, in bytes a second, at which a frame may arrive
    /// once [`frame_grace`](Self::frame_grace) has passed.
    pub frame_min_rate: u32,
    /// Who may do what (the node's auth file). Peers are not clients: they
    /// prove the cluster secret instead.
    pub access: Arc<Access>,
    /// Slots for peer connections, taken once a peer has proved the
    /// cluster secret; a proven peer finding none is closed.
    pub peer_slots: Arc<Semaphore>,
    /// Whether peer connections are served at all (not on a node whose
    /// clients need tokens and whose peers would prove an empty secret).
    pub takes_peers: bool,
    /// The node-wide budget of bytes being received (shared with HTTP):
    /// a frame that would go past it is answered `Unavailable` and its
    /// connection closed.
    pub inflight: Arc<dhrt_proto::Inflight>,
}

impl Default for BinaryLimits {
    /// Loopback clients only, as a node without an auth file.
    fn default() -> Self {
        BinaryLimits {
            max_frame: DEFAULT_MAX_FRAME,
            idle_timeout: Duration::from_secs(300),
            frame_grace: Duration::from_secs(10),
            frame_min_rate: 1024,
            access: Access::loopback_only(),
            peer_slots: Arc::new(Semaphore::new(1024)),
            takes_peers: true,
            inflight: dhrt_proto::Inflight::unlimited(),
        }
    }
}

async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    want: usize,
    idle: Duration,
) -> io::Result<Option<Closed>> {
    buf.reserve(want.max(16 * 1024));
    match tokio::time::timeout(idle, stream.read_buf(buf)).await {
        Ok(Ok(0)) => Ok(Some(Closed::ByClient)),
        Ok(Ok(_)) => Ok(None),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(Some(Closed::Idle)),
    }
}

/// Serves one binary connection from `remote` until the client leaves, it idles, it breaks
/// the protocol, or `shutdown` completes (requests already received are
/// answered first). `proven` is told once the client has shown a valid
/// token, or a peer has proved the cluster secret.
pub async fn serve_binary<S>(
    mut stream: S,
    remote: SocketAddr,
    ops: Arc<Node>,
    limits: BinaryLimits,
    shutdown: impl Future<Output = ()>,
    mut proven: Proven,
) -> io::Result<Closed>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let connected = tokio::time::Instant::now();
    loop {
        match read_preamble(&buf) {
            Ok(Preamble::Binary {
                channel: Channel::Peer,
                ..
            }) if !limits.takes_peers => {
                static REFUSED: crate::LogThrottle =
                    crate::LogThrottle::new(Duration::from_secs(1));
                if let Some(left_out) = REFUSED.allow() {
                    tracing::warn!(%remote, left_out, "refused a peer: this node has an auth file and no cluster secret, so it takes no peers (set --cluster-secret on every node to cluster)");
                }
                return Ok(Closed::Protocol(
                    "peers refused: an auth file and no cluster secret".into(),
                ));
            }
            Ok(Preamble::Binary {
                channel: Channel::Peer,
                ..
            }) => {
                buf.advance(PREAMBLE_LEN);
                let cluster = ops.cluster().clone();
                let slots = &limits.peer_slots;
                return serve_peer(
                    stream,
                    remote,
                    buf,
                    (cluster, ops.watch_sessions().clone()),
                    limits.max_frame,
                    (slots, proven),
                    shutdown,
                )
                .await;
            }
            Ok(Preamble::Binary { .. }) => {
                buf.advance(PREAMBLE_LEN);
                break;
            }
            Ok(Preamble::Incomplete) => {
                let grace = limits.frame_grace.min(limits.idle_timeout);
                let left = grace.saturating_sub(connected.elapsed());
                match read_more(&mut stream, &mut buf, PREAMBLE_LEN, left).await? {
                    Some(Closed::Idle) => {
                        return Ok(Closed::TooSlow(format!(
                            "no whole preamble within {} s",
                            grace.as_secs_f64()
                        )));
                    }
                    Some(closed) => return Ok(closed),
                    None => {}
                }
            }
            Ok(Preamble::NotBinary) => return Ok(Closed::Protocol("not a dhrt preamble".into())),
            Err(e) => return Ok(Closed::Protocol(e.to_string())),
        }
    }
    // Shutdown and silence are watched beside the reads, polled only when
    // they fire (see `dhrt_proto::Beside`), not on every request.
    let idle = Arc::new(IdleTimer::new(limits.idle_timeout));
    let guard = async {
        tokio::select! {
            biased;
            () = shutdown => Closed::Shutdown,
            () = idle.expired() => Closed::Idle,
        }
    };
    tokio::pin!(guard);
    let mut guard = Beside::new(guard);
    let mut out = Vec::with_capacity(16 * 1024);
    // Reused from batch to batch: no allocation per request for them.
    let mut spare: Vec<Item<'static>> = Vec::new();
    let access = &*limits.access;
    let mut standing = access.connect(remote.ip());
    let mut memo = Remembered::default();
    // Requests refused as unauthenticated on this connection, so far.
    let mut refused = 0u32;
    // When the first bytes of the unfinished frame at the front of `buf`
    // arrived, if there is one.
    let mut frame_started: Option<tokio::time::Instant> = None;
    // An unfinished frame must arrive at the minimum rate in every stretch
    // of the grace too, however much of it came before: the stretch under
    // way began then, and has had this many bytes.
    let stretch = (f64::from(limits.frame_min_rate) * limits.frame_grace.as_secs_f64()) as usize;
    let (mut stretch_start, mut stretch_bytes) = (tokio::time::Instant::now(), 0usize);
    // What the unfinished frame in `buf` holds of the node's budget.
    let mut held = dhrt_proto::Held::new(&limits.inflight);
    loop {
        // Take every complete request in the buffer and answer them in
        // order, writing whenever WRITE_BUDGET bytes of answers are ready
        // (and once at the end): small answers share a write, large ones
        // stream instead of piling up. Requests are decoded in place: their
        // names, keys and values borrow from the buffer until answered.
        let mut needed = 1;
        let mut broken = None;
        let mut consumed = 0;
        let mut requests = 0usize;
        // A watch request: the connection becomes its stream once the
        // requests before it are answered.
        let mut watch = None;
        {
            let mut batch = recycle(std::mem::take(&mut spare));
            loop {
                let rest = &buf[consumed..];
                // Before it has shown a token, a connection may send
                // nothing larger than an `Auth`: a stranger cannot make
                // the node buffer a 16 MiB frame.
                // A read-only token sends no values either: it cannot
                // make the node buffer one.
                let max_frame = match standing {
                    Standing::Anonymous | Standing::Refused => UNAUTHENTICATED_MAX_FRAME,
                    Standing::Token(_) if !matches!(access.role(standing), Ok(r) if r.allows(Role::Write)) => {
                        READ_MAX_FRAME.min(limits.max_frame)
                    }
                    _ => limits.max_frame,
                };
                let (range, len) = match frame_bounds(rest, max_frame) {
                    Ok(Decoded::Complete { msg, len }) => (msg, len),
                    Ok(Decoded::Incomplete { needed: n }) => {
                        needed = n;
                        break;
                    }
                    Err(e) => {
                        broken = Some(e.to_string());
                        break;
                    }
                };
                let payload = &rest[range];
                match dhrt_proto::decode::<RequestRef<'_>>(payload) {
                    Ok(request) => {
                        // Read before the token is checked: see `now_with`.
                        let generation = access.generation();
                        let item = admit(access, &mut standing, &mut memo, request);
                        // A valid token: admitted, or just accepted (not a
                        // connection whose token was revoked since).
                        if let Standing::Token(hash) = standing
                            && matches!(
                                &item,
                                Ok(_)
                                    | Err(Response {
                                        result: Ok(Reply::Authenticated(_)),
                                        ..
                                    })
                            )
                        {
                            proven.now_with(generation, true, || Some(hash));
                        }
                        if let Ok(RequestRef {
                            id,
                            op: OpRef::Watch(w),
                        }) = item
                        {
                            watch = Some((id, w));
                            requests += 1;
                            consumed += len;
                            break;
                        }
                        if is_unauthenticated(&item) {
                            // A stranger's refused requests neither keep the
                            // connection from idling nor pile up answers.
                            refused += 1;
                            if refused > MAX_REFUSED {
                                broken = Some(format!(
                                    "{MAX_REFUSED} requests refused for want of a valid token"
                                ));
                                break;
                            }
                        } else {
                            requests += 1;
                        }
                        batch.push(item);
                    }
                    Err(e) => match request_id(payload) {
                        // A stranger's count as refusals: answering them,
                        // unread, must not keep it connected.
                        Some(_)
                            if matches!(standing, Standing::Anonymous | Standing::Refused)
                                && refused >= MAX_REFUSED =>
                        {
                            broken = Some(format!("{MAX_REFUSED} requests refused unread"));
                            break;
                        }
                        Some(id) => {
                            refused += u32::from(matches!(
                                standing,
                                Standing::Anonymous | Standing::Refused
                            ));
                            batch.push(Err(Response {
                                id,
                                result: Err(OpError::new(
                                    ErrorKind::InvalidInput,
                                    format!("unreadable request: {e}"),
                                )),
                            }))
                        }
                        None => {
                            broken = Some(format!("unreadable request without an id: {e}"));
                            break;
                        }
                    },
                }
                consumed += len;
            }
            let mut sink = Sink {
                stream: &mut stream,
                out: &mut out,
                max_frame: limits.max_frame,
                guard: &mut guard,
                // Answers that are only refusals do not count as activity.
                idle: (requests > 0).then_some(&*idle),
            };
            let answered = match answer(&*ops, &mut batch, &mut sink).await {
                Ok(()) => sink.flush().await,
                e => e,
            };
            spare = recycle(batch);
            match answered {
                Ok(()) => {}
                Err(Stop::Io(e)) => return Err(e),
                Err(Stop::Closed(closed)) => return Ok(closed),
            }
        }
        let allocated = buf.capacity();
        buf.advance(consumed);
        if allocated > KEEP_BUFFER && buf.len() < KEEP_BUFFER {
            // A large frame is answered: its buffer does not stay with
            // the connection (outside the node's budget, which counts
            // only what is arriving) for the rest of its life.
            let mut smaller = BytesMut::with_capacity(KEEP_BUFFER.min(buf.len().max(16 * 1024)));
            smaller.extend_from_slice(&buf);
            buf = smaller;
        }
        held.resize(buf.len());
        if buf.is_empty() {
            frame_started = None;
        } else if consumed > 0 || frame_started.is_none() {
            // What is left began arriving with the read that completed the
            // frames before it (or now, if nothing completed).
            frame_started = Some(tokio::time::Instant::now());
        }
        if requests > 0 {
            // Only whole requests keep a connection from being idle: bytes
            // trickled into a frame that never completes do not.
            idle.touch();
        }
        if out.capacity() > 4 * WRITE_BUDGET {
            // One huge answer does not keep its buffer for the
            // connection's life.
            out = Vec::with_capacity(16 * 1024);
        }
        if let Some(reason) = broken {
            return Ok(Closed::Protocol(reason));
        }
        if let Some((id, request)) = watch {
            match ops.watch(request).await {
                Ok(source) => {
                    // The token is judged again before each batch: a watch
                    // stops once its token is revoked (SIGHUP).
                    let access = limits.access.clone();
                    let recheck = move || {
                        access.check_remembered(
                            standing,
                            dhrt_proto::Role::Read,
                            "watching a collection",
                            &mut memo,
                        )
                    };
                    return crate::watch_conn::serve_watch(
                        stream,
                        buf,
                        (id, source),
                        limits.max_frame,
                        guard,
                        idle.clone(),
                        recheck,
                        ops.watch_runtime(),
                    )
                    .await;
                }
                Err(e) => {
                    // Refused (a token that cannot be resumed, a bad
                    // name): answered, and the connection goes on.
                    let mut sink = Sink {
                        stream: &mut stream,
                        out: &mut out,
                        max_frame: limits.max_frame,
                        guard: &mut guard,
                        idle: Some(&*idle),
                    };
                    let pushed = match sink.push(Response { id, result: Err(e) }).await {
                        Ok(()) => sink.flush().await,
                        e => e,
                    };
                    match pushed {
                        Ok(()) => continue,
                        Err(Stop::Io(e)) => return Err(e),
                        Err(Stop::Closed(closed)) => return Ok(closed),
                    }
                }
            }
        }
        // Deadlines beside the idle timeout, armed only while a frame is
        // unfinished or the client has yet to show a token: a read that
        // ends on a frame boundary (a client that writes whole requests)
        // arms no timer here; one that ends inside a frame arms one for
        // the next read.
        let frame_due = frame_started.map(|at| {
            let allowance = buf.len() as u64 * 1000 / u64::from(limits.frame_min_rate.max(1));
            (
                (at + limits.frame_grace + Duration::from_millis(allowance))
                    .min(stretch_start.max(at) + limits.frame_grace),
                Slow::Frame,
            )
        });
        let token_due = match standing {
            Standing::Anonymous | Standing::Refused => {
                Some((connected + limits.frame_grace, Slow::Token))
            }
            Standing::Trusted(_) | Standing::Token(_) => None,
        };
        let due = match (frame_due, token_due) {
            (Some(f), Some(t)) => Some(if t.0 < f.0 { t } else { f }),
            (f, t) => f.or(t),
        };
        buf.reserve(needed.max(16 * 1024));
        let read = stream.read_buf(&mut buf);
        tokio::pin!(read);
        let read = match due {
            None => guard.run(read).await,
            Some((at, why)) => {
                let read = tokio::time::timeout_at(at, read);
                tokio::pin!(read);
                match guard.run(read).await {
                    Either::Left(Ok(read)) => Either::Left(read),
                    Either::Left(Err(_)) => {
                        return Ok(Closed::TooSlow(why.reason(&limits, buf.len())));
                    }
                    Either::Right(closed) => Either::Right(closed),
                }
            }
        };
        match read {
            Either::Left(read) => {
                let n = read?;
                if n == 0 {
                    return Ok(Closed::ByClient);
                }
                stretch_bytes += n;
                if stretch_bytes >= stretch {
                    (stretch_start, stretch_bytes) = (tokio::time::Instant::now(), 0);
                }
                if !held.resize(buf.len()) {
                    let why = held.refusal();
                    // The refused frame's share of the budget, and its
                    // buffer, go back before the rest of it is read.
                    held.resize(0);
                    return refuse_frame(&mut stream, std::mem::take(&mut buf), why, &limits).await;
                }
            }
            Either::Right(closed) => return Ok(closed),
        }
    }
}

/// Answers the unfinished frame at the front of `buf` with `why`
/// (`Unavailable`), if its id can be read yet, and closes the connection:
/// the rest of the frame is not taken, only read and thrown away for a
/// while (`LINGER`), so that a client still sending it gets to read the
/// answer instead of a reset.
async fn refuse_frame<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: BytesMut,
    why: String,
    limits: &BinaryLimits,
) -> io::Result<Closed> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if let Some(id) = buf.get(dhrt_proto::FRAME_HEADER_LEN..).and_then(request_id) {
        let answer = Response {
            id,
            result: Err(OpError::new(ErrorKind::Unavailable, why.clone())),
        };
        let mut out = Vec::new();
        if dhrt_proto::encode_frame(&answer, &mut out, limits.max_frame).is_ok() {
            let _ = stream.write_all(&out).await;
            let _ = stream.flush().await;
        }
    }
    let mut left = match frame_bounds(&buf, limits.max_frame) {
        Ok(Decoded::Incomplete { needed }) => needed,
        _ => 0,
    };
    drop(buf);
    let until = tokio::time::Instant::now() + LINGER;
    let mut scratch = vec![0u8; 16 * 1024];
    while left > 0 {
        match tokio::time::timeout_at(until, stream.read(&mut scratch)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
    Ok(Closed::Busy(why))
}

/// How long the rest of a refused frame is read (and thrown away) before
/// its connection is closed.
const LINGER: Duration = Duration::from_secs(5);

/// Which deadline a slow connection missed.
#[derive(Debug, Clone, Copy)]
enum Slow {
    /// An unfinished frame arrived slower than the minimum rate.
    Frame,
    /// A client that must show a token had not shown a valid one.
    Token,
}

impl Slow {
    fn reason(self, limits: &BinaryLimits, buffered: usize) -> String {
        let grace = limits.frame_grace.as_secs_f64();
        match self {
            Slow::Frame => format!(
                "a frame arrived too slowly ({buffered} bytes of it; at least {} bytes a second \
                 after the first {grace} s, and as much in every {grace} s)",
                limits.frame_min_rate
            ),
            Slow::Token => format!("no valid token shown within {grace} s of connecting"),
        }
    }
}

/// A connection's read buffer grown past this (a large value arrived) is
/// given back once the frame is answered.
const KEEP_BUFFER: usize = 1 << 20;

/// The largest frame accepted from a connection that has not shown a token
/// (on a node with an auth file): room for an `Auth`, little more.
const UNAUTHENTICATED_MAX_FRAME: u32 = 16 * 1024;

/// The largest frame accepted from a connection whose token may only read:
/// room for a request naming a key of 64 KiB twice (a key and a listing's
/// `after`), and no value.
const READ_MAX_FRAME: u32 = 192 * 1024;

/// Requests a connection may have refused for want of a valid token before
/// it is closed: enough for a client to notice, not enough for a stranger
/// to make the node hold thousands of refusals.
const MAX_REFUSED: u32 = 64;

/// Whether `item` is an answer refusing its request as unauthenticated.
#[inline]
fn is_unauthenticated(item: &Item<'_>) -> bool {
    matches!(item, Err(Response { result: Err(e), .. }) if e.kind == ErrorKind::Unauthenticated)
}

/// A decoded request borrowing from the read buffer, or the answer to one
/// that is answered already (undecodable, refused, or an `Auth`).
type Item<'a> = Result<RequestRef<'a>, Response>;

/// Lets `request` through if the connection's standing allows it; answers
/// it at once if not, or if it is an `Auth` (which changes the standing,
/// in order: requests after it in the same batch see the new one).
#[inline]
fn admit<'a>(
    access: &Access,
    standing: &mut Standing,
    memo: &mut Remembered,
    request: RequestRef<'a>,
) -> Item<'a> {
    if let OpRef::Auth { token } = request.op {
        let result = access.present(*standing, token.as_bytes()).and_then(|s| {
            *standing = s;
            access.role(s).map(Reply::Authenticated)
        });
        if let Err(e) = &result {
            access.count_refusal(e);
        }
        return Err(Response {
            id: request.id,
            result,
        });
    }
    if *standing == Standing::Trusted(dhrt_proto::Role::Admin) {
        return Ok(request);
    }
    let (needed, what) = dhrt_proto::auth::needed(&request.op);
    match access.check_remembered(*standing, needed, what, memo) {
        Ok(()) => Ok(request),
        Err(e) => {
            access.count_refusal(&e);
            Err(Response {
                id: request.id,
                result: Err(e),
            })
        }
    }
}
