//! The API over real loopback connections: keep-alive, slow and hostile
//! clients, limits, and streamed listings.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dhrt_http::{Api, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::node::MapNode;

async fn start() -> SocketAddr {
    start_with(Limits {
        max_body: 64 * 1024,
        header_read_timeout: Duration::from_millis(300),
        list_batch: 100,
        idle_timeout: Duration::from_secs(1),
        body_grace: Duration::from_millis(300),
        body_min_rate: 100,
        ..Limits::default()
    })
    .await
}

/// A server of a `MapNode` with `limits`, accepting until the test ends.
async fn start_with(limits: Limits) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let api = Api::new(Arc::new(MapNode::default()), limits);
    tokio::spawn(async move {
        loop {
            let (socket, remote) = listener.accept().await.unwrap();
            tokio::spawn(api.clone().serve_connection(
                socket,
                remote.ip(),
                std::future::pending(),
                dhrt_proto::Proven::ignored(),
            ));
        }
    });
    addr
}

/// Opens an NDJSON watch of `collection` and reads its answer's head (200).
async fn open_watch(addr: SocketAddr, collection: &str) -> TcpStream {
    let mut client = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /{collection} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/x-ndjson\r\n\r\n"
    );
    client.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 4096];
    let n = client.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    client
}

/// Sends `raw` and reads until the server closes the connection.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the server did not close the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes a byte every 100 ms until the server closes the connection (at
/// most 10 s), reading what it answers into `out`.
async fn trickle_until_closed(
    s: &mut TcpStream,
    out: &mut Vec<u8>,
) -> Result<std::io::Result<usize>, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            tokio::select! {
                r = s.read_to_end(out) => return r,
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if s.write_all(b"x").await.is_err() {
                        return s.read_to_end(out).await;
                    }
                }
            }
        }
    })
    .await
}

