//! The JSON shapes of the API: `{"Key": k, "Value": v}`, `["k1", ...]`,
//! `{"Error": "..."}`. Values that are not UTF-8 are sent as base64 in
//! `ValueBase64` instead of being mangled; keys in `KeyBase64`, beside a
//! `Key` that only shows them.

use std::borrow::Cow;

use base64::Engine;
use serde::Serialize;

#[derive(Serialize)]
struct KeyValue<'a> {
    #[serde(rename = "Key")]
    key: Cow<'a, str>,
    #[serde(rename = "KeyBase64", skip_serializing_if = "Option::is_none")]
    key_base64: Option<String>,
    #[serde(rename = "Value", skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    #[serde(rename = "ValueBase64", skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
    #[serde(rename = "Bytes", skip_serializing_if = "Option::is_none")]
    bytes: Option<usize>,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn key_fields(key: &[u8]) -> (Cow<'_, str>, Option<String>) {
    match std::str::from_utf8(key) {
        Ok(k) => (Cow::Borrowed(k), None),
        Err(_) => (String::from_utf8_lossy(key), Some(b64(key))),
    }
}

/// Whether `s` goes into a JSON string as it is: UTF-8 with nothing to
/// escape (no control character, quote or backslash).
fn plain(s: &[u8]) -> bool {
    // The common case, printable ASCII, is checked 16 bytes at a time
    // without a branch per byte (the compiler makes vector compares of it);
    // anything else gets the exact test.
    fn escapes(b: u8) -> u8 {
        // Below 0x20 or from 0x80 up in one unsigned compare.
        u8::from(b.wrapping_sub(0x20) >= 0x60) | u8::from(b == b'"') | u8::from(b == b'\\')
    }
    let (blocks, rest) = s.as_chunks::<16>();
    let ascii = blocks
        .iter()
        .all(|block| block.iter().fold(0, |bad, &b| bad | escapes(b)) == 0)
        && rest.iter().all(|&b| escapes(b) == 0);
    ascii
        || s.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\') && std::str::from_utf8(s).is_ok()
}

/// The length of `{"Key": k, "Value": v}` when both are [`plain`].
fn plain_key_value_len(key: &[u8], value: &[u8]) -> Option<usize> {
    (plain(key) && plain(value)).then(|| key.len() + value.len() + 21)
}

