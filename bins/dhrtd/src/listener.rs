//! The node's one endpoint: accept, tell the binary protocol (its
//! preamble's first byte is not ASCII) from HTTP by the first byte, and a
//! peer from a client by the preamble's channel, cap the connections of
//! each kind apart (clients can never take the slots peers need), and hand
//! the connection to the right server.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use dhrt_cluster::{BinaryLimits, LogThrottle, Node, serve_binary};
use dhrt_http::Api;
use dhrt_proto::auth::TokenHash;
use dhrt_proto::{Access, Channel, PREAMBLE_LEN, Preamble, Proven, Standing, read_preamble};

use crate::tls::{self, Tls};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How many connections of each kind are served at once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slots {
    /// Client connections, HTTP and binary.
    pub(crate) clients: usize,
    /// Peer connections.
    pub(crate) peers: usize,
}

/// Everything a connection needs.
pub(crate) struct Servers {
    pub(crate) node: Arc<Node>,
    pub(crate) http: Arc<Api<Node>>,
    pub(crate) binary: BinaryLimits,
    /// How long a new connection may take to send its first byte (and,
    /// with TLS, to finish its handshake).
    pub(crate) first_byte_timeout: Duration,
    /// TLS, when configured: then plain text is served on loopback only.
    pub(crate) tls: Option<Tls>,
}

/// How the node stops: clients first, then, once it has left the cluster,
/// peers. Peers are served while it leaves: a stopping node that stopped
/// answering them at once heard no probe answers, declared every peer dead,
/// and then had no owner to hand its collections to.
#[derive(Clone, Default)]
pub(crate) struct Stopping {
    /// Cancelled at the signal: no new client connection, and those open
    /// finish what is in flight (watches end).
    pub(crate) clients: CancellationToken,
    /// Cancelled once the node has left: the listener closes.
    pub(crate) peers: CancellationToken,
    /// The client connections open.
    clients_open: TaskTracker,
}

impl Stopping {
    /// Stops serving clients and waits up to `grace` for their connections
    /// to finish the requests in flight.
    pub(crate) async fn stop_clients(&self, grace: Duration) {
        self.clients.cancel();
        self.clients_open.close();
        if tokio::time::timeout(grace, self.clients_open.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.clients_open.len(),
                "client connections still open after the grace period; they close as the node exits"
            );
        }
    }
}

