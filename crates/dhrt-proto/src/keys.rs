//! The keys a drop removed ([`crate::Operations::drop_collection`]): back
//! to back in one buffer, which may hold every key of a large collection.

use bytes::Bytes;

/// Keys in one shared buffer, each found by where it ends.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Keys {
    bytes: Bytes,
    ends: Vec<usize>,
}

impl Keys {
    /// The keys in `bytes` that end at each of `ends` (ascending, the last
    /// at most `bytes.len()`; the first starts at 0).
    ///
    /// # Panics
    /// If `ends` does not fit that description.
    pub fn from_parts(bytes: impl Into<Bytes>, ends: Vec<usize>) -> Self {
        let bytes = bytes.into();
        assert!(
            ends.windows(2).all(|w| w[0] <= w[1]) && ends.last().is_none_or(|&e| e <= bytes.len()),
            "key ends out of order or past the buffer"
        );
        Keys { bytes, ends }
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The keys, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        (0..self.len()).map(|i| &self.bytes[self.range(i)])
    }

    /// Each key as a slice of the shared buffer (no copy of the keys).
    pub fn to_bytes(&self) -> Vec<Bytes> {
        (0..self.len())
            .map(|i| self.bytes.slice(self.range(i)))
            .collect()
    }

    fn range(&self, i: usize) -> std::ops::Range<usize> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        start..self.ends[i]
    }
}

impl From<Vec<Bytes>> for Keys {
    fn from(keys: Vec<Bytes>) -> Self {
        let mut bytes = Vec::with_capacity(keys.iter().map(Bytes::len).sum());
        let mut ends = Vec::with_capacity(keys.len());
        for k in &keys {
            bytes.extend_from_slice(k);
            ends.push(bytes.len());
        }
        Keys::from_parts(bytes, ends)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_out_as_they_went_in() {
        let keys = Keys::from(vec![
            Bytes::from_static(b"a"),
            Bytes::new(),
            Bytes::from_static(b"bcd"),
        ]);
        assert_eq!(keys.len(), 3);
        assert_eq!(keys.iter().collect::<Vec<_>>(), [&b"a"[..], b"", b"bcd"]);
        assert_eq!(
            keys.to_bytes(),
            [&b"a"[..], b"", b"bcd"].map(Bytes::from_static)
        );
        assert!(Keys::default().is_empty());
    }

    #[test]
    #[should_panic(expected = "key ends out of order")]
    fn ends_past_the_buffer_are_refused() {
        Keys::from_parts(b"ab".to_vec(), vec![1, 3]);
    }
}
