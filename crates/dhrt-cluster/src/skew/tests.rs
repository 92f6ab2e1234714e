//! Unit tests of the clock guard, offsets, verdicts and the lead.

use super::*;

const HOUR: i64 = 3_600_000;
const MAX: u64 = 60_000;

#[test]
fn the_lead_is_the_latest_clock_the_cluster_does_not_find_skewed() {
    assert_eq!(lead(&[], MAX), 0);
    assert_eq!(lead(&[-5_000, -1], MAX), 0);
    assert_eq!(lead(&[-5_000, 5_000, 2_000], MAX), 5_000);
    // A clock beyond the allowed offset is skewed: not followed.
    assert_eq!(lead(&[2 * HOUR, 5_000], MAX), 5_000);
    assert_eq!(lead(&[MAX as i64], MAX), MAX);
    // This node at -15 s, peers at 0 and +50 s: the middle is 0, the
    // +50 s clock within the offset of it, followed (65 s from here);
    // from the node at 0, the same clock (+50 s).
    assert_eq!(lead(&[15_000, 65_000], MAX), 65_000);
    assert_eq!(lead(&[-15_000, 50_000], MAX), 50_000);
    // A chain 0, +40 s, +80 s: the middle +40 s, every clock within
    // the offset of it; all follow +80 s.
    assert_eq!(lead(&[40_000, 80_000], MAX), 80_000);
    assert_eq!(lead(&[-40_000, 40_000], MAX), 40_000);
    // Clocks 0, 0, +5 s and +65 s, from the one at +5 s: the +65 s
    // clock is within the offset of this one but beyond it from the
    // middle (0): skewed, not followed. From a node at 0: +5 s.
    assert_eq!(lead(&[-5_000, -5_000, 60_000], MAX), 0);
    assert_eq!(lead(&[0, 5_000, 65_000], MAX), 5_000);
    assert_eq!(lead(&[-2 * HOUR, 30_000], MAX), 30_000);
    // Two peers hours ahead agree with each other: this node is the
    // one off (skewed), and the lead stays within twice the offset.
    assert!(lead(&[2 * HOUR, 2 * HOUR], MAX) <= 2 * MAX);
}

#[test]
fn sentences_give_seconds_to_the_millisecond_below_ten() {
    assert_eq!(seconds(60_000), "60");
    assert_eq!(seconds(86_399_999), "86399");
    assert_eq!(seconds(1_000), "1");
    assert_eq!(seconds(1_003), "1.003");
    let v = verdict(&[-1_003], 1_000, 0);
    assert!(v.skewed);
    assert!(
        v.reason.contains("1.003 s off") && v.reason.contains("the 1 s allowed"),
        "{}",
        v.reason
    );
}

#[test]
fn the_peers_time_is_their_middle_and_a_tie_gives_both() {
    assert_eq!(peers_offset(&[]), (0, 0));
    assert_eq!(peers_offset(&[40_000]), (40_000, 40_000));
    // One of two peers two hours ahead: contact is recorded by the
    // other, absence measured by it.
    assert_eq!(peers_offset(&[2 * HOUR, 40_000]), (40_000, 2 * HOUR));
    assert_eq!(peers_offset(&[5, -3, 2 * HOUR]), (5, 5));
}

#[test]
fn the_guard_admits_up_to_the_allowed_offset_and_no_further() {
    let g = Guard { max_offset_ms: MAX };
    let wall = 1_800_000_000_000;
    assert!(g.admits(wall << LOGICAL_BITS, wall));
    assert!(g.admits((wall + MAX) << LOGICAL_BITS, wall));
    assert!(!g.admits(((wall + MAX) << LOGICAL_BITS) + 1, wall));
    assert!(!g.admits(u64::MAX, wall));
    assert_eq!(
        Guard::ahead_s((wall + 7_200_000) << LOGICAL_BITS, wall),
        7200
    );
}

