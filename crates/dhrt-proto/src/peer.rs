//! The peer protocol: what nodes say to each other on a connection that
//! opened with the [`Channel::Peer`](crate::Channel) preamble. First a
//! [`Handshake`] in which both sides prove they know the cluster secret
//! (the secret itself never crosses the wire), then [`PeerMessage`]s in
//! both directions: requests with ids and their responses (replication,
//! reads, anti-entropy, handoff, join) and one-way [`Gossip`] for
//! membership. Specified in `docs/protocol.md`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::message::OpError;
use crate::watch::{Token, WatchEvent, WatchRequest};

/// Length of handshake nonces and proofs (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;

/// The version of a write: hybrid-logical-clock timestamp and the id of the
/// node that accepted it. Greater wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// HLC timestamp: ms since the Unix epoch << 16 | logical counter.
    pub ts: u64,
    /// Node id.
    pub node: u64,
}

/// The handshake of a peer connection, in order: `Hello` (dialer), then
/// `Challenge` (listener), then `Proof` (dialer), then `Accepted` or
/// `Refused` (listener). The dialer proves first: a stranger learns a
/// node id and a random nonce, nothing it could test a guessed secret
/// against. Proofs are HMAC-SHA256 under the cluster secret (empty when
/// none is set) over the role, both node ids and both nonces. Every frame
/// after `Accepted` is sealed (`docs/protocol.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Handshake {
    /// The dialer's id and nonce.
    Hello {
        /// The dialer's node id.
        node: u64,
        /// Fresh random bytes.
        nonce: [u8; PROOF_LEN],
    },
    /// The listener's id and nonce; no proof yet.
    Challenge {
        /// The listener's node id.
        node: u64,
        /// Fresh random bytes.
        nonce: [u8; PROOF_LEN],
    },
    /// The dialer's proof over both ids and nonces.
    Proof {
        /// The dialer's proof.
        proof: [u8; PROOF_LEN],
    },
    /// The listener verified the dialer's proof; here is its own, which
    /// the dialer verifies before sending anything else.
    Accepted {
        /// The listener's proof.
        proof: [u8; PROOF_LEN],
    },
    /// The listener refuses the dialer; the connection closes.
    Refused {
        /// Why, for the dialer's log.
        reason: String,
    },
}

/// One frame on an established peer connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// A request; answered by a `Response` with the same id.
    Request {
        /// Chosen by the sender, echoed in the response.
        id: u64,
        /// What to do.
        op: PeerOp,
    },
    /// The answer to the request with this id.
    Response {
        /// The request's id.
        id: u64,
        /// The outcome.
        result: Result<PeerReply, OpError>,
    },
    /// Membership news; never answered directly.
    Gossip(Gossip),
    /// From the listener: how many bytes of the connection it has read so
    /// far. Sent while a frame takes long to arrive (a large value on a
    /// slow link), so that the dialer tells bytes still on their way from
    /// a peer that does not answer; never answered.
    Received {
        /// Bytes read from the dialer since the handshake.
        bytes: u64,
    },
}

/// One replicated change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mutation {
    /// A set (`value: Some`) or a delete (`None`) of a key, with its version.
    Put {
        /// Collection.
        collection: String,
        /// Key.
        key: Bytes,
        /// The value, or `None` for a delete.
        value: Option<Bytes>,
        /// The write's version.
        version: Stamp,
    },
    /// Every key of `collection` older than `version` is gone.
    Drop {
        /// Collection.
        collection: String,
        /// The drop's version.
        version: Stamp,
    },
}

/// A position in a [`PeerOp::Buckets`] listing: the bucket (one of the
/// requested ones) and how many of its records were already sent. Records
/// written meanwhile may shift it by a few: anti-entropy compares again
/// next round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketCursor {
    /// The bucket number.
    pub bucket: u32,
    /// Records of it already sent.
    pub skip: u64,
}

