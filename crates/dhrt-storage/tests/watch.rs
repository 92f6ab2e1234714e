//! Watching a collection: every change after a position, exactly, across
//! compaction, resharding and reopening; the distinct error when that is
//! impossible; snapshot then follow.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dhrt_storage::{
    ChangeKind, Error, Options, Position, Store, Version, Watch, WatchEvent, WatchFrom,
};
use proptest::prelude::*;

use crate::quiet_options;

/// Key → (value or None for a tombstone, version).
type State = BTreeMap<Vec<u8>, (Option<Vec<u8>>, Version)>;

fn drain(w: &mut Watch) -> Vec<WatchEvent> {
    let mut all = Vec::new();
    loop {
        let batch = w.poll(1 << 16).unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

fn changes(events: &[WatchEvent]) -> Vec<(ChangeKind, Vec<u8>, Option<Vec<u8>>)> {
    events
        .iter()
        .map(|e| match e {
            WatchEvent::Change(c) => (c.kind, c.key.to_vec(), c.value.as_ref().map(|v| v.to_vec())),
            other => panic!("not a change: {other:?}"),
        })
        .collect()
}

/// The live state as the store has it, tombstones included.
fn state_of(store: &Store, c: &str) -> State {
    store
        .records(c, None)
        .unwrap()
        .map(|r| (r.key, (r.value.map(|v| v.to_vec()), r.version)))
        .collect()
}

/// Applies watch events to `state` as a client would; checks that per key
/// the versions strictly increase and returns the events' positions.
fn apply_events(state: &mut State, events: &[WatchEvent]) -> Vec<Position> {
    let mut seen: HashMap<Vec<u8>, Version> = HashMap::new();
    let mut positions = Vec::new();
    for e in events {
        let WatchEvent::Change(c) = e else {
            panic!("not a change: {e:?}")
        };
        positions.push(c.position);
        match c.kind {
            ChangeKind::Drop => state.retain(|_, (_, v)| *v >= c.version),
            kind => {
                let key = c.key.to_vec();
                if let Some(prev) = seen.insert(key.clone(), c.version) {
                    assert!(
                        c.version > prev,
                        "versions of {key:?} went {prev:?} -> {:?}",
                        c.version
                    );
                }
                let value = (kind == ChangeKind::Set).then(|| c.value.as_ref().unwrap().to_vec());
                state.insert(key, (value, c.version));
            }
        }
    }
    positions
}

fn live(state: &State) -> BTreeMap<Vec<u8>, Vec<u8>> {
    state
        .iter()
        .filter_map(|(k, (v, _))| v.clone().map(|v| (k.clone(), v)))
        .collect()
}

#[test]
fn a_watch_sees_every_change_in_order_with_increasing_positions() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    store.set("c", b"before", b"x").unwrap();
    let mut w = store.watch("c", WatchFrom::Now, None).unwrap();
    assert!(w.poll(1024).unwrap().is_empty(), "nothing since now");
    store.set("c", b"a", b"1").unwrap();
    store.set("c", b"b", b"2").unwrap();
    store.delete("c", b"a").unwrap();
    store
        .set_many("c", &[(b"m1", b"x"), (b"m2", b"y")])
        .unwrap();
    store
        .apply(
            "c",
            b"r",
            Some(b"replicated"),
            Version::new(u64::MAX >> 2, 9),
        )
        .unwrap();
    let mut events = drain(&mut w);
    assert_eq!(
        changes(&events),
        vec![
            (ChangeKind::Set, b"b".to_vec(), Some(b"2".to_vec())),
            (ChangeKind::Delete, b"a".to_vec(), None),
            (ChangeKind::Set, b"m1".to_vec(), Some(b"x".to_vec())),
            (ChangeKind::Set, b"m2".to_vec(), Some(b"y".to_vec())),
            (ChangeKind::Set, b"r".to_vec(), Some(b"replicated".to_vec())),
        ],
        "a's set was superseded by its delete before the poll: only the winner"
    );
    // A drop supersedes every older key: a watch that reads after it sees
    // the drop alone.
    store.set("c", b"z", b"gone").unwrap();
    store.drop_collection("c").unwrap();
    let dropped = drain(&mut w);
    assert_eq!(
        changes(&dropped),
        vec![(ChangeKind::Drop, Vec::new(), None)]
    );
    events.extend(dropped);
    let positions: Vec<Position> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Change(c) => c.position,
            _ => unreachable!(),
        })
        .collect();
    assert!(positions.windows(2).all(|p| p[0].seq < p[1].seq));
    assert_eq!(w.position(), *positions.last().unwrap());
    // The position round-trips through its token.
    let token = w.position().to_string();
    assert_eq!(token.len(), 32);
    assert_eq!(token.parse::<Position>().unwrap(), w.position());
    assert!("xyz".parse::<Position>().is_err());
}

