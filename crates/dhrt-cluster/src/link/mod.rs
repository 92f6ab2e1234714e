//! A persistent connection to one peer, dialed on demand: the peer
//! preamble, the handshake that proves both sides know the cluster secret,
//! then sealed frames (`crate::session`): pipelined requests matched to
//! responses by id, and one-way gossip. A failed or timed-out exchange, or
//! a frame that fails to open, drops the connection; the next use dials
//! again.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use dhrt_proto::{
    Channel, Gossip, OpError, PeerMessage, PeerOp, PeerReply, channel_preamble, encode_frame,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::handshake::{self, DialError, Side};
use crate::wire::{plain_max, read_sealed, seal_frame};
use progress::{Counting, MOST_EXTRA, Moved, WINDOW};
pub(crate) use progress::{MIN_MOVED, transfer_time};

/// Why an exchange with a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// The peer could not be reached or the connection broke.
    #[error("peer {addr} unreachable: {reason}")]
    Unreachable {
        /// The peer's address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The handshake failed: a wrong or missing cluster secret.
    #[error("peer {addr} refused: {reason}")]
    Refused {
        /// The peer's address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// No answer within the timeout.
    #[error("peer {addr} did not answer within {ms} ms")]
    Timeout {
        /// The peer's address.
        addr: String,
        /// The timeout.
        ms: u64,
    },
    /// The peer answered with an error.
    #[error("peer {addr}: {error}")]
    Remote {
        /// The peer's address.
        addr: String,
        /// Its error.
        error: OpError,
    },
    /// This node failed (its storage), not the peer.
    #[error("this node: {0}")]
    Local(OpError),
}

/// Why a dial that reached this very node is refused (an address of its
/// own other than the one it advertises: `localhost`, a loopback one).
pub(crate) const ITSELF: &str = "that address is this node itself";

/// A byte stream to a peer: TCP in production, anything that reads and
/// writes (a simulated network in tests).
pub trait PeerStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> PeerStream for T {}

/// What [`Connector::connect`] returns.
pub type ConnectFuture<'a> =
    Pin<Box<dyn Future<Output = io::Result<Box<dyn PeerStream>>> + Send + 'a>>;

/// How a node opens connections to its peers.
pub trait Connector: Send + Sync + std::fmt::Debug + 'static {
    /// Opens a stream to `addr` (`host:port`).
    fn connect<'a>(&'a self, addr: &'a str) -> ConnectFuture<'a>;
}

/// Plain TCP with `TCP_NODELAY`: the default.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    fn connect<'a>(&'a self, addr: &'a str) -> ConnectFuture<'a> {
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            let _ = stream.set_nodelay(true);
            keep_alive(&stream);
            Ok(Box::new(stream) as Box<dyn PeerStream>)
        })
    }
}

/// How long a TCP connection may be silent before the kernel asks the
/// other end whether it is still there; unanswered
/// [`KEEPALIVE_PROBES`] times, [`KEEPALIVE_INTERVAL`] apart, it is closed.
pub(crate) const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// See [`KEEPALIVE_IDLE`].
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// See [`KEEPALIVE_IDLE`].
pub(crate) const KEEPALIVE_PROBES: u32 = 4;

/// Turns TCP keepalive on: a connection whose other end vanished without
/// a word (a partition that outlived it, a host that lost power) is closed
/// within about 50 s of silence, rather than held, with its slot and its
/// descriptor, for ever. A dialer that gave up a connection during a
/// partition could not tell the listener, whose end would otherwise stay.
pub fn keep_alive(stream: &TcpStream) {
    let params = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&params) {
        tracing::debug!("TCP keepalive not set: {e}");
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<PeerReply, OpError>>>>>;

struct Conn {
    frames: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    alive: Arc<AtomicBool>,
    /// Bytes that arrived on it, either way (`progress.rs`).
    moved: Arc<Moved>,
    /// When it was dialed.
    since: tokio::time::Instant,
    /// Dropped with the connection: its writer sends what is queued, tells
    /// the peer, and stops, giving up a write the peer does not read after
    /// `LINGER`; the reader then stops once the peer closes its end, or
    /// `LINGER` later. A peer that never answers and never closes keeps no
    /// descriptor per abandoned connection.
    _close: watch::Sender<()>,
}

/// Who is dialing, and with what secret.
#[derive(Debug, Clone)]
pub(crate) struct Dialer {
    pub(crate) me: u64,
    pub(crate) secret: Arc<[u8]>,
    pub(crate) max_frame: u32,
    pub(crate) connector: Arc<dyn Connector>,
}

/// How long a dropped connection waits for a peer that does not read its
/// last write, or does not close its end once told.
const LINGER: Duration = Duration::from_secs(10);

/// A connection to one peer address.
pub(crate) struct Link {
    addr: String,
    /// The member expected at `addr`: a node that answers there as another
    /// is refused (an address that moved, a port forwarded to the wrong
    /// node).
    expect: Option<u64>,
    dialer: Dialer,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    next_id: AtomicU64,
    /// Bytes that arrived on its connections, either way (`progress.rs`).
    moved: Arc<AtomicU64>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("addr", &self.addr).finish()
    }
}

