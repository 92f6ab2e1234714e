//! The link's tests: tampering, a dial that hangs, a peer that never
//! answers nor closes, and a node answering as another member.

use dhrt_proto::{PREAMBLE_LEN, PeerReply};
use tokio::io::{AsyncReadExt, DuplexStream};

use super::*;
use crate::wire::read_sealed;

const SECRET: &[u8] = b"a cluster secret of at least 32 bytes";

/// Hands out one end of an in-memory stream, once.
#[derive(Debug)]
struct OneStream(Mutex<Option<DuplexStream>>);

impl Connector for OneStream {
    fn connect<'a>(&'a self, _: &'a str) -> ConnectFuture<'a> {
        let stream = self.0.lock().unwrap().take();
        Box::pin(async move {
            let stream = stream.ok_or_else(|| io::Error::other("dialed twice"))?;
            Ok(Box::new(stream) as Box<dyn PeerStream>)
        })
    }
}

#[tokio::test]
async fn an_answer_altered_in_transit_closes_the_dialed_connection() {
    let (d, mut l) = tokio::io::duplex(1 << 16);
    let link = Link::new(
        "192.0.2.2:7453".into(),
        Dialer {
            me: 1,
            secret: SECRET.into(),
            max_frame: 1 << 20,
            connector: Arc::new(OneStream(Mutex::new(Some(d)))),
        },
    );
    // The listener answers the first request with one bit flipped.
    let listener = tokio::spawn(async move {
        let (mut buf, mut session) = accepted(&mut l, 1 << 20).await;
        let request = read_sealed(&mut l, &mut buf, 1 << 20, &mut session.opener);
        let Some(PeerMessage::Request { id, .. }) = request.await.unwrap() else {
            panic!("no request")
        };
        let answer = PeerMessage::Response {
            id,
            result: Ok(PeerReply::Entry(None)),
        };
        let mut out = sealed(&answer, &mut session.sealer);
        let last = out.len() - 1;
        out[last] ^= 0x01;
        l.write_all(&out).await.unwrap();
        // The dialer hangs up.
        let mut rest = Vec::new();
        l.read_to_end(&mut rest).await.unwrap();
        rest
    });
    let op = PeerOp::Read {
        collection: "c".into(),
        key: "k".into(),
    };
    let answer = link.request(op, Duration::from_secs(30)).await;
    assert!(
        matches!(&answer, Err(LinkError::Unreachable { reason, .. }) if reason.contains("closed")),
        "{answer:?}"
    );
    assert!(listener.await.unwrap().is_empty());
}

/// A listener that completes the handshake as node `id` and then
/// reads everything and answers nothing, never closing its end; it
/// returns once the dialer's end is gone (not only half-closed).
fn silent_listener(mut l: DuplexStream, id: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut preamble = [0; PREAMBLE_LEN];
        l.read_exact(&mut preamble).await.unwrap();
        let mut buf = BytesMut::new();
        let me = Side {
            id,
            secret: SECRET,
            max_frame: 1 << 20,
        };
        let _session = handshake::accept(&mut l, &mut buf, me).await;
        let mut rest = Vec::new();
        let _ = l.read_to_end(&mut rest).await;
        // Told the dialer is done (its end half-closed): is its end
        // gone too? The start of a frame that never ends, a byte now
        // and then, until it is.
        let mut trickle = l.write_all(&1000u32.to_le_bytes()).await;
        while trickle.is_ok() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            trickle = l.write_all(&[0]).await;
        }
    })
}

/// Takes the preamble and the handshake as member 2, with frames of at
/// most `max_frame`: what was read past them, and the session.
async fn accepted(l: &mut DuplexStream, max_frame: u32) -> (BytesMut, crate::session::Session) {
    let mut preamble = [0; PREAMBLE_LEN];
    l.read_exact(&mut preamble).await.unwrap();
    let mut buf = BytesMut::new();
    let me = Side {
        id: 2,
        secret: SECRET,
        max_frame,
    };
    let (_, session) = handshake::accept(l, &mut buf, me).await.unwrap().unwrap();
    (buf, session)
}

