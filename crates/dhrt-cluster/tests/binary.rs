//! The binary-protocol server over an in-memory duplex stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dhrt_cluster::{BinaryLimits, Closed, serve_binary};
use dhrt_proto::{
    Decoded, ErrorKind, Op, Reply, Request, Response, decode_frame, encode_frame, preamble,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

fn limits() -> BinaryLimits {
    BinaryLimits {
        max_frame: 1 << 20,
        idle_timeout: Duration::from_millis(500),
        ..BinaryLimits::default()
    }
}

fn start() -> (
    DuplexStream,
    tokio::task::JoinHandle<std::io::Result<Closed>>,
) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let node = Arc::new(crate::node::node());
    let task = tokio::spawn(serve_binary(
        server,
        ([127, 0, 0, 1], 1).into(),
        node,
        limits(),
        std::future::pending(),
        dhrt_proto::Proven::ignored(),
    ));
    (client, task)
}

async fn read_responses(client: &mut DuplexStream, n: usize) -> Vec<Response> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    while out.len() < n {
        match decode_frame::<Response>(&buf, 1 << 20).unwrap() {
            Decoded::Complete { msg, len } => {
                out.push(msg);
                let _ = buf.split_to(len);
            }
            Decoded::Incomplete { .. } => {
                let read = tokio::time::timeout(Duration::from_secs(5), client.read_buf(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(read > 0, "server closed early");
            }
        }
    }
    out
}

#[tokio::test]
async fn pipelined_requests_are_all_answered_by_id() {
    let (mut client, _task) = start();
    let mut wire = preamble().to_vec();
    for i in 0..100u64 {
        let op = Op::Set {
            collection: "c".into(),
            key: Bytes::from(format!("k{i}")),
            value: Bytes::from(format!("v{i}")),
        };
        encode_frame(&Request { id: i, op }, &mut wire, 1 << 20).unwrap();
    }
    encode_frame(
        &Request {
            id: 1000,
            op: Op::Get {
                collection: "c".into(),
                key: Bytes::from_static(b"k42"),
            },
        },
        &mut wire,
        1 << 20,
    )
    .unwrap();
    // Send it in awkward pieces.
    for chunk in wire.chunks(7) {
        client.write_all(chunk).await.unwrap();
    }
    let responses = read_responses(&mut client, 101).await;
    assert!(
        responses[..100]
            .iter()
            .enumerate()
            .all(|(i, r)| r.id == i as u64 && r.result == Ok(Reply::Stored))
    );
    assert_eq!(
        responses[100],
        Response {
            id: 1000,
            result: Ok(Reply::Value(Some(Bytes::from_static(b"v42"))))
        }
    );
}

#[tokio::test]
async fn an_unreadable_request_with_an_id_gets_an_error_and_the_connection_goes_on() {
    let (mut client, _task) = start();
    let mut wire = preamble().to_vec();
    // id 7, then op variant 99: readable id, unknown operation.
    wire.extend_from_slice(&[2, 0, 0, 0, 7, 99]);
    encode_frame(
        &Request {
            id: 8,
            op: Op::Ping,
        },
        &mut wire,
        1 << 20,
    )
    .unwrap();
    client.write_all(&wire).await.unwrap();
    let responses = read_responses(&mut client, 2).await;
    assert_eq!(responses[0].id, 7);
    assert_eq!(
        responses[0].result.as_ref().unwrap_err().kind,
        ErrorKind::InvalidInput
    );
    assert_eq!(
        responses[1],
        Response {
            id: 8,
            result: Ok(Reply::Pong)
        }
    );
}

#[tokio::test]
async fn protocol_violations_and_idle_clients_are_disconnected() {
    // A lying length.
    let (mut client, task) = start();
    let mut wire = preamble().to_vec();
    wire.extend_from_slice(&u32::MAX.to_le_bytes());
    client.write_all(&wire).await.unwrap();
    assert!(matches!(task.await.unwrap().unwrap(), Closed::Protocol(_)));
    // A wrong preamble.
    let (mut client, task) = start();
    client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(matches!(task.await.unwrap().unwrap(), Closed::Protocol(_)));
    // Silence.
    let (mut client, task) = start();
    client.write_all(&preamble()).await.unwrap();
    assert_eq!(task.await.unwrap().unwrap(), Closed::Idle);
    // A clean goodbye.
    let (client, task) = start();
    drop(client);
    assert_eq!(task.await.unwrap().unwrap(), Closed::ByClient);
}

#[tokio::test(start_paused = true)]
async fn only_silence_longer_than_the_idle_timeout_disconnects() {
    // Six pings 200 ms apart (1.2 s in all, the timeout being 500 ms): the
    // connection stays; then silence closes it after the timeout, counted
    // from the last ping.
    let (mut client, task) = start();
    client.write_all(&preamble()).await.unwrap();
    for id in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut wire = Vec::new();
        encode_frame(&Request { id, op: Op::Ping }, &mut wire, 1 << 20).unwrap();
        client.write_all(&wire).await.unwrap();
        assert_eq!(
            read_responses(&mut client, 1).await[0].result,
            Ok(Reply::Pong)
        );
        assert!(!task.is_finished(), "closed while talking, after ping {id}");
    }
    let silent = tokio::time::Instant::now();
    assert_eq!(task.await.unwrap().unwrap(), Closed::Idle);
    let waited = silent.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_millis(600),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_run_of_sets_is_written_together_and_a_bad_one_fails_alone() {
    let (mut client, _task) = start();
    let set = |id: u64, c: &str, k: &str| Request {
        id,
        op: Op::Set {
            collection: c.into(),
            key: Bytes::copy_from_slice(k.as_bytes()),
            value: Bytes::from_static(b"v"),
        },
    };
    let mut wire = preamble().to_vec();
    for r in [
        set(1, "a", "k1"),
        set(2, "a", "k2"),
        set(3, "a", ""),
        set(4, "a", "k4"),
        set(5, "b", "k5"),
        set(6, "b", "k6"),
    ] {
        encode_frame(&r, &mut wire, 1 << 20).unwrap();
    }
    encode_frame(
        &Request {
            id: 7,
            op: Op::Get {
                collection: "a".into(),
                key: Bytes::from_static(b"k4"),
            },
        },
        &mut wire,
        1 << 20,
    )
    .unwrap();
    client.write_all(&wire).await.unwrap();
    let responses = read_responses(&mut client, 7).await;
    let ids: Vec<u64> = responses.iter().map(|r| r.id).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6, 7]);
    for r in &responses[..6] {
        if r.id == 3 {
            assert_eq!(r.result.as_ref().unwrap_err().kind, ErrorKind::InvalidInput);
        } else {
            assert_eq!(r.result, Ok(Reply::Stored), "{r:?}");
        }
    }
    assert_eq!(
        responses[6].result,
        Ok(Reply::Value(Some(Bytes::from_static(b"v"))))
    );
}

