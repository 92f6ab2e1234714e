//! `dhrt-proto`: the wire types of dhrt's binary protocol, its frame codec,
//! and the [`Operations`] trait a node implements. No I/O: everything here
//! works on byte slices and values, so it is tested (and fuzzed) alone.
//!
//! A binary connection starts with an 8-byte [`preamble`], then carries
//! frames: a little-endian `u32` length and that many bytes of bincode. The
//! client sends [`Request`]s, each with an id; the node answers each with a
//! [`Response`] carrying the same id, so requests may be pipelined. The full
//! specification is `docs/protocol.md`.
//!
//! ```
//! use dhrt_proto::{Decoded, Op, Request, decode_frame, encode_frame, DEFAULT_MAX_FRAME};
//!
//! let request = Request { id: 7, op: Op::Get { collection: "default".into(), key: "k".into() } };
//! let mut wire = Vec::new();
//! encode_frame(&request, &mut wire, DEFAULT_MAX_FRAME).unwrap();
//! match decode_frame::<Request>(&wire, DEFAULT_MAX_FRAME).unwrap() {
//!     Decoded::Complete { msg, len } => assert_eq!((msg, len), (request, wire.len())),
//!     Decoded::Incomplete { .. } => unreachable!(),
//! }
//! ```

#![forbid(unsafe_code)]

pub mod auth;
mod beside;
mod codec;
mod error;
mod frame;
pub mod inflight;
mod keys;
mod message;
mod ops;
mod peer;
pub mod seal;
mod stats;
mod watch;

pub use auth::{Access, Proven, Role, Standing};
pub use beside::{Beside, Either, Run};
pub use codec::{decode, encode, request_id};
pub use error::ProtoError;
pub use frame::{
    Channel, DEFAULT_MAX_FRAME, Decoded, FRAME_HEADER_LEN, MAGIC, PEER_PROTOCOL_VERSION,
    PREAMBLE_LEN, PROTOCOL_VERSION, Preamble, SHARE_AT_LEAST, channel_preamble, decode_frame,
    encode_frame, encode_frame_shared, frame_bounds, preamble, read_preamble,
};
pub use inflight::{Held, Inflight, Reserved, UNCOUNTED};
pub use keys::Keys;
pub use message::{
    Entry, ErrorKind, Op, OpError, OpRef, Page, ReplicasInfo, Reply, Request, RequestRef, Response,
};
pub use ops::{MAX_PAGE, MAX_PAGE_BYTES, Operations, dispatch, dispatch_ref};
pub use peer::{
    BucketCursor, CollectionDigest, Gossip, GossipKind, Handshake, Liveness, MAX_APPLY,
    MAX_MEMBER_COLLECTIONS, MAX_MEMBER_FIELD, MemberUpdate, Mutation, PROOF_LEN, PeerMessage,
    PeerOp, PeerReply, Stamp, Versioned,
};
pub use stats::{
    ClockInfo, CollectionInfo, DiskInfo, MemberInfo, MemberState, MoveInfo, NodeInfo, NodeStats,
    SyncInfo, WatchInfo,
};
pub use watch::{
    ENDED_QUIET, EventKind, EventSource, Token, WatchEvent, WatchRequest, WatchStart, ended_unread,
    version_hex,
};
