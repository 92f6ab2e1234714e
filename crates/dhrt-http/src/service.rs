//! The HTTP service: a request in, a response out, over anything that
//! implements [`Operations`]; and the connection driver with its timeouts.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dhrt_proto::auth::{Mode, Remembered};
use dhrt_proto::{Access, Beside, Entry, Operations, Proven, Role, WatchRequest, WatchStart};
use futures_util::future::{self, Either};
use http::header::{
    ACCEPT, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, ORIGIN, TRANSFER_ENCODING,
    WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::body::{self, BoxError, ResponseBody};
use crate::cors::{self, Cors, CrossOrigin};
use crate::error::HttpError;
use crate::head_timeout::{Expired, HeadWatch, Watched};
use crate::json;
use crate::router::{self, DEFAULT_COLLECTION, Endpoint, ListParams};
use crate::watch::{self, Format};

const JSON: &str = "application/json";
/// A streamed listing is sent in chunks of about this many bytes; a value
/// larger than this is escaped and sent in pieces.
const LIST_CHUNK: usize = 256 * 1024;
/// Bytes of a large value escaped at a time (at most six times as many out).
const VALUE_STEP: usize = 64 * 1024;
/// A listing is sent in chunks of about this many bytes (a value larger
/// than this in pieces): with two chunks queued and hyper's write buffer
/// (`MAX_BUF`), a listing whose client reads nothing holds some 360 KiB
/// here, not 1.6 MiB with chunks of `LIST_CHUNK` and hyper's default
/// buffer (docs/http.md).
const SEND_CHUNK: usize = 64 * 1024;
/// hyper's buffer of a connection, each way: what it takes of a response
/// before the socket does (400 KiB by default), and room for the longest
/// request head (a request line of 65,534 bytes and 100 headers).
const MAX_BUF: usize = 128 * 1024;
const OCTETS: &str = "application/octet-stream";
/// A body of this many bytes or more, its length declared, is gathered in
/// a buffer of that size from the start (`read_body`).
const LARGE_BODY: u64 = 64 * 1024;

/// Limits that protect the node from its clients, and who may use it.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Who may do what: the node's auth file, or loopback only, or anyone.
    pub access: Arc<Access>,
    /// The largest request body (a `PUT` value), in bytes; more gets 413.
    pub max_body: usize,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// A request body must arrive at this many bytes a second or more,
    /// after [`body_grace`](Self::body_grace), and at that rate in every
    /// stretch of the grace too; slower, it gets 408 and the connection is
    /// closed.
    pub body_min_rate: u32,
    /// How long any body may take before the rate applies.
    pub body_grace: Duration,
    /// The node-wide budget of bytes being received (shared with the
    /// binary protocol): a body that would go past it gets 503.
    pub inflight: Arc<dhrt_proto::Inflight>,
    /// Entries fetched per step of a streamed listing.
    pub list_batch: u32,
    /// Cancelled when the node stops: every watch then ends at once with
    /// an error event saying so (a watch never ends by itself, so it
    /// would hold the stop for the whole grace period).
    pub stopping: tokio_util::sync::CancellationToken,
    /// The origins whose web pages may call the API (`--cors-origin`);
    /// none by default, and a request from any other is refused.
    pub cors: Cors,
    /// Where watches read and render their events (a runtime of low CPU
    /// priority in dhrtd, so that watchers fall behind rather than slow
    /// writers); `None`: the current one.
    pub watch_runtime: Option<tokio::runtime::Handle>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            access: Access::loopback_only(),
            max_body: 16 << 20,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            body_min_rate: 1024,
            body_grace: Duration::from_secs(10),
            inflight: dhrt_proto::Inflight::unlimited(),
            list_batch: 1000,
            cors: Cors::default(),
            stopping: tokio_util::sync::CancellationToken::new(),
            watch_runtime: None,
        }
    }
}

/// What ended a connection's guard.
enum Guard {
    Shutdown,
    Expired(Expired),
    /// A watch the node ended, whose client reads nothing.
    Closed,
}

/// The HTTP API over a node.
#[derive(Debug)]
pub struct Api<O> {
    ops: Arc<O>,
    limits: Limits,
}

/// How long, and how many bytes of it, the rest of a refused body is read
/// and thrown away.
const DRAIN_FOR: Duration = Duration::from_secs(5);
const DRAIN_BYTES: usize = 32 << 20;