#[tokio::test]
async fn an_auth_request_changes_what_the_requests_after_it_may_do() {
    use dhrt_proto::auth::{Access, Role, Tokens, auth_line, new_token};
    let (reader, writer) = (new_token(), new_token());
    let file = format!(
        "{}\n{}\n",
        auth_line(Role::Read, &reader, ""),
        auth_line(Role::Write, &writer, "")
    );
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let limits = BinaryLimits {
        access: Access::tokens(Tokens::parse(&file).unwrap()),
        ..limits()
    };
    let node = Arc::new(crate::node::node());
    let _task = tokio::spawn(serve_binary(
        server,
        ([127, 0, 0, 1], 1).into(),
        node,
        limits,
        std::future::pending(),
        dhrt_proto::Proven::ignored(),
    ));
    let set = |v: &'static str| Op::Set {
        collection: "c".into(),
        key: Bytes::from_static(b"k"),
        value: Bytes::from_static(v.as_bytes()),
    };
    let get = Op::Get {
        collection: "c".into(),
        key: Bytes::from_static(b"k"),
    };
    let auth = |token: &str| Op::Auth {
        token: token.to_string(),
    };
    // One pipelined batch: each request is judged by the token presented
    // before it, in order.
    let ops = [
        get.clone(),
        auth("dhrt_wrong"),
        auth(&reader),
        get.clone(),
        set("by reader"),
        auth(&writer),
        set("by writer"),
        set("again"),
        get,
        Op::DropCollection {
            collection: "c".into(),
        },
    ];
    let mut wire = preamble().to_vec();
    for (id, op) in ops.into_iter().enumerate() {
        encode_frame(&Request { id: id as u64, op }, &mut wire, 1 << 20).unwrap();
    }
    client.write_all(&wire).await.unwrap();
    let mut responses = read_responses(&mut client, 10).await;
    responses.sort_by_key(|r| r.id);
    let kinds: Vec<_> = responses
        .iter()
        .map(|r| r.result.as_ref().map_err(|e| e.kind))
        .collect();
    assert_eq!(kinds[0], Err(ErrorKind::Unauthenticated));
    assert_eq!(kinds[1], Err(ErrorKind::Unauthenticated));
    assert_eq!(kinds[2], Ok(&Reply::Authenticated(Role::Read)));
    assert_eq!(kinds[3], Ok(&Reply::Value(None)));
    assert_eq!(kinds[4], Err(ErrorKind::Forbidden));
    assert_eq!(kinds[5], Ok(&Reply::Authenticated(Role::Write)));
    assert_eq!(kinds[6], Ok(&Reply::Stored));
    assert_eq!(kinds[7], Ok(&Reply::Stored));
    assert_eq!(
        kinds[8],
        Ok(&Reply::Value(Some(Bytes::from_static(b"again"))))
    );
    assert_eq!(kinds[9], Err(ErrorKind::Forbidden));
}