#[test]
fn one_node_ahead_of_two_is_skewed_and_they_are_not() {
    // The skewed node sees both peers two hours behind.
    let v = verdict(&[-2 * HOUR, -2 * HOUR], MAX, 0);
    assert!(v.skewed, "{v:?}");
    assert_eq!(v.ahead_ms, 2 * HOUR);
    assert!(v.reason.contains("7200 s off"), "{}", v.reason);
    assert!(v.reason.contains("this node is ahead"), "{}", v.reason);
    // Each healthy node sees one peer two hours ahead, one in step,
    // and says it is in step with the cluster.
    let v = verdict(&[2 * HOUR, 15], MAX, 0);
    assert!(!v.skewed, "{v:?}");
    assert!(v.ahead_ms.abs() < 1000, "{v:?}");
    // A node behind the others is skewed as well.
    let v = verdict(&[HOUR, HOUR], MAX, 0);
    assert!(
        v.skewed && v.reason.contains("this node is behind"),
        "{v:?}"
    );
}

#[test]
fn in_a_pair_that_disagrees_both_refuse_writes() {
    // Nobody can tell whose clock is wrong.
    assert!(verdict(&[-HOUR], MAX, 0).skewed);
    assert!(verdict(&[HOUR], MAX, 0).skewed);
    assert!(!verdict(&[MAX as i64], MAX, 0).skewed);
    // Two against two: everyone refuses.
    assert!(verdict(&[HOUR, HOUR, 0], MAX, 0).skewed);
}

#[test]
fn a_skewed_node_takes_writes_again_only_clearly_within_the_limit() {
    let max = MAX as i64;
    let fine = Verdict::default();
    let skewed = verdict(&[max + 3], MAX, 0);
    assert!(skewed.skewed);
    // Into skew at once, as before.
    assert!(settle(&fine, skewed.clone(), &[max + 3], MAX, 0).skewed);
    // Measured just within the limit next round: still refusing.
    let fresh = verdict(&[max - 2], MAX, 0);
    assert!(!fresh.skewed);
    let kept = settle(&skewed, fresh, &[max - 2], MAX, 0);
    assert!(
        kept.skewed
            && kept
                .reason
                .contains("59 s off from the clocks of 1 of its 1 peers"),
        "{kept:?}"
    );
    // Within by more than a twentieth: writes again.
    let clear = max - max / 20 - 1;
    assert!(!settle(&skewed, verdict(&[clear], MAX, 0), &[clear], MAX, 0).skewed);
    // The same for stamps ahead of the clock in its log.
    let ahead = verdict(&[], MAX, MAX + 1);
    assert!(ahead.skewed);
    assert!(settle(&ahead, verdict(&[], MAX, MAX - 1), &[], MAX, MAX - 1).skewed);
    assert!(!settle(&ahead, verdict(&[], MAX, 1_000), &[], MAX, 1_000).skewed);
    // Skewed for its stamps, it is not held for a peer that sits
    // within the limit but inside the margin: only the stamps are
    // judged more strictly.
    let peer = [max - 2];
    let ahead = verdict(&peer, MAX, MAX + 1);
    assert!(ahead.skewed && ahead.by_stamps);
    assert!(!settle(&ahead, verdict(&peer, MAX, 1_000), &peer, MAX, 1_000).skewed);
    // And what it says while held says when it lets go.
    let held = settle(&skewed, verdict(&[max - 2], MAX, 0), &[max - 2], MAX, 0);
    assert!(held.reason.contains("once within 57 s"), "{}", held.reason);
}

#[test]
fn a_verdict_drawn_from_too_few_peers_gives_way_to_theirs_whole() {
    // Clocks 0, +30 s, +59 s and +61 s: the node at 0 first hears from
    // the +61 s one, and is skewed until it has heard enough.
    let first = unsettled(&[61_000], 2, MAX).unwrap();
    assert!(first.skewed && first.provisional);
    let all = [30_000, 59_000, 61_000];
    let fresh = verdict(&all, MAX, 0);
    assert!(!fresh.skewed, "{fresh:?}");
    // Three clocks of four within 60 s of it, but two of four within
    // 57 s: held by the margin, it would refuse writes for good.
    assert!(!settle(&first, fresh.clone(), &all, MAX, 0).skewed);
    // A verdict drawn from the peers keeps its margin.
    let judged = verdict(&[61_000, 61_000, 30_000], MAX, 0);
    assert!(judged.skewed && !judged.provisional);
    assert!(settle(&judged, fresh, &all, MAX, 0).skewed);
}

