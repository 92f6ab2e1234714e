//! The sealed session of a peer connection, pure (no I/O; `wire.rs`
//! frames, reads and writes): two keys, one per direction, and
//! ChaCha20-Poly1305 under them (`dhrt_proto::seal`, built optimized even in
//! debug builds).
//!
//! Rules:
//! - Each direction's key is HKDF-SHA256 with the cluster secret as input
//!   key material (empty when none is set: the same code path), a salt
//!   that binds the whole handshake (a label, the dialer's id and nonce,
//!   the listener's id and nonce, the dialer's proof, the listener's
//!   proof), and the direction as info. So the keys are new on every
//!   connection, and the two directions never share one.
//! - The n-th frame a side seals (n from 0) uses the nonce `0u32 LE ||
//!   n u64 LE`; the opener expects the same n. A replayed, reordered,
//!   dropped or altered frame fails to open, and the connection closes:
//!   a failure is final, nothing from the frame is used.
//! - A counter never wraps: the frame that would need it is refused, and
//!   the connection closes.
//! - With no secret the keys are derived from public bytes alone: frames
//!   are checked against corruption, not against an attacker. That is why
//!   a node without a secret serves peers on loopback only.

use dhrt_proto::PROOF_LEN;
use dhrt_proto::seal::{Cipher, NONCE_LEN};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::auth::{Role, Transcript};

/// Bytes a sealed frame adds: the Poly1305 tag.
pub(crate) const TAG_LEN: usize = dhrt_proto::seal::TAG_LEN;

const SALT_LABEL: &[u8] = b"dhrt-peer-session-v2";
const DIALER_TO_LISTENER: &[u8] = b"dhrt-peer dialer to listener";
const LISTENER_TO_DIALER: &[u8] = b"dhrt-peer listener to dialer";

/// Why a frame could not be sealed or opened. Either way the connection
/// must close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SessionError {
    /// Tampered, replayed, reordered, truncated, or sealed under another
    /// key.
    #[error("a sealed frame failed to open (altered, replayed, reordered or under another key)")]
    Open,
    /// The frame counter of this direction is used up.
    #[error("the frame counter is used up")]
    Exhausted,
}

/// Both proofs of a handshake, bound into the keys with the transcript.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Proofs {
    pub(crate) dialer: [u8; PROOF_LEN],
    pub(crate) listener: [u8; PROOF_LEN],
}

/// One direction's cipher and frame counter.
struct Direction {
    cipher: Cipher,
    next: u64,
}

impl Direction {
    fn new(key: &[u8; 32]) -> Self {
        Direction {
            cipher: Cipher::new(key),
            next: 0,
        }
    }

    /// The nonce of the next frame; the counter moves only once that
    /// frame is sealed or opened.
    fn nonce(&self) -> Result<[u8; NONCE_LEN], SessionError> {
        if self.next == u64::MAX {
            return Err(SessionError::Exhausted);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce[4..].copy_from_slice(&self.next.to_le_bytes());
        Ok(nonce)
    }
}

/// Seals the frames this side sends.
pub(crate) struct Sealer(Direction);

/// Opens the frames this side receives.
pub(crate) struct Opener(Direction);

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("next", &self.0.next)
            .finish()
    }
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("next", &self.0.next)
            .finish()
    }
}

impl Sealer {
    /// Encrypts `buf[start..]` in place and appends its tag.
    pub(crate) fn seal(&mut self, buf: &mut Vec<u8>, start: usize) -> Result<(), SessionError> {
        let nonce = self.0.nonce()?;
        let tag = self.0.cipher.seal(&nonce, &mut buf[start..]);
        buf.extend_from_slice(&tag);
        self.0.next += 1;
        Ok(())
    }
}

impl Opener {
    /// Checks and decrypts `sealed` (ciphertext then tag) in place; the
    /// plaintext is the returned front of it.
    pub(crate) fn open<'a>(&mut self, sealed: &'a mut [u8]) -> Result<&'a [u8], SessionError> {
        let nonce = self.0.nonce()?;
        let Some(body_len) = sealed.len().checked_sub(TAG_LEN) else {
            return Err(SessionError::Open);
        };
        let (body, tag) = sealed.split_at_mut(body_len);
        let tag = (&*tag).try_into().expect("split at the tag's length");
        self.0
            .cipher
            .open(&nonce, body, tag)
            .map_err(|_| SessionError::Open)?;
        self.0.next += 1;
        Ok(body)
    }
}

/// One side's half of a session.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) sealer: Sealer,
    pub(crate) opener: Opener,
}

