//! The peer handshake's proofs: HMAC-SHA256 under the cluster secret over
//! the role, both nonces and both node ids. Each side proves it knows the
//! secret without sending it; fresh nonces on both sides make a recorded
//! proof useless on another connection. With no secret configured the key
//! is empty, so a node with a secret and one without refuse each other.

use dhrt_proto::PROOF_LEN;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Which side a proof is for, so one side's proof is never valid as the
/// other's.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Role {
    Listener,
    Dialer,
}

/// What both sides know once nonces are exchanged.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transcript {
    pub(crate) dialer: u64,
    pub(crate) dialer_nonce: [u8; PROOF_LEN],
    pub(crate) listener: u64,
    pub(crate) listener_nonce: [u8; PROOF_LEN],
}

fn mac(secret: &[u8], role: Role, t: &Transcript) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(match role {
        Role::Listener => b"dhrt-peer-listener",
        Role::Dialer => b"dhrt-peer-dialer\0\0",
    });
    mac.update(&t.dialer.to_le_bytes());
    mac.update(&t.dialer_nonce);
    mac.update(&t.listener.to_le_bytes());
    mac.update(&t.listener_nonce);
    mac
}

/// The proof `role` sends.
pub(crate) fn prove(secret: &[u8], role: Role, t: &Transcript) -> [u8; PROOF_LEN] {
    mac(secret, role, t).finalize().into_bytes().into()
}

/// Whether `proof` is `role`'s proof; compared in constant time.
pub(crate) fn verify(secret: &[u8], role: Role, t: &Transcript, proof: &[u8; PROOF_LEN]) -> bool {
    mac(secret, role, t).verify_slice(proof).is_ok()
}

/// A fresh nonce from the operating system's generator.
pub(crate) fn nonce() -> [u8; PROOF_LEN] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript() -> Transcript {
        Transcript {
            dialer: 1,
            dialer_nonce: [1; PROOF_LEN],
            listener: 2,
            listener_nonce: [2; PROOF_LEN],
        }
    }

    #[test]
    fn proofs_need_the_secret_the_role_and_the_nonces() {
        let t = transcript();
        let p = prove(b"s3cret", Role::Dialer, &t);
        assert!(verify(b"s3cret", Role::Dialer, &t, &p));
        assert!(!verify(b"other", Role::Dialer, &t, &p));
        assert!(!verify(b"", Role::Dialer, &t, &p));
        assert!(!verify(b"s3cret", Role::Listener, &t, &p));
        let replay = Transcript {
            listener_nonce: [3; PROOF_LEN],
            ..t
        };
        assert!(!verify(b"s3cret", Role::Dialer, &replay, &p));
    }
}