#[test]
fn the_cluster_time_is_the_median_and_the_guard_follows_the_later_clock() {
    assert_eq!(cluster_offset(&[], MAX), 0);
    // Ahead of two peers in step: the cluster is two hours behind.
    assert_eq!(cluster_offset(&[-2 * HOUR, -2 * HOUR], MAX), -2 * HOUR);
    // In step with one of two: the cluster is here.
    assert_eq!(cluster_offset(&[2 * HOUR, 0], MAX), 0);
    // Behind both: the cluster is ahead, and the guard admits its
    // stamps.
    let behind = cluster_offset(&[2 * HOUR, 2 * HOUR], MAX);
    assert_eq!(behind, 2 * HOUR);
    let g = Guard { max_offset_ms: MAX };
    let wall = 1_800_000_000_000u64;
    let their_stamp = (wall + 2 * HOUR as u64) << LOGICAL_BITS;
    assert!(!g.admits(their_stamp, wall));
    assert!(g.admits(their_stamp, Guard::reference(wall, behind)));
    // A node ahead keeps its own clock as the reference.
    assert_eq!(Guard::reference(wall, -2 * HOUR), wall);
    // A tie beyond the allowed offset takes the lower middle: a pair
    // that disagrees refuses each other's future.
    assert_eq!(cluster_offset(&[2 * HOUR], MAX), 0);
    assert_eq!(cluster_offset(&[-2 * HOUR], MAX), -2 * HOUR);
    assert_eq!(cluster_offset(&[0, 2 * HOUR, 2 * HOUR], MAX), 0);
}

#[test]
fn a_pair_in_step_admits_by_the_later_clock_on_both_sides() {
    let g = Guard { max_offset_ms: MAX };
    let wall = 1_800_000_000_000u64;
    // A chain at 0, +40 s, +80 s: the node at 0 admits by the middle.
    assert_eq!(cluster_offset(&[40_000, 80_000], MAX), 40_000);
    // The top leaves: the node at 0 keeps its peer's clock as its
    // reference, and judges the top's stamps it took by it.
    let low = cluster_offset(&[40_000], MAX);
    assert_eq!(low, 40_000);
    let top_stamp = (wall + 80_000) << LOGICAL_BITS;
    assert!(g.admits(top_stamp, Guard::reference(wall, low)));
    // Its peer (at +40 s) admits by its own clock: the same limit.
    let high = cluster_offset(&[-40_000], MAX);
    let peer_wall = wall + 40_000;
    assert_eq!(
        Guard::reference(peer_wall, high),
        Guard::reference(wall, low)
    );
    let v = verdict(&[40_000], MAX, 80_000 - 40_000);
    assert!(!v.skewed, "{v:?}");
    assert_eq!(v.ahead_ms, -40_000);
    // Clocks at 0, 0, +50 s and +110 s: the one at +110 s is more than
    // the allowed offset ahead of the lower middle, so the node at 0
    // keeps its own clock and refuses that node's stamps (the upper
    // middle would admit them), and has nothing to judge itself by
    // when it leaves.
    assert_eq!(cluster_offset(&[0, 50_000, 110_000], MAX), 0);
    let skewed_stamp = (wall + 110_000) << LOGICAL_BITS;
    assert!(!g.admits(skewed_stamp, Guard::reference(wall, 0)));
    // The same four from the node at +50 s: its own clock.
    assert_eq!(cluster_offset(&[-50_000, -50_000, 60_000], MAX), -50_000);
    // Every clock within the allowed offset of the lower middle.
    assert_eq!(cluster_offset(&[0, 55_000, 55_000], MAX), 55_000);
}

