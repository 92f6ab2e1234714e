//! A watch of this node's log that ends when this node stops storing its
//! collection.
//!
//! Writes of a collection reach the nodes that store it: its owners, or,
//! while none is alive, the node that takes the write. When that changes
//! (a join or a leave moves the collection, its replication factor
//! changes, an owner comes back), new writes go elsewhere, and a watch of
//! the local log would go silent without saying so. [`WhileStored`] checks
//! every [`CHECK_EVERY`] and ends the watch with a sentence instead: the
//! client resumes from its last token (on another node that token is
//! `Gone`, and the client takes a snapshot), never a silent gap.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use dhrt_proto::{ErrorKind, EventSource, OpError, Token, WatchEvent};
use tokio::time::Instant;

/// How often a watch asks whether this node still stores its collection.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Whether this node stores a collection now.
pub(crate) type Stored = Box<dyn Fn() -> bool + Send + Sync>;

/// A local watch that ends once `stored` says no.
pub(crate) struct WhileStored {
    inner: Box<dyn EventSource>,
    stored: Stored,
    collection: String,
    next_check: Instant,
}

impl WhileStored {
    pub(crate) fn boxed(
        inner: Box<dyn EventSource>,
        collection: String,
        stored: Stored,
    ) -> Box<dyn EventSource> {
        Box::new(WhileStored {
            inner,
            stored,
            collection,
            next_check: Instant::now() + CHECK_EVERY,
        })
    }

    fn moved(&self) -> OpError {
        OpError::new(
            ErrorKind::Unavailable,
            format!(
                "this node no longer stores collection {:?} (its owners changed, or an owner is back) and its changes go to other nodes now: resume from the last token you received (another node answers that token with 410: then take a snapshot)",
                self.collection
            ),
        )
    }

    async fn next(&mut self) -> Result<Vec<WatchEvent>, OpError> {
        loop {
            if Instant::now() >= self.next_check {
                if !(self.stored)() {
                    return Err(self.moved());
                }
                self.next_check = Instant::now() + CHECK_EVERY;
            }
            tokio::select! {
                biased;
                batch = self.inner.next_batch() => return batch,
                () = tokio::time::sleep_until(self.next_check) => {}
            }
        }
    }
}

impl EventSource for WhileStored {
    fn next_batch(
        &mut self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<WatchEvent>, OpError>> + Send + '_>> {
        Box::pin(self.next())
    }

    fn token(&self) -> Token {
        self.inner.token()
    }

    fn ended(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.ended()
    }

    fn take_slot(&mut self) -> Option<Box<dyn Send + Sync>> {
        self.inner.take_slot()
    }
}