/// A key's entry as one node holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    /// The value, or `None` for a tombstone.
    pub value: Option<Bytes>,
    /// Its version.
    pub version: Stamp,
}

/// What one node holds of a collection, summarized for anti-entropy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionDigest {
    /// Collection.
    pub collection: String,
    /// The digest of each key-hash bucket.
    #[serde(deserialize_with = "at_most::<_, _, MAX_BUCKETS>")]
    pub buckets: Vec<u64>,
    /// The collection's newest drop, if any.
    pub dropped_at: Option<Stamp>,
    /// Entries held (live keys and tombstones).
    pub entries: u64,
}

/// The most mutations one [`PeerOp::Apply`] (or `ApplyReporting`) may
/// carry: what senders cut their batches at. More is refused as the frame
/// is decoded, not after: a frame of millions of tiny mutations decodes
/// into some sixteen times its size.
pub const MAX_APPLY: usize = 4096;

/// Lists in peer messages are refused as they decode once longer than
/// senders ever make them (a list of one-byte items decodes into many
/// times its frame): each list's limit is its field's.
const MAX_DIGESTS_NAMED: usize = 256;
/// Buckets of a digest (`DIGEST_BUCKETS` in dhrt-storage).
const MAX_BUCKETS: usize = 1024;
/// Members in a table or a gossip message: twice the most a node keeps.
const MAX_MEMBERS_SENT: usize = 2048;
/// Digests in one answer: far more than a [`PeerOp::DigestsAfter`] page
/// holds (about a MiB of them), as many as a full frame of small
/// collections' digests in an answer to [`PeerOp::Digests`].
const MAX_DIGESTS_SENT: usize = 65_536;

/// Decodes a list, refusing one of more than `N` items.
fn at_most<'de, D, T, const N: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct List<T, const N: usize>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const N: usize> serde::de::Visitor<'de> for List<T, N> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a list of at most {N} items")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let too_many = || serde::de::Error::custom(format!("a list of more than {N} items"));
            if seq.size_hint().is_some_and(|n| n > N) {
                return Err(too_many());
            }
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(item) = seq.next_element()? {
                if out.len() == N {
                    return Err(too_many());
                }
                out.push(item);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(List::<T, N>(std::marker::PhantomData))
}

