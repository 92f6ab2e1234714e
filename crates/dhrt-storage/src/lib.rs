//! `dhrt-storage`: dhrt's embeddable local key/value engine.
//!
//! A [`Store`] is a data directory of named collections. Each collection is
//! one append-only log file (`<name>.dhrt`, format in `docs/format.md`) read
//! through a shared memory map, with an in-memory index — a key-hash-sharded
//! set of small sorted arrays — from key to the newest record. A
//! get is one index lookup and one read from the map; a set is one copy into
//! the map (into space reserved ahead with `fallocate`; `pwrite` where that
//! is impossible) and one index insert. Every record carries a CRC32C and a [`Version`];
//! [`Store::apply`] keeps whichever version is greater, which is what lets
//! replicas converge. Memory mode ([`Store::memory`]) runs the same code over
//! anonymous in-memory files.
//!
//! This crate knows nothing about the network.

#![deny(unsafe_code)]

mod collection;
mod compact;
mod disk;
mod error;
mod feed;
mod header;
mod index;
// `KeyRef`: one cast of a byte slice to a transparent wrapper; long keys'
// bytes behind a raw pointer.
#[allow(unsafe_code)]
mod key;
mod key_list;
mod locate;
mod log;
mod migrate;
// Maps, `fallocate`, `memfd_create`, `flock`: the engine's system calls.
#[allow(unsafe_code)]
mod mmap;
mod name;
mod options;
mod record;
mod recover;
mod scan;
// Index shards: sorted arrays replaced whole, retired through the epoch.
#[allow(unsafe_code)]
mod shard;
mod store;
mod verify;
mod version;
mod watermark;

pub use bytes::Bytes;
pub use compact::{CompactionReport, LOCKED_CATCH_UP_BYTES};
pub use error::{Error, Result};
pub use feed::{Change, ChangeKind, EVENT_OVERHEAD, Position, Watch, WatchEvent, WatchFrom};
pub use index::{DIGEST_BITS, DIGEST_BUCKETS, digest_bucket, order_hash};
pub use key_list::KeyList;
pub use name::{MAX_COLLECTION_NAME_LEN, validate_collection_name};
pub use options::{Options, SyncMode};
pub use record::MAX_KEY_LEN;
pub use scan::{Listing, NewestFirst, Record, Records, Scan};
pub use store::{CollectionStats, Digest, RecoveryReport, Stats, Store};
pub use version::{Clock, LOGICAL_BITS, Replicated, Version, wall_ms};
