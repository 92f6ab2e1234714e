//! The node-wide budget of large values in flight through client
//! connections: request bodies (HTTP) and unfinished frames (the binary
//! protocol) held in memory until they are whole, and values a node
//! relays from its peers, held until the client has read them. Each
//! connection is bounded by the largest value; this bounds them all
//! together, so that many clients uploading large values slowly (or
//! starting to and stopping), or asking for large values and not reading
//! them, cannot take the node's memory. A request that would go past it is
//! refused, at once, with a sentence saying so.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// Bytes of a request below which it is not counted: small requests (the
/// usual ones) never touch the shared counter.
pub const UNCOUNTED: usize = 64 << 10;

/// The budget: bytes held, against a limit.
#[derive(Debug)]
pub struct Inflight {
    held: AtomicUsize,
    max: usize,
}

impl Inflight {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Arc<Inflight> {
        Arc::new(Inflight {
            held: AtomicUsize::new(0),
            max,
        })
    }

    /// No limit (tests, embedders that bound connections otherwise).
    pub fn unlimited() -> Arc<Inflight> {
        Inflight::new(usize::MAX)
    }

    /// The limit, in bytes.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Appends the budget's gauges in Prometheus' text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# HELP dhrt_inflight_bytes Bytes of large values in flight (requests still arriving, values relayed from peers to clients still reading them), held against --max-inflight-mib.\n# TYPE dhrt_inflight_bytes gauge\ndhrt_inflight_bytes {}",
            self.held()
        );
        if self.max != usize::MAX {
            let _ = writeln!(
                out,
                "# HELP dhrt_inflight_limit_bytes --max-inflight-mib, in bytes.\n# TYPE dhrt_inflight_limit_bytes gauge\ndhrt_inflight_limit_bytes {}",
                self.max
            );
        }
    }

    /// `value` (received from a peer, in this node's memory) held against
    /// the budget until its last reference is dropped: once a client has
    /// read it, or its connection closed. Values below [`UNCOUNTED`] are
    /// not counted. The sentence for a client if the budget has no room.
    pub fn hold(self: &Arc<Self>, value: Bytes) -> Result<Bytes, String> {
        self.reserve(value.len())?.hold(value)
    }

    /// Room for a value of `len` bytes about to be fetched from a peer,
    /// taken before it is asked for: a value this node has no room for
    /// does not cross the network. Nothing is taken below [`UNCOUNTED`].
    /// The sentence for a client if the budget has no room.
    pub fn reserve(self: &Arc<Self>, len: usize) -> Result<Reserved, String> {
        let n = counted(len);
        if n > 0 && !self.try_take(n) {
            return Err(self.relay_refusal());
        }
        Ok(Reserved(Held {
            budget: self.clone(),
            bytes: n,
        }))
    }

    /// [`hold`](Self::hold) of several values together (a page of a
    /// listing: its keys and values), counted as one: their share is given
    /// back once the last of them is dropped. Nothing is counted when they
    /// add up to less than [`UNCOUNTED`].
    pub fn hold_all(self: &Arc<Self>, values: Vec<&mut Bytes>) -> Result<(), String> {
        let n: usize = values.iter().map(|v| v.len()).sum();
        if n < UNCOUNTED {
            return Ok(());
        }
        if !self.try_take(n) {
            return Err(self.relay_refusal());
        }
        let held = Arc::new(Held {
            budget: self.clone(),
            bytes: n,
        });
        for v in values {
            let value = std::mem::take(v);
            *v = Bytes::from_owner(Relayed {
                value,
                _held: held.clone(),
            });
        }
        Ok(())
    }

    fn relay_refusal(&self) -> String {
        format!(
            "this node already holds {} MiB of large values in flight (requests still arriving, values relayed to clients still reading them), against its limit of {} MiB (--max-inflight-mib): try again, or read from a node that stores the collection",
            self.held() >> 20,
            self.max >> 20
        )
    }

    fn try_take(&self, n: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |h| {
                h.checked_add(n).filter(|&t| t <= self.max)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
    }
}

/// What a value of `len` bytes counts against the budget.
fn counted(len: usize) -> usize {
    if len < UNCOUNTED { 0 } else { len }
}

/// Room taken for a value on its way from a peer
/// ([`Inflight::reserve`]); given back if dropped unused.
#[derive(Debug)]
pub struct Reserved(Held);

impl Reserved {
    /// `value`, held against the budget until its last reference is
    /// dropped, in the room taken for it (resized to its length: a value
    /// larger than the one announced needs room for the difference, and is
    /// refused, giving the room back, if there is none).
    pub fn hold(self, value: Bytes) -> Result<Bytes, String> {
        let mut held = self.0;
        let want = counted(value.len());
        if want > held.bytes {
            if !held.budget.try_take(want - held.bytes) {
                return Err(held.budget.relay_refusal());
            }
        } else if want < held.bytes {
            held.budget.give_back(held.bytes - want);
        }
        held.bytes = want;
        if want == 0 {
            return Ok(value);
        }
        Ok(Bytes::from_owner(Relayed {
            value,
            _held: Arc::new(held),
        }))
    }
}

/// A relayed value and its share of the budget.
struct Relayed {
    value: Bytes,
    _held: Arc<Held>,
}

impl AsRef<[u8]> for Relayed {
    fn as_ref(&self) -> &[u8] {
        &self.value
    }
}

/// What one request holds of the budget; given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Inflight>,
    bytes: usize,
}

impl Held {
    /// Holds nothing yet.
    pub fn new(budget: &Arc<Inflight>) -> Held {
        Held {
            budget: budget.clone(),
            bytes: 0,
        }
    }

