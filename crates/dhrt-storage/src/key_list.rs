//! Keys back to back in one buffer: what a drop removed, which may be every
//! key of a large collection. Two million keys of 16 bytes take 48 MB
//! here; as an allocation each (`Vec<Vec<u8>>`), about 112 MB.

/// Keys in one buffer, each found by where it ends.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyList {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl KeyList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `key`.
    pub fn push(&mut self, key: &[u8]) {
        self.bytes.extend_from_slice(key);
        self.ends.push(self.bytes.len());
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Key `i`.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.bytes[start..end])
    }

    /// The keys, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        (0..self.len()).map(|i| self.get(i).expect("in range"))
    }

    /// Sorts the keys (bytewise). Holds a second copy while it runs.
    pub fn sort(&mut self) {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_unstable_by(|&a, &b| self.get(a).cmp(&self.get(b)));
        let mut sorted = KeyList {
            bytes: Vec::with_capacity(self.bytes.len()),
            ends: Vec::with_capacity(self.ends.len()),
        };
        for i in order {
            sorted.push(self.get(i).expect("in range"));
        }
        *self = sorted;
    }

    /// Each key as a vector of its own.
    pub fn to_vec(&self) -> Vec<Vec<u8>> {
        self.iter().map(<[u8]>::to_vec).collect()
    }

    /// The buffer and where each key ends in it.
    pub fn into_parts(self) -> (Vec<u8>, Vec<usize>) {
        (self.bytes, self.ends)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_go_in_back_to_back_and_come_out_whole_and_sorted() {
        let mut keys = KeyList::new();
        assert!(keys.is_empty());
        for k in [&b"pear"[..], b"", b"apple", b"fig", b"app"] {
            keys.push(k);
        }
        assert_eq!(keys.len(), 5);
        assert_eq!(keys.get(1), Some(&b""[..]));
        assert_eq!(keys.get(2), Some(&b"apple"[..]));
        assert_eq!(keys.get(5), None);
        keys.sort();
        assert_eq!(
            keys.to_vec(),
            [&b""[..], b"app", b"apple", b"fig", b"pear"].map(<[u8]>::to_vec)
        );
        let (bytes, ends) = keys.into_parts();
        assert_eq!(bytes, b"appapplefigpear");
        assert_eq!(ends, [0, 3, 8, 11, 15]);
    }
}
