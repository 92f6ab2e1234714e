//! Routing as a pure function: method, path and query in, an [`Endpoint`] or
//! an [`HttpError`] out. No I/O and no knowledge of which collections exist:
//! the ambiguous `GET /:x` and `DELETE /:x` are resolved by the service.

use std::borrow::Cow;

use http::{Method, StatusCode};
use percent_encoding::percent_decode_str;

use crate::error::HttpError;

/// The collection used when a route names none.
pub const DEFAULT_COLLECTION: &str = "default";

/// What a request asks for. Names, keys and values borrow from the path
/// unless percent-decoding changed them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint<'a> {
    /// `GET /`: node and cluster statistics.
    Stats,
    /// `GET /?watch=a,b`: a stream of the changes of several collections.
    Watch {
        /// The collections, as given (checked by the node).
        collections: Vec<String>,
        /// `?since=`, `?snapshot=`, `?prefix=`.
        params: ListParams,
    },
    /// `GET /?replicas`, `GET /:collection?replicas`: a replication factor
    /// (the cluster's default, or a collection's) and owners;
    /// `PUT /?replicas=N`, `PUT /:collection?replicas=N` set it first.
    Replicas {
        /// The collection, or `None` for the cluster's default.
        collection: Option<Cow<'a, str>>,
        /// The new replication factor (`all` or a number), if one is set.
        set: Option<String>,
    },
    /// `DELETE /?member=ID_OR_ADDR`: removes a dead member from the
    /// cluster for good.
    RemoveMember {
        /// The member's id (16 hex digits) or address, as given.
        member: String,
    },
    /// `GET /metrics`: Prometheus metrics. (The key `metrics` of `default`
    /// is `/default/metrics`.)
    Metrics,
    /// `GET /:x`: the collection `x` if it exists, else the key `x` of
    /// `default`.
    KeyOrCollection {
        /// The decoded segment.
        name: Cow<'a, [u8]>,
        /// `?limit=` and `?after=`, used if `x` is a collection.
        list: ListParams,
    },
    /// `GET /:collection/:key`.
    Get {
        /// Collection.
        collection: Cow<'a, str>,
        /// Key.
        key: Cow<'a, [u8]>,
    },
    /// `POST /:key/:value` and `POST /:collection/:key/:value`.
    Set {
        /// Collection.
        collection: Cow<'a, str>,
        /// Key.
        key: Cow<'a, [u8]>,
        /// Value.
        value: Cow<'a, [u8]>,
    },
    /// `PUT /:key` and `PUT /:collection/:key`: the value is the body.
    Put {
        /// Collection.
        collection: Cow<'a, str>,
        /// Key.
        key: Cow<'a, [u8]>,
    },
    /// `DELETE /:x`: the collection `x` if it exists, else the key `x` of
    /// `default`.
    DeleteKeyOrCollection {
        /// The decoded segment.
        name: Cow<'a, [u8]>,
    },
    /// `DELETE /:collection/:key`.
    Delete {
        /// Collection.
        collection: Cow<'a, str>,
        /// Key.
        key: Cow<'a, [u8]>,
    },
}

/// Paging of a collection listing, and where a watch starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListParams {
    /// Return at most this many entries.
    pub limit: Option<u64>,
    /// Start after this key (the last key of the previous page).
    pub after: Option<Vec<u8>>,
    /// A watch: resume after this token.
    pub since: Option<String>,
    /// A watch: start with the current value of every key.
    pub snapshot: bool,
    /// A watch: only keys starting with this.
    pub prefix: Option<Vec<u8>>,
}

impl ListParams {
    /// Whether it holds a watch's parameters.
    pub fn is_watch(&self) -> bool {
        self.since.is_some() || self.snapshot || self.prefix.is_some()
    }

    /// Whether it holds a listing's parameters.
    pub fn is_listing(&self) -> bool {
        self.limit.is_some() || self.after.is_some()
    }
}

fn decode(segment: &str) -> Cow<'_, [u8]> {
    percent_decode_str(segment).into()
}

fn collection(segment: &str) -> Result<Cow<'_, str>, HttpError> {
    percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| HttpError::bad_request("invalid collection name: not UTF-8"))
}

