//! The client against a real node server on loopback.

use std::sync::Arc;

use dhrt_client::{Client, Error};
use dhrt_cluster::{BinaryLimits, Cluster, Identity, Node, serve_binary};
use dhrt_storage::{Options, Store};
use tokio::net::TcpListener;

async fn node() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let node = Arc::new(Node::new(Cluster::single(
        Store::memory(Options::default()),
        Identity {
            id: 1,
            name: "n".into(),
            addr: addr.clone(),
        },
    )));
    tokio::spawn(async move {
        loop {
            let (socket, remote) = listener.accept().await.unwrap();
            tokio::spawn(serve_binary(
                socket,
                remote,
                node.clone(),
                BinaryLimits::default(),
                std::future::pending(),
                dhrt_proto::Proven::ignored(),
            ));
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_round_trips() {
    let client = Client::connect(node().await).await.unwrap();
    client.ping().await.unwrap();
    client.set("users", "ada", "lovelace").await.unwrap();
    assert_eq!(
        client.get("users", "ada").await.unwrap().as_deref(),
        Some(&b"lovelace"[..])
    );
    assert_eq!(client.get("users", "nobody").await.unwrap(), None);
    for i in 0..30 {
        client
            .set("many", format!("k{i}"), format!("v{i}"))
            .await
            .unwrap();
    }
    let page = client.list("many", None, 20).await.unwrap();
    assert_eq!(page.entries.len(), 20);
    let rest = client.list("many", page.next.as_deref(), 20).await.unwrap();
    assert_eq!(rest.entries.len(), 10);
    assert!(rest.next.is_none());
    assert!(client.delete("users", "ada").await.unwrap());
    assert!(!client.delete("users", "ada").await.unwrap());
    assert_eq!(client.drop_collection("many").await.unwrap().len(), 30);
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.node.name, "n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_requests_in_flight_on_one_connection() {
    let client = Client::connect(node().await).await.unwrap();
    let tasks: Vec<_> = (0..2000u32)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                c.set("p", i.to_be_bytes(), i.to_string()).await.unwrap();
                c.get("p", i.to_be_bytes()).await.unwrap()
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), i.to_string().as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_typed() {
    let client = Client::connect(node().await).await.unwrap();
    assert!(matches!(
        client.set("../etc", "k", "v").await,
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        client.get("c", "").await,
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        client.set("c", "k", vec![0u8; (16 << 20) + 1]).await,
        Err(Error::TooLarge(_))
    ));
    // A page "after" the empty key, which no key is, and a page of none.
    for (after, limit) in [(Some(&b""[..]), 10), (None, 0)] {
        assert!(matches!(
            client.list("c", after, limit).await,
            Err(Error::InvalidInput(_))
        ));
    }
    // Still usable after errors.
    client.ping().await.unwrap();
    // Nobody listening.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    assert!(matches!(
        Client::connect(dead.to_string()).await,
        Err(Error::Connect { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_answers_each_operation_in_order() {
    use dhrt_proto::{Op, Reply};
    let client = Client::connect(node().await).await.unwrap();
    let ops = vec![
        Op::Set {
            collection: "p".into(),
            key: "a".into(),
            value: "1".into(),
        },
        Op::Get {
            collection: "p".into(),
            key: "a".into(),
        },
        Op::Get {
            collection: "../bad".into(),
            key: "a".into(),
        },
        Op::Delete {
            collection: "p".into(),
            key: "a".into(),
        },
    ];
    let replies = client.pipeline(ops).await.unwrap();
    assert!(matches!(replies[0], Ok(Reply::Stored)));
    assert!(matches!(&replies[1], Ok(Reply::Value(Some(v))) if v.as_ref() == b"1"));
    assert!(matches!(replies[2], Err(Error::InvalidInput(_))));
    assert!(matches!(replies[3], Ok(Reply::Deleted(true))));
}
