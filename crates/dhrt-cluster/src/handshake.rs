//! The peer handshake, both halves: the dialer's ([`dial`]) and the
//! listener's ([`accept`]). In order: `Hello` (dialer: id, nonce), then
//! `Challenge` (listener: id, nonce, proof), then `Proof` (dialer), then
//! `Accepted` or `Refused` (listener). Proofs are HMAC-SHA256 under the
//! cluster secret over the role and both ids and nonces (`crate::auth`).
//! Tested against itself over an in-memory stream.

use std::io;

use bytes::BytesMut;
use dhrt_proto::Handshake;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::auth::{self, Role, Transcript};
use crate::wire::{read_msg, write_msg};

/// Why the dialer's half failed.
#[derive(Debug)]
pub(crate) enum DialError {
    /// The stream broke.
    Io(io::Error),
    /// The listener refused, or could not prove the secret.
    Refused(String),
}

/// Who this side is and what it proves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Side<'a> {
    /// This node's id.
    pub(crate) id: u64,
    /// The cluster secret (empty when none is set).
    pub(crate) secret: &'a [u8],
    /// Largest frame accepted.
    pub(crate) max_frame: u32,
}

/// The dialer's half, after the preamble: the listener's id once both
/// sides have proved the secret. `buf` keeps what was read past the
/// handshake.
pub(crate) async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    me: Side<'_>,
) -> Result<u64, DialError> {
    let max = me.max_frame;
    let dialer_nonce = auth::nonce();
    let hello = Handshake::Hello {
        node: me.id,
        nonce: dialer_nonce,
    };
    write_msg(stream, &hello, max)
        .await
        .map_err(DialError::Io)?;
    let refused = |reason: &str| DialError::Refused(reason.to_string());
    let (listener, listener_nonce, proof) = match read_msg::<Handshake, _>(stream, buf, max).await {
        Ok(Some(Handshake::Challenge { node, nonce, proof })) => (node, nonce, proof),
        Ok(Some(Handshake::Refused { reason })) => return Err(refused(&reason)),
        Ok(_) => return Err(refused("no challenge")),
        Err(e) => return Err(DialError::Io(e)),
    };
    let t = Transcript {
        dialer: me.id,
        dialer_nonce,
        listener,
        listener_nonce,
    };
    if !auth::verify(me.secret, Role::Listener, &t, &proof) {
        return Err(refused("the peer does not know the cluster secret"));
    }
    let proof = auth::prove(me.secret, Role::Dialer, &t);
    write_msg(stream, &Handshake::Proof { proof }, max)
        .await
        .map_err(DialError::Io)?;
    match read_msg::<Handshake, _>(stream, buf, max).await {
        Ok(Some(Handshake::Accepted)) => Ok(listener),
        Ok(Some(Handshake::Refused { reason })) => Err(refused(&reason)),
        Ok(_) => Err(refused("handshake ended early")),
        Err(e) => Err(DialError::Io(e)),
    }
}

/// The listener's half, after the preamble: the dialer's id, or why it is
/// refused (the refusal is sent to the dialer too).
pub(crate) async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    me: Side<'_>,
) -> io::Result<Result<u64, String>> {
    let max = me.max_frame;
    let Some(Handshake::Hello { node, nonce }) = read_msg(stream, buf, max).await? else {
        return refuse(stream, max, "expected a hello".into()).await;
    };
    let t = Transcript {
        dialer: node,
        dialer_nonce: nonce,
        listener: me.id,
        listener_nonce: auth::nonce(),
    };
    let proof = auth::prove(me.secret, Role::Listener, &t);
    let challenge = Handshake::Challenge {
        node: t.listener,
        nonce: t.listener_nonce,
        proof,
    };
    write_msg(stream, &challenge, max).await?;
    let Some(Handshake::Proof { proof }) = read_msg(stream, buf, max).await? else {
        return refuse(stream, max, "expected a proof".into()).await;
    };
    if !auth::verify(me.secret, Role::Dialer, &t, &proof) {
        let reason = format!("node {node:016x} does not know the cluster secret");
        return refuse(stream, max, reason).await;
    }
    write_msg(stream, &Handshake::Accepted, max).await?;
    Ok(Ok(node))
}