/// Reads the rest of a body whose request is refused (too large, or the
/// node's budget is full), throwing it away, for a while: a client still
/// sending it then finishes and reads the answer, where a connection
/// closed under its writes would meet a reset and lose the answer. Nothing
/// of it is kept; past `DRAIN_FOR` or `DRAIN_BYTES` the body is dropped and
/// the connection closed.
fn drain<B>(mut body: B)
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    tokio::spawn(async move {
        let until = tokio::time::Instant::now() + DRAIN_FOR;
        let mut left = DRAIN_BYTES;
        while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(until, body.frame()).await {
            let n = frame.data_ref().map_or(0, Bytes::len);
            if n >= left {
                return;
            }
            left -= n;
        }
    });
}

/// Put on a watch request by [`Api::serve_connection`]: a watch that cannot
/// deliver its last event as the node stops (its client reads nothing)
/// cancels it, and the connection is closed instead of holding the stop.
#[derive(Clone)]
struct CloseConnection(tokio_util::sync::CancellationToken);

/// A watch asked with a listing's paging, which it would ignore.
fn listing_params_in_a_watch() -> HttpError {
    HttpError::bad_request(
        "limit and after are for listings, not watches: a watch takes since, snapshot and prefix",
    )
}

#[inline]
fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody> {
    let mut r = Response::new(body::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[inline]
fn json(body: Vec<u8>) -> Response<ResponseBody> {
    response(StatusCode::OK, JSON, body)
}

/// The response for a failure: its status and `{"Error": ...}` (and, for
/// a 401, the scheme a client should use).
pub fn error_response(e: &HttpError) -> Response<ResponseBody> {
    let mut r = response(e.status, JSON, json::error(&e.message));
    if e.status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"dhrt\""),
        );
        // A client without a valid token does not keep its connection (nor
        // the slot it holds): it comes back with one.
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    } else if e.status == StatusCode::REQUEST_TIMEOUT {
        // The rest of the body may never come: nothing more is read.
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// The token of an `Authorization: Bearer TOKEN` header.
fn bearer(headers: &HeaderMap) -> Result<Option<&[u8]>, HttpError> {
    let mut all = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        // Which one counts would depend on the reader (a proxy may have
        // added one): neither does.
        return Err(HttpError::bad_request(
            "the request has more than one Authorization header: send one",
        ));
    }
    let value = value.as_bytes();
    match value.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => {
            Ok(Some(value[7..].trim_ascii()))
        }
        _ => Err(HttpError::new(
            StatusCode::UNAUTHORIZED,
            "the Authorization header must be \"Bearer TOKEN\"",
        )),
    }
}

/// Whether `role` may do what needs `needed` (called `what`); 403 if not.
#[inline]
fn allow(role: Role, needed: Role, what: &str) -> Result<(), HttpError> {
    Ok(dhrt_proto::auth::allow(role, needed, what)?)
}

/// What the handler needs from a request's headers, found in one pass
/// (a request has a handful: walking them beats hashing each name asked),
/// once per request whichever way it is answered.
#[derive(Debug, Clone, Copy, Default)]
struct HeadFacts {
    /// Both `Content-Length` and `Transfer-Encoding`: a smuggling attempt,
    /// refused.
    conflicting_lengths: bool,
    /// `Accept: application/octet-stream`: the raw value, not JSON.
    wants_octets: bool,
    /// `Accept: text/event-stream` or `application/x-ndjson`: a watch.
    stream: Option<Format>,
    /// An `Origin`: a browser's request, for a web page (see `crate::cors`).
    origin: bool,
}

impl HeadFacts {
    fn of(headers: &HeaderMap) -> Self {
        let (mut length, mut encoding, mut wants_octets) = (false, false, false);
        let (mut stream, mut origin) = (None, false);
        for (name, value) in headers {
            if name == ORIGIN {
                origin = true;
            } else if name == CONTENT_LENGTH {
                length = true;
            } else if name == TRANSFER_ENCODING {
                encoding = true;
            } else if name == ACCEPT {
                let v = value.to_str().unwrap_or("");
                wants_octets |= v.split(',').any(|t| t.trim().starts_with(OCTETS));
                stream = stream.or_else(|| Format::from_accept(v));
            }
        }
        HeadFacts {
            conflicting_lengths: length && encoding,
            wants_octets,
            stream,
            origin,
        }
    }
}