#[test]
fn a_verdict_the_unmeasured_peers_could_overturn_is_not_decided() {
    // Joined a cluster at 0, 0 and +50 s with a clock at +110 s, and
    // measured the +50 s node and one at 0: one within, one off, one
    // not measured, whose clock decides.
    assert!(!verdict(&[-60_000, -110_000], MAX, 0).skewed);
    assert!(!decided(&[-60_000, -110_000], 1, MAX));
    assert!(decided(&[-60_000, -110_000, -110_000], 0, MAX));
    // Most peers within: decided whatever the rest says.
    assert!(decided(&[5, -3], 1, MAX));
    assert!(decided(&[5, -3, 40_000], 2, MAX));
    assert!(!decided(&[5], 2, MAX));
    // Most peers off: skewed whatever the rest says.
    assert!(decided(&[HOUR, HOUR, HOUR], 1, MAX));
    assert!(!decided(&[HOUR], 1, MAX));
    assert!(decided(&[], 0, MAX));
    // Not decided, one peer heard beyond the allowed offset: skewed
    // until enough are heard.
    let v = unsettled(&[-60_000, -110_000], 1, MAX).unwrap();
    assert!(
        v.skewed && v.reason.contains("with 1 more not heard from yet"),
        "{v:?}"
    );
    assert!(unsettled(&[5, -3], 2, MAX).is_none());
}

#[test]
fn small_offsets_and_no_peers_are_fine() {
    assert!(!verdict(&[], MAX, 0).skewed);
    assert!(!verdict(&[59_000, -59_000, 0], MAX, 0).skewed);
    assert_eq!(verdict(&[], MAX, 0).ahead_ms, 0);
}

#[test]
fn a_clock_pushed_ahead_by_its_own_log_is_skewed() {
    let v = verdict(&[0, 10], MAX, 2 * HOUR as u64);
    assert!(v.skewed);
    assert!(v.reason.contains("stamped 7200 s ahead"), "{}", v.reason);
    assert!(!verdict(&[0], MAX, MAX).skewed);
}

#[test]
fn an_offset_is_the_least_delayed_recent_sample_carried_on_the_monotonic_clock() {
    let mut o = Offsets::default();
    // Peer 7's clock reads 1_000_000 when this node's monotonic clock
    // reads 10 (10 ms in flight) and later 2_000_000 at 1_000_002.
    o.record(7, 1_000_000, 10);
    o.record(7, 2_000_000, 1_000_002);
    // Now: monotonic 1_000_002, this node's wall 5_000_000.
    assert_eq!(o.of(7, 5_000_000, 1_000_002), Some(2_000_000 - 5_000_000));
    assert_eq!(o.of(8, 0, 0), None);
    o.record(8, 0, 5); // unstamped: ignored
    assert_eq!(o.of(8, 0, 0), None);
    // This node's wall clock jumps an hour ahead; its monotonic clock
    // does not: the peer shows an hour behind at once, no new sample.
    let later = 1_000_102;
    let before = o.of(7, 5_000_100, later).unwrap();
    let after = o.of(7, 5_000_100 + HOUR as u64, later).unwrap();
    assert_eq!(before - after, HOUR);
    // The peer's own clock jumps: its new samples roll the old out.
    for i in 0..SAMPLES as u64 {
        o.record(7, 10_000_000 + i - HOUR as u64, later + i);
    }
    assert_eq!(o.of(7, 10_000_000, later), Some(-HOUR));
    o.retain(|id| id != 7);
    assert_eq!(o.of(7, 0, 0), None);
}

#[test]
fn the_strictest_allowed_offset_in_the_cluster_judges() {
    let mut o = Offsets::default();
    assert_eq!(o.strictest(200_000), 200_000);
    o.record_setting(1, 60_000);
    o.record_setting(2, 0); // not said
    o.record_setting(3, 90_000);
    assert_eq!(o.strictest(200_000), 60_000);
    assert_eq!(o.strictest(1_000), 1_000);
    o.retain(|id| id != 1);
    assert_eq!(o.strictest(200_000), 90_000);
}
