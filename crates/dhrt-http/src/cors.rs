//! Cross-origin requests (CORS): which web pages may call the API and
//! follow feeds from a browser.
//!
//! A browser names the page's origin in an `Origin` header on every
//! cross-origin request (and on every `POST`, `PUT` and `DELETE`); other
//! clients send none. A write (or any method but `GET` and `HEAD`) with an
//! `Origin` the node does not allow (`--cors-origin`) is refused with 403
//! before anything else happens. So a page the node's operator does not
//! trust cannot write to a node that serves loopback clients without a
//! token, through a browser on that machine, even with a request the
//! browser sends without asking first. Its reads are answered without the
//! CORS headers, so its browser keeps the answers from it.
//! An allowed origin gets its `Access-Control-*` headers, and a preflight
//! (`OPTIONS` with `Access-Control-Request-Method`) is answered 204 without
//! a token, which browsers never send on one; the request that follows is
//! authenticated as any other.

use http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
    VARY,
};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};

use crate::body::ResponseBody;
use crate::error::HttpError;

/// The origins whose pages may call the API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cors {
    /// Any origin (`*`).
    any: bool,
    /// These origins, as `scheme://host[:port]` the way browsers send
    /// them (see `normalize_origin`).
    origins: Vec<String>,
}

impl Cors {
    /// From `--cors-origin` values: `*` for any origin, or origins such as
    /// `https://app.example.com:8443`. An error names a value that is
    /// neither.
    pub fn new<S: AsRef<str>>(origins: &[S]) -> Result<Cors, String> {
        let mut cors = Cors::default();
        for origin in origins {
            let origin = origin.as_ref().trim();
            if origin == "*" {
                cors.any = true;
                continue;
            }
            let normal = normalize_origin(origin)
                .map_err(|why| format!("--cors-origin {origin:?}: {why}"))?;
            if !cors.origins.contains(&normal) {
                cors.origins.push(normal);
            }
        }
        Ok(cors)
    }

    /// Whether no origin is allowed (the default).
    pub fn is_off(&self) -> bool {
        !self.any && self.origins.is_empty()
    }

    fn allows(&self, origin: &str) -> bool {
        self.any || self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }
}

/// An origin as browsers send it, `scheme://host[:port]`, in the form
/// they send it: lowercase, and without the port when it is the scheme's
/// default (`https://a.com:443` is sent as `https://a.com`), so that a
/// value given differently still matches.
fn normalize_origin(origin: &str) -> Result<String, &'static str> {
    let origin = origin.to_ascii_lowercase();
    let (scheme, rest) = origin
        .split_once("://")
        .ok_or("an origin is scheme://host[:port], such as https://app.example.com, or *")?;
    if !scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return Err("the scheme of an origin is letters, such as https");
    }
    if rest.is_empty()
        || rest.contains(['/', '?', '#', '@', '\\'])
        || rest.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("an origin is scheme://host[:port], with no path, query or user");
    }
    // The host: a name, or an IPv6 address in brackets.
    let (host, port) = if rest.starts_with('[') {
        let end = rest
            .find(']')
            .ok_or("an IPv6 host of an origin ends with ]")?;
        match &rest[end + 1..] {
            "" => (&rest[..=end], None),
            after => (
                &rest[..=end],
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or("an origin's port follows a colon")?,
                ),
            ),
        }
    } else {
        match rest.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    if host.is_empty() || host == "[]" || (!host.starts_with('[') && host.contains(['[', ']'])) {
        return Err("an origin names a host, such as https://app.example.com");
    }
    let port = match port {
        None => None,
        Some(port) => {
            if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                return Err("the port of an origin is a number from 0 to 65535");
            }
            let port: u16 = port
                .parse()
                .map_err(|_| "the port of an origin is a number from 0 to 65535")?;
            let default = match scheme {
                "http" | "ws" => Some(80),
                "https" | "wss" => Some(443),
                _ => None,
            };
            (default != Some(port)).then_some(port)
        }
    };
    Ok(match port {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    })
}

