//! The index key: short keys live inline in the index entry, so comparing
//! against them during a lookup touches no other cache line.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::ptr::NonNull;

/// Keys up to this many bytes are stored inline.
pub(crate) const INLINE: usize = 22;

/// An index key: inline up to 22 bytes, on the heap beyond. 24 bytes
/// either way.
#[derive(Clone)]
pub(crate) enum Key {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(HeapBytes),
}

/// The bytes of a long key, owned, behind a raw pointer rather than a
/// `Box`: an index shard copies its entries bitwise into a new array while
/// readers may still read the old one (see `shard.rs`), and a raw pointer
/// claims no unique access that such a copy would contradict. Exactly one
/// copy owns the bytes and frees them.
pub(crate) struct HeapBytes {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the bytes are owned and never written after creation.
unsafe impl Send for HeapBytes {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for HeapBytes {}

impl HeapBytes {
    fn new(bytes: &[u8]) -> Self {
        let boxed: Box<[u8]> = bytes.into();
        let len = boxed.len();
        let ptr = NonNull::new(Box::into_raw(boxed).cast::<u8>()).expect("Box is never null");
        HeapBytes { ptr, len }
    }

    #[inline]
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `ptr` and `len` come from a live `Box<[u8]>` this value
        // owns; it is freed only in `drop`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for HeapBytes {
    fn clone(&self) -> Self {
        HeapBytes::new(self.as_bytes())
    }
}

impl Drop for HeapBytes {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are those of the `Box<[u8]>` made in
        // `new`, owned by this value alone, dropped once.
        drop(unsafe {
            Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.ptr.as_ptr(),
                self.len,
            ))
        });
    }
}

const _: () = assert!(std::mem::size_of::<Key>() == 24);

/// `key` as an inline key's length and bytes, if it fits.
#[inline]
pub(crate) fn inline(key: &[u8]) -> Option<(u8, [u8; INLINE])> {
    (key.len() <= INLINE).then(|| {
        let mut bytes = [0; INLINE];
        bytes[..key.len()].copy_from_slice(key);
        (key.len() as u8, bytes)
    })
}

impl Key {
    pub(crate) fn new(key: &[u8]) -> Self {
        match inline(key) {
            Some((len, bytes)) => Key::Inline { len, bytes },
            None => Key::Heap(HeapBytes::new(key)),
        }
    }

    #[inline]
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..*len as usize],
            Key::Heap(b) => b.as_bytes(),
        }
    }
}

impl Borrow<[u8]> for Key {
    #[inline]
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// A key to look up: bytes that order as [`Key`] does, through
/// [`compare`] instead of a `memcmp` call per comparison.
#[repr(transparent)]
pub(crate) struct KeyRef([u8]);

impl PartialEq for KeyRef {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len() && compare(&self.0, &other.0) == Ordering::Equal
    }
}

impl Eq for KeyRef {}

impl KeyRef {
    #[inline]
    pub(crate) fn new(key: &[u8]) -> &KeyRef {
        // SAFETY: `KeyRef` is a `repr(transparent)` wrapper of `[u8]`, so
        // the two references have the same layout and metadata.
        unsafe { &*(key as *const [u8] as *const KeyRef) }
    }
}

impl PartialOrd for KeyRef {
    #[inline]
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for KeyRef {
    #[inline]
    fn cmp(&self, other: &Self) -> Ordering {
        compare(&self.0, &other.0)
    }
}

impl Borrow<KeyRef> for Key {
    #[inline]
    fn borrow(&self) -> &KeyRef {
        KeyRef::new(self.as_bytes())
    }
}

/// Byte-wise lexicographic order, as `<[u8]>::cmp`, eight bytes at a time
/// and inline: a lookup compares its key with a handful of nodes' keys,
/// most of them short, where a `memcmp` call costs more than the
/// comparison.
#[inline]
pub(crate) fn compare(a: &[u8], b: &[u8]) -> Ordering {
    let n = a.len().min(b.len());
    let (mut a8, mut b8) = (a[..n].chunks_exact(8), b[..n].chunks_exact(8));
    for (x, y) in (&mut a8).zip(&mut b8) {
        let x = u64::from_be_bytes(x.try_into().expect("8 bytes"));
        let y = u64::from_be_bytes(y.try_into().expect("8 bytes"));
        if x != y {
            return x.cmp(&y);
        }
    }
    for (x, y) in a8.remainder().iter().zip(b8.remainder()) {
        if x != y {
            return x.cmp(y);
        }
    }
    a.len().cmp(&b.len())
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    #[inline]
    fn cmp(&self, other: &Self) -> Ordering {
        compare(self.as_bytes(), other.as_bytes())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Two keys that often share a prefix, of lengths around the 8-byte
    /// steps and the inline limit.
    fn key_pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        (
            prop::collection::vec(0u8..4, 0..30),
            prop::collection::vec(any::<u8>(), 0..12),
            prop::collection::vec(any::<u8>(), 0..12),
        )
            .prop_map(|(prefix, a, b)| {
                let (mut x, mut y) = (prefix.clone(), prefix);
                x.extend(a);
                y.extend(b);
                (x, y)
            })
    }

    proptest! {
        #[test]
        fn compare_orders_as_slices_do((a, b) in key_pair()) {
            prop_assert_eq!(compare(&a, &b), a.cmp(&b));
            prop_assert_eq!(KeyRef::new(&a).cmp(KeyRef::new(&b)), a.cmp(&b));
            prop_assert_eq!(KeyRef::new(&a) == KeyRef::new(&b), a == b);
            prop_assert_eq!(Key::new(&a).cmp(&Key::new(&b)), a.cmp(&b));
        }
    }

    #[test]
    fn inline_and_heap_keys_order_like_slices() {
        let keys: Vec<Vec<u8>> = vec![
            vec![],
            b"a".to_vec(),
            vec![b'a'; 22],
            vec![b'a'; 23],
            b"b".to_vec(),
            vec![0xff; 40],
        ];
        for a in &keys {
            for b in &keys {
                assert_eq!(Key::new(a).cmp(&Key::new(b)), a.cmp(b));
                assert_eq!(Key::new(a).as_bytes(), &a[..]);
            }
        }
    }
}
