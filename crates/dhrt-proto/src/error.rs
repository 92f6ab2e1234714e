//! Protocol errors.

/// What can be wrong with bytes on the wire. Decoding never changes any
/// state; a connection that sees any of these should answer (if it can) and
/// close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The connection does not start with the dhrt preamble.
    #[error("not a dhrt binary connection (bad magic)")]
    BadMagic,
    /// The peer speaks a protocol version this build does not.
    #[error(
        "unsupported protocol version {0} (this build speaks {client} to clients, {peer} to peers)",
        client = crate::PROTOCOL_VERSION,
        peer = crate::PEER_PROTOCOL_VERSION
    )]
    UnsupportedVersion(u16),
    /// A frame's length prefix exceeds the maximum frame size.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// The length the prefix claims.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// A frame's payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
}