/// Accepts connections until `stopping.peers` is cancelled (clients only
/// until `stopping.clients` is), then gives the peer connections in
/// flight a moment to finish.
pub(crate) async fn run(
    listener: TcpListener,
    servers: Arc<Servers>,
    slots: Slots,
    stopping: Stopping,
) {
    // Connections not yet told apart (they have a few seconds to say what
    // they are) are capped too, so a flood of silent ones costs little.
    let unknown = Arc::new(Semaphore::new(slots.clients + slots.peers));
    let caps = Arc::new(Caps {
        clients: Semaphore::new(slots.clients),
        slots,
        pending_by_ip: Mutex::new(HashMap::new()),
        undeclared: Mutex::new(BTreeMap::new()),
        tokened: Mutex::new(Tokened::default()),
        access: servers.binary.access.clone(),
        next_unproven: AtomicU64::new(0),
    });
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = stopping.peers.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off, go on.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(source) = caps.count_source(peer.ip()) else {
            if let Some(left_out) = ONE_SOURCE_FULL.allow() {
                tracing::warn!(%peer, left_out, limit = PENDING_PER_SOURCE, "too many connections from one address that have not said what they are, or not proved the cluster secret; refusing");
            }
            continue;
        };
        // Every pending slot taken: the connection that has had longest to
        // say what it is (or to prove the secret) is closed, and its slot
        // goes to the newcomer. Clients and peers say what they are in
        // their first bytes, so strangers that connect and say nothing
        // cannot keep them out.
        let permit = match unknown.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => match caps.close_oldest_undeclared() {
                Some(permit) => {
                    if let Some(left_out) = UNDECLARED_CLOSED.allow() {
                        tracing::warn!(
                            left_out,
                            "every pending slot taken: closed the oldest connection that had not said what it is, or proved the cluster secret, for a newcomer"
                        );
                    }
                    permit
                }
                None => {
                    caps.uncount_source(source);
                    if let Some(left_out) = UNKNOWN_FULL.allow() {
                        tracing::warn!(%peer, left_out, "too many connections that have not said what they are; refusing");
                    }
                    continue;
                }
            },
        };
        let (pending, closing) = Pending::new(caps.clone(), source, permit);
        let _ = stream.set_nodelay(true);
        // Peers and clients alike: one that vanished does not keep its
        // slot.
        dhrt_cluster::keep_alive(&stream);
        // A child token per connection: a connection polls its shutdown
        // future on every wake, and polling locks the token's node; one
        // node shared by every connection would be a lock all of them
        // contend for.
        let shutdown = Shutdown {
            clients: stopping.clients.child_token(),
            peers: stopping.peers.child_token(),
            clients_open: stopping.clients_open.clone(),
        };
        let (servers, caps) = (servers.clone(), caps.clone());
        tracker.spawn(async move {
            let pending = (pending, closing);
            if let Err(e) = serve(stream, peer, &servers, &caps, pending, shutdown).await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
    drop(listener);
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
}

/// A connection's view of [`Stopping`].
struct Shutdown {
    clients: CancellationToken,
    peers: CancellationToken,
    clients_open: TaskTracker,
}

/// The caps on each kind of connection. Peers take their slots in the
/// peer server, once they have proved the cluster secret.
struct Caps {
    clients: Semaphore,
    slots: Slots,
    /// Connections not yet told apart, or peers not yet proved, per
    /// address off loopback.
    pending_by_ip: Mutex<HashMap<IpAddr, usize>>,
    /// The connections in a pending slot (not yet told apart, or peers
    /// not yet proved), oldest first, with the slot each holds: when every
    /// one is taken, a newcomer closes the oldest and takes its slot.
    undeclared: Mutex<BTreeMap<u64, (CancellationToken, OwnedSemaphorePermit)>>,
    /// Client connections in a slot that must show a token.
    tokened: Mutex<Tokened>,
    /// The tokens they must show.
    access: Arc<Access>,
    next_unproven: AtomicU64,
}

/// The client connections that must show a token, by whether they have
/// shown one that is valid now.
#[derive(Default)]
struct Tokened {
    /// Not shown a valid one yet, oldest first: when every slot is taken,
    /// a newcomer closes the oldest of them and takes its slot.
    unproven: BTreeMap<u64, CancellationToken>,
    /// Shown one (of this hash): never closed for a newcomer while it is
    /// valid. After a reload, those whose token is no longer valid go
    /// back among the unproven (a revoked token's connections, asking or
    /// idle, must not keep their slots).
    proven: HashMap<u64, (CancellationToken, TokenHash)>,
    /// The tokens' generation ([`dhrt_proto::Access::generation`]) the
    /// proven ones were last checked under.
    generation: u64,
}

/// How long a newcomer waits for the slot of the stranger it closed.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

impl Caps {
    /// A client slot: a free one, or else the one the oldest client that
    /// has not shown a valid token holds (none, or one revoked since), once
    /// it has closed. `None` when every slot is held by a client that needs
    /// no token or has shown one still valid.
    async fn client_slot(&self) -> Option<SemaphorePermit<'_>> {
        if let Ok(slot) = self.clients.try_acquire() {
            return Some(slot);
        }
        // Legitimate clients show their token in their first request, so
        // the stranger closed is one that has had longer than any of them
        // to do so: strangers cannot hold every slot by connecting first
        // and saying nothing (or nothing valid).
        let (_, oldest) = {
            let mut tokened = self.tokened.lock().unwrap();
            tokened.seen(self.access.generation(), &self.access);
            tokened.unproven.pop_first()?
        };
        oldest.cancel();
        if let Some(left_out) = STRANGER_CLOSED.allow() {
            tracing::warn!(
                left_out,
                "every client slot taken: closed the oldest connection that had not shown a token, for a newcomer"
            );
        }
        match tokio::time::timeout(EVICTION_WAIT, self.clients.acquire()).await {
            Ok(Ok(slot)) => Some(slot),
            _ => None,
        }
    }

    /// The slot of the oldest connection that has not said what it is (or
    /// proved the secret), which is closed; `None` if there is none.
    fn close_oldest_undeclared(&self) -> Option<OwnedSemaphorePermit> {
        let (_, (closing, permit)) = self.undeclared.lock().unwrap().pop_first()?;
        closing.cancel();
        Some(permit)
    }

    /// Counts a connection from `ip` among its address's pending ones:
    /// `None` if that address has as many as it may; `Some(None)` for
    /// loopback, which is not counted.
    fn count_source(&self, ip: IpAddr) -> Option<Option<IpAddr>> {
        if dhrt_proto::auth::is_loopback(ip) {
            return Some(None);
        }
        let ip = source(ip);
        let mut by_ip = self.pending_by_ip.lock().unwrap();
        let count = by_ip.entry(ip).or_insert(0);
        if *count >= PENDING_PER_SOURCE {
            return None;
        }
        *count += 1;
        Some(Some(ip))
    }

    /// Undoes [`Self::count_source`].
    fn uncount_source(&self, ip: Option<IpAddr>) {
        if let Some(ip) = ip {
            let mut by_ip = self.pending_by_ip.lock().unwrap();
            if let Some(count) = by_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    by_ip.remove(&ip);
                }
            }
        }
    }

    /// Counts a client connection that must still show a token among those
    /// a newcomer may close; `closing` closes it.
    fn unproven(self: &Arc<Self>, closing: CancellationToken) -> Proven {
        let id = self.next_unproven.fetch_add(1, Ordering::Relaxed);
        self.tokened.lock().unwrap().unproven.insert(id, closing);
        let guard = Unproven {
            caps: self.clone(),
            id,
        };
        Proven::rearmable(move |generation, hash| guard.proved(generation, hash))
    }
}