/// What to do with a request that carries an `Origin`.
pub(crate) enum CrossOrigin {
    /// Answer it, adding these headers.
    Allowed(HeaderValue),
    /// Answer it as if it had no `Origin`: a read from a page the node
    /// does not allow, which its browser keeps from reading the answer.
    Plain,
    /// A preflight: this is the whole answer.
    Preflight(Response<ResponseBody>),
}

/// Decides on a request with an `Origin` header.
pub(crate) fn check(
    cors: &Cors,
    method: &Method,
    headers: &HeaderMap,
) -> Result<CrossOrigin, HttpError> {
    let origin = headers
        .get(ORIGIN)
        .expect("called for requests with an Origin");
    let text = origin.to_str().unwrap_or("");
    if !cors.allows(text) && (method == Method::GET || method == Method::HEAD) {
        // The browser keeps the answer from the page.
        return Ok(CrossOrigin::Plain);
    }
    if !cors.allows(text) {
        let hint = if cors.is_off() {
            "no web page may call this node: start it with --cors-origin ORIGIN to allow one"
        } else {
            "this origin is not one of the node's --cors-origin"
        };
        return Err(HttpError::new(
            StatusCode::FORBIDDEN,
            format!("a request from a web page of origin {text:?} is refused: {hint}"),
        ));
    }
    if method == Method::OPTIONS && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD) {
        let mut response = Response::new(crate::body::full(bytes::Bytes::new()));
        *response.status_mut() = StatusCode::NO_CONTENT;
        let h = response.headers_mut();
        allow(h, origin.clone());
        h.insert(
            ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, PUT, DELETE"),
        );
        h.insert(
            ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Authorization, Content-Type, Accept, Last-Event-ID"),
        );
        h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        return Ok(CrossOrigin::Preflight(response));
    }
    Ok(CrossOrigin::Allowed(origin.clone()))
}

/// Adds the headers that let the page of `origin` read a response.
pub(crate) fn allow(headers: &mut HeaderMap, origin: HeaderValue) {
    headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(VARY, HeaderValue::from_static("Origin"));
    headers.insert(
        ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("WWW-Authenticate"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked_and_matched_without_case() {
        let cors = Cors::new(&["https://App.example.com:8443"]).unwrap();
        assert!(cors.allows("https://app.example.com:8443"));
        assert!(!cors.allows("https://app.example.com"));
        assert!(!cors.allows("null"));
        assert!(Cors::new(&["*"]).unwrap().allows("null"));
        assert!(Cors::new::<&str>(&[]).unwrap().is_off());
        for bad in [
            "app.example.com",
            "https://",
            "https://a/b",
            "https://a?x",
            "ht tp://a",
            "https://u@a",
            "https://a.com:99999",
            "https://a.com:x",
        ] {
            assert!(Cors::new(&[bad]).is_err(), "{bad}");
        }
        for bad in [
            "http://[::1",
            "http://[::1]x",
            "http://a.com:+80",
            "http://a.com:",
            "http://a]:80",
            "http://:80",
            "1http://a.com",
        ] {
            assert!(Cors::new(&[bad]).is_err(), "{bad}");
        }
        for good in ["http://[::1]:8080", "http://[::1]", "https://a.com:443"] {
            assert!(Cors::new(&[good]).is_ok(), "{good}");
        }
        // Given as browsers would never send them, and still matched.
        let cors =
            Cors::new(&["https://A.com:443", "http://b.com:080", "http://[::1]:80"]).unwrap();
        assert!(cors.allows("https://a.com"));
        assert!(!cors.allows("https://a.com:443"));
        assert!(cors.allows("http://b.com"));
        assert!(cors.allows("http://[::1]"));
        let cors = Cors::new(&["http://b.com:0080", "https://b.com:80"]).unwrap();
        assert!(cors.allows("http://b.com"));
        assert!(cors.allows("https://b.com:80"));
    }
}