/// A batch of tiny records (short keys, empty values) is as small as one
/// of large ones: each event counts `EVENT_OVERHEAD` bytes besides its key
/// and value, so a watcher that stops reading holds a bounded batch, not
/// 65,536 events rendered into some 20 MB.
#[test]
fn a_batch_of_tiny_records_is_bounded_by_what_each_event_costs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    let budget = 64 << 10;
    for (from, snapshot) in [
        (WatchFrom::After(Position::START), false),
        (WatchFrom::Snapshot, true),
    ] {
        if !snapshot {
            for i in 0..20_000u32 {
                store.set("tiny", format!("{i}").as_bytes(), b"").unwrap();
            }
        }
        let mut w = store.watch("tiny", from, None).unwrap();
        let most = budget / dhrt_storage::EVENT_OVERHEAD + 1;
        let mut keys = 0;
        loop {
            let batch = w.poll(budget).unwrap();
            if batch.is_empty() {
                break;
            }
            assert!(
                batch.len() <= most,
                "{} events in one batch (snapshot: {snapshot}), at most {most}",
                batch.len()
            );
            keys += batch
                .iter()
                .filter(|e| matches!(e, WatchEvent::Change(_) | WatchEvent::Initial { .. }))
                .count();
            if matches!(batch.last(), Some(WatchEvent::InitialDone(_))) {
                break;
            }
        }
        assert_eq!(
            keys, 20_000,
            "every event still comes (snapshot: {snapshot})"
        );
    }
}

#[test]
fn a_watch_of_a_missing_collection_sees_it_from_its_first_write() {
    let store = Store::memory(quiet_options());
    let mut w = store.watch("later", WatchFrom::Now, None).unwrap();
    let mut snap = store.watch("later", WatchFrom::Snapshot, None).unwrap();
    assert!(w.poll(1024).unwrap().is_empty());
    assert_eq!(
        snap.poll(1024).unwrap(),
        vec![WatchEvent::InitialDone(Position::START)]
    );
    store.set("later", b"k", b"v").unwrap();
    assert_eq!(
        changes(&drain(&mut w)),
        vec![(ChangeKind::Set, b"k".to_vec(), Some(b"v".to_vec()))]
    );
    assert_eq!(changes(&drain(&mut snap)).len(), 1);
    // A position from before the collection existed resumes from its start.
    let mut from_start = store
        .watch("later", WatchFrom::After(Position::START), None)
        .unwrap();
    assert_eq!(changes(&drain(&mut from_start)).len(), 1);
}

#[test]
fn prefixes_filter_keys_but_the_position_moves_on() {
    let store = Store::memory(quiet_options());
    let mut w = store.watch("c", WatchFrom::Now, Some(b"user/")).unwrap();
    store.set("c", b"user/1", b"a").unwrap();
    store.set("c", b"order/1", b"b").unwrap();
    let events = drain(&mut w);
    assert_eq!(changes(&events).len(), 1);
    let WatchEvent::Change(c) = &events[0] else {
        unreachable!()
    };
    assert!(
        w.position().seq > c.position.seq,
        "moved past the filtered record"
    );
}

