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
    /// These origins, as `scheme://host[:port]`, lowercase.
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
            check_origin(origin).map_err(|why| format!("--cors-origin {origin:?}: {why}"))?;
            cors.origins.push(origin.to_ascii_lowercase());
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

/// An origin as browsers send it: `scheme://host` with an optional port,
/// nothing after.
fn check_origin(origin: &str) -> Result<(), &'static str> {
    let (scheme, rest) = origin
        .split_once("://")
        .ok_or("an origin is scheme://host[:port], such as https://app.example.com, or *")?;
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return Err("the scheme of an origin is letters, such as https");
    }
    if rest.is_empty()
        || rest.contains(['/', '?', '#', '@'])
        || rest.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("an origin is scheme://host[:port], with no path, query or user");
    }
    // A port, if any, after the host (an IPv6 host is in brackets).
    if let Some((host, port)) = rest.rsplit_once(':')
        && (!host.contains(':') || host.ends_with(']'))
        && port.parse::<u16>().is_err()
    {
        return Err("the port of an origin is a number from 0 to 65535");
    }
    Ok(())
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
        for good in ["http://[::1]:8080", "http://[::1]", "https://a.com:443"] {
            assert!(Cors::new(&[good]).is_ok(), "{good}");
        }
    }
}