/// The answer to a `GET` of `key`: the value as JSON (or raw), or 404.
#[inline]
fn found_response(
    collection: &str,
    key: &[u8],
    value: Option<Bytes>,
    raw: bool,
) -> Result<Response<ResponseBody>, HttpError> {
    let Some(value) = value else {
        return Err(HttpError::not_found(format!(
            "key {:?} not found in collection {collection:?}",
            String::from_utf8_lossy(key)
        )));
    };
    if raw {
        return Ok(response(StatusCode::OK, OCTETS, value));
    }
    if value.len() > LIST_CHUNK {
        return Ok(streamed_key_value(Bytes::copy_from_slice(key), value));
    }
    Ok(json(json::key_value_body(key, &value)))
}

/// `{"Key": k, "Value": v}` of a large value, escaped and sent a piece at a
/// time: what the connection holds is the value and a few pieces, not the
/// whole escaped text (six times the value for control bytes).
fn streamed_key_value(key: Bytes, value: Bytes) -> Response<ResponseBody> {
    streamed_json((key, value), |(key, value)| {
        Box::new(json::KeyValuePieces::new(key, value, VALUE_STEP))
    })
}

/// The JSON list of a drop's keys: built whole when small, else sent a
/// piece at a time (a drop of millions of keys would otherwise hold their
/// JSON beside them, hundreds of MB).
fn key_list(keys: dhrt_proto::Keys) -> Response<ResponseBody> {
    if keys.len() < 1024 {
        return json(json::key_list(&keys));
    }
    streamed_json(keys, |keys| {
        Box::new(json::KeyListPieces::new(keys.iter(), VALUE_STEP))
    })
}

/// A JSON answer sent as the pieces `pieces` makes of `data`, as the client
/// reads them.
fn streamed_json<T: Send + Sync + 'static>(
    data: T,
    pieces: for<'a> fn(&'a T) -> Box<dyn Iterator<Item = Vec<u8>> + Send + 'a>,
) -> Response<ResponseBody> {
    let (tx, body) = body::channel(1);
    tokio::spawn(async move {
        for piece in pieces(&data) {
            if tx.send(Ok(piece.into())).await.is_err() {
                return; // the client went away
            }
        }
    });
    let mut r = Response::new(body);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    r
}

/// A name that could be a collection: valid UTF-8 of the allowed characters.
fn as_collection_name(name: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(name).ok()?;
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then_some(s)
}

impl<O: Operations> Api<O> {
    /// An API serving `ops`.
    pub fn new(ops: Arc<O>, limits: Limits) -> Arc<Self> {
        Arc::new(Api { ops, limits })
    }

