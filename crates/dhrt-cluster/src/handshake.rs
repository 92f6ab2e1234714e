//! The peer handshake, both halves: the dialer's ([`dial`]) and the
//! listener's ([`accept`]). In order: `Hello` (dialer: id, nonce), then
//! `Challenge` (listener: id, fresh nonce, no proof), then `Proof`
//! (dialer), then `Accepted` with the listener's proof, or `Refused`
//! (listener). The dialer proves first, so a stranger learns a node id and
//! a random nonce, nothing to test a guessed secret against; a recorded
//! `Proof` is worthless on another connection, where the listener's nonce
//! is new. Proofs are HMAC-SHA256 under the cluster secret over the role
//! and both ids and nonces (`crate::auth`); both sides leave with the
//! connection's [`Session`] keys (`crate::session`). Tested against itself
//! over an in-memory stream.

use std::io;

use bytes::BytesMut;
use dhrt_proto::Handshake;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::auth::{self, Role, Transcript};
use crate::session::{self, Proofs, Session};
use crate::wire::{read_msg, write_msg};

/// The largest handshake frame: before it has proved anything, a peer can
/// make this node buffer no more than this (a refusal's reason included).
const HANDSHAKE_MAX_FRAME: u32 = 4096;

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

/// The dialer's half, after the preamble: the listener's id and the
/// session, once both sides have proved the secret. `buf` keeps what was
/// read past the handshake.
pub(crate) async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    me: Side<'_>,
) -> Result<(u64, Session), DialError> {
    let max = me.max_frame.min(HANDSHAKE_MAX_FRAME);
    let dialer_nonce = auth::nonce();
    let hello = Handshake::Hello {
        node: me.id,
        nonce: dialer_nonce,
    };
    write_msg(stream, &hello, max)
        .await
        .map_err(DialError::Io)?;
    let refused = |reason: &str| DialError::Refused(reason.to_string());
    let (listener, listener_nonce) = match read_msg::<Handshake, _>(stream, buf, max).await {
        Ok(Some(Handshake::Challenge { node, nonce })) => (node, nonce),
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
    let dialer_proof = auth::prove(me.secret, Role::Dialer, &t);
    let proof = Handshake::Proof {
        proof: dialer_proof,
    };
    write_msg(stream, &proof, max)
        .await
        .map_err(DialError::Io)?;
    let listener_proof = match read_msg::<Handshake, _>(stream, buf, max).await {
        Ok(Some(Handshake::Accepted { proof })) => proof,
        Ok(Some(Handshake::Refused { reason })) => return Err(refused(&reason)),
        Ok(_) => return Err(refused("handshake ended early")),
        Err(e) => return Err(DialError::Io(e)),
    };
    if !auth::verify(me.secret, Role::Listener, &t, &listener_proof) {
        return Err(refused("the peer does not know the cluster secret"));
    }
    let proofs = Proofs {
        dialer: dialer_proof,
        listener: listener_proof,
    };
    Ok((
        listener,
        session::establish(me.secret, Role::Dialer, &t, &proofs),
    ))
}

/// The listener's half, after the preamble: the dialer's id and the
/// session, or why the dialer is refused (the refusal is sent to it too).
pub(crate) async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    me: Side<'_>,
) -> io::Result<Result<(u64, Session), String>> {
    let max = me.max_frame.min(HANDSHAKE_MAX_FRAME);
    let Some(Handshake::Hello { node, nonce }) = read_msg(stream, buf, max).await? else {
        return refuse(stream, max, "expected a hello".into()).await;
    };
    let t = Transcript {
        dialer: node,
        dialer_nonce: nonce,
        listener: me.id,
        listener_nonce: auth::nonce(),
    };
    let challenge = Handshake::Challenge {
        node: t.listener,
        nonce: t.listener_nonce,
    };
    write_msg(stream, &challenge, max).await?;
    let Some(Handshake::Proof { proof }) = read_msg(stream, buf, max).await? else {
        return refuse(stream, max, "expected a proof".into()).await;
    };
    if !auth::verify(me.secret, Role::Dialer, &t, &proof) {
        let reason = format!("node {node:016x} does not know the cluster secret");
        return refuse(stream, max, reason).await;
    }
    let proofs = Proofs {
        dialer: proof,
        listener: auth::prove(me.secret, Role::Listener, &t),
    };
    let accepted = Handshake::Accepted {
        proof: proofs.listener,
    };
    write_msg(stream, &accepted, max).await?;
    Ok(Ok((
        node,
        session::establish(me.secret, Role::Listener, &t, &proofs),
    )))
}

