//! The `Host` a request names, judged on a node that trusts its loopback
//! clients (no auth file).
//!
//! Such a node serves whoever connects from loopback. A web page can make
//! the browser of someone on that machine connect from loopback: its site's
//! name, looked up again after the page loaded, answers 127.0.0.1 (DNS
//! rebinding), and the page's requests are then same-origin to the browser,
//! which lets the page read the answers. The browser still names the site
//! in `Host`. So a node without tokens answers only requests whose `Host`
//! is an IP address, `localhost` (or a name under it), or this machine's
//! own host name, which no page can take, and refuses the rest with 403
//! and a sentence. Nodes with tokens need no such rule: a page cannot read
//! a token from the browser.

use std::sync::OnceLock;

use http::header::HOST;
use http::{HeaderMap, StatusCode};

use crate::error::HttpError;

/// Refuses a request with more than one `Host` (400, as RFC 9112 asks):
/// which one names the node would be a guess, and a proxy in front may
/// guess otherwise.
#[inline]
pub(crate) fn single(headers: &HeaderMap) -> Result<(), HttpError> {
    if headers.get_all(HOST).iter().nth(1).is_some() {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "more than one Host header".to_string(),
        ));
    }
    Ok(())
}

/// Refuses a request whose `Host` could be a site's name pointed at this
/// machine. A request without `Host` (HTTP/1.0; browsers always send it)
/// passes.
pub(crate) fn check(headers: &HeaderMap) -> Result<(), HttpError> {
    let Some(value) = headers.get(HOST) else {
        return Ok(());
    };
    let host = value.to_str().ok().and_then(name);
    match host {
        Some(host) if trusted(host) => Ok(()),
        _ => Err(HttpError::new(
            StatusCode::FORBIDDEN,
            format!(
                "this node has no auth file, so it answers loopback clients only, and only when \
                 they name it by an IP address or localhost: Host {:?} could be a web site's name \
                 pointed at this machine (DNS rebinding). Use http://127.0.0.1:PORT/, or start \
                 the node with --auth-file FILE",
                String::from_utf8_lossy(value.as_bytes())
            ),
        )),
    }
}

/// The host of a `Host` value, without its port; `None` if it is not one.
fn name(value: &str) -> Option<&str> {
    let value = value.trim();
    if let Some(rest) = value.strip_prefix('[') {
        // [v6]:port or [v6].
        let (ip, after) = rest.split_once(']')?;
        let port_ok = after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()));
        return (port_ok && ip.parse::<std::net::Ipv6Addr>().is_ok()).then_some(value);
    }
    let host = match value.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        Some(_) => return None,
        None => value,
    };
    (!host.is_empty()).then_some(host)
}

fn trusted(host: &str) -> bool {
    if host.starts_with('[') || host.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost") || own_name().is_some_and(|own| host == own)
}

/// This machine's host name, lower case.
fn own_name() -> Option<&'static str> {
    static NAME: OnceLock<Option<String>> = OnceLock::new();
    NAME.get_or_init(|| {
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
        let name = name.trim().to_ascii_lowercase();
        (!name.is_empty() && name != "localhost").then_some(name)
    })
    .as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(value: &str) -> Result<(), HttpError> {
        let mut h = HeaderMap::new();
        h.insert(HOST, value.parse().unwrap());
        check(&h)
    }

    #[test]
    fn two_hosts_are_refused_whatever_they_name() {
        let mut h = HeaderMap::new();
        h.insert(HOST, "127.0.0.1".parse().unwrap());
        assert!(single(&h).is_ok());
        h.append(HOST, "127.0.0.1".parse().unwrap());
        assert_eq!(single(&h).unwrap_err().status, StatusCode::BAD_REQUEST);
        assert!(single(&HeaderMap::new()).is_ok());
    }

    #[test]
    fn addresses_and_localhost_pass_and_other_names_are_refused() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:7453",
            "10.1.2.3:80",
            "[::1]",
            "[::1]:7453",
            "localhost",
            "LOCALHOST:7453",
            "localhost.:7453",
            "app.localhost:7453",
        ] {
            assert!(host(ok).is_ok(), "{ok}");
        }
        for refused in [
            "attacker.example",
            "attacker.example:7453",
            "127.0.0.1.nip.io:7453",
            "localhost.attacker.example",
            "[::1]x",
            "[not-v6]:1",
            "127.0.0.1:port",
            ":7453",
            "",
        ] {
            let e = host(refused).unwrap_err();
            assert_eq!(e.status, StatusCode::FORBIDDEN, "{refused}");
            assert!(e.message.contains("DNS rebinding"), "{}", e.message);
        }
        assert!(check(&HeaderMap::new()).is_ok(), "no Host: HTTP/1.0");
    }

    #[test]
    fn this_machines_own_name_passes() {
        if let Some(own) = own_name() {
            assert!(host(&format!("{own}:7453")).is_ok());
            assert!(host(&own.to_ascii_uppercase()).is_ok());
        }
    }
}
