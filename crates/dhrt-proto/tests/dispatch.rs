//! `dispatch` maps each operation onto the `Operations` trait.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use dhrt_proto::{
    Entry, ErrorKind, MAX_PAGE, MemberInfo, NodeInfo, NodeStats, Op, OpError, Operations, Page,
    Reply, dispatch,
};

/// A node of one in-memory map, enough to drive `dispatch`.
#[derive(Default)]
struct MapNode(Mutex<BTreeMap<(String, Bytes), Bytes>>);

impl Operations for MapNode {
    async fn get(&self, collection: &str, key: &[u8]) -> Result<Option<Bytes>, OpError> {
        Ok(self
            .0
            .lock()
            .unwrap()
            .get(&(collection.to_string(), Bytes::copy_from_slice(key)))
            .cloned())
    }
    async fn set(&self, collection: &str, key: &[u8], value: Bytes) -> Result<(), OpError> {
        if key.is_empty() {
            return Err(OpError::new(ErrorKind::InvalidInput, "empty key"));
        }
        self.0
            .lock()
            .unwrap()
            .insert((collection.to_string(), Bytes::copy_from_slice(key)), value);
        Ok(())
    }
    async fn delete(&self, collection: &str, key: &[u8]) -> Result<bool, OpError> {
        Ok(self
            .0
            .lock()
            .unwrap()
            .remove(&(collection.to_string(), Bytes::copy_from_slice(key)))
            .is_some())
    }
    async fn list(
        &self,
        collection: &str,
        after: Option<&[u8]>,
        limit: u32,
    ) -> Result<Page, OpError> {
        let map = self.0.lock().unwrap();
        let entries: Vec<Entry> = map
            .iter()
            .filter(|((c, k), _)| c == collection && after.is_none_or(|a| &k[..] > a))
            .take(limit as usize)
            .map(|((_, k), v)| Entry {
                key: k.clone(),
                value: v.clone(),
            })
            .collect();
        let next = (entries.len() == limit as usize).then(|| entries.last().unwrap().key.clone());
        Ok(Page { entries, next })
    }
    fn has_collection(&self, name: &str) -> bool {
        self.0.lock().unwrap().keys().any(|(c, _)| c == name)
    }
    async fn drop_collection(&self, collection: &str) -> Result<dhrt_proto::Keys, OpError> {
        let mut map = self.0.lock().unwrap();
        let keys: Vec<(String, Bytes)> = map
            .keys()
            .filter(|(c, _)| c == collection)
            .cloned()
            .collect();
        for k in &keys {
            map.remove(k);
        }
        Ok(keys.into_iter().map(|(_, k)| k).collect::<Vec<_>>().into())
    }
    async fn metrics(&self) -> String {
        format!("map_entries {}\n", self.map_len())
    }

    async fn stats(&self) -> NodeStats {
        NodeStats {
            node: NodeInfo {
                id: "0".into(),
                name: "map".into(),
                addr: "-".into(),
                version: "0".into(),
                mode: "memory".into(),
                data_dir: String::new(),
                uptime_s: 0,
            },
            collections: Vec::new(),
            members: Vec::<MemberInfo>::new(),
            sync: None,
            clock: Default::default(),
            watch: Default::default(),
            disk: None,
        }
    }
}

impl MapNode {
    fn map_len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// Polls a future that completes without waiting (the map node never waits).
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the map node never waits"),
    }
}

fn run(node: &MapNode, op: Op) -> Result<Reply, OpError> {
    ready(dispatch(node, op))
}

#[test]
fn each_operation_reaches_the_node() {
    let node = MapNode::default();
    let c = || "c".to_string();
    assert_eq!(run(&node, Op::Ping), Ok(Reply::Pong));
    for i in 0..(MAX_PAGE + 5) {
        let key = Bytes::from(format!("k{i:06}"));
        assert_eq!(
            run(
                &node,
                Op::Set {
                    collection: c(),
                    key,
                    value: Bytes::from_static(b"v")
                }
            ),
            Ok(Reply::Stored)
        );
    }
    assert_eq!(
        run(
            &node,
            Op::Get {
                collection: c(),
                key: Bytes::from_static(b"k000001")
            }
        ),
        Ok(Reply::Value(Some(Bytes::from_static(b"v"))))
    );
    assert_eq!(
        run(
            &node,
            Op::Delete {
                collection: c(),
                key: Bytes::from_static(b"k000001")
            }
        ),
        Ok(Reply::Deleted(true))
    );
    assert_eq!(
        run(
            &node,
            Op::Get {
                collection: c(),
                key: Bytes::from_static(b"k000001")
            }
        ),
        Ok(Reply::Value(None))
    );
    // A page never exceeds MAX_PAGE, whatever the request asks.
    let Ok(Reply::Page(page)) = run(
        &node,
        Op::List {
            collection: c(),
            after: None,
            limit: u32::MAX,
        },
    ) else {
        panic!("not a page");
    };
    assert_eq!(page.entries.len(), MAX_PAGE as usize);
    let Ok(Reply::Page(rest)) = run(
        &node,
        Op::List {
            collection: c(),
            after: page.next,
            limit: 100,
        },
    ) else {
        panic!("not a page");
    };
    assert_eq!(rest.entries.len(), 4);
    let err = run(
        &node,
        Op::Set {
            collection: c(),
            key: Bytes::new(),
            value: Bytes::new(),
        },
    )
    .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidInput);
    let Ok(Reply::Dropped(keys)) = run(&node, Op::DropCollection { collection: c() }) else {
        panic!("not dropped");
    };
    assert_eq!(keys.len(), MAX_PAGE as usize + 4);
    assert!(!node.has_collection("c"));
    assert!(matches!(run(&node, Op::Stats), Ok(Reply::Stats(_))));
}