/// Resuming from a position gives every change after it, exactly, whatever
/// happened in between: compaction (with and without a purge of old
/// tombstones that the position had already passed), resharding, reopening.
#[test]
fn resume_is_exact_across_compaction_resharding_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        keys_per_shard: 2,
        min_index_shards: 1,
        ..quiet_options()
    };
    let store = Store::open(dir.path(), options.clone()).unwrap();
    for i in 0..200u32 {
        store.set("c", format!("k{i}").as_bytes(), b"old").unwrap();
    }
    let mut w = store.watch("c", WatchFrom::Now, None).unwrap();
    for i in 0..50u32 {
        store.delete("c", format!("k{i}").as_bytes()).unwrap();
    }
    drain(&mut w);
    let at = w.position();
    let mut expected = state_of(&store, "c");
    let base = expected.clone();
    for i in 40..120u32 {
        store
            .set(
                "c",
                format!("k{i}").as_bytes(),
                format!("new{i}").as_bytes(),
            )
            .unwrap();
    }
    for i in 100..110u32 {
        store.delete("c", format!("k{i}").as_bytes()).unwrap();
    }
    for i in 0..3000u32 {
        // Grows the index past a reshard.
        store.set("c", format!("n{i}").as_bytes(), b"n").unwrap();
    }
    expected = state_of(&store, "c");
    store.compact("c").unwrap();
    let check = |store: &Store| {
        let mut w = store.watch("c", WatchFrom::After(at), None).unwrap();
        let mut state = base.clone();
        let events = drain(&mut w);
        apply_events(&mut state, &events);
        assert_eq!(state, expected);
        // Nothing from before the position: k0..k39 were last changed then.
        for e in &events {
            if let WatchEvent::Change(c) = e {
                let k = String::from_utf8(c.key.to_vec()).unwrap();
                assert!(
                    !(k.starts_with('k') && k[1..].parse::<u32>().unwrap() < 40),
                    "{k} changed before the position"
                );
            }
        }
    };
    check(&store);
    drop(w);
    drop(store);
    let store = Store::open(dir.path(), options.clone()).unwrap();
    check(&store);
    // Writes after a restart carry on from the same history.
    let mut w = store.watch("c", WatchFrom::After(at), None).unwrap();
    drain(&mut w);
    store.set("c", b"after-restart", b"x").unwrap();
    let events = drain(&mut w);
    assert_eq!(
        changes(&events),
        vec![(
            ChangeKind::Set,
            b"after-restart".to_vec(),
            Some(b"x".to_vec())
        )]
    );
    let WatchEvent::Change(c) = &events[0] else {
        unreachable!()
    };
    assert_eq!(c.position.history, at.history);
    assert!(c.position.seq > at.seq);
}

#[test]
fn a_watch_follows_a_compaction_that_happens_while_it_lags() {
    let store = Store::memory(quiet_options());
    let mut w = store.watch("c", WatchFrom::Now, None).unwrap();
    for round in 0..5u32 {
        for i in 0..100u32 {
            store
                .set(
                    "c",
                    format!("k{i}").as_bytes(),
                    format!("{round}").as_bytes(),
                )
                .unwrap();
        }
    }
    // Read a little, then compact under the watch, then read the rest.
    let first = w.poll(1).unwrap();
    assert_eq!(first.len(), 1);
    store.compact("c").unwrap();
    let mut state = State::new();
    let mut events = first;
    events.extend(drain(&mut w));
    apply_events(&mut state, &events);
    assert_eq!(state, state_of(&store, "c"));
}

/// A watch that stops polling is behind by what was written since,
/// however many compactions replaced the file it last read: its lag is
/// measured where its next poll resumes, in the current file, not by what
/// is left of the replaced one (which hid a stalled watcher from the lag
/// rule for as long as writes went on).
#[test]
fn a_watch_that_stopped_reading_lags_by_what_was_written_since_across_compactions() {
    let store = Store::memory(quiet_options());
    let value = vec![b'v'; 1000];
    for i in 0..100u32 {
        store.set("c", format!("k{i}").as_bytes(), &value).unwrap();
    }
    let mut w = store.watch("c", WatchFrom::Now, None).unwrap();
    assert_eq!(w.lag_bytes_known(), Some(0));
    // 50 rounds of overwrites of the same 100 keys, a compaction after
    // each: at most one round's records live in the file at any time.
    for round in 0..50u32 {
        for i in 0..100u32 {
            store.set("c", format!("k{i}").as_bytes(), &value).unwrap();
        }
        store.compact("c").unwrap();
        let lag = w.lag_bytes_known().expect("told after a compaction");
        // Everything live was written after the watch's position.
        let live = store.stats().collections[0].bytes - 32;
        assert_eq!(lag, live, "round {round}");
        assert!(lag >= 100 * 1000, "round {round}: {lag}");
    }
    // Its next poll reads exactly that much: the last value of each key.
    let events = drain(&mut w);
    assert_eq!(events.len(), 100);
    assert_eq!(w.lag_bytes_known(), Some(0));
}

