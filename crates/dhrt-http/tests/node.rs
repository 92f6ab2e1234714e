//! A node of one in-memory map: the test double the API is served over.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use dhrt_proto::{
    CollectionInfo, Entry, ErrorKind, MemberInfo, MemberState, NodeInfo, NodeStats, OpError,
    Operations, Page,
};

pub(crate) const MAX_VALUE: usize = 1 << 20;

#[derive(Default)]
pub(crate) struct MapNode {
    map: Mutex<BTreeMap<(String, Bytes), Bytes>>,
    /// Fail listings after this many pages (to test aborted streams).
    pub(crate) fail_list_after: Mutex<Option<usize>>,
    /// Answer gets through `get_now` too (as a real node does), not only
    /// through `get`.
    pub(crate) answers_now: AtomicBool,
    /// Gets answered through `get_now`.
    pub(crate) answered_now: AtomicUsize,
    /// Collections another node holds (writes to them through it that
    /// have not reached this one).
    pub(crate) elsewhere: Mutex<Vec<String>>,
    /// Times the other nodes were asked about a collection.
    pub(crate) probed: AtomicUsize,
}

fn check(collection: &str, key: &[u8]) -> Result<(), OpError> {
    let valid = !collection.is_empty()
        && collection.len() <= 64
        && collection
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(OpError::new(
            ErrorKind::InvalidInput,
            format!("invalid collection name {collection:?}"),
        ));
    }
    if key.is_empty() {
        return Err(OpError::new(ErrorKind::InvalidInput, "empty key"));
    }
    Ok(())
}