/// `{"Key": k, "Value": v}` of plain strings, byte for byte what serde_json
/// writes.
fn plain_key_value(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    out.extend_from_slice(br#"{"Key":""#);
    out.extend_from_slice(key);
    out.extend_from_slice(br#"","Value":""#);
    out.extend_from_slice(value);
    out.extend_from_slice(br#""}"#);
}

/// `{"Key": k, "Value": v}` as a buffer of exactly its length (so it
/// becomes a response body without another allocation).
pub(crate) fn key_value_body(key: &[u8], value: &[u8]) -> Vec<u8> {
    let Some(len) = plain_key_value_len(key, value) else {
        let mut out = Vec::new();
        serde_key_value(&mut out, key, value);
        return out;
    };
    let mut out = Vec::with_capacity(len);
    plain_key_value(&mut out, key, value);
    out
}

/// `{"Key": k, "Value": v}`.
pub(crate) fn key_value(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    if plain_key_value_len(key, value).is_some() {
        plain_key_value(out, key, value);
    } else {
        serde_key_value(out, key, value);
    }
}

/// `{"Key": k, "Value": v}` through serde_json: escapes, and base64 for
/// what is not UTF-8.
fn serde_key_value(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let (key, key_base64) = key_fields(key);
    let (value, value_base64) = match std::str::from_utf8(value) {
        Ok(v) => (Some(v), None),
        Err(_) => (None, Some(b64(value))),
    };
    let kv = KeyValue {
        key,
        key_base64,
        value,
        value_base64,
        bytes: None,
    };
    serde_json::to_writer(out, &kv).expect("writing JSON to a Vec cannot fail");
}

/// `{"Key": k, "Value": v}` in pieces, each from about `step` bytes of the
/// value (so at most six times that, escaped), for values too large to
/// escape into one buffer: a 16 MiB value of control bytes is 96 MiB of
/// JSON. The pieces joined are byte for byte [`key_value`]'s output.
pub(crate) struct KeyValuePieces<'a> {
    key: &'a [u8],
    value: &'a [u8],
    /// Whether the value goes as text (UTF-8) or as base64.
    text: bool,
    /// How much of the value is written; `None` before the opening part.
    at: Option<usize>,
    step: usize,
    done: bool,
}

impl<'a> KeyValuePieces<'a> {
    pub(crate) fn new(key: &'a [u8], value: &'a [u8], step: usize) -> Self {
        KeyValuePieces {
            key,
            value,
            text: std::str::from_utf8(value).is_ok(),
            at: None,
            // Base64 is cut at multiples of three bytes, so that the pieces
            // carry no padding but the last.
            step: step.max(3) / 3 * 3,
            done: false,
        }
    }
}

impl Iterator for KeyValuePieces<'_> {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.done {
            return None;
        }
        let Some(at) = self.at else {
            // `{"Key":..., ["KeyBase64":...,] "Value":"` (or ValueBase64).
            let (key, key_base64) = key_fields(self.key);
            let mut out = b"{\"Key\":".to_vec();
            serde_json::to_writer(&mut out, &key).expect("writing JSON to a Vec cannot fail");
            if let Some(b) = key_base64 {
                out.extend_from_slice(b",\"KeyBase64\":");
                serde_json::to_writer(&mut out, &b).expect("writing JSON to a Vec cannot fail");
            }
            out.extend_from_slice(if self.text {
                b",\"Value\":\""
            } else {
                b",\"ValueBase64\":\""
            });
            self.at = Some(0);
            return Some(out);
        };
        if at >= self.value.len() {
            self.done = true;
            return Some(b"\"}".to_vec());
        }
        let mut end = (at + self.step).min(self.value.len());
        let mut out = Vec::new();
        if self.text {
            // Cut between characters: escaping is per character, so the
            // escaped pieces joined are the whole escaped. Only this piece
            // is looked at (checking the whole value for each piece made a
            // large value's JSON cost the square of its size).
            while end < self.value.len() && is_continuation(self.value[end]) {
                end += 1;
            }
            #[cfg(test)]
            tests::CHECKED.with(|c| c.set(c.get() + (end - at)));
            let piece = std::str::from_utf8(&self.value[at..end])
                .expect("a piece of checked UTF-8 cut between characters");
            serde_json::to_writer(&mut out, piece).expect("writing JSON to a Vec cannot fail");
            // Without the quotes serde_json put around the piece.
            out.pop();
            out.remove(0);
        } else {
            out = b64(&self.value[at..end]).into_bytes();
        }
        self.at = Some(end);
        Some(out)
    }
}

/// Whether `b` continues a UTF-8 character (so no character starts at it).
fn is_continuation(b: u8) -> bool {
    b & 0xC0 == 0x80
}

/// `{"Key": k}`, plus `"Bytes": n` when given.
pub(crate) fn key_only(key: &[u8], bytes: Option<usize>) -> Vec<u8> {
    let (key, key_base64) = key_fields(key);
    let kv = KeyValue {
        key,
        key_base64,
        value: None,
        value_base64: None,
        bytes,
    };
    serde_json::to_vec(&kv).expect("writing JSON to a Vec cannot fail")
}

/// `["k1", "k2", ...]` (non-UTF-8 keys lossily: a key list is for people).
pub(crate) fn key_list(keys: &dhrt_proto::Keys) -> Vec<u8> {
    // One key at a time: a drop may list millions, and a `Vec` of them as
    // strings would be a second copy of the list.
    let mut out = Vec::with_capacity(2 + keys.iter().map(|k| k.len() + 3).sum::<usize>());
    out.push(b'[');
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, &String::from_utf8_lossy(k))
            .expect("writing JSON to a Vec cannot fail");
    }
    out.push(b']');
    out
}