#[tokio::test]
async fn keep_alive_serves_pipelined_requests_in_order() {
    let addr = start().await;
    let out = exchange(
        addr,
        b"POST /k/v1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /k HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert!(out.ends_with(r#"{"Key":"k","Value":"v1"}"#), "{out}");
}

#[tokio::test]
async fn a_client_that_trickles_its_headers_is_cut_off() {
    let addr = start().await;
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        // Keep trickling one header byte at a time.
        for b in b"X-Slow: yes" {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s.read_to_end(&mut out).await
    })
    .await;
    assert!(read.is_ok(), "still connected after 5 s");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(!String::from_utf8_lossy(&out).contains("200 OK"));
    // The server keeps serving others.
    assert!(
        exchange(addr, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 200")
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let addr = start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // Requests, each after a pause shorter than the idle timeout, keep it.
    for _ in 0..3 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    // Then silence: closed about a second after the last answer.
    let started = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "an idle connection still open after 5 s");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_body_slower_than_the_minimum_rate_gets_408_and_is_cut_off() {
    let addr = start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PUT /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 60000\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    // A byte every 100 ms: 10 bytes a second, under the 100 asked.
    let read = trickle_until_closed(&mut s, &mut out).await;
    assert!(read.is_ok(), "a trickled body still open after 10 s");
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("too slowly"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // A body at a fair rate is taken whole, however long it takes.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"PUT /fair HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 400\r\n\r\n",
    )
    .await
    .unwrap();
    for _ in 0..8 {
        s.write_all(&[b'y'; 50]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"),
        "{out:?}"
    );
}

#[tokio::test]
async fn hostile_requests_get_4xx_and_the_server_keeps_serving() {
    let addr = start().await;
    let cases: [&[u8]; 5] = [
        // A body over the limit, refused on its Content-Length.
        b"PUT /k HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 999999999\r\n\r\n",
        // Garbage instead of a request line.
        b"\x00\x01\x02 nonsense\r\n\r\n",
        // A path trick in the collection.
        b"GET /..%2f..%2fetc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        // NUL in a collection name.
        b"POST /a%00b/k/v HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        // An unsupported method.
        b"PATCH /k HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    ];
    for raw in cases {
        let out = exchange(addr, raw).await;
        let status: u16 = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        assert!(
            (400..500).contains(&status),
            "{:?} -> {out:?}",
            String::from_utf8_lossy(raw)
        );
    }
    let out = exchange(
        addr,
        b"PUT /k HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 999999999\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(
        exchange(addr, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 200")
    );
}

#[tokio::test]
async fn a_body_in_a_transfer_coding_other_than_chunked_is_refused_not_stored() {
    let addr = start().await;
    // "hello" gzipped would be stored still gzipped: 501, nothing stored.
    let out = exchange(
        addr,
        b"PUT /gz HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 501"), "{out}");
    assert!(out.contains("transfer coding"), "{out}");
    let out = exchange(addr, b"GET /gz HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    // Plain chunked is taken.
    let out = exchange(
        addr,
        b"PUT /ch HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[tokio::test]
async fn a_smuggled_request_is_never_executed() {
    let addr = start().await;
    // Both framings: Transfer-Encoding wins (RFC 9112 §6.3), the body ends at
    // the empty chunk, and the connection is closed after the response, so
    // the request hidden behind it is never read.
    let out = exchange(
        addr,
        b"POST /k/v HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nPOST /smuggled/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1").count(), 1, "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    let out = exchange(addr, b"GET /smuggled HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
}

#[tokio::test]
async fn a_large_listing_streams_as_one_json_array() {
    let addr = start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut batch = Vec::new();
    for i in 0..2000 {
        batch.extend_from_slice(
            format!("POST /big/key{i:05}/value{i} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes(),
        );
    }
    s.write_all(&batch).await.unwrap();
    let mut seen = 0;
    let mut buf = vec![0u8; 1 << 16];
    let mut acc = String::new();
    while seen < 2000 {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        acc.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen = acc.matches("HTTP/1.1 200 OK").count();
    }
    let out = exchange(
        addr,
        b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        out.contains("transfer-encoding: chunked"),
        "{}",
        &out[..200.min(out.len())]
    );
    let body = out.split_once("\r\n\r\n").unwrap().1;
    // De-chunk.
    let mut json = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size, 16).unwrap();
        if size == 0 {
            break;
        }
        json.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2000);
    assert_eq!(v[1999]["Key"], "key01999");
}

/// A watch whose client reads nothing does not hold a stopping node: it
/// cannot take its last event, so its connection is closed. (Graceful
/// shutdown alone waited for its endless body, for ever.)
#[tokio::test]
async fn a_stop_closes_a_watch_whose_client_reads_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stopping = tokio_util::sync::CancellationToken::new();
    let api = Api::new(
        Arc::new(MapNode::default()),
        Limits {
            stopping: stopping.clone(),
            ..Limits::default()
        },
    );
    let shutdown = stopping.clone();
    let served = tokio::spawn(async move {
        let (socket, remote) = listener.accept().await.unwrap();
        api.serve_connection(
            socket,
            remote.ip(),
            shutdown.cancelled_owned(),
            dhrt_proto::Proven::ignored(),
        )
        .await
    });
    // The stream flows; then the client stops reading, and the node's
    // buffers and the socket's fill.
    let _client = open_watch(addr, "flood").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stopping.cancel();
    // Only a guard against hanging for ever, as it did before.
    tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("the connection was not closed")
        .unwrap()
        .unwrap();
}

/// A watch's place among the node's open watches is given back as soon as
/// its client leaves, even while the runtime that reads and writes watches
/// (low CPU priority in dhrtd) gets no CPU: a churn of watches under load
/// kept their places for 14-40 s, and new watches were refused meanwhile.
#[tokio::test]
async fn a_watch_gives_its_place_back_when_its_client_leaves_though_its_tasks_starve() {
    use std::sync::atomic::Ordering;
    // A watch runtime whose only thread is held: nothing spawned on it runs.
    let starved = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (hold, held) = std::sync::mpsc::channel::<()>();
    let (blocked_tx, blocked_rx) = std::sync::mpsc::channel::<()>();
    starved.spawn(async move {
        blocked_tx.send(()).unwrap();
        let _ = held.recv();
    });
    blocked_rx.recv().unwrap();
    let addr = start_with(Limits {
        watch_runtime: Some(starved.handle().clone()),
        ..Limits::default()
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(open_watch(addr, "slotted").await);
    }
    assert_eq!(crate::node::SLOTS.load(Ordering::Acquire), 3);
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(10);
    while crate::node::SLOTS.load(Ordering::Acquire) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} places still held 10 s after their clients left",
            crate::node::SLOTS.load(Ordering::Acquire)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(hold);
    starved.shutdown_background();
}

/// A client that sends most of a body at once and then nothing is not
/// allowed the hours its average rate would grant (1 s per 100 bytes
/// received here, about 10 min for 60,000 bytes): a pause longer than the
/// grace gets 408, and the buffer is let go.
#[tokio::test]
async fn a_body_that_stops_after_a_fast_start_gets_408_after_the_grace() {
    let addr = start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PUT /parked HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 60001\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&[b'p'; 60000]).await.unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "a parked body still open after 10 s");
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// Most of a body at once, then a byte now and then (each pause under the
/// grace): the rate holds in every stretch of the grace, not only on
/// average, so this gets 408 after about the grace too.
#[tokio::test]
async fn a_body_that_trickles_after_a_fast_start_gets_408() {
    let addr = start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PUT /trickled HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 60100\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&[b'p'; 60000]).await.unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    // A byte every 100 ms: under the grace each time, 10 bytes a second
    // against the 100 asked.
    let read = trickle_until_closed(&mut s, &mut out).await;
    assert!(read.is_ok(), "a trickled body still open after 10 s");
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// A body over the limit: a client that waits for `100 Continue` gets the
/// 413 without being asked for the body; one that sends it all gets to
/// write it (the rest is read and thrown away) and reads the 413 after it,
/// where the connection used to close under its writes with a reset.
#[tokio::test]
async fn a_body_over_the_limit_gets_413_whether_its_client_waits_or_sends_it() {
    let addr = start().await;
    let big = 8 << 20;
    let head = |expect: &str| {
        format!("PUT /c/k HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {big}\r\n{expect}\r\n")
    };
    let mut waits = TcpStream::connect(addr).await.unwrap();
    waits
        .write_all(head("Expect: 100-continue\r\n").as_bytes())
        .await
        .unwrap();
    let text = answer(&mut waits).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");

    let mut sends = TcpStream::connect(addr).await.unwrap();
    let mut request = head("").into_bytes();
    request.resize(request.len() + big, b'v');
    sends
        .write_all(&request)
        .await
        .expect("the refused body is read, not reset");
    let text = answer(&mut sends).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}

/// The start of the answer waiting on `s`.
async fn answer(s: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("no answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}