#[tokio::test]
async fn a_connection_refused_too_often_for_want_of_a_token_is_closed() {
    use dhrt_proto::auth::{Access, Tokens};
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let limits = BinaryLimits {
        access: Access::tokens(Tokens::default()),
        ..limits()
    };
    let node = Arc::new(crate::node::node());
    let task = tokio::spawn(serve_binary(
        server,
        ([127, 0, 0, 1], 1).into(),
        node,
        limits,
        std::future::pending(),
        dhrt_proto::Proven::ignored(),
    ));
    let mut wire = preamble().to_vec();
    for id in 0..200 {
        encode_frame(&Request { id, op: Op::Ping }, &mut wire, 1 << 20).unwrap();
    }
    client.write_all(&wire).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("still open after 200 refused requests")
        .unwrap()
        .unwrap();
    let Closed::Protocol(why) = closed else {
        panic!("{closed:?}")
    };
    assert!(why.contains("for want of a valid token"), "{why}");
    // The refusals it got before: no more than the cap.
    let mut answers = Vec::new();
    let _ = client.read_to_end(&mut answers).await;
    let mut count = 0;
    let mut rest = &answers[..];
    while let Ok(Decoded::Complete { msg, len }) = decode_frame::<Response>(rest, 1 << 20) {
        assert_eq!(msg.result.unwrap_err().kind, ErrorKind::Unauthenticated);
        count += 1;
        rest = &rest[len..];
    }
    assert!(count <= 64, "{count}");
}