/// `msg` as the listener sends it: encoded and sealed.
fn sealed(msg: &PeerMessage, sealer: &mut crate::session::Sealer) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(msg, &mut out, 1 << 20).unwrap();
    seal_frame(&mut out, 0, sealer).unwrap();
    out
}

/// A request carrying a value of 900 KiB.
fn apply_900_kib() -> PeerOp {
    PeerOp::Apply(vec![dhrt_proto::Mutation::Put {
        collection: "c".into(),
        key: "k".into(),
        value: Some(vec![7u8; 900 << 10].into()),
        version: dhrt_proto::Stamp { ts: 1, node: 1 },
    }])
}

fn dialer(stream: DuplexStream) -> Dialer {
    Dialer {
        me: 1,
        secret: SECRET.into(),
        max_frame: 1 << 20,
        connector: Arc::new(OneStream(Mutex::new(Some(stream)))),
    }
}

/// Hands out these streams, one per dial.
#[derive(Debug)]
struct Streams(Mutex<Vec<DuplexStream>>);

impl Connector for Streams {
    fn connect<'a>(&'a self, _: &'a str) -> ConnectFuture<'a> {
        let stream = self.0.lock().unwrap().pop();
        Box::pin(async move {
            let stream = stream.ok_or_else(|| io::Error::other("no more streams"))?;
            Ok(Box::new(stream) as Box<dyn PeerStream>)
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_connection_whose_request_timed_out_is_closed_though_the_peer_keeps_it_open() {
    let (d1, l1) = tokio::io::duplex(1 << 16);
    let (d2, l2) = tokio::io::duplex(1 << 16);
    let (first, _second) = (silent_listener(l1, 2), silent_listener(l2, 2));
    let link = Link::to_member(
        "192.0.2.4:7453".into(),
        2,
        Dialer {
            me: 1,
            secret: SECRET.into(),
            max_frame: 1 << 20,
            connector: Arc::new(Streams(Mutex::new(vec![d2, d1]))),
        },
    );
    for _ in 0..2 {
        let answer = link
            .request(PeerOp::Digests(Vec::new()), Duration::from_secs(1))
            .await;
        assert!(
            matches!(answer, Err(LinkError::Timeout { .. })),
            "{answer:?}"
        );
    }
    // The link lives on, on its second connection; the first, given
    // up, is closed though its peer never closes its end.
    tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("the dialer kept the abandoned connection open")
        .unwrap();
    drop(link);
}

#[tokio::test]
async fn a_node_answering_as_another_member_is_refused() {
    let (d, l) = tokio::io::duplex(1 << 16);
    let _listener = silent_listener(l, 3);
    let link = Link::to_member("192.0.2.5:7453".into(), 2, dialer(d));
    let answer = link
        .request(PeerOp::Digests(Vec::new()), Duration::from_secs(5))
        .await;
    assert!(
        matches!(&answer, Err(LinkError::Refused { reason, .. }) if reason.contains("not member 0000000000000002")),
        "{answer:?}"
    );
}

/// Dials into a black hole: the connection is never made.
#[derive(Debug)]
struct BlackHole;

impl Connector for BlackHole {
    fn connect<'a>(&'a self, _: &'a str) -> ConnectFuture<'a> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test(start_paused = true)]
async fn callers_queued_behind_a_dial_that_hangs_give_up_at_their_own_deadline() {
    let link = Arc::new(Link::new(
        "192.0.2.3:7453".into(),
        Dialer {
            me: 1,
            secret: SECRET.into(),
            max_frame: 1 << 20,
            connector: Arc::new(BlackHole),
        },
    ));
    let started = tokio::time::Instant::now();
    let timeout = Duration::from_millis(500);
    let mut callers = tokio::task::JoinSet::new();
    for i in 0..5 {
        let link = link.clone();
        callers.spawn(async move {
            let answer = if i % 2 == 0 {
                link.request(PeerOp::Digests(Vec::new()), timeout)
                    .await
                    .map(|_| ())
            } else {
                let gossip = Gossip {
                    from: 1,
                    sent_ms: 0,
                    max_offset_ms: 0,
                    kind: dhrt_proto::GossipKind::Ping {
                        seq: 1,
                        relay: None,
                    },
                    updates: Vec::new(),
                };
                link.gossip(gossip, timeout).await
            };
            (answer, started.elapsed())
        });
    }
    // Time is paused: each caller's clock moves only by its timers, so
    // this is exact. Queued one dial timeout after another, the last
    // would give up after 2.5 s.
    for (answer, took) in callers.join_all().await {
        assert!(
            matches!(answer, Err(LinkError::Timeout { .. })),
            "{answer:?}"
        );
        assert_eq!(took, timeout, "a caller gave up after {took:?}");
    }
}

#[tokio::test]
async fn a_dial_that_reaches_this_node_itself_is_refused() {
    let (d, l) = tokio::io::duplex(1 << 16);
    // The dialer is node 1; so is what answers.
    let _listener = silent_listener(l, 1);
    let link = Link::new("localhost:7453".into(), dialer(d));
    let answer = link
        .request(PeerOp::Digests(Vec::new()), Duration::from_secs(5))
        .await;
    assert!(
        matches!(&answer, Err(LinkError::Refused { reason, .. }) if reason == ITSELF),
        "{answer:?}"
    );
}

/// A request whose frame takes many timeouts to cross a slow link (a
/// large value) is not given up while the peer says its bytes arrive: the
/// listener reads 32 KiB every 100 ms, about 3 s for the 900 KiB frame,
/// with a 500 ms timeout (and 0.9 s more for the frame's size at the floor
/// rate), and notes what it has read as it goes. One that moves nothing
/// is given up at its timeout.
#[tokio::test(start_paused = true)]
async fn a_request_whose_bytes_the_peer_says_arrive_is_waited_for_past_its_timeout() {
    let (d, mut l) = tokio::io::duplex(64 << 10);
    let link = Link::new("192.0.2.2:7453".into(), dialer(d));
    let listener = tokio::spawn(async move {
        let (mut buf, mut session) = accepted(&mut l, 4 << 20).await;
        // A slow link: 32 KiB every 100 ms.
        let (mut ids, mut received) = (Vec::new(), 0u64);
        loop {
            if let Some(msg) =
                crate::wire::take_sealed(&mut buf, 4 << 20, &mut session.opener).unwrap()
            {
                let PeerMessage::Request { id, .. } = msg else {
                    panic!("not a request")
                };
                ids.push(id);
                let answer = PeerMessage::Response {
                    id,
                    result: Ok(PeerReply::Entry(None)),
                };
                l.write_all(&sealed(&answer, &mut session.sealer))
                    .await
                    .unwrap();
                if ids.len() == 1 {
                    // Then nothing more moves: the next request waits in
                    // vain.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                continue;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut chunk = vec![0u8; 32 << 10];
            let n = l.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            received += n as u64;
            let note = PeerMessage::Received { bytes: received };
            l.write_all(&sealed(&note, &mut session.sealer))
                .await
                .unwrap();
        }
    });
    let big = apply_900_kib();
    let started = tokio::time::Instant::now();
    let answer = link.request(big, Duration::from_millis(500)).await;
    assert!(matches!(answer, Ok(PeerReply::Entry(None))), "{answer:?}");
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let small = PeerOp::Read {
        collection: "c".into(),
        key: "k".into(),
    };
    let started = tokio::time::Instant::now();
    let answer = link.request(small, Duration::from_millis(500)).await;
    assert!(
        matches!(answer, Err(LinkError::Timeout { .. })),
        "{answer:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    listener.abort();
}

/// Bytes written are not progress: a peer that stopped after its buffers
/// took the whole frame (the kernel's take many MiB) says nothing, and the
/// request is given up at its deadline, the frame's time at the floor rate
/// included, not waited for while it sits there.
#[tokio::test(start_paused = true)]
async fn a_frame_swallowed_by_buffers_of_a_peer_that_stopped_is_given_up_at_the_deadline() {
    let (d, mut l) = tokio::io::duplex(4 << 20);
    let link = Link::new("192.0.2.2:7453".into(), dialer(d));
    let listener = tokio::spawn(async move {
        let _accepted = accepted(&mut l, 4 << 20).await;
        // Then it stops: the duplex's 4 MiB hold the frame unread.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(l);
    });
    let big = apply_900_kib();
    let started = tokio::time::Instant::now();
    let answer = link.request(big, Duration::from_millis(500)).await;
    assert!(
        matches!(answer, Err(LinkError::Timeout { .. })),
        "{answer:?}"
    );
    // 500 ms and 0.88 s for 900 KiB at 1 MiB/s.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1300) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    listener.abort();
}

/// A listener that takes the handshake, then reports each gossip it reads,
/// and `None` when the dialer closes the connection.
fn gossip_listener(mut l: DuplexStream) -> mpsc::UnboundedReceiver<Option<u64>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (mut buf, mut session) = accepted(&mut l, 1 << 20).await;
        loop {
            match read_sealed(&mut l, &mut buf, 1 << 20, &mut session.opener).await {
                Ok(Some(PeerMessage::Gossip(g))) => {
                    let _ = tx.send(Some(g.sent_ms));
                }
                Ok(Some(other)) => panic!("{other:?}"),
                Ok(None) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
            }
        }
    });
    rx
}

/// A connection given up after a probe went unanswered closes, and the
/// next message dials afresh; one younger than the age given is kept.
#[tokio::test(start_paused = true)]
async fn an_abandoned_connection_closes_and_the_next_message_dials_afresh() {
    let (d1, l1) = tokio::io::duplex(1 << 16);
    let (d2, l2) = tokio::io::duplex(1 << 16);
    let link = Link::new(
        "192.0.2.2:7453".into(),
        Dialer {
            me: 1,
            secret: SECRET.into(),
            max_frame: 1 << 20,
            // Popped from the end: d1 first.
            connector: Arc::new(Streams(Mutex::new(vec![d2, d1]))),
        },
    );
    let (mut first, mut second) = (gossip_listener(l1), gossip_listener(l2));
    let gossip = |n| Gossip {
        from: 1,
        sent_ms: n,
        max_offset_ms: 0,
        kind: dhrt_proto::GossipKind::Sync { reply: false },
        updates: vec![],
    };
    let timeout = Duration::from_secs(1);
    link.gossip(gossip(1), timeout).await.unwrap();
    assert_eq!(first.recv().await, Some(Some(1)));
    // Too young to be given up.
    link.abandon(Duration::from_secs(10));
    link.gossip(gossip(2), timeout).await.unwrap();
    assert_eq!(first.recv().await, Some(Some(2)));
    tokio::time::sleep(Duration::from_secs(10)).await;
    link.abandon(Duration::from_secs(10));
    assert_eq!(first.recv().await, Some(None), "the old connection closed");
    link.gossip(gossip(3), timeout).await.unwrap();
    assert_eq!(second.recv().await, Some(Some(3)));
}

/// Both ends of a node's connections probe a silent other end: the
/// options are on the socket, as the kernel reports them.
#[tokio::test]
async fn keepalive_is_on_with_its_timings() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stream = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let sock = socket2::SockRef::from(&stream);
    assert!(!sock.keepalive().unwrap(), "off by default");
    keep_alive(&stream);
    assert!(sock.keepalive().unwrap());
    assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
    assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
    assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
}
