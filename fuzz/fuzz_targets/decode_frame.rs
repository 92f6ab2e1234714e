//! Fuzzes the binary protocol's decoder: any bytes as a preamble, a request
//! id and a request or response frame. It must never panic or allocate what
//! the bytes claim, and whatever it accepts must survive a re-encode and
//! decode unchanged. (Re-encoding need not give the same bytes: bincode
//! accepts non-minimal varints.)
//!
//! Run: `cargo +nightly fuzz run decode_frame -- -max_total_time=60`
#![no_main]

use dhrt_proto::{Decoded, Request, Response, decode_frame, encode_frame, read_preamble, request_id};
use libfuzzer_sys::fuzz_target;

const MAX: u32 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let _ = read_preamble(data);
    let _ = request_id(data);
    if let Ok(Decoded::Complete { msg, .. }) = decode_frame::<Request>(data, MAX) {
        let mut again = Vec::new();
        encode_frame(&msg, &mut again, MAX).unwrap();
        assert!(matches!(decode_frame::<Request>(&again, MAX), Ok(Decoded::Complete { msg: m, .. }) if m == msg));
    }
    if let Ok(Decoded::Complete { msg, .. }) = decode_frame::<Response>(data, MAX) {
        let mut again = Vec::new();
        encode_frame(&msg, &mut again, MAX).unwrap();
        assert!(matches!(decode_frame::<Response>(&again, MAX), Ok(Decoded::Complete { msg: m, .. }) if m == msg));
    }
});
