//! The listening side of a peer connection: the handshake (refusing anyone
//! who cannot prove the cluster secret), then requests answered
//! concurrently and gossip handed to the membership protocol.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dhrt_proto::{
    ErrorKind, Handshake, OpError, PeerMessage, PeerOp, PeerReply, Versioned, encode_frame,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::auth::{self, Role, Transcript};
use crate::cluster::{Cluster, stamp};
use crate::server::Closed;
use crate::wire::{read_msg, take_msg, write_msg};

/// The bytes of records in one page of a bucket listing (a larger record
/// goes alone): well under the frame limit.
const BUCKET_PAGE_BYTES: usize = 4 << 20;

/// Serves a peer connection whose preamble was consumed; `buf` holds what
/// was read after it.
pub(crate) async fn serve_peer<S>(
    mut stream: S,
    mut buf: BytesMut,
    cluster: Arc<Cluster>,
    max_frame: u32,
    shutdown: impl std::future::Future<Output = ()>,
) -> io::Result<Closed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let handshake_timeout = Duration::from_secs(5);
    let dialer = match tokio::time::timeout(
        handshake_timeout,
        handshake(&mut stream, &mut buf, &cluster, max_frame),
    )
    .await
    {
        Ok(Ok(Ok(dialer))) => dialer,
        Ok(Ok(Err(reason))) => {
            tracing::warn!("refused a peer connection: {reason}");
            let _ = write_msg(
                &mut stream,
                &Handshake::Refused {
                    reason: reason.clone(),
                },
                max_frame,
            )
            .await;
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

/// The listener's half of the handshake: the dialer's id, or why it is
/// refused.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    cluster: &Cluster,
    max_frame: u32,
) -> io::Result<Result<u64, String>> {
    let Some(Handshake::Hello { node, nonce }) = read_msg(stream, buf, max_frame).await? else {
        return Ok(Err("expected a hello".into()));
    };
    let t = Transcript {
        dialer: node,
        dialer_nonce: nonce,
        listener: cluster.id(),
        listener_nonce: auth::nonce(),
    };
    let proof = auth::prove(cluster.secret(), Role::Listener, &t);
    write_msg(
        stream,
        &Handshake::Challenge {
            node: t.listener,
            nonce: t.listener_nonce,
            proof,
        },
        max_frame,
    )
    .await?;
    let Some(Handshake::Proof { proof }) = read_msg(stream, buf, max_frame).await? else {
        return Ok(Err("expected a proof".into()));
    };
    if !auth::verify(cluster.secret(), Role::Dialer, &t, &proof) {
        return Ok(Err(format!(
            "node {node:016x} does not know the cluster secret"
        )));
    }
    write_msg(stream, &Handshake::Accepted, max_frame).await?;
    Ok(Ok(node))
}

async fn handle(cluster: &Arc<Cluster>, dialer: u64, op: PeerOp) -> Result<PeerReply, OpError> {
    match op {
        PeerOp::Apply(mutations) => cluster.apply_async(mutations).await.map(PeerReply::from),
        PeerOp::Read { collection, key } => {
            let r = cluster
                .store()
                .lookup(&collection, &key)
                .map_err(crate::node::op_error)?;
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
