//! The JSON shapes of the API: `{"Key": k, "Value": v}`, `["k1", ...]`,
//! `{"Error": "..."}`. Keys and values that are not UTF-8 are sent as base64
//! in `KeyBase64` / `ValueBase64` instead of being mangled.

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

/// `{"Key": k, "Value": v}`.
pub(crate) fn key_value(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
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
pub(crate) fn key_list(keys: &[bytes::Bytes]) -> Vec<u8> {
    let keys: Vec<Cow<'_, str>> = keys.iter().map(|k| String::from_utf8_lossy(k)).collect();
    serde_json::to_vec(&keys).expect("writing JSON to a Vec cannot fail")
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