    /// Holds what a request of `total` bytes so far needs (nothing below
    /// [`UNCOUNTED`]); `false`, holding what it held, if the budget cannot
    /// give it.
    pub fn resize(&mut self, total: usize) -> bool {
        let want = total.saturating_sub(UNCOUNTED);
        if want > self.bytes {
            if !self.budget.try_take(want - self.bytes) {
                return false;
            }
        } else if want < self.bytes {
            self.budget.give_back(self.bytes - want);
        }
        self.bytes = want;
        true
    }

    /// The sentence for a request refused because the budget is full.
    pub fn refusal(&self) -> String {
        format!(
            "this node already holds {} MiB of large values in flight (requests still arriving, values relayed to clients still reading them), against its limit of {} MiB (--max-inflight-mib): try again",
            self.budget.held() >> 20,
            self.budget.max() >> 20
        )
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.give_back(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_share_the_budget_and_give_it_back() {
        let budget = Inflight::new(1 << 20);
        let mut a = Held::new(&budget);
        let mut b = Held::new(&budget);
        // Small requests are not counted.
        assert!(a.resize(UNCOUNTED));
        assert_eq!(budget.held(), 0);
        assert!(a.resize(UNCOUNTED + (700 << 10)));
        assert!(!b.resize(UNCOUNTED + (400 << 10)), "past the limit");
        assert_eq!(budget.held(), 700 << 10);
        assert!(b.resize(UNCOUNTED + (300 << 10)));
        assert_eq!(budget.held(), 1000 << 10);
        drop(a);
        assert_eq!(budget.held(), 300 << 10);
        assert!(b.resize(10));
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn relayed_values_hold_the_budget_until_their_last_reference_goes() {
        let budget = Inflight::new(1 << 20);
        let small = budget.hold(Bytes::from(vec![1u8; 100])).unwrap();
        assert_eq!((small.len(), budget.held()), (100, 0), "not counted");
        let large = Bytes::from(vec![7u8; 600 << 10]);
        let held = budget.hold(large.clone()).unwrap();
        assert_eq!(held, large);
        assert_eq!(budget.held(), 600 << 10);
        // A slice (a body being written) keeps it held.
        let tail = held.slice(1000..);
        drop(held);
        assert_eq!(budget.held(), 600 << 10);
        // No room for another: refused, and nothing more is held.
        let refusal = budget.hold(large.clone()).unwrap_err();
        assert!(refusal.contains("--max-inflight-mib"), "{refusal}");
        assert_eq!(budget.held(), 600 << 10);
        // A request arriving shares the same budget.
        let mut request = Held::new(&budget);
        assert!(!request.resize(UNCOUNTED + (500 << 10)));
        drop(tail);
        assert_eq!(budget.held(), 0);
        assert!(request.resize(UNCOUNTED + (500 << 10)));
        assert!(budget.hold(large).is_err(), "the request holds its share");
    }

    #[test]
    fn room_reserved_for_a_value_is_resized_to_it_or_given_back() {
        let budget = Inflight::new(1 << 20);
        let room = budget.reserve(600 << 10).unwrap();
        assert_eq!(budget.held(), 600 << 10, "taken before the value comes");
        let refusal = budget.reserve(600 << 10).unwrap_err();
        assert!(refusal.contains("--max-inflight-mib"), "{refusal}");
        // The value came smaller than announced: the rest is given back.
        let value = room.hold(Bytes::from(vec![3u8; 500 << 10])).unwrap();
        assert_eq!((value.len(), budget.held()), (500 << 10, 500 << 10));
        // Larger than announced, with no room for the difference: refused,
        // and the room given back.
        let room = budget.reserve(300 << 10).unwrap();
        assert_eq!(budget.held(), 800 << 10);
        assert!(room.hold(Bytes::from(vec![4u8; 600 << 10])).is_err());
        assert_eq!(budget.held(), 500 << 10);
        // Unused room is given back; small values take none.
        drop(budget.reserve(400 << 10).unwrap());
        let small = budget.reserve(100).unwrap();
        assert_eq!(budget.held(), 500 << 10);
        assert_eq!(small.hold(Bytes::from_static(b"x")).unwrap(), "x");
        drop(value);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_page_is_held_as_one_until_its_last_part_goes() {
        let budget = Inflight::new(1 << 20);
        let (mut k1, mut v1) = (Bytes::from_static(b"k1"), Bytes::from(vec![1u8; 40 << 10]));
        let (mut k2, mut v2) = (Bytes::from_static(b"k2"), Bytes::from(vec![2u8; 40 << 10]));
        budget
            .hold_all(vec![&mut k1, &mut v1, &mut k2, &mut v2])
            .unwrap();
        assert_eq!(budget.held(), 4 + (80 << 10), "counted together");
        assert_eq!((&k1[..], v2[0], v2.len()), (&b"k1"[..], 2, 40 << 10));
        drop((k1, v1, k2));
        assert_eq!(budget.held(), 4 + (80 << 10));
        drop(v2);
        assert_eq!(budget.held(), 0);
        // Small pages are not counted; a page past the budget is refused.
        let mut small = Bytes::from_static(b"tiny");
        budget.hold_all(vec![&mut small]).unwrap();
        assert_eq!(budget.held(), 0);
        let mut huge = Bytes::from(vec![0u8; 2 << 20]);
        assert!(budget.hold_all(vec![&mut huge]).is_err());
        assert_eq!((budget.held(), huge.len()), (0, 2 << 20));
    }
}
