//! The cluster state file (`cluster.state` in the data directory): when
//! this node was last in touch with the cluster, and the members it knew.
//! A restart without `--node` rejoins through those members, and a node
//! away longer than the tombstone grace period knows it must re-sync fully.
//!
//! Plain text, one fact per line, rewritten atomically (write, fsync,
//! rename, fsync of the directory):
//!
//! ```text
//! # dhrt cluster state: written by dhrtd; keep it with the data (docs/operations.md)
//! seen 1764255000000
//! stamp 115622215680000000
//! fresh 1764255000000
//! member 10.0.0.2:7453
//! member 10.0.0.3:7453
//! left 10.0.0.4:7453
//! known 10.0.0.2:7453 3f465c332847fa5a dead * n2
//! known 10.0.0.3:7453 91d0c7e2a4b35f10 dead users,orders n3
//! known 10.0.0.4:7453 5603d15f839092af left * n4
//! ```
//!
//! A `known` line is a member as this node last knew it: its address, id,
//! whether it had left (`left`) or not (`dead`), pinned collections (`*`
//! for all, `,` for none) and name. After a restart it is known again at
//! once, as dead (or left) until it answers: a whole cluster restarted
//! without one member still places that member's collections on it
//! (unavailable, not empty), and a member that left or was removed is not
//! brought back by a node that missed it and remembers it as a member
//! (its `left` word, at the same incarnation, outranks that node's
//! `dead`). Versions before these lines ignore them.

use std::io;
use std::path::Path;

use dhrt_proto::{Liveness, MemberUpdate};

/// What the file holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct SavedState {
    /// Wall-clock milliseconds when this node last had a live peer (by
    /// its peers' clocks, once compared with them).
    pub(crate) seen_ms: u64,
    /// This node's own clock then, as a version timestamp (ms shifted
    /// left by 16, and a counter): what it wrote later has later stamps,
    /// whatever its clock's offset from its peers'. `None` in a file of an
    /// older version.
    pub(crate) stamp_ms: Option<u64>,
    /// The other members' addresses, left ones excluded.
    pub(crate) members: Vec<String>,
    /// The addresses of members that left: rejoined through after a
    /// restart (a whole cluster stopped one by one comes back), but not
    /// waited for as replicas.
    pub(crate) left: Vec<String>,
    /// The stamp from which this node's data cannot judge another's (it
    /// went on with its own data after a long absence), until every member
    /// has had a round with it: see `dhrt_proto::PeerReply::Horizon`.
    pub(crate) horizon: Option<u64>,
    /// When this node's data was last in touch with the cluster (`seen`
    /// while it was not syncing: a newcomer's half-done handoff is not
    /// fresh data), `Some(None)` when it holds none from a sync: see
    /// `dhrt_proto::PeerReply::Contact`. `None` in a file of an older
    /// version (then `seen` says it).
    pub(crate) fresh: Option<Option<u64>>,
    /// The members as this node knew them (`known` lines), each as dead
    /// or left at incarnation 0 (see [`remembered`]).
    pub(crate) known: Vec<MemberUpdate>,
}

/// Member `u` as a `known` line remembers it: left if it had left, dead
/// otherwise, at incarnation 0, below anything it says of itself, so its
/// first word replaces it; the incarnation also marks it as not heard from
/// in this life.
pub(crate) fn remembered(u: &MemberUpdate) -> MemberUpdate {
    MemberUpdate {
        id: u.id,
        name: u.name.clone(),
        addr: u.addr.clone(),
        incarnation: 0,
        liveness: if u.liveness == Liveness::Left {
            Liveness::Left
        } else {
            Liveness::Dead
        },
        syncing: false,
        collections: u.collections.clone(),
    }
}

/// A `known` line's fields after its keyword; `None` if malformed.
fn parse_known(rest: &str) -> Option<MemberUpdate> {
    let mut fields = rest.splitn(5, ' ');
    let addr = fields.next()?;
    let id = u64::from_str_radix(fields.next()?, 16).ok()?;
    let liveness = match fields.next()? {
        "dead" => Liveness::Dead,
        "left" => Liveness::Left,
        _ => return None,
    };
    let collections = match fields.next()? {
        "*" => None,
        list => Some(
            list.split(',')
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect(),
        ),
    };
    // Lines are read trimmed: a name that was only spaces is its address.
    let name = match fields.next().unwrap_or("").trim() {
        "" => addr,
        name => name,
    };
    let u = MemberUpdate {
        id,
        name: name.to_string(),
        addr: addr.to_string(),
        incarnation: 0,
        liveness,
        syncing: false,
        collections,
    };
    u.check().ok().map(|()| u)
}