#[test]
fn impossible_resumes_are_refused_with_resume_gone() {
    let store = Store::memory(Options {
        tombstone_grace: Duration::ZERO,
        ..quiet_options()
    });
    store.set("c", b"k", b"v").unwrap();
    let w = store.watch("c", WatchFrom::Now, None).unwrap();
    let at = w.position();
    // Another history (another node, or the collection recreated).
    let foreign = Position {
        history: at.history ^ 0xff,
        seq: at.seq,
    };
    let err = store
        .watch("c", WatchFrom::After(foreign), None)
        .unwrap_err();
    assert!(matches!(err, Error::ResumeGone { .. }), "{err}");
    assert!(err.to_string().contains("take a snapshot"), "{err}");
    // Ahead of the log.
    let ahead = Position {
        history: at.history,
        seq: at.seq + 1000,
    };
    assert!(matches!(
        store.watch("c", WatchFrom::After(ahead), None),
        Err(Error::ResumeGone { .. })
    ));
    // A collection this node never had.
    assert!(matches!(
        store.watch("nothing", WatchFrom::After(at), None),
        Err(Error::ResumeGone { .. })
    ));
    // A delete after the position, purged by compaction.
    let mut lagging = store.watch("c", WatchFrom::After(at), None).unwrap();
    store.delete("c", b"k").unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let report = store.compact("c").unwrap();
    assert_eq!(report.purged_tombstones, 1);
    assert!(matches!(
        store.watch("c", WatchFrom::After(at), None),
        Err(Error::ResumeGone { .. })
    ));
    assert!(matches!(lagging.poll(1024), Err(Error::ResumeGone { .. })));
    // From after the purge, resuming works again.
    let now = store.watch("c", WatchFrom::Now, None).unwrap().position();
    store.set("c", b"k2", b"v").unwrap();
    let mut w = store.watch("c", WatchFrom::After(now), None).unwrap();
    assert_eq!(changes(&drain(&mut w)).len(), 1);
}

#[test]
fn a_snapshot_holds_every_key_once_then_every_later_change() {
    let store = Store::memory(quiet_options());
    for i in 0..500u32 {
        store
            .set("c", format!("k{i:03}").as_bytes(), b"v0")
            .unwrap();
    }
    store.delete("c", b"k000").unwrap();
    let mut w = store.watch("c", WatchFrom::Snapshot, None).unwrap();
    // Writes race the snapshot: some keys are listed with their new value.
    let mut events = w.poll(2000).unwrap();
    for i in 0..500u32 {
        store
            .set("c", format!("k{i:03}").as_bytes(), b"v1")
            .unwrap();
    }
    store.set("c", b"new", b"n").unwrap();
    events.extend(drain(&mut w));
    let done = events
        .iter()
        .position(|e| matches!(e, WatchEvent::InitialDone(_)))
        .expect("a marker");
    let mut state = State::new();
    let mut listed = HashMap::new();
    for e in &events[..done] {
        let WatchEvent::Initial {
            key,
            value,
            version,
        } = e
        else {
            panic!("{e:?} before the marker")
        };
        assert!(listed.insert(key.to_vec(), ()).is_none(), "listed twice");
        state.insert(key.to_vec(), (Some(value.to_vec()), *version));
    }
    assert_eq!(listed.len(), 499, "every live key once");
    assert!(!listed.contains_key(&b"k000"[..]));
    // After the marker, changes: no (key, version) already listed again.
    let listed_versions: HashMap<Vec<u8>, Version> =
        state.iter().map(|(k, (_, v))| (k.clone(), *v)).collect();
    for e in &events[done + 1..] {
        if let WatchEvent::Change(c) = e {
            assert!(
                listed_versions
                    .get(&c.key[..])
                    .is_none_or(|&v| c.version > v),
                "a listed version came again"
            );
        }
    }
    apply_events(&mut state, &events[done + 1..]);
    assert_eq!(live(&state), live(&state_of(&store, "c")));
}