impl MapNode {
    fn map_len(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

fn k(collection: &str, key: &[u8]) -> (String, Bytes) {
    (collection.to_string(), Bytes::copy_from_slice(key))
}

impl Operations for MapNode {
    async fn get(&self, collection: &str, key: &[u8]) -> Result<Option<Bytes>, OpError> {
        check(collection, key)?;
        Ok(self.map.lock().unwrap().get(&k(collection, key)).cloned())
    }

    fn get_now(&self, collection: &str, key: &[u8]) -> Option<Result<Option<Bytes>, OpError>> {
        if !self.answers_now.load(Ordering::Relaxed) {
            return None;
        }
        self.answered_now.fetch_add(1, Ordering::Relaxed);
        Some(
            check(collection, key)
                .map(|()| self.map.lock().unwrap().get(&k(collection, key)).cloned()),
        )
    }

    async fn set(&self, collection: &str, key: &[u8], value: Bytes) -> Result<(), OpError> {
        check(collection, key)?;
        if value.len() > MAX_VALUE {
            return Err(OpError::new(ErrorKind::TooLarge, "value too large"));
        }
        self.map.lock().unwrap().insert(k(collection, key), value);
        Ok(())
    }

    async fn delete(&self, collection: &str, key: &[u8]) -> Result<bool, OpError> {
        check(collection, key)?;
        Ok(self
            .map
            .lock()
            .unwrap()
            .remove(&k(collection, key))
            .is_some())
    }

    async fn list(
        &self,
        collection: &str,
        after: Option<&[u8]>,
        limit: u32,
    ) -> Result<Page, OpError> {
        check(collection, b"-")?;
        {
            let mut fail = self.fail_list_after.lock().unwrap();
            if let Some(n) = fail.as_mut() {
                if *n == 0 {
                    return Err(OpError::new(ErrorKind::Unavailable, "listing failed"));
                }
                *n -= 1;
            }
        }
        let map = self.map.lock().unwrap();
        let mut entries: Vec<Entry> = map
            .iter()
            .filter(|((c, key), _)| c == collection && after.is_none_or(|a| &key[..] > a))
            .take(limit as usize + 1)
            .map(|((_, key), value)| Entry {
                key: key.clone(),
                value: value.clone(),
            })
            .collect();
        let more = entries.len() > limit as usize;
        entries.truncate(limit as usize);
        let next = if more {
            entries.last().map(|e| e.key.clone())
        } else {
            None
        };
        Ok(Page { entries, next })
    }

    fn has_collection(&self, name: &str) -> bool {
        self.map.lock().unwrap().keys().any(|(c, _)| c == name)
    }

    async fn has_collection_elsewhere(&self, name: &str) -> bool {
        self.probed.fetch_add(1, Ordering::Relaxed);
        self.elsewhere.lock().unwrap().iter().any(|c| c == name)
    }

    async fn drop_collection(&self, collection: &str) -> Result<dhrt_proto::Keys, OpError> {
        check(collection, b"-")?;
        let mut map = self.map.lock().unwrap();
        let keys: Vec<(String, Bytes)> = map
            .keys()
            .filter(|(c, _)| c == collection)
            .cloned()
            .collect();
        for key in &keys {
            map.remove(key);
        }
        Ok(keys
            .into_iter()
            .map(|(_, key)| key)
            .collect::<Vec<_>>()
            .into())
    }

    async fn metrics(&self) -> String {
        format!("map_entries {}\n", self.map_len())
    }

    async fn stats(&self) -> NodeStats {
        let map = self.map.lock().unwrap();
        let mut collections: BTreeMap<String, CollectionInfo> = BTreeMap::new();
        for ((c, _), v) in map.iter() {
            let e = collections.entry(c.clone()).or_insert(CollectionInfo {
                name: c.clone(),
                keys: 0,
                bytes: 0,
                digest: String::new(),
                replicas: "all".into(),
                owners: Vec::new(),
                under_replicated: false,
                moving: None,
            });
            e.keys += 1;
            e.bytes += v.len() as u64;
        }
        NodeStats {
            node: NodeInfo {
                id: "0000000000000001".into(),
                name: "map".into(),
                addr: "127.0.0.1:0".into(),
                version: "test".into(),
                mode: "memory".into(),
                data_dir: String::new(),
                uptime_s: 0,
            },
            collections: collections.into_values().collect(),
            members: vec![MemberInfo {
                id: "0000000000000001".into(),
                name: "map".into(),
                addr: "127.0.0.1:0".into(),
                state: MemberState::Healthy,
                clock_offset_ms: None,
            }],
            sync: None,
            clock: Default::default(),
            watch: Default::default(),
            disk: None,
        }
    }

    /// Only `flood` can be watched: an endless stream of 64 KiB sets, as
    /// fast as the client takes them.
    async fn watch(
        &self,
        request: dhrt_proto::WatchRequest,
    ) -> Result<Box<dyn dhrt_proto::EventSource>, OpError> {
        match request.collection.as_str() {
            "flood" => Ok(Box::new(Flood(0))),
            "slotted" => {
                SLOTS.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                Ok(Box::new(Slotted(Some(Slot))))
            }
            _ => Err(OpError::new(
                ErrorKind::Unavailable,
                "only flood and slotted are watched",
            )),
        }
    }
}

/// Places taken by `slotted` watches and not given back.
pub(crate) static SLOTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A `slotted` watch's place, given back on drop.
struct Slot;

impl Drop for Slot {
    fn drop(&mut self) {
        SLOTS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A watch with nothing to say, holding a place until handed over.
struct Slotted(Option<Slot>);

impl dhrt_proto::EventSource for Slotted {
    fn next_batch(
        &mut self,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Vec<dhrt_proto::WatchEvent>, OpError>>
                + Send
                + '_,
        >,
    > {
        Box::pin(std::future::pending())
    }

    fn token(&self) -> dhrt_proto::Token {
        dhrt_proto::Token { history: 1, seq: 0 }
    }

    fn take_slot(&mut self) -> Option<Box<dyn Send + Sync>> {
        Some(Box::new(self.0.take()?))
    }
}

/// The events of the `flood` watch.
struct Flood(u64);

impl dhrt_proto::EventSource for Flood {
    fn next_batch(
        &mut self,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Vec<dhrt_proto::WatchEvent>, OpError>>
                + Send
                + '_,
        >,
    > {
        Box::pin(async move {
            let events = (0..16)
                .map(|_| {
                    self.0 += 1;
                    dhrt_proto::WatchEvent {
                        kind: dhrt_proto::EventKind::Set,
                        key: Bytes::from(format!("k{}", self.0)),
                        value: Some(Bytes::from(vec![b'x'; 64 << 10])),
                        version: Some(dhrt_proto::Stamp {
                            ts: self.0,
                            node: 1,
                        }),
                        token: Some(self.token()),
                    }
                })
                .collect();
            Ok(events)
        })
    }

    fn token(&self) -> dhrt_proto::Token {
        dhrt_proto::Token {
            history: 1,
            seq: self.0,
        }
    }
}