/// A request from one node to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerOp {
    /// Apply these replicated changes: [`PeerReply::Applied`]. At most
    /// [`MAX_APPLY`] of them.
    Apply(#[serde(deserialize_with = "at_most::<_, _, MAX_APPLY>")] Vec<Mutation>),
    /// The receiver's entry for a key, tombstones included:
    /// [`PeerReply::Entry`].
    Read {
        /// Collection.
        collection: String,
        /// Key.
        key: Bytes,
    },
    /// The receiver's digests of these collections (every collection it
    /// has, when empty): [`PeerReply::Digests`].
    Digests(#[serde(deserialize_with = "at_most::<_, _, MAX_DIGESTS_NAMED>")] Vec<String>),
    /// The records of these buckets of a collection, in pages cut by
    /// bytes: [`PeerReply::Records`].
    Buckets {
        /// Collection.
        collection: String,
        /// Bucket numbers.
        #[serde(deserialize_with = "at_most::<_, _, MAX_BUCKETS>")]
        buckets: Vec<u32>,
        /// Where to go on: the `next` of the previous page, `None` for the
        /// first.
        from: Option<BucketCursor>,
    },
    /// A new node asks to join: [`PeerReply::Members`] with everyone known.
    Join(MemberUpdate),
    /// Stream a collection to the sender (join handoff), newest writes
    /// first, as `Apply` requests back over the sender's own connection;
    /// answered with [`PeerReply::HandoffDone`] once all are applied.
    Handoff {
        /// Collection.
        collection: String,
    },
    /// Open a watch of a collection the receiver stores, on behalf of a
    /// client of the sender (which does not store it):
    /// [`PeerReply::WatchOpened`]. The receiver keeps the watch as a
    /// session of the sender's, read with `WatchNext`, until `WatchClose`
    /// or until it goes unread for a while.
    WatchOpen(WatchRequest),
    /// The next events of a watch session, waiting at most `wait_ms` for
    /// some: [`PeerReply::Events`] (empty when none came in time).
    WatchNext {
        /// The session, as `WatchOpened` named it.
        session: u64,
        /// How long the receiver may wait for events.
        wait_ms: u32,
    },
    /// Close a watch session: [`PeerReply::WatchClosed`].
    WatchClose {
        /// The session.
        session: u64,
    },
    /// A page of the receiver's own listing of a collection (live keys, in
    /// its listing order): [`PeerReply::Page`]. For a node that does not
    /// own the collection.
    List {
        /// The collection.
        collection: String,
        /// Start after this key.
        after: Option<Bytes>,
        /// At most this many entries.
        limit: u32,
    },
    /// Apply these replicated changes as [`PeerOp::Apply`] does, and say
    /// which lost to a newer version the receiver holds:
    /// [`PeerReply::Superseded`] when some did, else
    /// [`PeerReply::Applied`]. The replication of client writes uses it:
    /// the writer stamps a write that lost again, later, so a write
    /// acknowledged to a client never loses to one acknowledged before it
    /// (a writer whose clock is behind, a node forwarding to the owners).
    /// At most [`MAX_APPLY`] of them.
    ApplyReporting(#[serde(deserialize_with = "at_most::<_, _, MAX_APPLY>")] Vec<Mutation>),
    /// The receiver's entry for a key, as [`PeerOp::Read`] answers it,
    /// with its value only if that is at most `inline_max` bytes:
    /// [`PeerReply::Entry`], or [`PeerReply::Withheld`] for a larger
    /// value. The fan-out read asks every live peer this way, then fetches
    /// a large value from one of the peers that hold its newest version:
    /// a value crosses the network once, not once per replica, and only
    /// after the reader has room for it.
    Peek {
        /// Collection.
        collection: String,
        /// Key.
        key: Bytes,
        /// The largest value sent inline.
        inline_max: u32,
    },
    /// A page of the receiver's digests of every collection it has, in
    /// name order, of the names after `after` (from the first with
    /// `None`): [`PeerReply::Digests`], cut at about a MiB; an empty page
    /// ends the listing. Anti-entropy and the full re-sync read a peer's
    /// digests this way, so that how many collections a node holds is not
    /// bounded by one frame.
    DigestsAfter {
        /// The last name of the page before, `None` for the first page.
        after: Option<String>,
    },
    /// How far the receiver's data can judge another's: [`PeerReply::Horizon`].
    /// A node in full re-sync asks its source before it forgets anything.
    Horizon,
    /// How fresh the receiver's data is: [`PeerReply::Contact`]. When
    /// every live member is syncing at once, each asks the others to
    /// choose the one that goes first.
    Contact,
    /// The receiver's replication factor for collections without a
    /// setting of their own: [`PeerReply::Replicas`]. A member that finds
    /// a peer computing owners with another one keeps the copies it would
    /// release.
    Replicas,
}

/// The answer to a [`PeerOp`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerReply {
    /// The changes were applied or found older than what the receiver
    /// holds, except those listed in `refused`.
    Applied {
        /// How many took effect.
        applied: u64,
        /// Indexes (into the request's list) of the changes the receiver
        /// refused and did not store: stamped too far in the future by its
        /// clock. They are not acknowledged.
        refused: Vec<u32>,
    },
    /// The entry, or `None` if the receiver has never seen the key.
    Entry(Option<Versioned>),
    /// Digests, one per collection.
    Digests(#[serde(deserialize_with = "at_most::<_, _, MAX_DIGESTS_SENT>")] Vec<CollectionDigest>),
    /// A page of records, as mutations to apply.
    Records {
        /// The records.
        records: Vec<Mutation>,
        /// Where the next page starts, if there is one.
        next: Option<BucketCursor>,
    },
    /// The members the receiver knows, itself included.
    Members(#[serde(deserialize_with = "at_most::<_, _, MAX_MEMBERS_SENT>")] Vec<MemberUpdate>),
    /// The handoff of a collection is complete: how many records it sent.
    HandoffDone(u64),
    /// A watch session is open.
    WatchOpened {
        /// Its name, for `WatchNext` and `WatchClose`.
        session: u64,
        /// The token that resumes from where it starts (a snapshot's is
        /// resumable only from its `Synced` event on).
        token: Token,
    },
    /// Events of a watch session, in order.
    Events(Vec<WatchEvent>),
    /// The session is closed (or was already gone).
    WatchClosed,
    /// A page of a listing.
    Page(crate::Page),
    /// The answer to [`PeerOp::ApplyReporting`] when some changes lost:
    /// as [`PeerReply::Applied`], and the index of each change that lost
    /// to a newer version held by the receiver, with that version.
    Superseded {
        /// How many took effect.
        applied: u64,
        /// As in [`PeerReply::Applied`].
        refused: Vec<u32>,
        /// Indexes (into the request's list) of changes older than what the
        /// receiver holds for their key (or than the collection's drop),
        /// each with the version held.
        newer: Vec<(u32, Stamp)>,
    },
    /// The answer to [`PeerOp::Peek`] for a live value larger than its
    /// `inline_max`: the version and size of the value the receiver holds,
    /// without it ([`PeerOp::Read`] fetches it).
    Withheld {
        /// Its version.
        version: Stamp,
        /// The value's length in bytes.
        len: u64,
    },
    /// The answer to [`PeerOp::Horizon`]: `None` when the receiver's data
    /// is the cluster's (it has been in touch, or re-synced from a member
    /// that was); else the stamp from which it was out of touch before it
    /// went on with its own data (every member was back from a long
    /// absence at once, or it came back alone): it cannot tell what was
    /// deleted after that, and a record stamped after it that it lacks is
    /// not one the cluster forgot.
    Horizon(Option<u64>),
    /// The answer to [`PeerOp::Contact`]: when the data the receiver holds
    /// was last in touch with the cluster (wall ms, by its peers' clocks
    /// as it noted them, kept across restarts), or `None` when it has not
    /// finished a sync (a newcomer, a wiped node, one stopped halfway
    /// through its handoff).
    /// Among members all syncing at once, the one with the latest goes
    /// first with its own data; one with `None` never does while another
    /// has some: the others would forget what it lacks.
    Contact(Option<u64>),
    /// The answer to [`PeerOp::Replicas`]: the cluster's default set
    /// through the API if there is one, else the receiver's `--replicas`;
    /// `None` for `all`.
    Replicas(Option<u16>),
}

/// A member's liveness, as one node has heard it. At equal incarnation a
/// later state in this order overrides an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Liveness {
    /// Answering.
    Alive,
    /// A probe or request failed; the member may refute it.
    Suspect,
    /// Suspected for too long; must re-sync before it serves again.
    Dead,
    /// Left gracefully.
    Left,
}

/// What is known of one member at one incarnation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberUpdate {
    /// Node id.
    pub id: u64,
    /// Human name.
    pub name: String,
    /// The address peers reach it at.
    pub addr: String,
    /// Bumped by the member itself to refute suspicion or announce a change;
    /// newer incarnations override older ones.
    pub incarnation: u64,
    /// Liveness at that incarnation.
    pub liveness: Liveness,
    /// The member is catching up (join handoff or re-sync) and is not yet a
    /// complete replica.
    pub syncing: bool,
    /// The collections it hosts, or `None` for all.
    pub collections: Option<Vec<String>>,
}

/// The longest member name or address a node takes (bytes).
pub const MAX_MEMBER_FIELD: usize = 255;

/// The most collections a member may list (`--collections`).
pub const MAX_MEMBER_COLLECTIONS: usize = 1024;

impl MemberUpdate {
    /// Whether this record is well formed, with the reason if not: a name
    /// and an address of at most [`MAX_MEMBER_FIELD`] bytes without
    /// control characters (the address is `host:port`, without spaces),
    /// and at most [`MAX_MEMBER_COLLECTIONS`] collections of valid names.
    /// Members are written into logs, listings and `cluster.state`, and
    /// gossiped to every node: a peer (which holds the cluster secret,
    /// but may be buggy or taken over) must not be able to smuggle lines
    /// into the state file or grow every node's member table without end.
    pub fn check(&self) -> Result<(), String> {
        let field = |what: &str, v: &str| {
            if v.is_empty() || v.len() > MAX_MEMBER_FIELD {
                return Err(format!(
                    "a member {what} must be 1 to {MAX_MEMBER_FIELD} bytes"
                ));
            }
            if v.chars().any(char::is_control) {
                return Err(format!("a member {what} must not hold control characters"));
            }
            Ok(())
        };
        field("name", &self.name)?;
        field("address", &self.addr)?;
        let port_ok = self
            .addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok || self.addr.chars().any(char::is_whitespace) {
            return Err("a member address must be host:port, without spaces".into());
        }
        if let Some(collections) = &self.collections {
            if collections.len() > MAX_MEMBER_COLLECTIONS {
                return Err(format!(
                    "a member may host at most {MAX_MEMBER_COLLECTIONS} named collections"
                ));
            }
            let valid = |c: &String| {
                !c.is_empty()
                    && c.len() <= 64
                    && c.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            };
            if !collections.iter().all(valid) {
                return Err("a member's collections must be valid collection names".into());
            }
        }
        Ok(())
    }
}

/// A membership message: the protocol exchange plus piggybacked news.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gossip {
    /// The sender's node id.
    pub from: u64,
    /// The sender's wall clock when it sent this, ms since the Unix epoch:
    /// how peers measure the offset between their clocks.
    pub sent_ms: u64,
    /// The largest clock offset the sender allows (its
    /// `--max-clock-offset-ms`): every node judges its own clock by the
    /// strictest setting in the cluster.
    pub max_offset_ms: u64,
    /// What kind of exchange this is.
    pub kind: GossipKind,
    /// Recent membership news.
    #[serde(deserialize_with = "at_most::<_, _, MAX_MEMBERS_SENT>")]
    pub updates: Vec<MemberUpdate>,
}