/// Parses the file's text; unknown lines are ignored (newer versions may
/// add facts), a malformed `seen` is an error.
pub(crate) fn parse(text: &str) -> io::Result<SavedState> {
    let mut state = SavedState::default();
    let mut seen = false;
    for line in text.lines().map(str::trim) {
        if let Some(ms) = line.strip_prefix("seen ") {
            // The first one counts: the file has one, and a later one can
            // only have been smuggled in.
            if std::mem::replace(&mut seen, true) {
                continue;
            }
            state.seen_ms = ms.trim().parse().map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("bad line {line:?}"))
            })?;
        } else if let Some(ms) = line.strip_prefix("stamp ") {
            if state.stamp_ms.is_none() {
                state.stamp_ms = ms.trim().parse().ok();
            }
        } else if let Some(f) = line.strip_prefix("fresh ") {
            // Unreadable: as if it held no data from a sync (never first).
            if state.fresh.is_none() {
                state.fresh = Some(f.trim().parse().ok());
            }
        } else if let Some(h) = line.strip_prefix("horizon ") {
            // Unreadable: the lowest there is (nothing is judged by it).
            let h = h.trim().parse().unwrap_or(0);
            state.horizon = Some(state.horizon.map_or(h, |o: u64| o.min(h)));
        } else if let Some(addr) = line.strip_prefix("member ") {
            let addr = addr.trim();
            if !addr.is_empty() && !state.members.iter().any(|m| m == addr) {
                state.members.push(addr.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("known ") {
            // Malformed: skipped (the member is rejoined by its address
            // alone, as before these lines).
            if let Some(u) = parse_known(rest.trim())
                && !state.known.iter().any(|k| k.id == u.id)
            {
                state.known.push(u);
            }
        } else if let Some(addr) = line.strip_prefix("left ") {
            let addr = addr.trim();
            if !addr.is_empty() && !state.left.iter().any(|m| m == addr) {
                state.left.push(addr.to_string());
            }
        }
    }
    Ok(state)
}

/// The file's text for `state`.
pub(crate) fn render(state: &SavedState) -> String {
    let mut out = String::from(
        "# dhrt cluster state: written by dhrtd; keep it with the data (docs/operations.md)\n",
    );
    out.push_str(&format!("seen {}\n", state.seen_ms));
    if let Some(ms) = state.stamp_ms {
        out.push_str(&format!("stamp {ms}\n"));
    }
    if let Some(h) = state.horizon {
        out.push_str(&format!("horizon {h}\n"));
    }
    match state.fresh {
        Some(Some(ms)) => out.push_str(&format!("fresh {ms}\n")),
        Some(None) => out.push_str("fresh none\n"),
        None => {}
    }
    // A member's address is checked when it is learned; one that could
    // break a line is never written.
    for (kind, list) in [("member", &state.members), ("left", &state.left)] {
        for m in list.iter().filter(|m| !m.chars().any(char::is_whitespace)) {
            out.push_str(&format!("{kind} {m}\n"));
        }
    }
    // Checked when learned (no control characters, no space in the
    // address, valid collection names): nothing here breaks a line.
    for u in state.known.iter().filter(|u| u.check().is_ok()) {
        let pins = match &u.collections {
            None => "*".to_string(),
            Some(list) if list.is_empty() => ",".to_string(),
            Some(list) => list.join(","),
        };
        let state = if u.liveness == Liveness::Left {
            "left"
        } else {
            "dead"
        };
        out.push_str(&format!(
            "known {} {:016x} {state} {pins} {}\n",
            u.addr, u.id, u.name
        ));
    }
    out
}

/// Reads the file; `None` if there is none.
pub(crate) fn load(path: &Path) -> io::Result<Option<SavedState>> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Refuses a start over a damaged state file (there, but unreadable, or
/// naming no member, which no node writes: it is written only once there
/// are members to remember) when the node holds data and was given no
/// member to join through: it cannot tell which cluster it was part of,
/// and started alone it would serve its data apart from the cluster, with
/// no word of it. `Err` says what to do. A file that names members but
/// lost its `seen` line is not refused: the node rejoins through them and
/// re-syncs fully.
pub fn check_state_file(path: &Path, seeds_given: bool, holds_data: bool) -> Result<(), String> {
    let damage = match load(path) {
        Ok(Some(saved)) if saved.members.is_empty() && saved.left.is_empty() => {
            "it names no member".to_string()
        }
        Ok(_) => return Ok(()),
        Err(e) => e.to_string(),
    };
    if seeds_given || !holds_data {
        return Ok(());
    }
    Err(format!(
        "{} is damaged ({damage}): this node cannot tell which cluster it belonged to nor how long it was away, and started alone it would serve its data apart from the cluster. If it was a member of a cluster, start it with --node ADDR of a live member (it re-syncs fully before trusting its own data); if it ran alone, delete that file",
        path.display()
    ))
}

/// Replaces the file with `state`: written beside it and made durable,
/// then renamed over it, and the rename made durable. A power loss leaves
/// the old file or the new one, never an empty one (which would read as
/// "never in touch", or lose the members a restart rejoins through).
///
/// One save at a time: two at once (the contact loop's and a leave's)
/// shared the file beside it, and one could rename the other's half.
pub(crate) fn save(path: &Path, state: &SavedState) -> io::Result<()> {
    use std::io::Write;
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = path.with_extension("state.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(render(state).as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_ignores_what_it_does_not_know() {
        let s = SavedState {
            seen_ms: 1_764_255_000_000,
            stamp_ms: Some(1_764_254_945_000),
            members: vec!["10.0.0.2:7453".into(), "n3:7453".into()],
            left: vec!["n4:7453".into()],
            horizon: Some(115_622_210_000_000_000),
            fresh: Some(Some(1_764_254_999_000)),
            known: vec![
                remembered(&MemberUpdate {
                    id: 0x3f46_5c33_2847_fa5a,
                    name: "node two, rack 4".into(),
                    addr: "10.0.0.2:7453".into(),
                    incarnation: 1_764_255_000_000,
                    liveness: Liveness::Suspect,
                    syncing: true,
                    collections: None,
                }),
                remembered(&MemberUpdate {
                    id: 7,
                    name: "n3".into(),
                    addr: "n3:7453".into(),
                    incarnation: 9,
                    liveness: Liveness::Alive,
                    syncing: false,
                    collections: Some(vec!["users".into(), "orders".into()]),
                }),
                remembered(&MemberUpdate {
                    id: 8,
                    name: "n5".into(),
                    addr: "n5:7453".into(),
                    incarnation: 9,
                    liveness: Liveness::Left,
                    syncing: false,
                    collections: Some(Vec::new()),
                }),
            ],
        };
        assert_eq!(parse(&render(&s)).unwrap(), s);
        assert!(
            render(&s).contains("known 10.0.0.2:7453 3f465c332847fa5a dead * node two, rack 4\n")
        );
        assert!(render(&s).contains("known n5:7453 0000000000000008 left , n5\n"));
        // Malformed `known` lines are skipped, the rest is read; a name
        // lost to trimming is the address.
        let text = "seen 5\nknown a:1\nknown a:1 zz dead * n\nknown a:1 0a dead x/y n\n\
                    known a:1 0b gone * n\nknown a:1 0c dead * n\nknown a:1 0d left *\n";
        let known = parse(text).unwrap().known;
        assert_eq!(known.len(), 2, "{known:?}");
        assert_eq!((known[0].id, known[0].name.as_str()), (12, "n"));
        assert_eq!(known[0].liveness, Liveness::Dead);
        assert_eq!((known[1].id, known[1].name.as_str()), (13, "a:1"));
        assert_eq!(known[1].liveness, Liveness::Left);
        // No data from a sync (a newcomer mid-handoff): said so, never
        // taken for fresh; unreadable reads the same way.
        let none = SavedState {
            fresh: Some(None),
            ..s.clone()
        };
        assert_eq!(parse(&render(&none)).unwrap(), none);
        assert_eq!(parse("seen 5\nfresh x\n").unwrap().fresh, Some(None));
        // A file of an older version says nothing of it.
        assert_eq!(parse("seen 5\n").unwrap().fresh, None);
        // A node that went on with its own data keeps its horizon across
        // a restart; an unreadable one judges nothing.
        assert_eq!(
            parse(
                "seen 5
horizon 77
"
            )
            .unwrap()
            .horizon,
            Some(77)
        );
        assert_eq!(
            parse(
                "seen 5
horizon x
"
            )
            .unwrap()
            .horizon,
            Some(0)
        );
        assert_eq!(
            parse(
                "seen 5
"
            )
            .unwrap()
            .horizon,
            None
        );
        // A file of an older version has no stamp line.
        let text = "seen 5\nfuture-fact 1\nmember a:1\nmember a:1\nleft b:2\n\n";
        assert_eq!(
            parse(text).unwrap(),
            SavedState {
                seen_ms: 5,
                stamp_ms: None,
                members: vec!["a:1".into()],
                left: vec!["b:2".into()],
                horizon: None,
                fresh: None,
                known: Vec::new(),
            }
        );
        assert!(parse("seen yesterday\n").is_err());
    }

    #[test]
    fn saves_atomically_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.state");
        assert_eq!(load(&path).unwrap(), None);
        let s = SavedState {
            seen_ms: 42,
            stamp_ms: None,
            members: vec!["x:1".into()],
            left: Vec::new(),
            horizon: None,
            fresh: None,
            known: Vec::new(),
        };
        save(&path, &s).unwrap();
        assert_eq!(load(&path).unwrap(), Some(s));
        assert!(!path.with_extension("state.tmp").exists());
    }

    /// Saves from several threads at once each succeed, and the file is
    /// always one of them whole.
    #[test]
    fn saves_at_once_never_tear_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.state");
        let state = |t: u64| SavedState {
            seen_ms: t,
            stamp_ms: None,
            members: (0..50).map(|i| format!("n{t}-{i}:7453")).collect(),
            left: Vec::new(),
            horizon: None,
            fresh: None,
            known: Vec::new(),
        };
        std::thread::scope(|s| {
            for t in 1..=4u64 {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..50 {
                        save(path, &state(t)).unwrap();
                        let read = load(path).unwrap().unwrap();
                        assert_eq!(read, state(read.seen_ms));
                    }
                });
            }
        });
    }

    #[test]
    fn a_damaged_file_refuses_a_start_alone_over_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.state");
        // No file: a node that never joined, or one told to forget.
        assert!(check_state_file(&path, false, true).is_ok());
        save(
            &path,
            &SavedState {
                seen_ms: 42,
                stamp_ms: None,
                members: vec!["a:1".into()],
                left: Vec::new(),
                horizon: None,
                fresh: None,
                known: Vec::new(),
            },
        )
        .unwrap();
        assert!(check_state_file(&path, false, true).is_ok());
        // Its `seen` line lost, it still names a member to rejoin through
        // (and re-syncs fully).
        std::fs::write(&path, "member a:1\n").unwrap();
        assert!(check_state_file(&path, false, true).is_ok());
        for damaged in [
            "",
            "\0\0\0\0",
            "# dhrt cluster state\nseen 17965731977",
            "seen 1796573197784\n",
            "seen yesterday\nmember a:1\n",
        ] {
            std::fs::write(&path, damaged).unwrap();
            let e = check_state_file(&path, false, true).unwrap_err();
            assert!(e.contains("--node ADDR"), "{damaged:?}: {e}");
            // Given a member, the start goes on (and re-syncs fully);
            // without data there is nothing to keep apart.
            assert!(check_state_file(&path, true, true).is_ok());
            assert!(check_state_file(&path, false, false).is_ok());
        }
        std::fs::write(&path, [0xffu8, 0xfe, b'\n']).unwrap();
        assert!(check_state_file(&path, false, true).is_err());
    }

    /// A line smuggled into the file (a member address holding a newline)
    /// cannot replace `seen`, and such an address is never written.
    #[test]
    fn only_the_first_seen_counts_and_no_address_breaks_a_line() {
        let text = "seen 5\nmember a:1\nseen 99999999999999\n";
        assert_eq!(parse(text).unwrap().seen_ms, 5);
        let state = SavedState {
            seen_ms: 7,
            stamp_ms: None,
            members: vec!["a:1\nseen 99999999999999".into(), "b:2".into()],
            left: Vec::new(),
            horizon: None,
            fresh: None,
            known: Vec::new(),
        };
        let back = parse(&render(&state)).unwrap();
        assert_eq!(back.seen_ms, 7);
        assert_eq!(back.members, ["b:2"]);
    }
}