fn list_params(query: Option<&str>) -> Result<ListParams, HttpError> {
    let mut params = ListParams::default();
    let mut seen: Vec<&str> = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if seen.contains(&name) {
            return Err(HttpError::bad_request(format!(
                "query parameter {name:?} is given more than once"
            )));
        }
        seen.push(name);
        match name {
            "limit" => {
                let limit = std::str::from_utf8(&decode(value))
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| {
                        HttpError::bad_request(format!(
                            "limit must be a whole number, not {value:?}"
                        ))
                    })?;
                params.limit = Some(limit);
            }
            "after" => {
                let after = decode(&value.replace('+', " ")).into_owned();
                if after.is_empty() {
                    // No key is empty: "after" it would be a place in the
                    // hash order, and the listing would skip what precedes.
                    return Err(HttpError::bad_request(
                        "after must name a key (1 byte or more); leave it out to list from the start",
                    ));
                }
                params.after = Some(after);
            }
            "since" => {
                params.since = Some(
                    String::from_utf8(decode(value).into_owned())
                        .map_err(|_| HttpError::bad_request("since must be a resume token"))?,
                )
            }
            "prefix" => params.prefix = Some(decode(&value.replace('+', " ")).into_owned()),
            "snapshot" => {
                params.snapshot = match value {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    other => {
                        return Err(HttpError::bad_request(format!(
                            "snapshot must be true or false, not {other:?}"
                        )));
                    }
                }
            }
            // The route of a multi-collection watch; read by `route`.
            "watch" => {}
            other => {
                return Err(HttpError::bad_request(format!(
                    "unknown query parameter {other:?} (known: limit, after; for a watch: since, snapshot, prefix)"
                )));
            }
        }
    }
    Ok(params)
}

/// `?replicas` (`Some(None)`) or `?replicas=N` (`Some(Some(N))`), if the
/// query has it.
fn replicas_param(query: Option<&str>) -> Option<Option<String>> {
    query?.split('&').find_map(|p| match p.split_once('=') {
        Some(("replicas", v)) if !v.is_empty() => {
            Some(Some(percent_decode_str(v).decode_utf8_lossy().into_owned()))
        }
        Some(("replicas", _)) => Some(None),
        None if p == "replicas" => Some(None),
        _ => None,
    })
}

/// Refuses a query holding anything but `name`.
fn only_param(query: Option<&str>, name: &str) -> Result<(), HttpError> {
    let other = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').map_or(p, |(n, _)| n))
        .find(|n| *n != name);
    match other {
        Some(n) => Err(HttpError::bad_request(format!(
            "unknown query parameter {n:?}: ?{name} takes no other"
        ))),
        None => Ok(()),
    }
}

/// The value of `?member=`, if the query has it.
fn member_param(query: Option<&str>) -> Option<String> {
    let value = query?.split('&').find_map(|p| p.strip_prefix("member="))?;
    Some(percent_decode_str(value).decode_utf8_lossy().into_owned())
}

/// The collections of `?watch=a,b`, if the query has it.
fn watch_list(query: Option<&str>) -> Option<Vec<String>> {
    let value = query?.split('&').find_map(|p| p.strip_prefix("watch="))?;
    Some(
        decode(value)
            .split(|&b| b == b',')
            .filter(|c| !c.is_empty())
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect(),
    )
}