async fn refuse<S: AsyncWrite + Unpin>(
    stream: &mut S,
    max: u32,
    reason: String,
) -> io::Result<Result<u64, String>> {
    let refused = Handshake::Refused {
        reason: reason.clone(),
    };
    // Best effort: the dialer may be gone already.
    let _ = write_msg(stream, &refused, max).await;
    Ok(Err(reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = 1 << 20;

    async fn run(
        dialer_secret: &[u8],
        listener_secret: &[u8],
    ) -> (Result<u64, DialError>, Result<u64, String>) {
        let (mut d, mut l) = tokio::io::duplex(4096);
        let dialer = Side {
            id: 1,
            secret: dialer_secret,
            max_frame: MAX,
        };
        let listener = Side {
            id: 2,
            secret: listener_secret,
            max_frame: MAX,
        };
        // Each side owns its end: a side that gives up closes it, as a
        // socket would.
        let dialing = async move {
            let mut buf = BytesMut::new();
            dial(&mut d, &mut buf, dialer).await
        };
        let accepting = async move {
            let mut buf = BytesMut::new();
            accept(&mut l, &mut buf, listener).await
        };
        let (dialed, accepted) = tokio::join!(dialing, accepting);
        (dialed, accepted.unwrap())
    }

    #[tokio::test]
    async fn the_same_secret_lets_both_sides_in_and_names_them() {
        let (dialed, accepted) = run(b"a long shared secret", b"a long shared secret").await;
        assert_eq!(dialed.unwrap(), 2);
        assert_eq!(accepted.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_wrong_secret_is_refused_by_the_dialer_first() {
        let (dialed, accepted) = run(b"one secret", b"another secret").await;
        let Err(DialError::Refused(why)) = dialed else {
            panic!("{dialed:?}")
        };
        assert!(why.contains("does not know the cluster secret"), "{why}");
        // The listener never got a proof.
        assert!(accepted.is_err());
    }

    #[tokio::test]
    async fn a_node_without_a_secret_and_one_with_refuse_each_other() {
        let (dialed, _) = run(b"", b"the secret").await;
        assert!(matches!(dialed, Err(DialError::Refused(_))));
        let (dialed, _) = run(b"the secret", b"").await;
        assert!(matches!(dialed, Err(DialError::Refused(_))));
    }

    #[tokio::test]
    async fn a_listener_refuses_a_dialer_that_proves_nothing() {
        let (mut d, mut l) = tokio::io::duplex(4096);
        let listener = Side {
            id: 2,
            secret: b"s",
            max_frame: MAX,
        };
        let mut lb = BytesMut::new();
        let stranger = async {
            let mut buf = BytesMut::new();
            let hello = Handshake::Hello {
                node: 9,
                nonce: [0; dhrt_proto::PROOF_LEN],
            };
            write_msg(&mut d, &hello, MAX).await.unwrap();
            let _: Option<Handshake> = read_msg(&mut d, &mut buf, MAX).await.unwrap();
            // A guessed proof.
            let proof = Handshake::Proof {
                proof: [7; dhrt_proto::PROOF_LEN],
            };
            write_msg(&mut d, &proof, MAX).await.unwrap();
            read_msg::<Handshake, _>(&mut d, &mut buf, MAX)
                .await
                .unwrap()
        };
        let (answer, accepted) = tokio::join!(stranger, accept(&mut l, &mut lb, listener));
        assert!(
            matches!(answer, Some(Handshake::Refused { .. })),
            "{answer:?}"
        );
        assert!(accepted.unwrap().unwrap_err().contains("0000000000000009"));
    }
}