/// The session of side `role` after the handshake `t` with `proofs`.
pub(crate) fn establish(secret: &[u8], role: Role, t: &Transcript, proofs: &Proofs) -> Session {
    let mut salt = Vec::with_capacity(SALT_LABEL.len() + 16 + 4 * PROOF_LEN);
    salt.extend_from_slice(SALT_LABEL);
    salt.extend_from_slice(&t.dialer.to_le_bytes());
    salt.extend_from_slice(&t.dialer_nonce);
    salt.extend_from_slice(&t.listener.to_le_bytes());
    salt.extend_from_slice(&t.listener_nonce);
    salt.extend_from_slice(&proofs.dialer);
    salt.extend_from_slice(&proofs.listener);
    let hkdf = Hkdf::<Sha256>::new(Some(&salt), secret);
    let key = |info: &[u8]| {
        let mut key = [0u8; 32];
        hkdf.expand(info, &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 length");
        Direction::new(&key)
    };
    let (to_listener, to_dialer) = (key(DIALER_TO_LISTENER), key(LISTENER_TO_DIALER));
    match role {
        Role::Dialer => Session {
            sealer: Sealer(to_listener),
            opener: Opener(to_dialer),
        },
        Role::Listener => Session {
            sealer: Sealer(to_dialer),
            opener: Opener(to_listener),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"a cluster secret of at least 32 bytes";

    fn transcript() -> Transcript {
        Transcript {
            dialer: 1,
            dialer_nonce: [1; PROOF_LEN],
            listener: 2,
            listener_nonce: [2; PROOF_LEN],
        }
    }

    const PROOFS: Proofs = Proofs {
        dialer: [3; PROOF_LEN],
        listener: [4; PROOF_LEN],
    };

    fn pair(secret: &[u8]) -> (Session, Session) {
        let t = transcript();
        (
            establish(secret, Role::Dialer, &t, &PROOFS),
            establish(secret, Role::Listener, &t, &PROOFS),
        )
    }

    fn sealed(s: &mut Sealer, plain: &[u8]) -> Vec<u8> {
        let mut buf = plain.to_vec();
        s.seal(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn frames_round_trip_both_ways_and_grow_by_the_tag() {
        let (mut d, mut l) = pair(SECRET);
        for i in 0..3u8 {
            let plain = vec![i; 100 + i as usize];
            let mut frame = sealed(&mut d.sealer, &plain);
            assert_eq!(frame.len(), plain.len() + TAG_LEN);
            assert_ne!(&frame[..plain.len()], &plain[..], "encrypted");
            assert_eq!(l.opener.open(&mut frame).unwrap(), &plain[..]);
            let mut back = sealed(&mut l.sealer, &plain);
            assert_eq!(d.opener.open(&mut back).unwrap(), &plain[..]);
        }
        // Sealing appends after what the buffer already holds.
        let mut buf = b"head".to_vec();
        buf.extend_from_slice(b"body");
        d.sealer.seal(&mut buf, 4).unwrap();
        assert_eq!(&buf[..4], b"head");
        assert_eq!(l.opener.open(&mut buf[4..]).unwrap(), b"body");
        // An empty payload is sealed too.
        let mut empty = sealed(&mut d.sealer, b"");
        assert_eq!(l.opener.open(&mut empty).unwrap(), b"");
    }

    #[test]
    fn any_altered_byte_fails_to_open() {
        let plain = b"PeerMessage::Request { id: 7, op: Apply }";
        let frame = {
            let (mut d, _) = pair(SECRET);
            sealed(&mut d.sealer, plain)
        };
        for at in 0..frame.len() {
            let mut bad = frame.clone();
            bad[at] ^= 0x01;
            let (_, mut l) = pair(SECRET);
            assert_eq!(l.opener.open(&mut bad), Err(SessionError::Open), "{at}");
        }
        // Truncated, or shorter than a tag.
        for len in [0, TAG_LEN - 1, TAG_LEN, frame.len() - 1] {
            let (_, mut l) = pair(SECRET);
            let mut short = frame[..len].to_vec();
            assert_eq!(l.opener.open(&mut short), Err(SessionError::Open), "{len}");
        }
        let (_, mut l) = pair(SECRET);
        assert!(l.opener.open(&mut frame.clone()).is_ok());
    }

    #[test]
    fn replayed_reordered_and_dropped_frames_fail() {
        let (mut d, mut l) = pair(SECRET);
        let first = sealed(&mut d.sealer, b"first");
        let second = sealed(&mut d.sealer, b"second");
        // Reordered: the second arrives first.
        assert_eq!(l.opener.open(&mut second.clone()), Err(SessionError::Open));
        assert_eq!(l.opener.open(&mut first.clone()).unwrap(), b"first");
        // Replayed.
        assert_eq!(l.opener.open(&mut first.clone()), Err(SessionError::Open));
        assert_eq!(l.opener.open(&mut second.clone()).unwrap(), b"second");
        // Dropped: the third is skipped, the fourth does not open.
        let _third = sealed(&mut d.sealer, b"third");
        let mut fourth = sealed(&mut d.sealer, b"fourth");
        assert_eq!(l.opener.open(&mut fourth), Err(SessionError::Open));
    }

    #[test]
    fn another_secret_or_handshake_gives_other_keys() {
        let (mut d, _) = pair(SECRET);
        let frame = sealed(&mut d.sealer, b"hello");
        let (_, mut wrong) = pair(b"another secret entirely, 32 bytes+");
        assert_eq!(
            wrong.opener.open(&mut frame.clone()),
            Err(SessionError::Open)
        );
        let (_, mut empty) = pair(b"");
        assert_eq!(
            empty.opener.open(&mut frame.clone()),
            Err(SessionError::Open)
        );
        // Same secret, another connection (the listener's nonce differs).
        let t = Transcript {
            listener_nonce: [9; PROOF_LEN],
            ..transcript()
        };
        let mut other = establish(SECRET, Role::Listener, &t, &PROOFS);
        assert_eq!(
            other.opener.open(&mut frame.clone()),
            Err(SessionError::Open)
        );
        // Same nonces, other proofs.
        let proofs = Proofs {
            listener: [5; PROOF_LEN],
            ..PROOFS
        };
        let mut other = establish(SECRET, Role::Listener, &transcript(), &proofs);
        assert_eq!(
            other.opener.open(&mut frame.clone()),
            Err(SessionError::Open)
        );
    }

    #[test]
    fn the_two_directions_have_different_keys() {
        let (mut d, mut l) = pair(SECRET);
        // Same plaintext, same counter, two directions: two ciphertexts.
        let a = sealed(&mut d.sealer, b"same");
        let b = sealed(&mut l.sealer, b"same");
        assert_ne!(a, b);
        // A frame reflected back at its sender does not open.
        assert_eq!(d.opener.open(&mut a.clone()), Err(SessionError::Open));
        assert!(l.opener.open(&mut a.clone()).is_ok());
        assert!(d.opener.open(&mut b.clone()).is_ok());
    }

    #[test]
    fn the_no_secret_session_takes_the_same_path() {
        let (mut d, mut l) = pair(b"");
        let mut frame = sealed(&mut d.sealer, b"loopback");
        assert_eq!(l.opener.open(&mut frame).unwrap(), b"loopback");
    }

    #[test]
    fn a_counter_never_wraps() {
        let (mut d, mut l) = pair(SECRET);
        d.sealer.0.next = u64::MAX - 1;
        l.opener.0.next = u64::MAX - 1;
        let mut last = sealed(&mut d.sealer, b"last");
        assert_eq!(l.opener.open(&mut last).unwrap(), b"last");
        let mut buf = b"one more".to_vec();
        assert_eq!(d.sealer.seal(&mut buf, 0), Err(SessionError::Exhausted));
        assert_eq!(buf, b"one more", "nothing sealed");
        assert_eq!(l.opener.open(&mut last), Err(SessionError::Exhausted));
    }
}

/// What sealing and opening cost: `cargo test -p dhrt-cluster --release
/// --lib session::cost -- --ignored --nocapture`.
#[cfg(test)]
mod cost {
    use std::time::Instant;

    use super::*;

    #[test]
    #[ignore = "a measurement, not a check"]
    fn seal_and_open_per_frame() {
        let t = Transcript {
            dialer: 1,
            dialer_nonce: [1; PROOF_LEN],
            listener: 2,
            listener_nonce: [2; PROOF_LEN],
        };
        let proofs = Proofs {
            dialer: [3; PROOF_LEN],
            listener: [4; PROOF_LEN],
        };
        for (size, rounds) in [(100usize, 200_000u32), (1 << 20, 200)] {
            let mut d = establish(b"secret", Role::Dialer, &t, &proofs);
            let mut l = establish(b"secret", Role::Listener, &t, &proofs);
            let payload = vec![7u8; size];
            let mut buf = Vec::with_capacity(size + TAG_LEN);
            let started = Instant::now();
            for _ in 0..rounds {
                buf.clear();
                buf.extend_from_slice(&payload);
                d.sealer.seal(&mut buf, 0).unwrap();
                l.opener.open(&mut buf).unwrap();
            }
            let per = started.elapsed() / rounds;
            let rate = (size as f64) / per.as_secs_f64() / (1 << 20) as f64;
            println!("{size} B: seal + open {per:?} per frame ({rate:.0} MiB/s)");
        }
    }
}
