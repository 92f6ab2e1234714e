//! `dhrt-client`: an async client of dhrt's binary protocol
//! (`docs/protocol.md`). One [`Client`] is one connection; clone it freely:
//! every clone shares the connection, and requests from all of them are
//! pipelined (many in flight at once, answered by id).
//!
//! ```no_run
//! # async fn demo() -> Result<(), dhrt_client::Error> {
//! let client = dhrt_client::Client::connect("127.0.0.1:7453").await?;
//! client.set("users", "ada", "lovelace").await?;
//! assert_eq!(client.get("users", "ada").await?.as_deref(), Some(&b"lovelace"[..]));
//! assert!(client.delete("users", "ada").await?);
//! let stats = client.stats().await?;
//! println!("{} keys in {} collections", stats.collections.iter().map(|c| c.keys).sum::<u64>(), stats.collections.len());
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

mod connection;
mod error;
mod tls;
mod watch;

pub use connection::{Client, ClientBuilder};
pub use dhrt_proto::{
    Entry, EventKind, NodeStats, Page, ReplicasInfo, Role, Token, WatchEvent, WatchStart,
    version_hex,
};
pub use error::Error;
pub use watch::{Watch, WatchItem};
