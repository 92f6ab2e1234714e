//! Tests of dhrt-http, one binary: every route against a map-backed node,
//! and the connection behaviour over real loopback sockets.

mod node;
mod routes;
mod wire;