#[tokio::test]
async fn a_stranger_sending_unreadable_requests_is_closed_too() {
    use dhrt_proto::auth::{Access, Tokens};
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let limits = BinaryLimits {
        access: Access::tokens(Tokens::default()),
        idle_timeout: Duration::from_secs(300),
        frame_grace: Duration::from_secs(300),
        ..limits()
    };
    let task = tokio::spawn(serve_binary(
        server,
        ([127, 0, 0, 1], 1).into(),
        Arc::new(crate::node::node()),
        limits,
        std::future::pending(),
        dhrt_proto::Proven::ignored(),
    ));
    // id 7, then op variant 200: each gets an answer it never reads.
    let mut wire = preamble().to_vec();
    for _ in 0..200 {
        wire.extend_from_slice(&[2, 0, 0, 0, 7, 200]);
    }
    client.write_all(&wire).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("still open after 200 unreadable requests")
        .unwrap()
        .unwrap();
    let Closed::Protocol(why) = closed else {
        panic!("{closed:?}")
    };
    assert!(why.contains("refused"), "{why}");
}

/// A server with a 300 s idle timeout (much longer than the frame grace, so
/// only the grace can close these connections) and `access`.
fn start_slow_limits(
    access: Arc<dhrt_proto::auth::Access>,
    remote: std::net::SocketAddr,
) -> (
    DuplexStream,
    tokio::task::JoinHandle<std::io::Result<Closed>>,
) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let limits = BinaryLimits {
        max_frame: 1 << 20,
        idle_timeout: Duration::from_secs(300),
        frame_grace: Duration::from_secs(10),
        frame_min_rate: 1024,
        access,
        ..BinaryLimits::default()
    };
    let node = Arc::new(crate::node::node());
    let task = tokio::spawn(serve_binary(
        server,
        remote,
        node,
        limits,
        std::future::pending(),
        dhrt_proto::Proven::ignored(),
    ));
    (client, task)
}

/// Waits for the connection to close; how long it took, and why.
async fn closed_after(
    task: tokio::task::JoinHandle<std::io::Result<Closed>>,
) -> (Duration, Closed) {
    let started = tokio::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(200), task)
        .await
        .expect("still open after 200 s")
        .unwrap()
        .unwrap();
    (started.elapsed(), closed)
}

#[tokio::test(start_paused = true)]
async fn an_unfinished_frame_or_preamble_is_closed_after_the_grace_not_the_idle_timeout() {
    use dhrt_proto::auth::Access;
    let local = ([127, 0, 0, 1], 1).into();
    // Half a preamble, then nothing.
    let (mut client, task) = start_slow_limits(Access::loopback_only(), local);
    client.write_all(&preamble()[..3]).await.unwrap();
    let (waited, closed) = closed_after(task).await;
    assert!(
        matches!(&closed, Closed::TooSlow(why) if why.contains("preamble")),
        "{closed:?}"
    );
    assert!(waited <= Duration::from_secs(10), "{waited:?}");
    // A whole preamble and the first 5 bytes of a frame, then nothing: the
    // slot is given back after the grace (plus a few ms for 5 bytes).
    let (mut client, task) = start_slow_limits(Access::loopback_only(), local);
    let wire = [&preamble()[..], &ping(1)].concat();
    client
        .write_all(&wire[..preamble().len() + 5])
        .await
        .unwrap();
    let (waited, closed) = closed_after(task).await;
    assert!(
        matches!(&closed, Closed::TooSlow(why) if why.contains("too slowly")),
        "{closed:?}"
    );
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_frame_arriving_faster_than_the_minimum_rate_is_answered_however_long_it_takes() {
    use dhrt_proto::auth::Access;
    let (mut client, task) = start_slow_limits(Access::loopback_only(), ([127, 0, 0, 1], 1).into());
    let value = vec![7u8; 60 * 1024];
    let mut wire = preamble().to_vec();
    encode_frame(
        &Request {
            id: 1,
            op: Op::Set {
                collection: "c".into(),
                key: Bytes::from_static(b"k"),
                value: Bytes::from(value.clone()),
            },
        },
        &mut wire,
        1 << 20,
    )
    .unwrap();
    // 2 KiB a second: 30 s for the frame, three times the grace, at twice
    // the minimum rate.
    for chunk in wire.chunks(2048) {
        client.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!task.is_finished(), "closed while the frame kept coming");
    }
    assert_eq!(
        read_responses(&mut client, 1).await[0].result,
        Ok(Reply::Stored)
    );
    // Then a frame that stops half way is closed, counted from its own start.
    let wire = ping(2);
    client.write_all(&wire[..3]).await.unwrap();
    let (waited, closed) = closed_after(task).await;
    assert!(matches!(closed, Closed::TooSlow(_)), "{closed:?}");
    assert!(waited < Duration::from_secs(11), "{waited:?}");
}