/// [`key_list`] in pieces of about `step` bytes (one key may go past it):
/// a drop of millions of keys holds its list of keys, not also the whole
/// JSON of it. The pieces joined are byte for byte `key_list`'s output.
pub(crate) struct KeyListPieces<'a, I: Iterator<Item = &'a [u8]>> {
    keys: I,
    /// Keys written so far; `None` before the opening bracket.
    written: Option<usize>,
    step: usize,
    done: bool,
}

impl<'a, I: Iterator<Item = &'a [u8]>> KeyListPieces<'a, I> {
    pub(crate) fn new(keys: I, step: usize) -> Self {
        KeyListPieces {
            keys,
            written: None,
            step,
            done: false,
        }
    }
}

impl<'a, I: Iterator<Item = &'a [u8]>> Iterator for KeyListPieces<'a, I> {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.done {
            return None;
        }
        let mut out = Vec::with_capacity(self.step.min(1 << 20) + 16);
        let written = self.written.get_or_insert_with(|| {
            out.push(b'[');
            0
        });
        loop {
            let Some(k) = self.keys.next() else {
                out.push(b']');
                self.done = true;
                break;
            };
            if *written > 0 {
                out.push(b',');
            }
            serde_json::to_writer(&mut out, &String::from_utf8_lossy(k))
                .expect("writing JSON to a Vec cannot fail");
            *written += 1;
            if out.len() >= self.step {
                break;
            }
        }
        Some(out)
    }
}