impl Tokened {
    /// The tokens' generation is `generation`: after a reload, connections
    /// whose token `access` no longer grants are unproven again.
    fn seen(&mut self, generation: u64, access: &Access) {
        if self.generation >= generation {
            return;
        }
        self.generation = generation;
        let revoked: Vec<u64> = self
            .proven
            .iter()
            .filter(|(_, (_, hash))| access.role(Standing::Token(*hash)).is_err())
            .map(|(id, _)| *id)
            .collect();
        for id in revoked {
            if let Some((closing, _)) = self.proven.remove(&id) {
                self.unproven.insert(id, closing);
            }
        }
    }
}

/// A client connection that must show a token, on the listener's lists
/// while it is open (dropped with its [`Proven`]).
struct Unproven {
    caps: Arc<Caps>,
    id: u64,
}

impl Unproven {
    /// It showed the token of `hash`, valid under the tokens of
    /// `generation`: spared while that token is valid (unless it was
    /// closed already).
    fn proved(&self, generation: u64, hash: TokenHash) {
        let caps = &self.caps;
        let mut tokened = caps.tokened.lock().unwrap();
        tokened.seen(generation, &caps.access);
        // Checked again under the lock: a reload may have come since.
        if caps.access.role(Standing::Token(hash)).is_err() {
            if let Some((closing, _)) = tokened.proven.remove(&self.id) {
                tokened.unproven.insert(self.id, closing);
            }
            return;
        }
        if let Some(closing) = tokened.unproven.remove(&self.id) {
            tokened.proven.insert(self.id, (closing, hash));
        } else if let Some((_, held)) = tokened.proven.get_mut(&self.id) {
            *held = hash;
        }
    }
}

impl Drop for Unproven {
    fn drop(&mut self) {
        let mut tokened = self.caps.tokened.lock().unwrap();
        tokened.unproven.remove(&self.id);
        tokened.proven.remove(&self.id);
    }
}

/// The most connections one address off loopback may have that have not
/// said what they are (or, for peers, not yet proved the secret): one
/// source cannot fill the slots every connection passes through.
const PENDING_PER_SOURCE: usize = 64;

static UNKNOWN_FULL: LogThrottle = LogThrottle::new(Duration::from_secs(1));
static ONE_SOURCE_FULL: LogThrottle = LogThrottle::new(Duration::from_secs(1));
static KIND_FULL: LogThrottle = LogThrottle::new(Duration::from_secs(1));
static STRANGER_CLOSED: LogThrottle = LogThrottle::new(Duration::from_secs(1));
static UNDECLARED_CLOSED: LogThrottle = LogThrottle::new(Duration::from_secs(1));

/// The source an address counts against: IPv4 as it is (also when mapped
/// into IPv6), IPv6 by its /64, which one machine or network usually owns
/// whole (one address each would be 2^64 buckets).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(octets.into())
            }
        },
    }
}

/// A connection that has not yet said what it is (or a peer that has not
/// proved the secret): it holds one of the node's pending slots (kept in
/// [`Caps::undeclared`], where a newcomer may take it) and counts against
/// its address. Dropped once it has.
struct Pending {
    caps: Arc<Caps>,
    ip: Option<IpAddr>,
    id: u64,
}

impl Pending {
    /// A connection from `ip` (as [`Caps::count_source`] counted it) in
    /// the pending slot `permit`; closed when the token returned is.
    fn new(
        caps: Arc<Caps>,
        ip: Option<IpAddr>,
        permit: OwnedSemaphorePermit,
    ) -> (Pending, CancellationToken) {
        let closing = CancellationToken::new();
        let id = caps.next_unproven.fetch_add(1, Ordering::Relaxed);
        caps.undeclared
            .lock()
            .unwrap()
            .insert(id, (closing.clone(), permit));
        (Pending { caps, ip, id }, closing)
    }