/// A frame sent almost whole at once and then left unfinished is not
/// allowed the time its received bytes would buy at the minimum rate
/// (about 15 min for 900 KiB): a pause longer than the grace closes it,
/// and the buffer is let go.
#[tokio::test(start_paused = true)]
async fn a_frame_that_stops_after_a_fast_start_is_closed_after_the_grace() {
    use dhrt_proto::auth::Access;
    let (mut client, task) = start_slow_limits(Access::loopback_only(), ([127, 0, 0, 1], 1).into());
    let mut wire = preamble().to_vec();
    encode_frame(
        &Request {
            id: 1,
            op: Op::Set {
                collection: "c".into(),
                key: Bytes::from_static(b"k"),
                value: Bytes::from(vec![7u8; 900 * 1024]),
            },
        },
        &mut wire,
        1 << 20,
    )
    .unwrap();
    client.write_all(&wire[..wire.len() - 10]).await.unwrap();
    let (waited, closed) = closed_after(task).await;
    assert!(
        matches!(&closed, Closed::TooSlow(why) if why.contains("too slowly")),
        "{closed:?}"
    );
    assert!(waited < Duration::from_secs(11), "{waited:?}");
    // The same, then a byte a second (each pause under the grace): the
    // rate holds in every stretch of the grace, not only on average.
    let (mut client, task) = start_slow_limits(Access::loopback_only(), ([127, 0, 0, 1], 1).into());
    client.write_all(&wire[..wire.len() - 10]).await.unwrap();
    let started = tokio::time::Instant::now();
    for i in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let at = wire.len() - 10 + i;
        if client.write_all(&wire[at..at + 1]).await.is_err() {
            break;
        }
    }
    let (_, closed) = closed_after(task).await;
    assert!(matches!(closed, Closed::TooSlow(_)), "{closed:?}");
    assert!(
        started.elapsed() < Duration::from_secs(11),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_must_show_a_token_and_does_not_is_closed_after_the_grace() {
    use dhrt_proto::auth::{Access, Role, Tokens, auth_line, new_token};
    // A remote client of a node without an auth file says nothing after
    // its preamble.
    let (mut client, task) = start_slow_limits(Access::loopback_only(), ([192, 0, 2, 1], 1).into());
    client.write_all(&preamble()).await.unwrap();
    let (waited, closed) = closed_after(task).await;
    assert!(
        matches!(&closed, Closed::TooSlow(why) if why.contains("token")),
        "{closed:?}"
    );
    assert!(waited <= Duration::from_secs(10), "{waited:?}");
    // A client of a node with tokens that never shows one.
    let token = new_token();
    let access = Access::tokens(Tokens::parse(&auth_line(Role::Read, &token, "")).unwrap());
    let (mut client, task) = start_slow_limits(access.clone(), ([127, 0, 0, 1], 1).into());
    client.write_all(&preamble()).await.unwrap();
    let (waited, closed) = closed_after(task).await;
    assert!(
        matches!(&closed, Closed::TooSlow(why) if why.contains("token")),
        "{closed:?}"
    );
    assert!(waited <= Duration::from_secs(10), "{waited:?}");
    // One that shows it stays, idle, long past the grace.
    let (mut client, task) = start_slow_limits(access, ([127, 0, 0, 1], 1).into());
    authenticate(&mut client, token).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!task.is_finished(), "an authenticated client was closed");
    let wire = ping(2);
    client.write_all(&wire).await.unwrap();
    assert_eq!(
        read_responses(&mut client, 1).await[0].result,
        Ok(Reply::Pong)
    );
}

