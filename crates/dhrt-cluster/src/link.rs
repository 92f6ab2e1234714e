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
use tokio::sync::{mpsc, oneshot};

use crate::handshake::{self, DialError, Side};
use crate::wire::{plain_max, read_sealed, seal_frame};

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
            Ok(Box::new(stream) as Box<dyn PeerStream>)
        })
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<PeerReply, OpError>>>>>;

struct Conn {
    frames: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    alive: Arc<AtomicBool>,
}

/// Who is dialing, and with what secret.
#[derive(Debug, Clone)]
pub(crate) struct Dialer {
    pub(crate) me: u64,
    pub(crate) secret: Arc<[u8]>,
    pub(crate) max_frame: u32,
    pub(crate) connector: Arc<dyn Connector>,
}

/// A connection to one peer address.
pub(crate) struct Link {
    addr: String,
    dialer: Dialer,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("addr", &self.addr).finish()
    }
}

impl Link {
    pub(crate) fn new(addr: String, dialer: Dialer) -> Self {
        Link {
            addr,
            dialer,
            conn: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
        }
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
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
            Ok((_, session)) => session,
            Err(DialError::Io(e)) => return Err(self.unreachable(e)),
            Err(DialError::Refused(reason)) => {
                return Err(LinkError::Refused {
                    addr: self.addr.clone(),
                    reason,
                });
            }
        };
        let (mut sealer, mut opener) = (session.sealer, session.opener);
        let (mut rd, mut wr) = tokio::io::split(stream);
        // Dropped by the reader when it stops: the writer stops too, and
        // the connection closes.
        let (reading, mut stopped) = oneshot::channel::<()>();
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        {
            let alive = alive.clone();
            tokio::spawn(async move {
                loop {
                    let mut frame = tokio::select! {
                        biased;
                        _ = &mut stopped => break,
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
                    if wr.write_all(&frame).await.is_err() || !sealed {
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
            tokio::spawn(async move {
                let _reading = reading;
                loop {
                    let msg = match read_sealed(&mut rd, &mut buf, max, &mut opener).await {
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
                    if let PeerMessage::Response { id, result } = msg
                        && let Some(tx) = pending.lock().unwrap().remove(&id)
                    {
                        let _ = tx.send(result);
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
        })
    }

    /// Sends `op` and waits for its answer, at most `timeout` (dialing
    /// included).
    pub(crate) async fn request(
        &self,
        op: PeerOp,
        timeout: Duration,
    ) -> Result<PeerReply, LinkError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let conn = self.conn(deadline).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        encode_frame(
            &PeerMessage::Request { id, op },
            &mut frame,
            plain_max(self.dialer.max_frame),
        )
        .map_err(|e| self.unreachable(e))?;
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().unwrap().insert(id, tx);
        if conn.frames.send(frame).is_err() {
            conn.pending.lock().unwrap().remove(&id);
            return Err(self.unreachable("connection closed"));
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(error))) => Err(LinkError::Remote {
                addr: self.addr.clone(),
                error,
            }),
            Ok(Err(_)) => Err(self.unreachable("connection closed")),
            Err(_) => {
                conn.pending.lock().unwrap().remove(&id);
                // A stuck connection stays stuck: dial afresh next time.
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

#[cfg(test)]
mod tests {
    use dhrt_proto::{PREAMBLE_LEN, PeerReply};
    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;
    use crate::wire::read_sealed;

    const SECRET: &[u8] = b"a cluster secret of at least 32 bytes";

    /// Hands out one end of an in-memory stream, once.
    #[derive(Debug)]
    struct OneStream(Mutex<Option<DuplexStream>>);

    impl Connector for OneStream {
        fn connect<'a>(&'a self, _: &'a str) -> ConnectFuture<'a> {
            let stream = self.0.lock().unwrap().take();
            Box::pin(async move {
                let stream = stream.ok_or_else(|| io::Error::other("dialed twice"))?;
                Ok(Box::new(stream) as Box<dyn PeerStream>)
            })
        }
    }

    #[tokio::test]
    async fn an_answer_altered_in_transit_closes_the_dialed_connection() {
        let (d, mut l) = tokio::io::duplex(1 << 16);
        let link = Link::new(
            "192.0.2.2:7453".into(),
            Dialer {
                me: 1,
                secret: SECRET.into(),
                max_frame: 1 << 20,
                connector: Arc::new(OneStream(Mutex::new(Some(d)))),
            },
        );
        // The listener answers the first request with one bit flipped.
        let listener = tokio::spawn(async move {
            let mut preamble = [0; PREAMBLE_LEN];
            l.read_exact(&mut preamble).await.unwrap();
            let mut buf = BytesMut::new();
            let me = Side {
                id: 2,
                secret: SECRET,
                max_frame: 1 << 20,
            };
            let (_, mut session) = handshake::accept(&mut l, &mut buf, me)
                .await
                .unwrap()
                .unwrap();
            let request = read_sealed(&mut l, &mut buf, 1 << 20, &mut session.opener);
            let Some(PeerMessage::Request { id, .. }) = request.await.unwrap() else {
                panic!("no request")
            };
            let answer = PeerMessage::Response {
                id,
                result: Ok(PeerReply::Entry(None)),
            };
            let mut out = Vec::new();
            encode_frame(&answer, &mut out, 1 << 20).unwrap();
            seal_frame(&mut out, 0, &mut session.sealer).unwrap();
            let last = out.len() - 1;
            out[last] ^= 0x01;
            l.write_all(&out).await.unwrap();
            // The dialer hangs up.
            let mut rest = Vec::new();
            l.read_to_end(&mut rest).await.unwrap();
            rest
        });
        let op = PeerOp::Read {
            collection: "c".into(),
            key: "k".into(),
        };
        let answer = link.request(op, Duration::from_secs(30)).await;
        assert!(
            matches!(&answer, Err(LinkError::Unreachable { reason, .. }) if reason.contains("closed")),
            "{answer:?}"
        );
        assert!(listener.await.unwrap().is_empty());
    }

    /// Dials into a black hole: the connection is never made.
    #[derive(Debug)]
    struct BlackHole;

    impl Connector for BlackHole {
        fn connect<'a>(&'a self, _: &'a str) -> ConnectFuture<'a> {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn callers_queued_behind_a_dial_that_hangs_give_up_at_their_own_deadline() {
        let link = Arc::new(Link::new(
            "192.0.2.3:7453".into(),
            Dialer {
                me: 1,
                secret: SECRET.into(),
                max_frame: 1 << 20,
                connector: Arc::new(BlackHole),
            },
        ));
        let started = tokio::time::Instant::now();
        let timeout = Duration::from_millis(500);
        let mut callers = tokio::task::JoinSet::new();
        for i in 0..5 {
            let link = link.clone();
            callers.spawn(async move {
                let answer = if i % 2 == 0 {
                    link.request(PeerOp::Digests(Vec::new()), timeout)
                        .await
                        .map(|_| ())
                } else {
                    let gossip = Gossip {
                        from: 1,
                        sent_ms: 0,
                        max_offset_ms: 0,
                        kind: dhrt_proto::GossipKind::Ping {
                            seq: 1,
                            relay: None,
                        },
                        updates: Vec::new(),
                    };
                    link.gossip(gossip, timeout).await
                };
                (answer, started.elapsed())
            });
        }
        // Time is paused: each caller's clock moves only by its timers, so
        // this is exact. Queued one dial timeout after another, the last
        // would give up after 2.5 s.
        for (answer, took) in callers.join_all().await {
            assert!(
                matches!(answer, Err(LinkError::Timeout { .. })),
                "{answer:?}"
            );
            assert_eq!(took, timeout, "a caller gave up after {took:?}");
        }
    }
}