    /// The node served.
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// Answers one request, as if it came from loopback (see
    /// [`handle_from`](Self::handle_from)). Never fails: errors become
    /// responses.
    pub fn handle<B>(
        self: &Arc<Self>,
        req: Request<B>,
    ) -> Either<
        future::Ready<Response<ResponseBody>>,
        impl Future<Output = Response<ResponseBody>> + Send + 'static + use<O, B>,
    >
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        self.handle_from(std::net::Ipv4Addr::LOCALHOST.into(), req)
    }

    /// Answers one request from `remote`. Never fails: errors become
    /// responses.
    ///
    /// The hot path, a `GET` of a key the node can answer at once
    /// ([`Operations::get_now`]), is answered before this returns; the
    /// future is then ready and holds nothing but the response.
    pub fn handle_from<B>(
        self: &Arc<Self>,
        remote: IpAddr,
        req: Request<B>,
    ) -> Either<
        future::Ready<Response<ResponseBody>>,
        impl Future<Output = Response<ResponseBody>> + Send + 'static + use<O, B>,
    >
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let facts = HeadFacts::of(req.headers());
        let role = self.role(remote, req.headers(), &mut Remembered::default());
        match self.answer_now(&req, facts, &role) {
            Some(response) => Either::Left(future::ready(response)),
            None => Either::Right(self.clone().answer_later(remote, req, facts, role)),
        }
    }

    /// The role of a request from `remote` with these headers, or its 401.
    #[inline]
    fn role(
        &self,
        remote: IpAddr,
        headers: &HeaderMap,
        memo: &mut Remembered,
    ) -> Result<Role, HttpError> {
        crate::host::single(headers)?;
        let access = &self.limits.access;
        if access.mode() == Mode::Open {
            return Ok(Role::Admin);
        }
        let token = match access.mode() {
            Mode::Tokens => bearer(headers)?,
            Mode::LoopbackOnly => {
                crate::host::check(headers)?;
                None
            }
            Mode::Open => None,
        };
        Ok(access.request_remembered(remote, token, memo)?)
    }

    /// The response to any request: the long way.
    async fn answer_later<B>(
        self: Arc<Self>,
        remote: IpAddr,
        req: Request<B>,
        facts: HeadFacts,
        role: Result<Role, HttpError>,
    ) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let origin = if facts.origin {
            match cors::check(&self.limits.cors, req.method(), req.headers()) {
                Ok(CrossOrigin::Allowed(origin)) => Some(origin),
                Ok(CrossOrigin::Plain) => None,
                Ok(CrossOrigin::Preflight(response)) => return response,
                Err(e) => return error_response(&e),
            }
        } else {
            None
        };
        let access = self.limits.access.clone();
        let result = match role {
            Ok(role) => self.try_handle(remote, req, facts, role).await,
            Err(e) => Err(e),
        };
        let mut response = match result {
            Ok(r) => r,
            Err(e) => {
                let kind = match e.status {
                    StatusCode::UNAUTHORIZED => Some(dhrt_proto::ErrorKind::Unauthenticated),
                    StatusCode::FORBIDDEN => Some(dhrt_proto::ErrorKind::Forbidden),
                    _ => None,
                };
                if let Some(kind) = kind {
                    access.count_refusal(&dhrt_proto::OpError::new(kind, ""));
                }
                error_response(&e)
            }
        };
        if let Some(origin) = origin {
            cors::allow(response.headers_mut(), origin);
        }
        response
    }

    /// The response to `req` if it is a `GET` of a key the node answers
    /// without waiting; `None` sends it the long way (which also gives
    /// every error of routing its response).
    fn answer_now<B>(
        &self,
        req: &Request<B>,
        facts: HeadFacts,
        role: &Result<Role, HttpError>,
    ) -> Option<Response<ResponseBody>> {
        // Every role may read; no role goes the long way to its 401.
        if req.method() != Method::GET
            || facts.conflicting_lengths
            || role.is_err()
            || facts.stream.is_some()
            || facts.origin
        {
            return None;
        }
        let uri = req.uri();
        let endpoint = router::route(req.method(), uri.path(), uri.query()).ok()?;
        let (collection, key) = match &endpoint {
            Endpoint::Get { collection, key } => (&**collection, &**key),
            Endpoint::KeyOrCollection { name, .. } if !self.is_collection(name) => {
                (DEFAULT_COLLECTION, &**name)
            }
            _ => return None,
        };
        let found = self.ops.get_now(collection, key)?;
        Some(
            found
                .map_err(HttpError::from)
                .and_then(|value| found_response(collection, key, value, facts.wants_octets))
                .unwrap_or_else(|e| error_response(&e)),
        )
    }

    /// Whether `name` (a single path segment) names a collection that
    /// exists, making `GET /name` a listing rather than a key.
    fn is_collection(&self, name: &[u8]) -> bool {
        as_collection_name(name).is_some_and(|c| self.ops.has_collection(c))
    }

    async fn try_handle<B>(
        self: Arc<Self>,
        remote: IpAddr,
        req: Request<B>,
        facts: HeadFacts,
        role: Role,
    ) -> Result<Response<ResponseBody>, HttpError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        if facts.conflicting_lengths {
            return Err(HttpError::bad_request(
                "a request may not carry both Content-Length and Transfer-Encoding",
            ));
        }
        let (head, body) = req.into_parts();
        let endpoint = router::route(&head.method, head.uri.path(), head.uri.query())?;
        let raw = facts.wants_octets;
        let ops = &self.ops;
        // Every endpoint reads at least; writes and drops are checked below.
        allow(role, Role::Read, "reading")?;
        match endpoint {
            Endpoint::Stats => Ok(json(
                serde_json::to_vec(&ops.stats().await).expect("stats serialize"),
            )),
            Endpoint::Metrics => {
                let mut text = ops.metrics().await;
                self.limits.access.render_metrics(&mut text);
                self.limits.inflight.render_metrics(&mut text);
                Ok(response(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    text,
                ))
            }
            Endpoint::KeyOrCollection { list, .. }
                if facts.stream.is_some() && list.is_listing() =>
            {
                Err(listing_params_in_a_watch())
            }
            Endpoint::Watch { params, .. } if params.is_listing() => {
                Err(listing_params_in_a_watch())
            }
            Endpoint::KeyOrCollection { name, list } if facts.stream.is_some() => {
                let Some(c) = as_collection_name(&name) else {
                    return Err(HttpError::bad_request(format!(
                        "{:?} is not a collection name (1 to 64 of A-Z a-z 0-9 _ -): nothing to watch",
                        String::from_utf8_lossy(&name)
                    )));
                };
                let format = facts.stream.expect("checked");
                self.watch(remote, vec![c.to_string()], list, false, format, &head)
                    .await
            }
            Endpoint::KeyOrCollection { list, .. } if list.is_watch() => {
                Err(HttpError::bad_request(
                    "since, snapshot and prefix are for watches: send Accept: text/event-stream or application/x-ndjson",
                ))
            }
            Endpoint::Watch {
                collections,
                params,
            } => {
                let format = facts.stream.unwrap_or(Format::Sse);
                self.watch(remote, collections, params, true, format, &head)
                    .await
            }
            Endpoint::KeyOrCollection { name, list } => match as_collection_name(&name) {
                Some(c) if ops.has_collection(c) => self.clone().list(c.to_string(), list).await,
                _ => self.get(DEFAULT_COLLECTION, &name, raw).await,
            },
            Endpoint::Get { collection, key } => self.get(&collection, &key, raw).await,
            Endpoint::Set {
                collection,
                key,
                value,
            } => {
                allow(role, Role::Write, "setting a key")?;
                ops.set(&collection, &key, Bytes::copy_from_slice(&value))
                    .await?;
                let mut out = Vec::new();
                json::key_value(&mut out, &key, &value);
                Ok(json(out))
            }
            Endpoint::Put { collection, key } => {
                allow(role, Role::Write, "setting a key")?;
                let value = self.read_body(&head.headers, body).await?;
                let len = value.len();
                ops.set(&collection, &key, value).await?;
                Ok(json(json::key_only(&key, Some(len))))
            }
            Endpoint::DeleteKeyOrCollection { name } => {
                let collection = match as_collection_name(&name) {
                    Some(c) if ops.has_collection(c) => Some(c),
                    // Not held here, but perhaps elsewhere: a write to it
                    // through another node may not have reached this one
                    // (under `quorum`), and the key `x` of `default` is
                    // not what the client meant. Asked for a client that
                    // may drop it (an answer may carry a large value).
                    Some(c) if role >= Role::Admin && ops.has_collection_elsewhere(c).await => {
                        Some(c)
                    }
                    _ => None,
                };
                match collection {
                    Some(c) => {
                        allow(role, Role::Admin, "dropping a collection")?;
                        let keys = ops.drop_collection(c).await?;
                        Ok(key_list(keys))
                    }
                    None => {
                        allow(role, Role::Write, "deleting a key")?;
                        self.delete(DEFAULT_COLLECTION, &name).await
                    }
                }
            }
            Endpoint::Delete { collection, key } => {
                allow(role, Role::Write, "deleting a key")?;
                self.delete(&collection, &key).await
            }
            Endpoint::RemoveMember { member } => {
                allow(role, Role::Admin, "removing a member")?;
                let id = ops.remove_member(&member).await?;
                let body = serde_json::json!({ "Removed": id });
                Ok(json(serde_json::to_vec(&body).expect("serializes")))
            }
            Endpoint::Replicas { collection, set } => {
                if set.is_some() {
                    allow(role, Role::Admin, "setting a replication factor")?;
                }
                let info = ops.replicas(collection.as_deref(), set.as_deref()).await?;
                let body = serde_json::json!({
                    "Collection": info.collection.as_deref().unwrap_or("*"),
                    "Replicas": info.replicas,
                    "Owners": info.owners,
                    "UnderReplicated": info.under_replicated,
                });
                Ok(json(serde_json::to_vec(&body).expect("serializes")))
            }
        }
    }

    /// Opens a watch of `collections` and streams it.
    async fn watch(
        &self,
        remote: IpAddr,
        collections: Vec<String>,
        params: ListParams,
        multi: bool,
        format: Format,
        head: &http::request::Parts,
    ) -> Result<Response<ResponseBody>, HttpError> {
        const MAX_WATCHED: usize = 64;
        let headers = &head.headers;
        let close_connection = head
            .extensions
            .get::<CloseConnection>()
            .map(|c| c.0.clone());
        if collections.is_empty() || collections.len() > MAX_WATCHED {
            return Err(HttpError::bad_request(format!(
                "watch 1 to {MAX_WATCHED} collections (?watch=a,b)"
            )));
        }
        let mut unique = collections.clone();
        unique.sort();
        unique.dedup();
        if unique.len() != collections.len() {
            return Err(HttpError::bad_request(
                "a collection is named twice in ?watch=",
            ));
        }
        // An EventSource reconnecting says where it was.
        let since = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.trim().is_empty())
            .map(str::to_string)
            .or(params.since);
        let starts: Vec<WatchStart> = match since {
            Some(s) => watch::parse_since(&collections, &s, multi)?
                .into_iter()
                .map(WatchStart::After)
                .collect(),
            None if params.snapshot => vec![WatchStart::Snapshot; collections.len()],
            None => vec![WatchStart::Now; collections.len()],
        };
        let snapshot = starts.iter().all(|s| *s == WatchStart::Snapshot);
        // The token is judged again before each batch: a watch stops once
        // its token is revoked (SIGHUP), as a request would be refused.
        let access = self.limits.access.clone();
        let token = bearer(headers)?.map(<[u8]>::to_vec);
        let mut memo = Remembered::default();
        let recheck = move || -> Result<(), dhrt_proto::OpError> {
            if access.mode() == Mode::Open {
                return Ok(());
            }
            let role = access.request_remembered(remote, token.as_deref(), &mut memo)?;
            dhrt_proto::auth::allow(role, Role::Read, "watching a collection")
        };
        let mut sources = Vec::with_capacity(collections.len());
        for (collection, start) in collections.into_iter().zip(starts) {
            let source = self
                .ops
                .watch(WatchRequest {
                    collection: collection.clone(),
                    start,
                    prefix: params.prefix.clone().map(Bytes::from),
                })
                .await?;
            sources.push((collection, source));
        }
        Ok(watch::stream(
            sources,
            multi,
            format,
            snapshot,
            Box::new(recheck),
            self.limits.watch_runtime.clone(),
            watch::Stop {
                stopping: self.limits.stopping.child_token(),
                close_connection,
            },
        ))
    }

    async fn get(
        &self,
        collection: &str,
        key: &[u8],
        raw: bool,
    ) -> Result<Response<ResponseBody>, HttpError> {
        let value = self.ops.get(collection, key).await?;
        found_response(collection, key, value, raw)
    }

    async fn delete(
        &self,
        collection: &str,
        key: &[u8],
    ) -> Result<Response<ResponseBody>, HttpError> {
        if self.ops.delete(collection, key).await? {
            Ok(json(json::key_only(key, None)))
        } else {
            Err(HttpError::not_found(format!(
                "key {:?} not found in collection {collection:?}",
                String::from_utf8_lossy(key)
            )))
        }
    }

    /// Reads a value's body within the limits (size, rate, the node's
    /// budget). `B` is `Unpin`, as hyper's body is: read in place, and
    /// moved whole into [`drain`] when refused.
    async fn read_body<B>(&self, headers: &HeaderMap, mut body: B) -> Result<Bytes, HttpError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let too_large = || {
            HttpError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body exceeds the limit of {} bytes (the largest value this node takes: --max-value-bytes)",
                    self.limits.max_body
                ),
            )
        };
        // HTTP/1.1 takes `chunked` off; any other transfer coding (gzip,
        // deflate) would be stored still encoded as the value.
        for te in headers.get_all(hyper::header::TRANSFER_ENCODING) {
            let te = te.to_str().unwrap_or("?");
            if te
                .split(',')
                .any(|c| !c.trim().eq_ignore_ascii_case("chunked"))
            {
                return Err(HttpError::new(
                    StatusCode::NOT_IMPLEMENTED,
                    format!(
                        "transfer coding {te:?} is not supported: send the value as it is (chunked or with a Content-Length)"
                    ),
                ));
            }
        }
        let declared = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.limits.max_body as u64) {
            // A client that waits for `100 Continue` sends nothing until
            // told to: reading would tell it to, for nothing.
            let waits = headers
                .get(hyper::header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            if !waits {
                drain(body);
            }
            return Err(too_large());
        }
        // The body must keep coming: `body_grace`, plus a second for every
        // `body_min_rate` bytes received; and at that rate in every stretch
        // of `body_grace` too (a client that sent most of a large body at
        // once, then a byte now and then, would otherwise hold its buffer
        // for hours before its average fell below the rate).
        let started = tokio::time::Instant::now();
        let rate = u64::from(self.limits.body_min_rate.max(1));
        let stretch = (rate as f64 * self.limits.body_grace.as_secs_f64()) as u64;
        let mut first: Option<Bytes> = None;
        // A large body whose length is declared is gathered in a buffer of
        // that size: grown by doubling, then copied to drop the spare room,
        // a 16 MiB body took 48 MiB at its peak. Room reserved is not
        // memory used until the bytes arrive (the allocator maps pages as
        // they are written), and the in-flight budget counts what arrived.
        let mut rest = BytesMut::with_capacity(
            declared
                .filter(|&n| n >= LARGE_BODY)
                .map_or(0, |n| n as usize),
        );
        let mut received = 0u64;
        let (mut stretch_start, mut stretch_bytes) = (started, 0u64);
        let mut held = dhrt_proto::Held::new(&self.limits.inflight);
        loop {
            let allowance = Duration::from_millis(received.saturating_mul(1000) / rate);
            let deadline = (started + self.limits.body_grace + allowance)
                .min(stretch_start + self.limits.body_grace);
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => {
                    return Err(HttpError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "the body arrived too slowly ({received} bytes in {:.1} s; at least \
                             {rate} bytes a second after the first {} s)",
                            started.elapsed().as_secs_f64(),
                            self.limits.body_grace.as_secs()
                        ),
                    ));
                }
                Ok(None) => break,
                Ok(Some(Ok(frame))) => frame,
                Ok(Some(Err(e))) => {
                    let e: BoxError = e.into();
                    return Err(HttpError::bad_request(format!(
                        "could not read the body: {e}"
                    )));
                }
            };
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            received += data.len() as u64;
            if received > self.limits.max_body as u64 {
                drop(data);
                drain(body);
                return Err(too_large());
            }
            stretch_bytes += data.len() as u64;
            if stretch_bytes >= stretch {
                (stretch_start, stretch_bytes) = (tokio::time::Instant::now(), 0);
            }
            if !held.resize(received as usize) {
                drain(body);
                return Err(HttpError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    held.refusal(),
                ));
            }
            // One piece (the usual case) is kept as it came, for now.
            match first.take() {
                None if rest.is_empty() => first = Some(data),
                Some(earlier) => {
                    rest.extend_from_slice(&earlier);
                    rest.extend_from_slice(&data);
                }
                None => rest.extend_from_slice(&data),
            }
        }
        // The value may be kept for as long as a peer is away (a hint), so
        // it must own its bytes: a piece as it came is a view into the
        // connection's read buffer (8 KiB or more, kept whole by the view),
        // and `rest` may have grown to twice the body.
        Ok(match first {
            Some(piece) => Bytes::copy_from_slice(&piece),
            None if rest.capacity() - rest.len() > 4096 => Bytes::copy_from_slice(&rest),
            None => rest.freeze(),
        })
    }

    /// A collection listing: the first batch is fetched before answering (so
    /// a failure gets a proper status), the rest is streamed.
    async fn list(
        self: Arc<Self>,
        collection: String,
        params: ListParams,
    ) -> Result<Response<ResponseBody>, HttpError> {
        let mut remaining = params.limit.unwrap_or(u64::MAX);
        let step = u64::from(self.limits.list_batch.max(1));
        let batch = move |remaining: u64| remaining.min(step) as u32;
        let first = self
            .ops
            .list(&collection, params.after.as_deref(), batch(remaining))
            .await?;
        // What a listing holds at once is bounded: a page (the node caps it
        // by bytes), the chunk being filled, and the chunks queued here.
        let (tx, body) = body::channel(2);
        let api = self.clone();
        tokio::spawn(async move {
            let mut page = first;
            let mut chunk = b"[".to_vec();
            let mut first_entry = true;
            loop {
                let answered = page.entries.len() as u64;
                for Entry { key, value } in &page.entries {
                    if !first_entry {
                        chunk.push(b',');
                    }
                    first_entry = false;
                    if value.len() > SEND_CHUNK {
                        for piece in json::KeyValuePieces::new(key, value, VALUE_STEP) {
                            chunk.extend_from_slice(&piece);
                            if chunk.len() >= SEND_CHUNK
                                && tx
                                    .send(Ok(std::mem::take(&mut chunk).into()))
                                    .await
                                    .is_err()
                            {
                                return; // the client went away
                            }
                        }
                    } else {
                        json::key_value(&mut chunk, key, value);
                    }
                    if chunk.len() >= SEND_CHUNK
                        && tx
                            .send(Ok(std::mem::take(&mut chunk).into()))
                            .await
                            .is_err()
                    {
                        return; // the client went away
                    }
                }
                // The page is answered: its values need not be held while
                // the next one is fetched.
                page.entries.clear();
                remaining = remaining.saturating_sub(answered);
                let Some(next) = page.next.take().filter(|_| remaining > 0 && answered > 0) else {
                    break;
                };
                if !chunk.is_empty()
                    && tx
                        .send(Ok(std::mem::take(&mut chunk).into()))
                        .await
                        .is_err()
                {
                    return; // the client went away
                }
                page = match api
                    .ops
                    .list(&collection, Some(&next), batch(remaining))
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(collection, "listing aborted: {e}");
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
            }
            chunk.push(b']');
            let _ = tx.send(Ok(chunk.into())).await;
        });
        let mut r = Response::new(body);
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
        Ok(r)
    }

    /// Serves HTTP/1.1 on one connection until the client closes it or
    /// `shutdown` completes; then finishes the request in flight and closes.
    /// `proven` is told once a request has shown a valid token.
    pub async fn serve_connection<I>(
        self: Arc<Self>,
        io: I,
        remote: IpAddr,
        shutdown: impl Future<Output = ()>,
        proven: Proven,
    ) -> Result<(), hyper::Error>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let watch = HeadWatch::new();
        let api = self.clone();
        let service_watch = watch.clone();
        let memo = std::sync::Mutex::new((Remembered::default(), proven));
        let close = tokio_util::sync::CancellationToken::new();
        let service_close = close.clone();
        let service = service_fn(move |mut req: Request<Incoming>| {
            service_watch.head_complete();
            // The same two ways as `handle`, without wrapping one future in
            // another on the hot path.
            let facts = HeadFacts::of(req.headers());
            if facts.stream.is_some() || req.uri().query().is_some_and(|q| q.contains("watch=")) {
                req.extensions_mut()
                    .insert(CloseConnection(service_close.clone()));
            }
            // One request at a time on a connection: the lock is never
            // contended.
            let role = {
                let (memo, proven) = &mut *memo.lock().unwrap();
                // Read before the token is checked: see `now_with`.
                let generation = api.limits.access.generation();
                let token = bearer(req.headers()).ok().flatten();
                let changed = !token.is_some_and(|t| memo.remembers(t));
                let role = api.role(remote, req.headers(), memo);
                if role.is_ok() {
                    proven.now_with(generation, changed, || {
                        token.map(dhrt_proto::auth::TokenHash::of)
                    });
                }
                role
            };
            if let Some(response) = api.answer_now(&req, facts, &role) {
                service_watch.answered();
                return Either::Left(future::ok::<_, Infallible>(response));
            }
            let (later, watch) = (
                api.clone().answer_later(remote, req, facts, role),
                service_watch.clone(),
            );
            Either::Right(async move {
                let response = later.await;
                watch.answered();
                Ok::<_, Infallible>(response)
            })
        });
        let io = Watched {
            inner: io,
            watch: watch.clone(),
        };
        let conn = http1::Builder::new()
            .keep_alive(true)
            .max_buf_size(MAX_BUF)
            .serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        // The guard is polled only when its timer or the shutdown signal
        // fires, not on every request (see `dhrt_proto::Beside`).
        let (head, idle) = (self.limits.header_read_timeout, self.limits.idle_timeout);
        let guard = async {
            tokio::select! {
                biased;
                () = shutdown => Guard::Shutdown,
                e = watch.expired(head, idle) => Guard::Expired(e),
                () = close.cancelled() => Guard::Closed,
            }
        };
        tokio::pin!(guard);
        match Beside::new(guard).run(conn.as_mut()).await {
            Either::Left(served) => served,
            Either::Right(Guard::Expired(Expired::Head)) => {
                tracing::debug!("a request's headers took too long; closing the connection");
                Ok(())
            }
            Either::Right(Guard::Expired(Expired::Idle)) => {
                tracing::debug!("an idle connection reached the idle timeout; closing it");
                Ok(())
            }
            Either::Right(Guard::Closed) => {
                tracing::debug!(
                    "a watch ended by the node could not be sent to its client, which reads nothing; closing the connection"
                );
                Ok(())
            }
            Either::Right(Guard::Shutdown) => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    served = conn.as_mut() => served,
                    () = close.cancelled() => {
                        tracing::debug!("a watch's client read nothing as the node stopped; closing the connection");
                        Ok(())
                    }
                }
            }
        }
    }
}
