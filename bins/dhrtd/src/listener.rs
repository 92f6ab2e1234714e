//! The node's one endpoint: accept, cap the number of connections, tell the
//! binary protocol (its preamble's first byte is not ASCII) from HTTP by the
//! first byte, and hand the connection to the right server.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dhrt_cluster::{BinaryLimits, Node, serve_binary};
use dhrt_http::Api;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    max_connections: usize,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max_connections, "connection limit reached; refusing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        // A child token per connection: a connection polls its shutdown
        // future on every wake, and polling locks the token's node; one
        // node shared by every connection would be a lock all of them
        // contend for.
        let (servers, shutdown) = (servers.clone(), shutdown.child_token());
        tracker.spawn(async move {
            if let Err(e) = serve(stream, peer, &servers, shutdown).await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
            drop(slot);
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

async fn serve(
    stream: TcpStream,
    remote: SocketAddr,
    servers: &Servers,
    shutdown: CancellationToken,
) -> io::Result<()> {
    // Look at the first byte without taking it: the server chosen reads the
    // connection from its start.
    let mut first = [0u8; 1];
    let n = tokio::select! {
        r = tokio::time::timeout(servers.first_byte_timeout, stream.peek(&mut first)) => match r {
            Ok(r) => r?,
            Err(_) => return Ok(()), // connected and said nothing
        },
        () = shutdown.cancelled() => return Ok(()),
    };
    if n == 0 {
        return Ok(());
    }
    if first[0] == dhrt_proto::MAGIC[0] {
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