/// The exchanges of the membership protocol (SWIM with push-pull sync).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GossipKind {
    /// Are you there? Answer with `Ack { seq, about: you }`; with
    /// `relay: Some(origin)`, the sender asks on `origin`'s behalf.
    Ping {
        /// Probe sequence number.
        seq: u64,
        /// The node that asked for this probe, if indirect.
        relay: Option<u64>,
    },
    /// `about` answered probe `seq`.
    Ack {
        /// Probe sequence number.
        seq: u64,
        /// The probed node.
        about: u64,
        /// The node the ack is forwarded to, if the probe was indirect.
        relay: Option<u64>,
    },
    /// Please probe `target` for me and forward its ack.
    PingReq {
        /// The asker's probe sequence number.
        seq: u64,
        /// The node to probe.
        target: u64,
    },
    /// My full member table (in `updates`); answer with yours
    /// (`reply: false` on the answer).
    Sync {
        /// Whether the receiver should answer with its own table.
        reply: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, addr: &str) -> MemberUpdate {
        MemberUpdate {
            id: 1,
            name: name.into(),
            addr: addr.into(),
            incarnation: 1,
            liveness: Liveness::Alive,
            syncing: false,
            collections: None,
        }
    }

    /// A batch of more mutations than any sender cuts is refused as it is
    /// decoded; one at the limit decodes whole. The same for other lists.
    #[test]
    fn lists_longer_than_any_sender_makes_do_not_decode() {
        let put = Mutation::Put {
            collection: "c".into(),
            key: Bytes::from_static(b"k"),
            value: None,
            version: Stamp { ts: 1, node: 1 },
        };
        for (n, ok) in [(MAX_APPLY, true), (MAX_APPLY + 1, false)] {
            for op in [
                PeerOp::Apply(vec![put.clone(); n]),
                PeerOp::ApplyReporting(vec![put.clone(); n]),
            ] {
                let mut bytes = Vec::new();
                crate::encode(&op, &mut bytes).unwrap();
                let decoded = crate::decode::<PeerOp>(&bytes);
                assert_eq!(decoded.is_ok(), ok, "{n}: {decoded:?}");
                if ok {
                    assert_eq!(decoded.unwrap(), op);
                }
            }
        }
        // So are the names of a digest request, however short.
        for (n, ok) in [(MAX_DIGESTS_NAMED, true), (MAX_DIGESTS_NAMED + 1, false)] {
            let mut bytes = Vec::new();
            crate::encode(&PeerOp::Digests(vec![String::new(); n]), &mut bytes).unwrap();
            assert_eq!(crate::decode::<PeerOp>(&bytes).is_ok(), ok, "{n} names");
        }
        // And the digests of an answer, and each digest's buckets.
        let digest = |buckets: usize| CollectionDigest {
            collection: "c".into(),
            buckets: vec![7; buckets],
            dropped_at: None,
            entries: 0,
        };
        for (reply, ok) in [
            (PeerReply::Digests(vec![digest(MAX_BUCKETS)]), true),
            (PeerReply::Digests(vec![digest(MAX_BUCKETS + 1)]), false),
            (PeerReply::Digests(vec![digest(0); MAX_DIGESTS_SENT]), true),
            (
                PeerReply::Digests(vec![digest(0); MAX_DIGESTS_SENT + 1]),
                false,
            ),
        ] {
            let mut bytes = Vec::new();
            crate::encode(&reply, &mut bytes).unwrap();
            let decoded = crate::decode::<PeerReply>(&bytes);
            assert_eq!(decoded.is_ok(), ok, "{decoded:?}");
            if ok {
                assert_eq!(decoded.unwrap(), reply);
            }
        }
        let op = PeerOp::DigestsAfter {
            after: Some("users".into()),
        };
        let mut bytes = Vec::new();
        crate::encode(&op, &mut bytes).unwrap();
        assert_eq!(crate::decode::<PeerOp>(&bytes).unwrap(), op);
    }

    #[test]
    fn a_member_record_is_checked() {
        for ok in [
            member("n1", "10.0.0.2:7453"),
            member("eu west 1", "db-1.example:7453"),
            member("v6", "[::1]:7453"),
        ] {
            assert_eq!(ok.check(), Ok(()), "{ok:?}");
        }
        let long = "x".repeat(MAX_MEMBER_FIELD + 1);
        for bad in [
            member("n1", "127.0.0.1:7453\nseen 99999999999999"),
            member("n1\nforged log line", "127.0.0.1:7453"),
            member("", "127.0.0.1:7453"),
            member(&long, "127.0.0.1:7453"),
            member("n1", &format!("{long}:1")),
            member("n1", "127.0.0.1"),
            member("n1", ":7453"),
            member("n1", "127.0.0.1:99999"),
            member("n1", "a b:1"),
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
        let mut m = member("n1", "127.0.0.1:7453");
        m.collections = Some(vec!["users".into(), "../x".into()]);
        assert!(m.check().is_err());
        m.collections = Some(vec!["c".into(); MAX_MEMBER_COLLECTIONS + 1]);
        assert!(m.check().is_err());
        m.collections = Some(vec!["users".into(); MAX_MEMBER_COLLECTIONS]);
        assert_eq!(m.check(), Ok(()));
    }
}