#[test]
fn the_listener_hears_each_change_once_the_watch_can_read_it() {
    let store = Store::memory(quiet_options());
    let heard = Arc::new(AtomicUsize::new(0));
    let h = heard.clone();
    store.on_change(move |c| {
        assert_eq!(c, "c");
        h.fetch_add(1, Ordering::SeqCst);
    });
    store.set("c", b"a", b"1").unwrap();
    store.delete("c", b"missing").unwrap();
    store.delete("c", b"a").unwrap();
    store
        .apply("c", b"old", Some(b"x"), Version::new(1, 1))
        .unwrap();
    // The same replicated write again changes nothing.
    store
        .apply("c", b"old", Some(b"x"), Version::new(1, 1))
        .unwrap();
    store.drop_collection("c").unwrap();
    assert_eq!(heard.load(Ordering::SeqCst), 4);
}

#[test]
fn a_format_1_file_is_converted_and_keeps_every_record() {
    fn v1_record(buf: &mut Vec<u8>, kind: u8, key: &[u8], value: &[u8], ts: u64) {
        let start = buf.len();
        buf.extend_from_slice(&[0; 4]);
        buf.push(kind);
        buf.extend_from_slice(&[0; 3]);
        buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
        buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
        buf.extend_from_slice(&ts.to_le_bytes());
        buf.extend_from_slice(&7u64.to_le_bytes());
        buf.extend_from_slice(key);
        buf.extend_from_slice(value);
        let crc = crc32c::crc32c(&buf[start + 4..]);
        buf[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    }
    let dir = tempfile::tempdir().unwrap();
    let mut file = b"DHRTLOG\0".to_vec();
    file.extend_from_slice(&1u16.to_le_bytes());
    file.extend_from_slice(&[0, 0]);
    let crc = crc32c::crc32c(&file);
    file.extend_from_slice(&crc.to_le_bytes());
    v1_record(&mut file, 1, b"dropped", b"x", 1 << 16);
    v1_record(&mut file, 3, b"", b"", 2 << 16);
    v1_record(&mut file, 1, b"a", b"1", 3 << 16);
    v1_record(&mut file, 1, b"b", b"2", 4 << 16);
    v1_record(&mut file, 2, b"a", b"", 5 << 16);
    v1_record(&mut file, 1, b"b", b"3", 6 << 16);
    let path = dir.path().join("old.dhrt");
    std::fs::write(&path, &file).unwrap();
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert_eq!(store.recovery()[0].converted_records, Some(6));
    let state = state_of(&store, "old");
    assert_eq!(
        state,
        BTreeMap::from([
            (b"a".to_vec(), (None, Version::new(5 << 16, 7))),
            (
                b"b".to_vec(),
                (Some(b"3".to_vec()), Version::new(6 << 16, 7))
            ),
        ])
    );
    // Its history replays from the start, and goes on after reopening.
    let mut w = store
        .watch("old", WatchFrom::After(Position::START), None)
        .unwrap();
    let mut replayed = State::new();
    apply_events(&mut replayed, &drain(&mut w));
    assert_eq!(replayed, state);
    store.set("old", b"c", b"4").unwrap();
    drop(w);
    drop(store);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(
        u16::from_le_bytes([on_disk[8], on_disk[9]]),
        2,
        "rewritten in format 2"
    );
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert_eq!(store.recovery()[0].converted_records, None);
    assert_eq!(store.get("old", b"c").unwrap().as_deref(), Some(&b"4"[..]));
    assert_eq!(store.get("old", b"b").unwrap().as_deref(), Some(&b"3"[..]));
}

#[derive(Clone, Debug)]
enum Op {
    Set(u8, u8),
    Delete(u8),
    Apply(u8, Option<u8>, u16),
    Drop,
    Compact,
    Reopen,
    /// Remember the current position and state.
    Mark,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..24u8, any::<u8>()).prop_map(|(k, v)| Op::Set(k, v)),
        2 => (0..24u8).prop_map(Op::Delete),
        2 => (0..24u8, proptest::option::of(any::<u8>()), any::<u16>())
            .prop_map(|(k, v, t)| Op::Apply(k, v, t)),
        1 => Just(Op::Drop),
        1 => Just(Op::Compact),
        1 => Just(Op::Reopen),
        2 => Just(Op::Mark),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// From any position a watch handed out, the state at that moment plus
    /// the events of a watch resumed from it give the final state, per key
    /// with increasing versions: no silent gap, whatever ran in between.
    #[test]
    fn resuming_from_any_position_reaches_the_final_state(ops in proptest::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options { keys_per_shard: 1, ..quiet_options() };
        let mut store = Store::open(dir.path(), options.clone()).unwrap();
        let mut marks: Vec<(Position, State)> = vec![(Position::START, State::new())];
        let base_ts = dhrt_storage::wall_ms() << 16;
        for op in ops {
            let key = |k: u8| format!("key{k}").into_bytes();
            match op {
                Op::Set(k, v) => store.set("c", &key(k), &[v]).unwrap(),
                Op::Delete(k) => { store.delete("c", &key(k)).unwrap(); }
                Op::Apply(k, v, t) => {
                    let version = Version::new(base_ts - (u64::from(t) << 16), 3);
                    store.apply("c", &key(k), v.as_ref().map(std::slice::from_ref), version).unwrap();
                }
                Op::Drop => { store.drop_collection("c").unwrap(); }
                Op::Compact => { store.compact("c").unwrap(); }
                Op::Reopen => {
                    drop(store);
                    store = Store::open(dir.path(), options.clone()).unwrap();
                }
                Op::Mark => {
                    let w = store.watch("c", WatchFrom::Now, None).unwrap();
                    marks.push((w.position(), state_of(&store, "c")));
                }
            }
        }
        let fin = state_of(&store, "c");
        for (at, mut state) in marks {
            let mut w = store.watch("c", WatchFrom::After(at), None).unwrap();
            apply_events(&mut state, &drain(&mut w));
            prop_assert_eq!(live(&state), live(&fin));
        }
    }
}

