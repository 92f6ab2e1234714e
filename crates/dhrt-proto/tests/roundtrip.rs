//! Every message survives encode → decode unchanged.

use bytes::Bytes;
use dhrt_proto::{
    ClockInfo, CollectionInfo, DEFAULT_MAX_FRAME, Decoded, Entry, ErrorKind, MemberInfo,
    MemberState, NodeInfo, NodeStats, Op, OpError, Page, Reply, Request, RequestRef, Response,
    SHARE_AT_LEAST, WatchEvent, decode, decode_frame, encode_frame, encode_frame_shared,
    frame_bounds,
};
use proptest::prelude::*;

fn bytes() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..100).prop_map(Bytes::from)
}

fn op() -> impl Strategy<Value = Op> {
    let name = "[a-z_-]{1,10}";
    prop_oneof![
        Just(Op::Ping),
        Just(Op::Stats),
        (name, bytes()).prop_map(|(collection, key)| Op::Get { collection, key }),
        (name, bytes(), bytes()).prop_map(|(collection, key, value)| Op::Set {
            collection,
            key,
            value
        }),
        (name, bytes()).prop_map(|(collection, key)| Op::Delete { collection, key }),
        (name, prop::option::of(bytes()), any::<u32>()).prop_map(|(collection, after, limit)| {
            Op::List {
                collection,
                after,
                limit,
            }
        }),
        name.prop_map(|collection| Op::DropCollection { collection }),
        "[a-z0-9.:]{1,20}".prop_map(|addr| Op::Join { addr }),
    ]
}

fn stats() -> NodeStats {
    NodeStats {
        node: NodeInfo {
            id: "00000000000000ff".into(),
            name: "n1".into(),
            addr: "127.0.0.1:7453".into(),
            version: "0.1.0".into(),
            mode: "persisted".into(),
            data_dir: "./dhrt-data".into(),
            uptime_s: 5,
        },
        collections: vec![CollectionInfo {
            name: "default".into(),
            keys: 3,
            bytes: 400,
            digest: "0123456789abcdef".into(),
            replicas: "2".into(),
            owners: vec!["00000000000000ff".into(), "0000000000000100".into()],
            under_replicated: false,
            moving: Some(dhrt_proto::MoveInfo {
                to: vec!["0000000000000100".into()],
                records_sent: 10,
                bytes_sent: 1000,
                for_s: 2,
                waiting: Some("owners not reachable: 0000000000000100".into()),
            }),
        }],
        members: vec![MemberInfo {
            id: "00000000000000ff".into(),
            name: "n1".into(),
            addr: "127.0.0.1:7453".into(),
            state: MemberState::Healthy,
            clock_offset_ms: Some(-12),
        }],
        sync: None,
        clock: ClockInfo {
            skewed: true,
            ahead_ms: 7_200_000,
            max_offset_ms: 60_000,
            reason: "ahead".into(),
        },
        watch: dhrt_proto::WatchInfo {
            watchers: 3,
            events_sent: 99,
            slowest_lag_ms: 12,
            slowest_lag_bytes: 4096,
        },
        disk: Some(dhrt_proto::DiskInfo {
            full: true,
            free_bytes: 1 << 20,
        }),
    }
}

fn reply() -> impl Strategy<Value = Result<Reply, OpError>> {
    prop_oneof![
        Just(Ok(Reply::Pong)),
        Just(Ok(Reply::Stored)),
        Just(Ok(Reply::Stats(Box::new(stats())))),
        any::<bool>().prop_map(|b| Ok(Reply::Deleted(b))),
        prop::option::of(bytes()).prop_map(|v| Ok(Reply::Value(v))),
        prop::collection::vec(bytes(), 0..5).prop_map(|k| Ok(Reply::Dropped(k))),
        (
            prop::collection::vec((bytes(), bytes()), 0..5),
            prop::option::of(bytes())
        )
            .prop_map(|(e, next)| {
                Ok(Reply::Page(Page {
                    entries: e
                        .into_iter()
                        .map(|(key, value)| Entry { key, value })
                        .collect(),
                    next,
                }))
            }),
        ".{0,40}".prop_map(|m| Err(OpError::new(ErrorKind::InvalidInput, m))),
    ]
}

fn round_trip<T>(msg: &T) -> T
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let mut wire = Vec::new();
    encode_frame(msg, &mut wire, DEFAULT_MAX_FRAME).unwrap();
    match decode_frame::<T>(&wire, DEFAULT_MAX_FRAME).unwrap() {
        Decoded::Complete { msg, len } => {
            assert_eq!(len, wire.len());
            msg
        }
        Decoded::Incomplete { .. } => panic!("incomplete"),
    }
}