    /// Released when the peer proves the secret.
    fn proof(self) -> Proven {
        Proven::new(move || drop(self))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Its slot, unless a newcomer took it.
        drop(self.caps.undeclared.lock().unwrap().remove(&self.id));
        self.caps.uncount_source(self.ip);
    }
}

/// What a connection is, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Http,
    Binary,
    Peer,
    Tls,
}

/// What `head` (a connection's first bytes) says it is; `None` if too few
/// bytes to tell.
fn kind_of(head: &[u8]) -> Option<Kind> {
    if head.first() == Some(&tls::HANDSHAKE_RECORD) {
        return Some(Kind::Tls);
    }
    match read_preamble(head) {
        Ok(Preamble::NotBinary) => Some(Kind::Http),
        Ok(Preamble::Binary {
            channel: Channel::Peer,
            ..
        }) => Some(Kind::Peer),
        // A bad version or channel: the binary server says so.
        Ok(Preamble::Binary { .. }) | Err(_) => Some(Kind::Binary),
        Ok(Preamble::Incomplete) => None,
    }
}

/// Looks at the first bytes without taking them (the server chosen reads
/// the connection from its start): `None` if the connection closed first.
async fn classify(stream: &TcpStream) -> io::Result<Option<Kind>> {
    let mut head = [0u8; PREAMBLE_LEN];
    let mut wait = Duration::from_millis(2);
    loop {
        let n = stream.peek(&mut head).await?;
        if n == 0 {
            return Ok(None);
        }
        match kind_of(&head[..n]) {
            Some(kind) => return Ok(Some(kind)),
            // Part of a preamble: peeking again at once would find the
            // same bytes. Waiting longer each time keeps a client that
            // stops there from costing the node a core.
            None => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(250));
            }
        }
    }
}

/// Reads the first bytes inside TLS until they say what the connection is;
/// the stream then replays them to the server chosen.
async fn classify_inside<S: AsyncRead + Unpin>(
    mut stream: S,
) -> io::Result<Option<(Kind, Replay<S>)>> {
    let mut head = Vec::with_capacity(PREAMBLE_LEN);
    loop {
        let mut more = [0u8; PREAMBLE_LEN];
        let want = PREAMBLE_LEN - head.len();
        let n = stream.read(&mut more[..want]).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&more[..n]);
        match kind_of(&head) {
            // TLS inside TLS is nothing this node speaks: HTTP answers it.
            Some(Kind::Tls) => return Ok(Some((Kind::Http, Replay::new(head, stream)))),
            Some(kind) => return Ok(Some((kind, Replay::new(head, stream)))),
            None => {}
        }
    }
}

