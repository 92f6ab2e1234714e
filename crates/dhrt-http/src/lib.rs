//! `dhrt-http`: dhrt's HTTP API, a raw hyper 1.x service over anything that
//! implements [`dhrt_proto::Operations`]. It never touches storage or the
//! cluster directly, so it is tested against a map.
//!
//! Routing is a pure function ([`route`]); failures become statuses and
//! `{"Error": ...}` bodies in one place ([`error_response`]). The routes and
//! shapes are documented in `docs/http.md`.

#![forbid(unsafe_code)]

mod body;
mod cors;
mod error;
mod head_timeout;
mod host;
mod json;
mod router;
mod service;
mod watch;

pub use body::{BoxError, ResponseBody};
pub use cors::Cors;
pub use error::HttpError;
pub use router::{DEFAULT_COLLECTION, Endpoint, ListParams, route};
pub use service::{Api, Limits, error_response};