/// `{"Error": message}`.
pub(crate) fn error(message: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Error<'a> {
        #[serde(rename = "Error")]
        error: &'a str,
    }
    serde_json::to_vec(&Error { error: message }).expect("writing JSON to a Vec cannot fail")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The fast writer against serde_json, and the exact-size body against
    /// the writer.
    fn check_against_serde(key: &[u8], value: &[u8]) {
        let mut fast = Vec::new();
        key_value(&mut fast, key, value);
        let (k, key_base64) = key_fields(key);
        let (v, value_base64) = match std::str::from_utf8(value) {
            Ok(v) => (Some(v), None),
            Err(_) => (None, Some(b64(value))),
        };
        let reference = serde_json::to_vec(&KeyValue {
            key: k,
            key_base64,
            value: v,
            value_base64,
            bytes: None,
        })
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&fast),
            String::from_utf8_lossy(&reference)
        );
        let body = key_value_body(key, value);
        assert_eq!(body, fast);
        if plain_key_value_len(key, value).is_some() {
            assert_eq!(body.capacity(), body.len(), "sized exactly");
        }
    }

    thread_local! {
        /// Bytes of text values [`KeyValuePieces`] checked for UTF-8.
        pub(super) static CHECKED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// A large text value in pieces costs its size, not its size times the
    /// number of pieces (each piece once checked the whole value: 1.9 s of
    /// CPU for one 16 MiB value of non-ASCII text).
    #[test]
    fn a_text_value_in_pieces_is_looked_at_once() {
        let value = "значение ✓ ".repeat(100_000);
        let value = value.as_bytes();
        assert!(value.len() > 1 << 20);
        CHECKED.with(|c| c.set(0));
        let mut whole = Vec::new();
        key_value(&mut whole, b"k", value);
        let joined: Vec<u8> = KeyValuePieces::new(b"k", value, 4096).flatten().collect();
        assert_eq!(joined, whole);
        let checked = CHECKED.with(|c| c.get());
        assert_eq!(
            checked,
            value.len(),
            "bytes checked for a value of {}",
            value.len()
        );
    }

    #[test]
    fn a_key_list_in_pieces_is_the_whole_list() {
        let names: Vec<Vec<u8>> = (0..1000)
            .map(|i| format!("ключ-{i}-\"{}", "x".repeat(i % 50)).into_bytes())
            .chain([vec![0xff, 0], Vec::new()])
            .collect();
        let ends: Vec<usize> = names
            .iter()
            .scan(0, |end, k| {
                *end += k.len();
                Some(*end)
            })
            .collect();
        for keys in [
            dhrt_proto::Keys::from_parts(names.concat(), ends),
            dhrt_proto::Keys::from_parts(Vec::new(), Vec::new()),
        ] {
            let whole = key_list(&keys);
            for step in [1, 2, 100, 4096, usize::MAX] {
                let pieces: Vec<Vec<u8>> = KeyListPieces::new(keys.iter(), step).collect();
                assert_eq!(pieces.concat(), whole, "step {step}");
                // Bounded pieces: up to one key (escaped) past the step.
                for p in &pieces {
                    assert!(p.len() <= step.saturating_add(6 * 60), "{}", p.len());
                }
            }
        }
    }

    #[test]
    fn pieces_joined_are_the_whole() {
        let long_utf8 = "ключ-значение ✓ \u{1}\"\\ ".repeat(50);
        let mut binary = long_utf8.clone().into_bytes();
        binary.push(0xff);
        let cases: [(&[u8], &[u8]); 5] = [
            (b"k", long_utf8.as_bytes()),
            (&[0xff, 1], long_utf8.as_bytes()),
            (b"k", &binary),
            (b"k", b""),
            (b"k", &[1u8; 1000]),
        ];
        for (key, value) in cases {
            let mut whole = Vec::new();
            key_value(&mut whole, key, value);
            for step in [1, 2, 3, 7, 64, 100_000] {
                let joined: Vec<u8> = KeyValuePieces::new(key, value, step).flatten().collect();
                assert_eq!(
                    String::from_utf8_lossy(&joined),
                    String::from_utf8_lossy(&whole),
                    "step {step}"
                );
            }
            // Bounded pieces: the opening part, then ~step of value each.
            for piece in KeyValuePieces::new(key, value, 30).skip(1) {
                assert!(piece.len() <= 6 * 33, "{}", piece.len());
            }
        }
    }

    #[test]
    fn the_plain_fast_path_writes_what_serde_json_writes() {
        let mut long_quote = [b'x'; 40];
        long_quote[20] = b'"';
        let mut long_control = [b'y'; 40];
        long_control[33] = b'\x01';
        let long_utf8 = "0123456789abcdef-ключ-значение ✓".as_bytes();
        let cases: [(&[u8], &[u8]); 11] = [
            (b"k", b"v"),
            (b"key:000000000001", &[b'x'; 100]),
            ("ключ".as_bytes(), "значение ✓".as_bytes()),
            (b"q\"uote", b"back\\slash"),
            (b"tab\t", b"new\nline"),
            (b"\x7f del", b""),
            (&[0xff, 0xfe], b"not utf-8 key"),
            (b"k", &[0xc3]),
            (b"in a block", &long_quote),
            (&long_control, b"after the blocks"),
            (long_utf8, long_utf8),
        ];
        for (key, value) in cases {
            check_against_serde(key, value);
        }
    }

    /// Mostly printable ASCII, sometimes anything: both paths of [`plain`]
    /// get exercised, with the odd byte in a block or in the rest.
    fn text() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(prop_oneof![8 => 0x20u8..0x7f, 1 => any::<u8>()], 0..70)
    }

    proptest! {
        #[test]
        fn any_key_and_value_come_out_as_serde_json_writes_them(key in text(), value in text()) {
            check_against_serde(&key, &value);
        }

        #[test]
        fn a_drop_lists_its_keys_as_serde_json_writes_them(
            keys in prop::collection::vec(text(), 0..8)
        ) {
            let list: dhrt_proto::Keys = keys
                .iter()
                .map(|k| bytes::Bytes::copy_from_slice(k))
                .collect::<Vec<_>>()
                .into();
            let reference: Vec<Cow<'_, str>> =
                keys.iter().map(|k| String::from_utf8_lossy(k)).collect();
            prop_assert_eq!(
                String::from_utf8(key_list(&list)).unwrap(),
                serde_json::to_string(&reference).unwrap()
            );
        }
    }
}