/// A stream whose first bytes were read already: they are read again
/// first.
struct Replay<S> {
    head: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Replay<S> {
    fn new(head: Vec<u8>, inner: S) -> Self {
        Replay { head, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.head.len() {
            let n = buf.remaining().min(self.head.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The answer a plain HTTP client gets from a node that speaks TLS only.
const TLS_REQUIRED: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\
Connection: close\r\nContent-Length: 57\r\n\r\n{\"Error\":\"this node speaks TLS only: use https (or TLS)\"}";

/// Serves a connection in a pending slot (`pending`, closed when its token
/// is, for a newcomer, until it has said what it is or, a peer, proved the
/// secret).
async fn serve(
    mut stream: TcpStream,
    remote: SocketAddr,
    servers: &Servers,
    caps: &Arc<Caps>,
    pending: (Pending, CancellationToken),
    shutdown: Shutdown,
) -> io::Result<()> {
    let limit = servers.first_byte_timeout;
    let kind = tokio::select! {
        r = tokio::time::timeout(limit, classify(&stream)) => match r {
            Ok(Ok(Some(kind))) => kind,
            Ok(Ok(None)) | Err(_) => return Ok(()), // connected and said nothing
            Ok(Err(e)) => return Err(e),
        },
        () = shutdown.peers.cancelled() => return Ok(()),
        () = pending.1.cancelled() => {
            tracing::debug!(%remote, "closed for a newcomer: every pending slot was taken and it had said nothing");
            return Ok(());
        }
    };
    match (kind, &servers.tls) {
        (Kind::Tls, None) => {
            tracing::debug!(%remote, "a TLS connection to a node without TLS; closing");
            Ok(())
        }
        (Kind::Tls, Some(tls)) => {
            // The handshake and the first bytes inside it, in the time a
            // plain connection has for its first byte.
            let inside = async {
                let stream = tls.acceptor.accept(stream).await?;
                classify_inside(stream).await
            };
            let (kind, stream) = tokio::select! {
                r = tokio::time::timeout(limit, inside) => match r {
                    Ok(Ok(Some(found))) => found,
                    Ok(Ok(None)) | Err(_) => return Ok(()),
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, "TLS handshake failed: {e}");
                        return Ok(());
                    }
                },
                () = shutdown.peers.cancelled() => return Ok(()),
                () = pending.1.cancelled() => return Ok(()),
            };
            serve_kind(kind, stream, remote, servers, caps, pending, shutdown).await
        }
        // With TLS on, plain text only on loopback.
        (kind, Some(_)) if !dhrt_proto::auth::is_loopback(remote.ip()) => {
            tracing::debug!(%remote, ?kind, "plain text to a node that speaks TLS only; closing");
            if kind == Kind::Http {
                let _ = stream.write_all(TLS_REQUIRED).await;
                let _ = stream.shutdown().await;
                // Take what the client sent, briefly: closing with unread
                // bytes would reset the connection before it reads the
                // answer.
                let mut sink = [0u8; 4096];
                let drain = async {
                    let mut left: usize = 64 * 1024;
                    while left > 0 {
                        match stream.read(&mut sink).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => left = left.saturating_sub(n),
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
            }
            Ok(())
        }
        (kind, _) => serve_kind(kind, stream, remote, servers, caps, pending, shutdown).await,
    }
}

/// Serves a connection known to be `kind`: a client in a client slot; a
/// peer, still pending, until the peer server has its proof and gives it a
/// peer slot.
async fn serve_kind<S>(
    kind: Kind,
    stream: S,
    remote: SocketAddr,
    servers: &Servers,
    caps: &Arc<Caps>,
    (pending, closing): (Pending, CancellationToken),
    shutdown: Shutdown,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // A client is served until the node stops serving clients, and counted
    // among the client connections it waits for; a peer, until it has left.
    let (_open, shutdown) = match kind {
        Kind::Peer => (None, shutdown.peers),
        Kind::Http | Kind::Binary | Kind::Tls => {
            let open = shutdown.clients_open.token();
            if shutdown.clients.is_cancelled() {
                return Ok(());
            }
            (Some(open), shutdown.clients)
        }
    };
    let (pending, _slot) = match kind {
        Kind::Peer => (Some(pending), None),
        Kind::Http | Kind::Binary | Kind::Tls => {
            drop(pending);
            let Some(slot) = caps.client_slot().await else {
                if let Some(left_out) = KIND_FULL.allow() {
                    let limit = caps.slots.clients;
                    tracing::warn!(%remote, limit, left_out, "client connection limit reached; refusing");
                }
                return Ok(());
            };
            (None, Some(slot))
        }
    };
    // A client that needs no token (loopback, without an auth file) is
    // never closed for a newcomer; one that does is, until it shows one:
    // at once, mid-request or not (dropping the connection's future
    // closes it), so its slot is free for the newcomer waiting. A peer is,
    // until it has proved the secret.
    let evicted = if kind == Kind::Peer {
        closing
    } else {
        CancellationToken::new()
    };
    let proven = match (servers.binary.access.connect(remote.ip()), pending) {
        // A peer's pending slot is released once it has proved the secret.
        (_, Some(pending)) => pending.proof(),
        (Standing::Trusted(_), None) => Proven::ignored(),
        (_, None) => caps.unproven(evicted.clone()),
    };
    let served = async {
        if kind != Kind::Http {
            let closed = serve_binary(
                stream,
                remote,
                servers.node.clone(),
                servers.binary.clone(),
                shutdown.cancelled(),
                proven,
            )
            .await?;
            tracing::debug!(?closed, "binary connection closed");
            Ok(())
        } else {
            servers
                .http
                .clone()
                .serve_connection(stream, remote.ip(), shutdown.cancelled_owned(), proven)
                .await
                .map_err(io::Error::other)
        }
    };
    tokio::select! {
        r = served => r,
        () = evicted.cancelled() => {
            tracing::debug!(%remote, ?kind, "closed for a newcomer: every slot was taken and it had shown no token (or proved no secret)");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_network_counts_as_one_source_and_mapped_ipv4_as_itself() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source(a), source(b));
        assert_ne!(source(a), source(other));
        let mapped: IpAddr = "::ffff:192.0.2.2".parse().unwrap();
        let v4: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(source(mapped), v4);
        assert_eq!(source(v4), v4);
    }
}
