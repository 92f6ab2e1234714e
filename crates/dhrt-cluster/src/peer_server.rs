//! The listening side of a peer connection: the handshake (refusing anyone
//! who cannot prove the cluster secret), then requests answered
//! concurrently and gossip handed to the membership protocol.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dhrt_proto::{ErrorKind, OpError, PeerMessage, PeerOp, PeerReply, Versioned, encode_frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::cluster::{Cluster, stamp};
use crate::handshake::{self, Side};
use crate::wire::Closed;
use crate::wire::take_msg;

/// The bytes of records in one page of a bucket listing (a larger record
/// goes alone): well under the frame limit.
const BUCKET_PAGE_BYTES: usize = 4 << 20;

/// Serves a peer connection whose preamble was consumed; `buf` holds what
/// was read after it.
pub(crate) async fn serve_peer<S>(
    mut stream: S,
    remote: SocketAddr,
    mut buf: BytesMut,
    cluster: Arc<Cluster>,
    max_frame: u32,
    shutdown: impl std::future::Future<Output = ()>,
) -> io::Result<Closed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let handshake_timeout = Duration::from_secs(5);
    let me = Side {
        id: cluster.id(),
        secret: cluster.secret(),
        max_frame,
    };
    let dialer = match tokio::time::timeout(
        handshake_timeout,
        handshake::accept(&mut stream, &mut buf, me),
    )
    .await
    {
        Ok(Ok(Ok(dialer))) => dialer,
        Ok(Ok(Err(reason))) => {
            tracing::warn!(%remote, "refused a peer connection: {reason}");
            return Ok(Closed::Protocol(reason));
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(Closed::Idle),
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<PeerMessage>();
    tokio::pin!(shutdown);
    let mut out = Vec::new();
    loop {
        while let Some(msg) = take_msg::<PeerMessage>(&mut buf, max_frame)? {
            match msg {
                PeerMessage::Gossip(g) => cluster.on_gossip(dialer, g),
                PeerMessage::Request { id, op } => {
                    let (cluster, tx) = (cluster.clone(), tx.clone());
                    tokio::spawn(async move {
                        let result = handle(&cluster, dialer, op).await;
                        let _ = tx.send(PeerMessage::Response { id, result });
                    });
                }
                PeerMessage::Response { .. } => {
                    return Ok(Closed::Protocol(
                        "a response on a listening connection".into(),
                    ));
                }
            }
        }
        buf.reserve(64 * 1024);
        tokio::select! {
            biased;
            () = &mut shutdown => return Ok(Closed::Shutdown),
            Some(msg) = rx.recv() => {
                encode(&msg, &mut out, max_frame);
                while let Ok(more) = rx.try_recv() {
                    encode(&more, &mut out, max_frame);
                }
                stream.write_all(&out).await?;
                out.clear();
            }
            n = stream.read_buf(&mut buf) => {
                if n? == 0 {
                    return Ok(Closed::ByClient);
                }
            }
        }
    }
}

fn encode(msg: &PeerMessage, out: &mut Vec<u8>, max_frame: u32) {
    if let Err(e) = encode_frame(msg, out, max_frame) {
        let PeerMessage::Response { id, .. } = msg else {
            return;
        };
        let too_large = PeerMessage::Response {
            id: *id,
            result: Err(OpError::new(ErrorKind::TooLarge, e.to_string())),
        };
        encode_frame(&too_large, out, max_frame).expect("a short error fits");
    }
}

async fn handle(cluster: &Arc<Cluster>, dialer: u64, op: PeerOp) -> Result<PeerReply, OpError> {
    match op {
        PeerOp::Apply(mutations) => cluster.apply_async(mutations).await.map(PeerReply::from),
        PeerOp::Read { collection, key } => {
            let r = cluster
                .store()
                .lookup(&collection, &key)
                .map_err(crate::error::op_error)?;
            Ok(PeerReply::Entry(r.map(|r| Versioned {
                value: r.value,
                version: stamp(r.version),
            })))
        }
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
        PeerOp::Join(update) => Ok(PeerReply::Members(cluster.on_join(update))),
        PeerOp::Handoff { collection } => cluster
            .stream_collection(dialer, &collection)
            .await
            .map(PeerReply::HandoffDone),
    }
}
