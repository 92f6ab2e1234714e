//! Replays of hostile frames: lying lengths, huge claimed lengths inside a
//! small frame, truncations, bad tags, trailing bytes, one byte at a time.
//! Every one must be answered with `Incomplete` or an error, quickly and
//! without allocating what the bytes claim.

use bytes::Bytes;
use dhrt_proto::{
    DEFAULT_MAX_FRAME, Decoded, Op, Preamble, ProtoError, Request, decode_frame, encode_frame,
    preamble, read_preamble, request_id,
};

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

fn sample() -> Request {
    Request {
        id: 42,
        op: Op::Set {
            collection: "users".into(),
            key: Bytes::from_static(b"ada"),
            value: Bytes::from(vec![7u8; 300]),
        },
    }
}

#[test]
fn a_lying_length_prefix_is_refused_before_the_payload_arrives() {
    let r = decode_frame::<Request>(&[0xff, 0xff, 0xff, 0xff], DEFAULT_MAX_FRAME);
    assert!(
        matches!(
            r,
            Err(ProtoError::FrameTooLarge {
                len: 0xffff_ffff,
                ..
            })
        ),
        "{r:?}"
    );
    let just_over = (DEFAULT_MAX_FRAME + 1).to_le_bytes();
    assert!(matches!(
        decode_frame::<Request>(&just_over, DEFAULT_MAX_FRAME),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    // Exactly the limit is merely incomplete.
    assert!(matches!(
        decode_frame::<Request>(&DEFAULT_MAX_FRAME.to_le_bytes(), DEFAULT_MAX_FRAME),
        Ok(Decoded::Incomplete { .. })
    ));
}

#[test]
fn huge_lengths_inside_a_small_frame_do_not_allocate() {
    // id 1, op Set (variant 2), then a collection name claiming 2^64-1 bytes.
    let mut claims_huge_string = vec![1u8, 2, 253];
    claims_huge_string.extend_from_slice(&u64::MAX.to_le_bytes());
    // id 1, op DropCollection... no: Reply-like vectors; a List with `after`
    // Some(bytes) claiming 2^62 bytes.
    let mut claims_huge_bytes = vec![1u8, 4, 1, b'c', 1, 253];
    claims_huge_bytes.extend_from_slice(&(1u64 << 62).to_le_bytes());
    claims_huge_bytes.extend_from_slice(&[0; 8]);
    for payload in [claims_huge_string, claims_huge_bytes] {
        assert!(payload.len() <= 24);
        let r = decode_frame::<Request>(&frame(&payload), DEFAULT_MAX_FRAME);
        assert!(matches!(r, Err(ProtoError::Malformed(_))), "{r:?}");
        // The borrowed form the server decodes refuses it the same way.
        let r = dhrt_proto::decode::<dhrt_proto::RequestRef<'_>>(&payload);
        assert!(matches!(r, Err(ProtoError::Malformed(_))), "{r:?}");
        // The id is still readable, so the server can answer with an error.
        assert_eq!(request_id(&payload), Some(1));
    }
}

#[test]
fn every_truncation_is_incomplete() {
    let mut wire = Vec::new();
    encode_frame(&sample(), &mut wire, DEFAULT_MAX_FRAME).unwrap();
    for cut in 0..wire.len() {
        match decode_frame::<Request>(&wire[..cut], DEFAULT_MAX_FRAME) {
            Ok(Decoded::Incomplete { needed }) => {
                assert!(needed >= 1 && cut + needed <= wire.len(), "cut {cut}")
            }
            other => panic!("cut {cut}: {other:?}"),
        }
    }
    assert!(matches!(
        decode_frame::<Request>(&wire, DEFAULT_MAX_FRAME),
        Ok(Decoded::Complete { len, .. }) if len == wire.len()
    ));
}

#[test]
fn one_byte_at_a_time_then_the_next_frame() {
    let mut wire = Vec::new();
    encode_frame(&sample(), &mut wire, DEFAULT_MAX_FRAME).unwrap();
    let second = Request {
        id: 43,
        op: Op::Ping,
    };
    encode_frame(&second, &mut wire, DEFAULT_MAX_FRAME).unwrap();
    let mut buf = Vec::new();
    let mut got = Vec::new();
    for &b in &wire {
        buf.push(b);
        if let Decoded::Complete { msg, len } =
            decode_frame::<Request>(&buf, DEFAULT_MAX_FRAME).unwrap()
        {
            got.push(msg);
            buf.drain(..len);
        }
    }
    assert_eq!(got, vec![sample(), second]);
    assert!(buf.is_empty());
}

#[test]
fn bad_tags_trailing_bytes_and_empty_frames_are_malformed() {
    let mut payload = Vec::new();
    dhrt_proto::encode(&sample(), &mut payload).unwrap();
    // The op's variant index is the byte after the one-byte id.
    let mut bad_tag = payload.clone();
    bad_tag[1] = 200;
    let mut trailing = payload.clone();
    trailing.push(0);
    for bad in [bad_tag, trailing] {
        assert!(matches!(
            decode_frame::<Request>(&frame(&bad), DEFAULT_MAX_FRAME),
            Err(ProtoError::Malformed(_))
        ));
        assert!(matches!(
            dhrt_proto::decode::<dhrt_proto::RequestRef<'_>>(&bad),
            Err(ProtoError::Malformed(_))
        ));
        assert_eq!(request_id(&bad), Some(42));
    }
    assert!(matches!(
        decode_frame::<Request>(&[0, 0, 0, 0], DEFAULT_MAX_FRAME),
        Err(ProtoError::Malformed(_))
    ));
    assert_eq!(request_id(&[]), None);
}

#[test]
fn the_preamble_tells_binary_from_http() {
    assert_eq!(
        read_preamble(&preamble()).unwrap(),
        Preamble::Binary {
            version: 1,
            channel: dhrt_proto::Channel::Client
        }
    );
    assert_eq!(
        read_preamble(b"GET / HTTP/1.1\r\n").unwrap(),
        Preamble::NotBinary
    );
    assert_eq!(read_preamble(b"P").unwrap(), Preamble::NotBinary);
    assert_eq!(read_preamble(&[]).unwrap(), Preamble::Incomplete);
    assert_eq!(
        read_preamble(&preamble()[..5]).unwrap(),
        Preamble::Incomplete
    );
    let mut future = preamble();
    future[4] = 9;
    assert_eq!(
        read_preamble(&future),
        Err(ProtoError::UnsupportedVersion(9))
    );
}

#[test]
fn the_peer_channel_has_its_own_version() {
    use dhrt_proto::{Channel, PEER_PROTOCOL_VERSION, channel_preamble};
    let peer = channel_preamble(Channel::Peer);
    assert_eq!(
        read_preamble(&peer).unwrap(),
        Preamble::Binary {
            version: PEER_PROTOCOL_VERSION,
            channel: Channel::Peer
        }
    );
    // A node of a build before the sealed peer channel says version 1.
    let mut old = peer;
    old[4..6].copy_from_slice(&1u16.to_le_bytes());
    assert_eq!(read_preamble(&old), Err(ProtoError::UnsupportedVersion(1)));
    // The client channel did not change.
    let mut client = preamble();
    client[4..6].copy_from_slice(&PEER_PROTOCOL_VERSION.to_le_bytes());
    assert!(read_preamble(&client).is_err());
}

#[test]
fn oversized_messages_are_not_encoded() {
    let mut out = vec![1, 2, 3];
    let r = encode_frame(&sample(), &mut out, 100);
    assert!(matches!(r, Err(ProtoError::FrameTooLarge { max: 100, .. })));
    assert_eq!(out, vec![1, 2, 3]);
}

mod arbitrary {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Random bytes never panic the decoder, and a frame it accepts
        /// survives a re-encode unchanged.
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = read_preamble(&bytes);
            let _ = request_id(&bytes);
            // The borrowed form accepts exactly what the owned form accepts.
            let owned = dhrt_proto::decode::<Request>(&bytes);
            let borrowed = dhrt_proto::decode::<dhrt_proto::RequestRef<'_>>(&bytes);
            match (&owned, &borrowed) {
                (Ok(o), Ok(b)) => prop_assert_eq!(&o.op.as_ref(), &b.op),
                (Err(_), Err(_)) => {}
                _ => prop_assert!(false, "{owned:?} vs {borrowed:?}"),
            }
            if let Ok(Decoded::Complete { msg, .. }) = decode_frame::<Request>(&bytes, 1 << 16) {
                let mut again = Vec::new();
                encode_frame(&msg, &mut again, 1 << 16).unwrap();
                let back = decode_frame::<Request>(&again, 1 << 16).unwrap();
                prop_assert_eq!(back, Decoded::Complete { msg, len: again.len() });
            }
        }
    }
}