proptest! {
    #[test]
    fn requests_round_trip(id in any::<u64>(), op in op()) {
        let r = Request { id, op };
        prop_assert_eq!(round_trip(&r), r);
    }

    /// The server decodes the borrowed form: it must read exactly what the
    /// owned form wrote, and refuse what the owned form refuses.
    #[test]
    fn requests_decode_as_borrowed_requests(id in any::<u64>(), op in op()) {
        let r = Request { id, op };
        let mut wire = Vec::new();
        encode_frame(&r, &mut wire, DEFAULT_MAX_FRAME).unwrap();
        let Decoded::Complete { msg, .. } = frame_bounds(&wire, DEFAULT_MAX_FRAME).unwrap() else {
            panic!("incomplete");
        };
        let borrowed: RequestRef<'_> = decode(&wire[msg.clone()]).unwrap();
        prop_assert_eq!(borrowed.id, id);
        prop_assert_eq!(borrowed.op, r.op.as_ref());
        // Cut short or extended, both forms refuse it alike.
        let payload = &wire[msg];
        for cut in [payload.len() - 1, payload.len() / 2] {
            prop_assert!(decode::<RequestRef<'_>>(&payload[..cut]).is_err());
            prop_assert!(decode::<Request>(&payload[..cut]).is_err());
        }
        let longer = [payload, &[0][..]].concat();
        prop_assert!(decode::<RequestRef<'_>>(&longer).is_err());
    }

    #[test]
    fn responses_round_trip(id in any::<u64>(), result in reply()) {
        let r = Response { id, result };
        prop_assert_eq!(round_trip(&r), r);
    }

    /// A frame whose large values are shared is, joined, the frame copied
    /// whole, and each large value in it is the value itself, not a copy.
    #[test]
    fn a_frame_sharing_its_values_is_the_frame(
        id in any::<u64>(),
        lens in prop::collection::vec(
            prop_oneof![0..100usize, SHARE_AT_LEAST - 1..SHARE_AT_LEAST + 300],
            1..4,
        ),
        seed in any::<u8>(),
    ) {
        let values: Vec<Bytes> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (j as u8).wrapping_mul(seed).wrapping_add(i as u8)).collect::<Vec<u8>>().into())
            .collect();
        let events: Vec<WatchEvent> = values
            .iter()
            .map(|v| WatchEvent {
                kind: dhrt_proto::EventKind::Set,
                key: Bytes::from_static(b"k"),
                value: Some(v.clone()),
                version: None,
                token: None,
            })
            .collect();
        let r = Response { id, result: Ok(Reply::Events(events)) };
        let mut whole = Vec::new();
        encode_frame(&r, &mut whole, DEFAULT_MAX_FRAME).unwrap();
        let shared: Vec<&Bytes> = values.iter().collect();
        let pieces = encode_frame_shared(&r, &shared, DEFAULT_MAX_FRAME).unwrap();
        prop_assert_eq!(&pieces.concat(), &whole);
        for v in values.iter().filter(|v| v.len() >= SHARE_AT_LEAST) {
            prop_assert!(pieces.iter().any(|p| p.as_ptr() == v.as_ptr() && p.len() == v.len()));
        }
        let copied = pieces.iter().map(Bytes::len).sum::<usize>()
            - values.iter().filter(|v| v.len() >= SHARE_AT_LEAST).map(Bytes::len).sum::<usize>();
        let small: usize = values.iter().map(Bytes::len).filter(|&n| n < SHARE_AT_LEAST).sum();
        prop_assert!(copied <= small + 32 * lens.len() + 32, "copied {} bytes", copied);
        // Too large for the frame: refused, as encode_frame refuses it.
        let max = (whole.len() - 5) as u32;
        prop_assert!(encode_frame_shared(&r, &shared, max).is_err());
        prop_assert!(encode_frame(&r, &mut Vec::new(), max).is_err());
    }
}

#[test]
fn stats_serialize_with_the_documented_field_names() {
    let json: serde_json::Value = serde_json::to_value(stats()).unwrap();
    for field in [
        "id", "name", "addr", "version", "mode", "data_dir", "uptime_s",
    ] {
        assert!(json["node"].get(field).is_some(), "node.{field} missing");
    }
    assert_eq!(json["collections"][0]["name"], "default");
    assert_eq!(json["collections"][0]["keys"], 3);
    assert_eq!(json["collections"][0]["bytes"], 400);
    assert_eq!(json["members"][0]["state"], "healthy");
    let states: Vec<String> = [
        MemberState::Healthy,
        MemberState::Unhealthy,
        MemberState::Dead,
        MemberState::Left,
        MemberState::Syncing,
    ]
    .iter()
    .map(|s| {
        serde_json::to_value(s)
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    })
    .collect();
    assert_eq!(states, ["healthy", "unhealthy", "dead", "left", "syncing"]);
}
