//! The peer frames' cipher: ChaCha20-Poly1305 (RFC 8439) in place, behind
//! functions that are not generic. The RustCrypto cipher is generic code,
//! compiled in the crate that names its types: in `dhrt-cluster`, left at
//! opt-level 0 in debug builds, it ran at a few MiB/s, and the simulations
//! and end-to-end tests crawled. Here it is compiled once, in `dhrt-proto`,
//! which is optimized in every profile (see the workspace `Cargo.toml`).
//! Nonces and keys are the caller's business (`dhrt-cluster`'s `session`
//! module): this only seals and opens.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};

/// Length of a key.
pub const KEY_LEN: usize = 32;
/// Length of a nonce.
pub const NONCE_LEN: usize = 12;
/// Length of the tag a sealed message carries.
pub const TAG_LEN: usize = 16;

/// A message did not open: altered, truncated, or sealed under another key
/// or nonce. Nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenError;

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the message failed authentication")
    }
}

impl std::error::Error for OpenError {}

/// A ChaCha20-Poly1305 key, ready to seal and open.
pub struct Cipher(ChaCha20Poly1305);

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(..)")
    }
}

impl Cipher {
    /// The cipher under `key`.
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        Cipher(ChaCha20Poly1305::new(Key::from_slice(key)))
    }

    /// Encrypts `buf` in place under `nonce`; returns its tag. The caller
    /// never uses a nonce twice under one key.
    ///
    /// # Panics
    ///
    /// On a message over 256 GiB, which the cipher cannot count.
    pub fn seal(&self, nonce: &[u8; NONCE_LEN], buf: &mut [u8]) -> [u8; TAG_LEN] {
        self.0
            .encrypt_in_place_detached(Nonce::from_slice(nonce), b"", buf)
            .expect("a message under 256 GiB")
            .into()
    }

    /// Checks `tag` over `buf` and decrypts `buf` in place; on an error
    /// `buf` is unchanged.
    pub fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), OpenError> {
        self.0
            .decrypt_in_place_detached(Nonce::from_slice(nonce), b"", buf, Tag::from_slice(tag))
            .map_err(|_| OpenError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rfc_8439_test_vector() {
        // RFC 8439 section 2.8.2, without its associated data: the
        // ciphertext is the same, only the tag differs.
        let key: [u8; 32] = std::array::from_fn(|i| 0x80 + i as u8);
        let nonce = [
            0x07, 0, 0, 0, 0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47,
        ];
        let plain = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let mut buf = plain.to_vec();
        let cipher = Cipher::new(&key);
        let tag = cipher.seal(&nonce, &mut buf);
        assert_eq!(&buf[..8], &[0xd3, 0x1a, 0x8d, 0x34, 0x64, 0x8e, 0x60, 0xdb]);
        assert_eq!(cipher.open(&nonce, &mut buf, &tag), Ok(()));
        assert_eq!(&buf[..], &plain[..]);
    }

    #[test]
    fn an_altered_message_or_tag_does_not_open_and_is_left_alone() {
        let cipher = Cipher::new(&[1; KEY_LEN]);
        let nonce = [2; NONCE_LEN];
        let mut buf = b"frame".to_vec();
        let tag = cipher.seal(&nonce, &mut buf);
        let sealed = buf.clone();
        buf[0] ^= 1;
        let altered = buf.clone();
        assert_eq!(cipher.open(&nonce, &mut buf, &tag), Err(OpenError));
        assert_eq!(buf, altered);
        let mut buf = sealed.clone();
        let mut bad_tag = tag;
        bad_tag[15] ^= 1;
        assert_eq!(cipher.open(&nonce, &mut buf, &bad_tag), Err(OpenError));
        assert_eq!(cipher.open(&[3; NONCE_LEN], &mut buf, &tag), Err(OpenError));
        let other = Cipher::new(&[9; KEY_LEN]);
        assert_eq!(other.open(&nonce, &mut buf, &tag), Err(OpenError));
        assert_eq!(cipher.open(&nonce, &mut buf, &tag), Ok(()));
    }
}