/// The frame of a `Ping` with `id`.
fn ping(id: u64) -> Vec<u8> {
    let mut wire = Vec::new();
    encode_frame(&Request { id, op: Op::Ping }, &mut wire, 1 << 20).unwrap();
    wire
}

/// A connection whose token was revoked gets its requests refused, and the
/// refusals do not count as activity: it is closed for idling after the
/// idle timeout, however often it keeps asking.
#[tokio::test(start_paused = true)]
async fn refused_requests_on_a_revoked_token_do_not_keep_a_connection_from_idling() {
    use dhrt_proto::auth::{Access, Role, Tokens, auth_line, new_token};
    let token = new_token();
    let access = Access::tokens(Tokens::parse(&auth_line(Role::Read, &token, "")).unwrap());
    let (mut client, task) = start_slow_limits(access.clone(), ([127, 0, 0, 1], 1).into());
    authenticate(&mut client, token).await;
    access.replace(Tokens::default());
    let started = tokio::time::Instant::now();
    let mut id = 2;
    while !task.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(320),
            "refused requests kept the connection open past the 300 s idle timeout"
        );
        let mut wire = Vec::new();
        encode_frame(
            &Request {
                id,
                op: Op::Get {
                    collection: "c".into(),
                    key: Bytes::from_static(b"k"),
                },
            },
            &mut wire,
            1 << 20,
        )
        .unwrap();
        if client.write_all(&wire).await.is_err() {
            break;
        }
        id += 1;
        tokio::time::sleep(Duration::from_secs(20)).await;
    }
    let closed = task.await.unwrap().unwrap();
    assert!(matches!(closed, Closed::Idle), "{closed:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(280),
        "{:?}",
        started.elapsed()
    );
}

/// Sends the preamble and an `Auth` with `token` (of the read role), and
/// checks that it is accepted.
async fn authenticate(client: &mut DuplexStream, token: String) {
    use dhrt_proto::auth::Role;
    let mut wire = preamble().to_vec();
    encode_frame(
        &Request {
            id: 1,
            op: Op::Auth { token },
        },
        &mut wire,
        1 << 20,
    )
    .unwrap();
    client.write_all(&wire).await.unwrap();
    assert_eq!(
        read_responses(client, 1).await[0].result,
        Ok(Reply::Authenticated(Role::Read))
    );
}

#[tokio::test]
async fn a_drop_whose_key_list_exceeds_a_frame_still_answers_that_it_dropped() {
    let (mut client, _task) = start();
    let mut wire = preamble().to_vec();
    // 30 keys of 60 KiB: 1.8 MB of names, past the 1 MiB frame.
    let key = |i: u8| Bytes::from(vec![b'a' + i; 60 << 10]);
    for i in 0..30u8 {
        let op = Op::Set {
            collection: "big".into(),
            key: key(i),
            value: Bytes::from_static(b"v"),
        };
        encode_frame(&Request { id: i.into(), op }, &mut wire, 1 << 20).unwrap();
    }
    let drop = Op::DropCollection {
        collection: "big".into(),
    };
    encode_frame(&Request { id: 100, op: drop }, &mut wire, 1 << 20).unwrap();
    let list = Op::List {
        collection: "big".into(),
        after: None,
        limit: 100,
    };
    encode_frame(&Request { id: 101, op: list }, &mut wire, 1 << 20).unwrap();
    client.write_all(&wire).await.unwrap();
    let responses = read_responses(&mut client, 32).await;
    assert!(
        responses[..30]
            .iter()
            .all(|r| r.result == Ok(Reply::Stored))
    );
    // Done, and said so: the keys that fit, each one of those dropped.
    let Ok(Reply::Dropped(keys)) = &responses[30].result else {
        panic!("{:?}", responses[30].result.as_ref().map(|_| ()))
    };
    assert!(!keys.is_empty() && keys.len() < 30, "{} keys", keys.len());
    assert!(
        keys.iter()
            .all(|k| k.len() == 60 << 10 && (0..30).any(|i| *k == key(i)))
    );
    let Ok(Reply::Page(page)) = &responses[31].result else {
        panic!("{:?}", responses[31].result)
    };
    assert!(page.entries.is_empty());
}