async fn refuse<S: AsyncWrite + Unpin>(
    stream: &mut S,
    max: u32,
    reason: String,
) -> io::Result<Result<(u64, Session), String>> {
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
    use dhrt_proto::PROOF_LEN;
    use tokio::io::{AsyncWriteExt, DuplexStream};

    const MAX: u32 = 1 << 20;
    const SECRET: &[u8] = b"a long shared secret";

    fn side(id: u64, secret: &[u8]) -> Side<'_> {
        Side {
            id,
            secret,
            max_frame: MAX,
        }
    }

    async fn run(
        dialer_secret: &[u8],
        listener_secret: &[u8],
    ) -> (
        Result<(u64, Session), DialError>,
        Result<(u64, Session), String>,
    ) {
        let (mut d, mut l) = tokio::io::duplex(4096);
        // Each side owns its end: a side that gives up closes it, as a
        // socket would.
        let dialing = async move {
            let mut buf = BytesMut::new();
            dial(&mut d, &mut buf, side(1, dialer_secret)).await
        };
        let accepting = async move {
            let mut buf = BytesMut::new();
            accept(&mut l, &mut buf, side(2, listener_secret)).await
        };
        let (dialed, accepted) = tokio::join!(dialing, accepting);
        (dialed, accepted.unwrap())
    }

    /// Plays a dialer by hand: sends `Hello`, returns the challenge.
    async fn hello(d: &mut DuplexStream, buf: &mut BytesMut, nonce: [u8; PROOF_LEN]) -> Handshake {
        let hello = Handshake::Hello { node: 9, nonce };
        write_msg(d, &hello, MAX).await.unwrap();
        read_msg(d, buf, MAX).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn the_same_secret_lets_both_sides_in_names_them_and_keys_them() {
        let (dialed, accepted) = run(SECRET, SECRET).await;
        let (listener, mut d) = dialed.unwrap();
        let (dialer, mut l) = accepted.unwrap();
        assert_eq!((listener, dialer), (2, 1));
        let mut frame = b"request".to_vec();
        d.sealer.seal(&mut frame, 0).unwrap();
        assert_eq!(l.opener.open(&mut frame).unwrap(), b"request");
        let mut frame = b"response".to_vec();
        l.sealer.seal(&mut frame, 0).unwrap();
        assert_eq!(d.opener.open(&mut frame).unwrap(), b"response");
    }

    #[tokio::test]
    async fn a_wrong_secret_is_refused_by_the_listener() {
        let (dialed, accepted) = run(b"one secret", b"another secret").await;
        let Err(DialError::Refused(why)) = dialed else {
            panic!("{dialed:?}")
        };
        // The listener's reason: it refused first.
        assert!(why.contains("node 0000000000000001 does not know"), "{why}");
        assert!(accepted.unwrap_err().contains("0000000000000001"));
    }

    #[tokio::test]
    async fn a_node_without_a_secret_and_one_with_refuse_each_other() {
        for (dialer, listener) in [(&b""[..], &b"the secret"[..]), (b"the secret", b"")] {
            let (dialed, accepted) = run(dialer, listener).await;
            assert!(matches!(dialed, Err(DialError::Refused(_))));
            assert!(accepted.is_err());
        }
    }

    #[tokio::test]
    async fn a_stranger_gets_a_challenge_without_a_proof_and_is_refused() {
        let (mut d, mut l) = tokio::io::duplex(4096);
        let stranger = async move {
            let mut buf = BytesMut::new();
            let challenge = hello(&mut d, &mut buf, [0; PROOF_LEN]).await;
            // A guessed proof.
            let proof = Handshake::Proof {
                proof: [7; PROOF_LEN],
            };
            write_msg(&mut d, &proof, MAX).await.unwrap();
            let mut after = Vec::new();
            while let Some(msg) = read_msg::<Handshake, _>(&mut d, &mut buf, MAX)
                .await
                .unwrap()
            {
                after.push(msg);
            }
            (challenge, after)
        };
        let accepting = async move {
            let mut buf = BytesMut::new();
            accept(&mut l, &mut buf, side(2, SECRET)).await
        };
        let ((challenge, after), accepted) = tokio::join!(stranger, accepting);
        // An id and a nonce: nothing to test a guessed secret against.
        assert!(
            matches!(challenge, Handshake::Challenge { node: 2, nonce } if nonce != [0; PROOF_LEN]),
            "{challenge:?}"
        );
        // Refused, and never a proof of the listener's.
        assert!(
            matches!(&after[..], [Handshake::Refused { .. }]),
            "{after:?}"
        );
        assert!(accepted.unwrap().unwrap_err().contains("0000000000000009"));
    }

    #[tokio::test]
    async fn a_recorded_proof_is_refused_on_a_new_connection() {
        let nonce = [5; PROOF_LEN];
        let mut recorded = None;
        for connection in 0..2 {
            let (mut d, mut l) = tokio::io::duplex(4096);
            let accepting = tokio::spawn(async move {
                let mut buf = BytesMut::new();
                accept(&mut l, &mut buf, side(2, SECRET))
                    .await
                    .unwrap()
                    .map(|(id, _)| id)
            });
            let mut buf = BytesMut::new();
            let Handshake::Challenge {
                node,
                nonce: listener_nonce,
            } = hello(&mut d, &mut buf, nonce).await
            else {
                panic!("no challenge")
            };
            // The first time a dialer that knows the secret proves it; the
            // second time its recorded proof is replayed.
            let proof = *recorded.get_or_insert_with(|| {
                let t = Transcript {
                    dialer: 9,
                    dialer_nonce: nonce,
                    listener: node,
                    listener_nonce,
                };
                auth::prove(SECRET, Role::Dialer, &t)
            });
            write_msg(&mut d, &Handshake::Proof { proof }, MAX)
                .await
                .unwrap();
            let answer: Handshake = read_msg(&mut d, &mut buf, MAX).await.unwrap().unwrap();
            let accepted = accepting.await.unwrap();
            if connection == 0 {
                assert!(matches!(answer, Handshake::Accepted { .. }), "{answer:?}");
                assert_eq!(accepted, Ok(9));
            } else {
                assert!(matches!(answer, Handshake::Refused { .. }), "{answer:?}");
                assert!(accepted.is_err());
            }
        }
    }

    #[tokio::test]
    async fn a_stranger_cannot_make_the_listener_buffer_a_large_frame() {
        let (mut d, mut l) = tokio::io::duplex(4096);
        // A length prefix past the handshake's limit, within the frame
        // limit: refused on the prefix alone.
        d.write_all(&(HANDSHAKE_MAX_FRAME + 1).to_le_bytes())
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        let accepted = accept(&mut l, &mut buf, side(2, SECRET)).await;
        assert_eq!(accepted.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_listener_that_cannot_prove_the_secret_is_refused_by_the_dialer() {
        let (mut d, mut l) = tokio::io::duplex(4096);
        // It accepts anyone, with a made-up proof.
        let impostor = async move {
            let mut buf = BytesMut::new();
            let _: Option<Handshake> = read_msg(&mut l, &mut buf, MAX).await.unwrap();
            let challenge = Handshake::Challenge {
                node: 2,
                nonce: [1; PROOF_LEN],
            };
            write_msg(&mut l, &challenge, MAX).await.unwrap();
            let _: Option<Handshake> = read_msg(&mut l, &mut buf, MAX).await.unwrap();
            let accepted = Handshake::Accepted {
                proof: [7; PROOF_LEN],
            };
            write_msg(&mut l, &accepted, MAX).await.unwrap();
        };
        let dialing = async move {
            let mut buf = BytesMut::new();
            dial(&mut d, &mut buf, side(1, SECRET)).await
        };
        let ((), dialed) = tokio::join!(impostor, dialing);
        let Err(DialError::Refused(why)) = dialed else {
            panic!("{dialed:?}")
        };
        assert!(why.contains("does not know the cluster secret"), "{why}");
    }
}
