//! The node's one endpoint: accept, tell the binary protocol (its
//! preamble's first byte is not ASCII) from HTTP by the first byte, and a
//! peer from a client by the preamble's channel, cap the connections of
//! each kind apart (clients can never take the slots peers need), and hand
//! the connection to the right server.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dhrt_cluster::{BinaryLimits, Node, serve_binary};
use dhrt_http::Api;
use dhrt_proto::{Channel, PREAMBLE_LEN, Preamble, read_preamble};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
    /// How long a new connection may take to send its first byte.
    pub(crate) first_byte_timeout: Duration,
}

/// Accepts connections until `shutdown` is cancelled, then waits up to
/// `grace` for the connections in flight to finish their requests.
pub(crate) async fn run(
    listener: TcpListener,
    servers: Arc<Servers>,
    slots: Slots,
    shutdown: CancellationToken,
    grace: Duration,
) {
    // Connections not yet told apart (they have a few seconds to say what
    // they are) are capped too, so a flood of silent ones costs little.
    let unknown = Arc::new(Semaphore::new(slots.clients + slots.peers));
    let caps = Arc::new(Caps {
        clients: Semaphore::new(slots.clients),
        peers: Semaphore::new(slots.peers),
        slots,
    });
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
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
        let Ok(pending) = unknown.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many connections that have not said what they are; refusing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        // A child token per connection: a connection polls its shutdown
        // future on every wake, and polling locks the token's node; one
        // node shared by every connection would be a lock all of them
        // contend for.
        let (servers, caps, shutdown) = (servers.clone(), caps.clone(), shutdown.child_token());
        tracker.spawn(async move {
            if let Err(e) = serve(stream, peer, &servers, &caps, pending, shutdown).await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            open = tracker.len(),
            "connections still open after the grace period; closing them"
        );
    }
}

/// The caps on each kind of connection.
struct Caps {
    clients: Semaphore,
    peers: Semaphore,
    slots: Slots,
}

/// What a connection is, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Http,
    Binary,
    Peer,
}

/// Looks at the first bytes without taking them (the server chosen reads
/// the connection from its start): `None` if the connection closed or said
/// nothing in time.
async fn classify(stream: &TcpStream) -> io::Result<Option<Kind>> {
    let mut head = [0u8; PREAMBLE_LEN];
    loop {
        let n = stream.peek(&mut head).await?;
        if n == 0 {
            return Ok(None);
        }
        match read_preamble(&head[..n]) {
            Ok(Preamble::NotBinary) => return Ok(Some(Kind::Http)),
            Ok(Preamble::Binary {
                channel: Channel::Peer,
                ..
            }) => return Ok(Some(Kind::Peer)),
            // A bad version or channel: the binary server says so.
            Ok(Preamble::Binary { .. }) | Err(_) => return Ok(Some(Kind::Binary)),
            // Part of a preamble: peeking again at once would find the
            // same bytes.
            Ok(Preamble::Incomplete) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn serve(
    stream: TcpStream,
    remote: SocketAddr,
    servers: &Servers,
    caps: &Caps,
    pending: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let kind = tokio::select! {
        r = tokio::time::timeout(servers.first_byte_timeout, classify(&stream)) => match r {
            Ok(Ok(Some(kind))) => kind,
            Ok(Ok(None)) | Err(_) => return Ok(()), // connected and said nothing
            Ok(Err(e)) => return Err(e),
        },
        () = shutdown.cancelled() => return Ok(()),
    };
    drop(pending);
    let (cap, limit) = match kind {
        Kind::Peer => (&caps.peers, caps.slots.peers),
        Kind::Http | Kind::Binary => (&caps.clients, caps.slots.clients),
    };
    let Ok(_slot) = cap.try_acquire() else {
        tracing::warn!(%remote, ?kind, limit, "connection limit reached; refusing");
        return Ok(());
    };
    if kind != Kind::Http {
        let closed = serve_binary(
            stream,
            remote,
            servers.node.clone(),
            servers.binary.clone(),
            shutdown.cancelled(),
        )
        .await?;
        tracing::debug!(?closed, "binary connection closed");
        Ok(())
    } else {
        servers
            .http
            .clone()
            .serve_connection(stream, remote.ip(), shutdown.cancelled_owned())
            .await
            .map_err(io::Error::other)
    }
}