/// Maps a request line onto an endpoint.
pub fn route<'a>(
    method: &Method,
    path: &'a str,
    query: Option<&str>,
) -> Result<Endpoint<'a>, HttpError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(HttpError::bad_request("the path must start with /"));
    };
    // One trailing slash after a key is forgiven ("/c/k/" is "/c/k"), but
    // not after a first segment: "/c/" is collection c with an empty key
    // (a script's `DELETE /users/$KEY` with an empty `$KEY` must not drop
    // the collection), and "//" is not the root.
    let rest = match rest.strip_suffix('/') {
        Some(r) if r.contains('/') => r,
        _ => rest,
    };
    // At most three segments are routed; a fourth only marks "too many".
    let mut parts = [""; 4];
    let mut count = 0;
    if !rest.is_empty() {
        for part in rest.split('/').take(parts.len()) {
            parts[count] = part;
            count += 1;
        }
    }
    let segments = &parts[..count];
    match segments.iter().position(|s| s.is_empty()) {
        Some(1) if count == 2 => {
            return Err(HttpError::bad_request(format!(
                "{method} {path}: the key is empty"
            )));
        }
        Some(_) => {
            return Err(HttpError::not_found(format!(
                "no route for {method} {path}: empty path segment"
            )));
        }
        None => {}
    }
    let default = || Cow::Borrowed(DEFAULT_COLLECTION);
    if let Some(set) = replicas_param(query) {
        only_param(query, "replicas")?;
        return match (method, segments, set) {
            (&Method::GET, [], None) => Ok(Endpoint::Replicas {
                collection: None,
                set: None,
            }),
            (&Method::PUT, [], set @ Some(_)) => Ok(Endpoint::Replicas {
                collection: None,
                set,
            }),
            (&Method::GET, [c], None) => Ok(Endpoint::Replicas {
                collection: Some(collection(c)?),
                set: None,
            }),
            (&Method::PUT, [c], set @ Some(_)) => Ok(Endpoint::Replicas {
                collection: Some(collection(c)?),
                set,
            }),
            _ => Err(HttpError::bad_request(
                "?replicas: GET /?replicas (the cluster's default) or GET /:collection?replicas \
                 reads a replication factor; PUT /?replicas=N or PUT /:collection?replicas=N \
                 (N a number, or all) sets it",
            )),
        };
    }
    if let Some(member) = member_param(query) {
        only_param(query, "member")?;
        return match (method, segments) {
            (&Method::DELETE, []) if !member.is_empty() => Ok(Endpoint::RemoveMember { member }),
            _ => Err(HttpError::bad_request(
                "?member: DELETE /?member=ID removes a dead member (its id, 16 hex digits, or \
                 its address) from the cluster",
            )),
        };
    }
    let endpoint = match (method, segments) {
        (&Method::GET, []) => match watch_list(query) {
            Some(collections) => Endpoint::Watch {
                collections,
                params: list_params(query)?,
            },
            None => Endpoint::Stats,
        },
        (&Method::GET, ["metrics"]) => Endpoint::Metrics,
        (&Method::GET, [x]) => Endpoint::KeyOrCollection {
            name: decode(x),
            list: list_params(query)?,
        },
        (&Method::GET, [c, k]) => Endpoint::Get {
            collection: collection(c)?,
            key: decode(k),
        },
        (&Method::POST, [k, v]) => Endpoint::Set {
            collection: default(),
            key: decode(k),
            value: decode(v),
        },
        (&Method::POST, [c, k, v]) => Endpoint::Set {
            collection: collection(c)?,
            key: decode(k),
            value: decode(v),
        },
        (&Method::PUT, [k]) => Endpoint::Put {
            collection: default(),
            key: decode(k),
        },
        (&Method::PUT, [c, k]) => Endpoint::Put {
            collection: collection(c)?,
            key: decode(k),
        },
        (&Method::DELETE, [x]) => Endpoint::DeleteKeyOrCollection { name: decode(x) },
        (&Method::DELETE, [c, k]) => Endpoint::Delete {
            collection: collection(c)?,
            key: decode(k),
        },
        (m, s)
            if s.len() <= 3
                && ![Method::GET, Method::POST, Method::PUT, Method::DELETE].contains(m) =>
        {
            return Err(HttpError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {m} is not supported (use GET, POST, PUT or DELETE)"),
            ));
        }
        _ => {
            return Err(HttpError::not_found(format!(
                "no route for {method} {path}"
            )));
        }
    };
    let takes_query = matches!(
        endpoint,
        Endpoint::Watch { .. } | Endpoint::KeyOrCollection { .. }
    );
    if !takes_query && let Some(q) = query.filter(|q| !q.is_empty()) {
        let name = q.split(['=', '&']).next().unwrap_or(q);
        return Err(HttpError::bad_request(format!(
            "unknown query parameter {name:?}: {method} {path} takes none"
        )));
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(bytes: &[u8]) -> Cow<'_, [u8]> {
        Cow::Borrowed(bytes)
    }

    fn ok(method: Method, path: &str) -> Endpoint<'_> {
        route(&method, path, None).unwrap()
    }

    #[test]
    fn the_routes_of_the_design() {
        assert_eq!(ok(Method::GET, "/"), Endpoint::Stats);
        assert_eq!(ok(Method::GET, "/metrics"), Endpoint::Metrics);
        assert_eq!(
            ok(Method::GET, "/users"),
            Endpoint::KeyOrCollection {
                name: b(b"users"),
                list: ListParams::default()
            }
        );
        assert_eq!(
            ok(Method::GET, "/users/ada"),
            Endpoint::Get {
                collection: "users".into(),
                key: b(b"ada")
            }
        );
        assert_eq!(
            ok(Method::POST, "/k/v"),
            Endpoint::Set {
                collection: "default".into(),
                key: b(b"k"),
                value: b(b"v")
            }
        );
        assert_eq!(
            ok(Method::POST, "/c/k/v"),
            Endpoint::Set {
                collection: "c".into(),
                key: b(b"k"),
                value: b(b"v")
            }
        );
        assert_eq!(
            ok(Method::PUT, "/k"),
            Endpoint::Put {
                collection: "default".into(),
                key: b(b"k")
            }
        );
        assert_eq!(
            ok(Method::PUT, "/c/k"),
            Endpoint::Put {
                collection: "c".into(),
                key: b(b"k")
            }
        );
        assert_eq!(
            ok(Method::DELETE, "/x"),
            Endpoint::DeleteKeyOrCollection { name: b(b"x") }
        );
        assert_eq!(
            ok(Method::DELETE, "/c/k"),
            Endpoint::Delete {
                collection: "c".into(),
                key: b(b"k")
            }
        );
        assert_eq!(
            ok(Method::GET, "/default/users"),
            Endpoint::Get {
                collection: "default".into(),
                key: b(b"users")
            }
        );
        // A trailing slash is forgiven after a key...
        assert_eq!(ok(Method::GET, "/c/k/"), ok(Method::GET, "/c/k"));
        // ...not after a collection: that is an empty key, and a DELETE
        // of one must not become a drop of the collection.
        for method in [Method::DELETE, Method::PUT, Method::GET] {
            let e = route(&method, "/users/", None).unwrap_err();
            assert_eq!(e.status, hyper::StatusCode::BAD_REQUEST, "{method}");
        }
    }

    #[test]
    fn segments_are_percent_decoded() {
        assert_eq!(
            ok(Method::POST, "/a%2Fb/hello%20world"),
            Endpoint::Set {
                collection: "default".into(),
                key: b(b"a/b"),
                value: b(b"hello world")
            }
        );
        // A collection segment that decodes to a path trick is passed on as
        // a name, which the node then refuses.
        assert_eq!(
            ok(Method::GET, "/%2e%2e%2f/k"),
            Endpoint::Get {
                collection: "../".into(),
                key: b(b"k")
            }
        );
        assert_eq!(
            route(&Method::GET, "/%ff/k", None).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn query_parameters_of_listings() {
        let e = route(&Method::GET, "/c", Some("limit=10&after=k%2001")).unwrap();
        assert_eq!(
            e,
            Endpoint::KeyOrCollection {
                name: b(b"c"),
                list: ListParams {
                    limit: Some(10),
                    after: Some(b"k 01".to_vec()),
                    ..ListParams::default()
                }
            }
        );
        let e = route(
            &Method::GET,
            "/",
            Some("watch=a%2Cb,c&since=a:00&snapshot=true&prefix=u%2F"),
        )
        .unwrap();
        assert_eq!(
            e,
            Endpoint::Watch {
                collections: vec!["a".into(), "b".into(), "c".into()],
                params: ListParams {
                    since: Some("a:00".into()),
                    snapshot: true,
                    prefix: Some(b"u/".to_vec()),
                    ..ListParams::default()
                }
            }
        );
        assert_eq!(
            route(&Method::GET, "/c", Some("snapshot=maybe"))
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            route(&Method::GET, "/c", Some("limit=ten"))
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        for empty in ["after=", "after", "limit=5&after="] {
            let e = route(&Method::GET, "/c", Some(empty)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{empty}");
        }
        assert_eq!(
            route(&Method::GET, "/c", Some("sort=asc"))
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn everything_else_is_an_error() {
        for (method, path, status) in [
            (Method::GET, "/a/b/c", StatusCode::NOT_FOUND),
            (Method::POST, "/k", StatusCode::NOT_FOUND),
            (Method::POST, "/", StatusCode::NOT_FOUND),
            (Method::PUT, "/a/b/c", StatusCode::NOT_FOUND),
            (Method::DELETE, "/", StatusCode::NOT_FOUND),
            (Method::GET, "//k", StatusCode::NOT_FOUND),
            (Method::GET, "//", StatusCode::NOT_FOUND),
            (Method::GET, "/a//b", StatusCode::NOT_FOUND),
            (Method::PATCH, "/k", StatusCode::METHOD_NOT_ALLOWED),
            (Method::OPTIONS, "/", StatusCode::METHOD_NOT_ALLOWED),
            (Method::GET, "nope", StatusCode::BAD_REQUEST),
            (Method::GET, "/a/b/c/d/e", StatusCode::NOT_FOUND),
        ] {
            assert_eq!(
                route(&method, path, None).unwrap_err().status,
                status,
                "{method} {path}"
            );
        }
    }

    #[test]
    fn removing_a_member_is_delete_on_the_root_with_its_id() {
        assert_eq!(
            route(&Method::DELETE, "/", Some("member=00000000000000ff")).unwrap(),
            Endpoint::RemoveMember {
                member: "00000000000000ff".into()
            }
        );
        assert_eq!(
            route(&Method::DELETE, "/", Some("member=127.0.0.1%3A7453")).unwrap(),
            Endpoint::RemoveMember {
                member: "127.0.0.1:7453".into()
            }
        );
        for (m, path, q) in [
            (Method::GET, "/", "member=ff"),
            (Method::DELETE, "/c", "member=ff"),
            (Method::DELETE, "/", "member="),
        ] {
            assert_eq!(
                route(&m, path, Some(q)).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{m} {path}?{q}"
            );
        }
    }
}
