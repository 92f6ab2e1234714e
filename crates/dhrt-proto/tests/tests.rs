//! Tests of dhrt-proto, one binary: hostile input, round trips, dispatch and
//! the JSON shape of stats.

mod dispatch;
mod hostile;
mod roundtrip;