#[test]
fn a_position_past_records_a_crash_took_is_refused_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    store.set("c", b"kept", b"1").unwrap();
    store.sync().unwrap();
    let kept_len = store.stats().collections[0].bytes;
    let mut w = store.watch("c", WatchFrom::Now, None).unwrap();
    let before = w.position();
    store.set("c", b"lost", b"2").unwrap();
    drain(&mut w);
    let seen = w.position();
    assert!(seen.seq > before.seq);
    drop(w);
    drop(store);
    // A power loss takes the unsynced record: the file ends where the sync
    // left it.
    let path = dir.path().join("c.dhrt");
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(kept_len).unwrap();
    drop(file);
    // (Closing synced everything; the watermark says what a power loss
    // right after the sync would have left.)
    let mut mark = b"DHRTDUR\0".to_vec();
    mark.extend_from_slice(&kept_len.to_le_bytes());
    let crc = crc32c::crc32c(&mark);
    mark.extend_from_slice(&crc.to_le_bytes());
    mark.extend_from_slice(&[0; 4]);
    std::fs::write(dir.path().join("c.dhrt.durable"), mark).unwrap();
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert_eq!(store.get("c", b"lost").unwrap(), None);
    let err = store.watch("c", WatchFrom::After(seen), None).unwrap_err();
    assert!(matches!(err, Error::ResumeGone { .. }), "{err}");
    assert!(err.to_string().contains("lost in a crash"), "{err}");
    // What the log still holds resumes as before.
    let mut w = store.watch("c", WatchFrom::After(before), None).unwrap();
    assert!(changes(&drain(&mut w)).is_empty());
    // A history-0 position other than the start is no position at all.
    let bogus = Position { history: 0, seq: 5 };
    assert!(matches!(
        store.watch("c", WatchFrom::After(bogus), None),
        Err(Error::ResumeGone { .. })
    ));
}