impl Link {
    /// A link to whatever node answers at `addr` (a seed).
    pub(crate) fn new(addr: String, dialer: Dialer) -> Self {
        Link {
            addr,
            expect: None,
            dialer,
            conn: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            moved: Arc::default(),
        }
    }

    /// A link to member `id` at `addr`.
    pub(crate) fn to_member(addr: String, id: u64, dialer: Dialer) -> Self {
        Link {
            addr,
            expect: Some(id),
            dialer,
            conn: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            moved: Arc::default(),
        }
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// Bytes that arrived on its connections so far, either way: read
    /// here, and read by the peer as it said. Two readings tell a peer
    /// taking a large value from one that does not answer.
    pub(crate) fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    /// Gives up the connection if it is older than `age`: it closes, and
    /// the next message dials afresh. One being dialed or used right now
    /// is left alone.
    pub(crate) fn abandon(&self, age: Duration) {
        if let Ok(mut slot) = self.conn.try_lock()
            && slot.as_ref().is_some_and(|c| c.since.elapsed() >= age)
            && let Some(c) = slot.take()
        {
            c.alive.store(false, Ordering::Release);
        }
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> LinkError {
        LinkError::Unreachable {
            addr: self.addr.clone(),
            reason: reason.to_string(),
        }
    }

    /// The live connection, dialing if there is none, by `deadline`.
    ///
    /// The deadline covers the wait for the slot too: while one caller
    /// dials a peer that does not answer (a SYN into a black hole), the
    /// others queue behind it, and each must still give up at its own
    /// deadline rather than one dial timeout after the one before it.
    async fn conn(&self, deadline: tokio::time::Instant) -> Result<Arc<Conn>, LinkError> {
        let started = tokio::time::Instant::now();
        let timed_out = || LinkError::Timeout {
            addr: self.addr.clone(),
            ms: deadline.saturating_duration_since(started).as_millis() as u64,
        };
        let Ok(mut slot) = tokio::time::timeout_at(deadline, self.conn.lock()).await else {
            return Err(timed_out());
        };
        if let Some(c) = slot.as_ref()
            && c.alive.load(Ordering::Acquire)
        {
            return Ok(c.clone());
        }
        *slot = None;
        let conn = match tokio::time::timeout_at(deadline, self.dial()).await {
            Ok(r) => Arc::new(r?),
            Err(_) => return Err(timed_out()),
        };
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn dial(&self) -> Result<Conn, LinkError> {
        let mut stream = self
            .dialer
            .connector
            .connect(&self.addr)
            .await
            .map_err(|e| self.unreachable(e))?;
        let max = self.dialer.max_frame;
        stream
            .write_all(&channel_preamble(Channel::Peer))
            .await
            .map_err(|e| self.unreachable(e))?;
        let mut buf = BytesMut::new();
        let me = Side {
            id: self.dialer.me,
            secret: &self.dialer.secret,
            max_frame: max,
        };
        let session = match handshake::dial(&mut stream, &mut buf, me).await {
            Ok((id, _)) if id == self.dialer.me => {
                return Err(LinkError::Refused {
                    addr: self.addr.clone(),
                    reason: ITSELF.into(),
                });
            }
            Ok((id, session)) if self.expect.is_none_or(|e| e == id) => session,
            Ok((id, _)) => {
                let expected = self.expect.unwrap_or_default();
                // Redialed on every exchange while it lasts: a line a minute.
                static WRONG_NODE: crate::LogThrottle =
                    crate::LogThrottle::new(Duration::from_secs(60));
                if let Some(left_out) = WRONG_NODE.allow() {
                    tracing::warn!(
                        peer = %self.addr,
                        left_out,
                        "member {expected:016x} was dialed at {}, and node {id:016x} answered there: a node started afresh at that address without --node (it joins when given one), or a wrong --advertise address or port forward",
                        self.addr
                    );
                }
                return Err(LinkError::Refused {
                    addr: self.addr.clone(),
                    reason: format!("node {id:016x} answered there, not member {expected:016x}"),
                });
            }
            Err(DialError::Io(e)) => return Err(self.unreachable(e)),
            Err(DialError::Refused(reason)) => {
                return Err(LinkError::Refused {
                    addr: self.addr.clone(),
                    reason,
                });
            }
        };
        let (mut sealer, mut opener) = (session.sealer, session.opener);
        let moved = Arc::new(Moved::for_link(self.moved.clone()));
        let (rd, mut wr) = tokio::io::split(stream);
        let mut rd = Counting::new(rd, moved.clone());
        // Dropped by the reader when it stops: the writer stops too, and
        // the connection closes.
        let (reading, mut stopped) = oneshot::channel::<()>();
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let (close, closed) = watch::channel(());
        // Dropped by the writer when it stops: the reader stops too.
        let (writing, mut written_all) = oneshot::channel::<()>();
        {
            let (alive, sent) = (alive.clone(), moved.clone());
            let mut closed = closed;
            tokio::spawn(async move {
                let _writing = writing;
                // The connection was dropped: what is queued still goes out
                // (a last gossip), a write to a peer that does not read for
                // `LINGER` aside.
                let mut gone = false;
                loop {
                    let mut frame = tokio::select! {
                        biased;
                        _ = &mut stopped => break,
                        r = closed.changed(), if !gone => match r {
                            Ok(()) => break,
                            Err(_) => {
                                gone = true;
                                continue;
                            }
                        },
                        frame = rx.recv() => match frame {
                            Some(frame) => frame,
                            None => break,
                        },
                    };
                    // Sealed here, in the order written: the counter is
                    // the nonce. Whatever else is queued is appended and
                    // sealed in place, for one write.
                    if seal_frame(&mut frame, 0, &mut sealer).is_err() {
                        break;
                    }
                    let mut sealed = true;
                    while frame.len() <= 1 << 20
                        && let Ok(more) = rx.try_recv()
                    {
                        let start = frame.len();
                        frame.extend_from_slice(&more);
                        if seal_frame(&mut frame, start, &mut sealer).is_err() {
                            frame.truncate(start);
                            sealed = false;
                            break;
                        }
                    }
                    // A peer that stops reading holds this write: closing
                    // the connection does not wait for it.
                    sent.sending(frame.len());
                    let write = wr.write_all(&frame);
                    tokio::pin!(write);
                    let written = loop {
                        tokio::select! {
                            biased;
                            _ = &mut stopped => break None,
                            r = closed.changed(), if !gone => match r {
                                Ok(()) => break None,
                                Err(_) => gone = true,
                            },
                            _ = tokio::time::sleep(LINGER), if gone => break None,
                            written = &mut write => break Some(written),
                        }
                    };
                    if !matches!(written, Some(Ok(()))) || !sealed {
                        break;
                    }
                }
                alive.store(false, Ordering::Release);
                // The link is gone (or the reader stopped): say so to the
                // peer, whose end of the connection then closes, and with
                // it the reader's. Without this a dropped link would keep
                // its connection, and one of the peer's slots, open.
                let _ = wr.shutdown().await;
            });
        }
        {
            let (alive, pending, addr) = (alive.clone(), pending.clone(), self.addr.clone());
            let moved = moved.clone();
            tokio::spawn(async move {
                let _reading = reading;
                // The writer has stopped and said so to the peer, which
                // then closes its end; one that does not is not waited for
                // past `LINGER`.
                let writer_gone = async {
                    let _ = (&mut written_all).await;
                    tokio::time::sleep(LINGER).await;
                };
                tokio::pin!(writer_gone);
                loop {
                    let read = tokio::select! {
                        biased;
                        () = &mut writer_gone => break,
                        read = read_sealed(&mut rd, &mut buf, max, &mut opener) => read,
                    };
                    let msg = match read {
                        Ok(Some(msg)) => msg,
                        Ok(None) => break,
                        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                            // Nothing of the frame is used.
                            tracing::warn!(peer = %addr, "closed the connection to a peer: {e}");
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(peer = %addr, "connection to a peer broke: {e}");
                            break;
                        }
                    };
                    match msg {
                        PeerMessage::Response { id, result } => {
                            if let Some(tx) = pending.lock().unwrap().remove(&id) {
                                let _ = tx.send(result);
                            }
                        }
                        PeerMessage::Received { bytes } => moved.received(bytes),
                        PeerMessage::Request { .. } | PeerMessage::Gossip(_) => {}
                    }
                }
                alive.store(false, Ordering::Release);
                // Fail everything still waiting.
                pending.lock().unwrap().clear();
            });
        }
        Ok(Conn {
            frames: tx,
            pending,
            alive,
            moved,
            since: tokio::time::Instant::now(),
            _close: close,
        })
    }

    /// Sends `op` and waits for its answer: at most `timeout` (dialing
    /// included), plus the time its own frame takes at [`FLOOR_RATE`] (a
    /// request carrying a large value); past that, as long as
    /// [`MIN_MOVED`] bytes arrive on the connection per [`WINDOW`] (or per
    /// `timeout`, when longer), either way (a large answer on its way, or
    /// this frame or those before it reaching the peer), the wait goes on,
    /// up to [`MOST_EXTRA`] more.
    pub(crate) async fn request(
        &self,
        op: PeerOp,
        timeout: Duration,
    ) -> Result<PeerReply, LinkError> {
        let started = tokio::time::Instant::now();
        let conn = self.conn(started + timeout).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        encode_frame(
            &PeerMessage::Request { id, op },
            &mut frame,
            plain_max(self.dialer.max_frame),
        )
        .map_err(|e| self.unreachable(e))?;
        let mut deadline = started + timeout + transfer_time(frame.len());
        let latest = deadline + MOST_EXTRA;
        let window = timeout.max(WINDOW);
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().unwrap().insert(id, tx);
        if conn.frames.send(frame).is_err() {
            conn.pending.lock().unwrap().remove(&id);
            return Err(self.unreachable("connection closed"));
        }
        let answer = {
            tokio::pin!(rx);
            let mut moved = conn.moved.total();
            loop {
                match tokio::time::timeout_at(deadline, &mut rx).await {
                    Err(_) if deadline < latest && conn.moved.total() - moved >= MIN_MOVED => {
                        moved = conn.moved.total();
                        deadline = (deadline + window).min(latest);
                    }
                    answer => break answer,
                }
            }
        };
        match answer {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(error))) => Err(LinkError::Remote {
                addr: self.addr.clone(),
                error,
            }),
            Ok(Err(_)) => Err(self.unreachable("connection closed")),
            Err(_) => {
                conn.pending.lock().unwrap().remove(&id);
                // A stuck connection stays stuck: dialed afresh next time,
                // and closed once the requests still on it are done.
                conn.alive.store(false, Ordering::Release);
                Err(LinkError::Timeout {
                    addr: self.addr.clone(),
                    ms: timeout.as_millis() as u64,
                })
            }
        }
    }

    /// Sends gossip without waiting for anything but the connection.
    pub(crate) async fn gossip(&self, gossip: Gossip, timeout: Duration) -> Result<(), LinkError> {
        let conn = self.conn(tokio::time::Instant::now() + timeout).await?;
        let mut frame = Vec::new();
        encode_frame(
            &PeerMessage::Gossip(gossip),
            &mut frame,
            plain_max(self.dialer.max_frame),
        )
        .map_err(|e| self.unreachable(e))?;
        conn.frames
            .send(frame)
            .map_err(|_| self.unreachable("connection closed"))
    }
}

mod progress;
#[cfg(test)]
mod tests;