#[tokio::test]
async fn a_read_only_token_cannot_make_the_node_buffer_a_value() {
    use dhrt_proto::auth::{Access, Role, Tokens, auth_line, new_token};
    let (reader, writer) = (new_token(), new_token());
    let file = format!(
        "{}\n{}\n",
        auth_line(Role::Read, &reader, ""),
        auth_line(Role::Write, &writer, "")
    );
    let access = Access::tokens(Tokens::parse(&file).unwrap());
    let serve = |access: Arc<Access>| {
        let (client, server) = tokio::io::duplex(1 << 20);
        // Nothing else closes it in this test's time.
        let limits = BinaryLimits {
            access,
            idle_timeout: Duration::from_secs(60),
            frame_grace: Duration::from_secs(60),
            ..limits()
        };
        let task = tokio::spawn(serve_binary(
            server,
            ([127, 0, 0, 1], 1).into(),
            Arc::new(crate::node::node()),
            limits,
            std::future::pending(),
            dhrt_proto::Proven::ignored(),
        ));
        (client, task)
    };
    // A frame of 512 KiB, the size of a set of such a value.
    let big = |id| {
        let mut wire = Vec::new();
        let op = Op::Set {
            collection: "c".into(),
            key: Bytes::from_static(b"k"),
            value: Bytes::from(vec![7u8; 512 << 10]),
        };
        encode_frame(&Request { id, op }, &mut wire, 1 << 20).unwrap();
        wire
    };
    let auth = |token: &str| {
        let mut wire = preamble().to_vec();
        let op = Op::Auth {
            token: token.to_string(),
        };
        encode_frame(&Request { id: 1, op }, &mut wire, 1 << 20).unwrap();
        wire
    };
    // The reader's connection is closed at the frame's length, before its
    // bytes are buffered.
    let (mut client, task) = serve(access.clone());
    client.write_all(&auth(&reader)).await.unwrap();
    assert_eq!(
        read_responses(&mut client, 1).await[0].result,
        Ok(Reply::Authenticated(Role::Read))
    );
    let _ = client.write_all(&big(2)[..64]).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), task).await;
    assert!(matches!(closed, Ok(Ok(Ok(_)))), "{closed:?}");
    // The writer's is answered.
    let (mut client, _task) = serve(access);
    client.write_all(&auth(&writer)).await.unwrap();
    client.write_all(&big(2)).await.unwrap();
    let answers = read_responses(&mut client, 2).await;
    assert_eq!(answers[1].result, Ok(Reply::Stored));
}

#[tokio::test]
async fn a_list_of_no_entries_is_refused_not_answered_as_the_last_page() {
    let (mut client, _task) = start();
    let mut wire = preamble().to_vec();
    let set = Op::Set {
        collection: "c".into(),
        key: Bytes::from_static(b"k"),
        value: Bytes::from_static(b"v"),
    };
    encode_frame(&Request { id: 1, op: set }, &mut wire, 1 << 20).unwrap();
    for (id, limit) in [(2, 0), (3, 1)] {
        let op = Op::List {
            collection: "c".into(),
            after: None,
            limit,
        };
        encode_frame(&Request { id, op }, &mut wire, 1 << 20).unwrap();
    }
    client.write_all(&wire).await.unwrap();
    let responses = read_responses(&mut client, 3).await;
    assert_eq!(
        responses[1].result.as_ref().unwrap_err().kind,
        ErrorKind::InvalidInput
    );
    let Ok(Reply::Page(page)) = &responses[2].result else {
        panic!("{:?}", responses[2].result)
    };
    assert_eq!(page.entries.len(), 1);
}
