//! Who may use a real `dhrtd`: tokens with roles over HTTP, the binary
//! protocol, `dhrt-cli` and `dhrt-client`; revocation by SIGHUP; loopback
//! only without an auth file; no start beyond loopback without a long
//! cluster secret.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dhrt_client::{Client, Error};
use serde_json::Value;

use crate::cli::cli_binary;
use crate::dhrtd::{Dhrtd, assert_closed, binary, free_addr, http_at};

/// `dhrt-cli token --role ROLE`: the token and its auth-file line.
pub(crate) fn make_token(role: &str) -> (String, String) {
    let o = Command::new(cli_binary())
        .args(["token", "--role", role, "--name", &format!("{role} test")])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let text = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("dhrt_"), "{text}");
    assert!(lines[1].starts_with(&format!("{role} sha256:")), "{text}");
    assert!(
        !lines[1].contains(&lines[0][5..]),
        "the file line holds the token"
    );
    (lines[0].to_string(), lines[1].to_string())
}

/// An admin token and an auth file holding it, in `dir`.
fn admin_auth_file(dir: &Path) -> (String, std::path::PathBuf) {
    let (admin, admin_line) = make_token("admin");
    let auth = dir.join("auth");
    std::fs::write(&auth, format!("{admin_line}\n")).unwrap();
    (admin, auth)
}

fn request(node: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let headers = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    http_at(node, method, path, &headers, b"").unwrap()
}

fn error_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["Error"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_string()
}

fn dhrt_cli(node: &Dhrtd, token: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(cli_binary());
    c.arg("--addr").arg(node.addr.to_string()).args(args);
    c.env_remove("DHRT_TOKEN");
    if let Some(t) = token {
        c.env("DHRT_TOKEN", t);
    }
    c.output().unwrap()
}

/// A node in memory with `auth` as its auth file and `slots` client slots.
fn start_with_slots(dir: &Path, auth: &Path, slots: &str) -> Dhrtd {
    Dhrtd::start(
        &dir.join("a"),
        &[
            "--memory",
            "--auth-file",
            auth.to_str().unwrap(),
            "--max-connections",
            slots,
        ],
    )
}

/// A newcomer with `token` is refused: every client slot is held by a
/// connection it may not close.
fn assert_newcomer_refused(at: SocketAddr, token: &str, what: &str) {
    let got = http_at(
        at,
        "GET",
        "/c/k",
        &format!("Authorization: Bearer {token}\r\n"),
        b"",
    );
    assert!(!matches!(got, Ok((200 | 404, _))), "{what}: {got:?}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn tokens_and_roles_over_http_the_binary_protocol_the_cli_and_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, read_line) = make_token("read");
    let (writer, write_line) = make_token("write");
    let (admin, admin_line) = make_token("admin");
    let auth = dir.path().join("auth");
    std::fs::write(
        &auth,
        format!("# tokens\n{read_line}\n{write_line}\n{admin_line}\n"),
    )
    .unwrap();
    let data = dir.path().join("data");
    let mut node = Dhrtd::start(&data, &["--auth-file", auth.to_str().unwrap()]);
    let at = node.addr;

    // HTTP: no token, a wrong one, a malformed header: 401, loopback or not.
    for token in [None, Some("dhrt_0000"), Some(&writer[..20])] {
        let (status, body) = request(at, "GET", "/", token);
        assert_eq!(status, 401, "{token:?}: {body}");
        assert!(!error_of(&body).is_empty());
    }
    let (status, body) = http_at(at, "GET", "/", "Authorization: Basic YTpi\r\n", b"").unwrap();
    assert_eq!((status, error_of(&body).contains("Bearer")), (401, true));
    // Each role does what it may, and gets 403 for the rest.
    assert_eq!(
        request(at, "POST", "/users/ada/lovelace", Some(&writer)).0,
        200
    );
    assert_eq!(request(at, "GET", "/users/ada", Some(&reader)).0, 200);
    assert_eq!(request(at, "GET", "/users", Some(&reader)).0, 200);
    assert_eq!(request(at, "GET", "/metrics", Some(&reader)).0, 200);
    // Two tokens in one request: neither counts, whichever comes first.
    for (first, second) in [(&reader, &writer), (&writer, &reader)] {
        let headers =
            format!("Authorization: Bearer {first}\r\nAuthorization: Bearer {second}\r\n");
        let (status, body) = http_at(at, "PUT", "/users/two", &headers, b"v").unwrap();
        assert_eq!(status, 400, "{body}");
        assert!(
            error_of(&body).contains("more than one Authorization"),
            "{body}"
        );
    }
    let (status, body) = request(at, "POST", "/users/ada/x", Some(&reader));
    assert_eq!(status, 403, "{body}");
    assert!(error_of(&body).contains("write role"), "{body}");
    assert_eq!(request(at, "DELETE", "/users/nobody", Some(&reader)).0, 403);
    let (status, body) = request(at, "DELETE", "/users", Some(&writer));
    assert_eq!(status, 403, "{body}");
    assert!(error_of(&body).contains("admin role"), "{body}");
    assert_eq!(
        request(at, "GET", "/users/ada", Some(&reader)).0,
        200,
        "nothing dropped"
    );
    // Refusals are counted for operators.
    let (status, metrics) = request(at, "GET", "/metrics", Some(&reader));
    assert_eq!(status, 200);
    assert!(
        metrics.contains("dhrt_auth_tokens{mode=\"tokens\"} 3"),
        "{metrics}"
    );
    let count = |reason: &str| -> u64 {
        let name = format!("dhrt_auth_refused_total{{reason=\"{reason}\"}} ");
        let line = metrics.lines().find(|l| l.starts_with(&name)).expect(&name);
        line[name.len()..].parse().unwrap()
    };
    assert!(count("unauthenticated") >= 4, "{metrics}");
    assert!(count("forbidden") >= 3, "{metrics}");

    // The binary protocol, through dhrt-client.
    let rt = runtime();
    rt.block_on(async {
        let anonymous = Client::connect(at.to_string()).await.unwrap();
        let e = anonymous.get("users", "ada").await.unwrap_err();
        assert!(matches!(e, Error::Unauthenticated(_)), "{e:?}");
        let e = Client::builder(at.to_string())
            .token("dhrt_wrong")
            .connect()
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unauthenticated(_)), "{e:?}");
        let r = Client::builder(at.to_string())
            .token(&reader)
            .connect()
            .await
            .unwrap();
        assert_eq!(
            r.get("users", "ada").await.unwrap().as_deref(),
            Some(&b"lovelace"[..])
        );
        assert!(matches!(
            r.set("users", "bob", "x").await,
            Err(Error::Forbidden(_))
        ));
        let w = Client::builder(at.to_string())
            .token(&writer)
            .connect()
            .await
            .unwrap();
        w.set("users", "bob", "builder").await.unwrap();
        let e = w.drop_collection("users").await.unwrap_err();
        assert!(matches!(e, Error::Forbidden(_)), "{e:?}");
        let e = w.join("127.0.0.1:1").await.unwrap_err();
        assert!(matches!(e, Error::Forbidden(_)), "{e:?}");
        let a = Client::builder(at.to_string())
            .token(&admin)
            .connect()
            .await
            .unwrap();
        a.set("scratch", "k", "v").await.unwrap();
        assert_eq!(a.drop_collection("scratch").await.unwrap().len(), 1);
    });

    // dhrt-cli, with DHRT_TOKEN and with --token.
    let o = dhrt_cli(&node, None, &["get", "users", "ada"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains("not authenticated") && said.contains("--token"),
        "{said}"
    );
    let o = dhrt_cli(&node, Some(&writer), &["set", "users", "cli", "yes"]);
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).as_ref()),
        (Some(0), "OK\n")
    );
    let o = dhrt_cli(&node, None, &["--token", &reader, "get", "users", "cli"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "yes\n");
    let o = dhrt_cli(&node, None, &["--token", &reader, "del", "users", "cli"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("forbidden"),
        "{o:?}"
    );

    // Revocation: the writer's line goes, SIGHUP re-reads the file. A
    // connection authenticated before keeps nothing.
    let open_writer = rt.block_on(async {
        let w = Client::builder(at.to_string())
            .token(&writer)
            .connect()
            .await
            .unwrap();
        w.set("users", "before", "revocation").await.unwrap();
        w
    });
    std::fs::write(&auth, format!("{read_line}\n{admin_line}\n")).unwrap();
    node.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while request(at, "GET", "/", Some(&writer)).0 != 401 {
        assert!(Instant::now() < deadline, "the revoked token still works");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(node.running(), "SIGHUP reloads, it does not stop the node");
    let e = rt
        .block_on(open_writer.set("users", "after", "revocation"))
        .unwrap_err();
    assert!(matches!(e, Error::Unauthenticated(_)), "{e:?}");
    assert_eq!(request(at, "GET", "/users/before", Some(&reader)).0, 200);
    assert_eq!(request(at, "GET", "/users/after", Some(&reader)).0, 404);
    // A file that does not parse changes nothing.
    std::fs::write(&auth, "read sha256:nothex\n").unwrap();
    node.signal("HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert!(node.running());
    assert_eq!(request(at, "GET", "/", Some(&reader)).0, 200);
    assert!(node.stop("TERM").success());
}

/// A global address of this machine, to reach a node from off loopback.
pub(crate) fn host_ip() -> IpAddr {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("this machine has no global IPv4 address to test with: {text}"))
}

pub(crate) const SECRET: &str = "0123456789abcdef0123456789abcdef-security-test";

#[test]
fn without_an_auth_file_only_loopback_clients_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let node = spawn(
        dir.path(),
        &[
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--cluster-secret",
            SECRET,
        ],
    );
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let remote = SocketAddr::new(host_ip(), port);
    wait_serving(local);
    assert_eq!(request(local, "POST", "/k/v", None).0, 200);
    let (status, body) = request(remote, "GET", "/k", None);
    assert_eq!(status, 401, "{body}");
    let said = error_of(&body);
    assert!(
        said.contains("--auth-file") && said.contains("dhrt-cli token"),
        "{said}"
    );
    assert_eq!(request(remote, "POST", "/k/w", None).0, 401);
    let e = runtime().block_on(async {
        let c = Client::connect(remote.to_string()).await.unwrap();
        c.get("default", "k").await.unwrap_err()
    });
    assert!(
        matches!(&e, Error::Unauthenticated(m) if m.contains("loopback")),
        "{e:?}"
    );
    // The secret was given on the command line: the node says where it
    // belongs instead.
    let mut node = node;
    let _ = node.0.kill();
    let _ = node.0.wait();
    let mut said = String::new();
    std::io::Read::read_to_string(&mut node.0.stderr.take().unwrap(), &mut said).unwrap();
    assert!(
        said.contains("cluster secret is on the command line")
            && said.contains("DHRT_CLUSTER_SECRET"),
        "{said}"
    );
    drop(node);

    // --no-auth, in so many words: anyone.
    let node = spawn(
        dir.path(),
        &[
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--cluster-secret",
            SECRET,
            "--no-auth",
        ],
    );
    wait_serving(local);
    assert_eq!(request(remote, "GET", "/k", None).0, 200);
    drop(node);
}

/// The status and body of a request to `addr` naming `host` in `Host`.
fn with_host(addr: SocketAddr, method: &str, path: &str, host: &str, extra: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = if method == "GET" { "" } else { "v" };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = Vec::new();
    // A watch does not end: its head and first event are enough.
    let mut chunk = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") || answer.len() < 200 {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
        if answer.starts_with(b"HTTP/1.1 200") && path.contains("watch") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text[9..12].parse().unwrap();
    (status, text)
}

/// DNS rebinding: a web page whose site name now points at 127.0.0.1
/// reaches a node that trusts loopback; the browser names the site in
/// `Host`, and the node refuses it. By address or `localhost` it serves,
/// and a node with tokens does not care what `Host` says.
#[test]
fn a_node_without_tokens_refuses_requests_naming_a_foreign_host() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &[]);
    let port = node.addr.port();
    let site = format!("attacker.example:{port}");
    assert_eq!(
        with_host(node.addr, "PUT", "/c/k", &format!("127.0.0.1:{port}"), "").0,
        200
    );
    for (method, path, extra) in [
        ("GET", "/c/k", ""),
        ("GET", "/c", ""),
        ("GET", "/", ""),
        ("GET", "/metrics", ""),
        ("GET", "/?watch=c", "Accept: text/event-stream\r\n"),
        ("PUT", "/c/k", ""),
        ("DELETE", "/c/k", ""),
    ] {
        let (status, text) = with_host(node.addr, method, path, &site, extra);
        assert_eq!(status, 403, "{method} {path}: {text}");
        assert!(
            text.contains("DNS rebinding") && text.contains("--auth-file"),
            "{text}"
        );
        assert!(!text.contains(r#""Value""#), "nothing of the data: {text}");
    }
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "localhost".to_string(),
    ] {
        let (status, text) = with_host(node.addr, "GET", "/c/k", &host, "");
        assert_eq!(status, 200, "{host}: {text}");
        assert!(text.ends_with(r#"{"Key":"k","Value":"v"}"#), "{text}");
    }
    let (status, text) = with_host(
        node.addr,
        "GET",
        "/?watch=c",
        &format!("[::1]:{port}"),
        "Accept: text/event-stream\r\n",
    );
    assert_eq!(status, 200, "{text}");
    drop(node);

    let (admin, auth) = admin_auth_file(dir.path());
    let node = Dhrtd::start(
        &dir.path().join("data"),
        &["--auth-file", auth.to_str().unwrap()],
    );
    let bearer = format!("Authorization: Bearer {admin}\r\n");
    let site = format!("db.internal.example:{}", node.addr.port());
    assert_eq!(with_host(node.addr, "PUT", "/c/k", &site, &bearer).0, 200);
    let (status, text) = with_host(node.addr, "GET", "/c/k", &site, "");
    assert_eq!(status, 401, "no token: {text}");
}

pub(crate) struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `dhrtd` with exactly `args` (no --listen added).
pub(crate) fn spawn_node(data: &Path, args: &[String]) -> Child {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn(data, &args)
}

fn spawn(data: &Path, args: &[&str]) -> Child {
    Child(
        Command::new(binary())
            .arg("--data-dir")
            .arg(data)
            .args(args)
            .env("DHRT_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

pub(crate) fn wait_serving(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "dhrtd did not start on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `dhrtd` expecting it to refuse to start: its exit code and stderr.
pub(crate) fn refused(data: &Path, args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(binary())
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("DHRT_CLUSTER_SECRET")
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_node_beyond_loopback_does_not_start_without_a_long_cluster_secret() {
    let dir = tempfile::tempdir().unwrap();
    let (code, said) = refused(dir.path(), &["--listen", "0.0.0.0:0"]);
    assert_eq!(code, Some(2), "{said}");
    assert!(
        said.contains("without a cluster secret") && said.contains("dhrt-cli secret"),
        "{said}"
    );
    let (code, said) = refused(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--cluster-secret", "short"],
    );
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("at least 32"), "{said}");
    let bad = dir.path().join("auth");
    std::fs::write(&bad, "# ok\nwriter sha256:00\n").unwrap();
    let (code, said) = refused(
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--auth-file",
            bad.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("line 2"), "{said}");
    let (code, said) = refused(
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--auth-file",
            bad.to_str().unwrap(),
            "--no-auth",
        ],
    );
    assert_eq!(code, Some(2), "{said}");

    // `dhrt-cli secret` makes one that is accepted.
    let o = Command::new(cli_binary()).arg("secret").output().unwrap();
    let secret = String::from_utf8(o.stdout).unwrap().trim().to_string();
    assert!(secret.len() >= 32, "{secret}");
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _node = spawn(
        dir.path(),
        &[
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--cluster-secret",
            &secret,
        ],
    );
    wait_serving(SocketAddr::from(([127, 0, 0, 1], port)));
}

/// A TCP proxy from a free port to `to` that keeps every byte the dialer
/// sends; returns its address and the bytes so far.
fn recording_proxy(to: SocketAddr) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = listener.local_addr().unwrap();
    let recorded = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = recorded.clone();
    std::thread::spawn(move || {
        // The first connection only: one handshake is all we want.
        let Ok((mut dialer, _)) = listener.accept() else {
            return;
        };
        let mut node = std::net::TcpStream::connect(to).unwrap();
        let (mut dialer_r, mut node_w) = (dialer.try_clone().unwrap(), node.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = dialer_r.read(&mut buf) {
                if n == 0 || node_w.write_all(&buf[..n]).is_err() {
                    break;
                }
                keep.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let mut buf = [0u8; 65536];
        while let Ok(n) = node.read(&mut buf) {
            if n == 0 || dialer.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    (at, recorded)
}

/// The handshake messages a node sends on `stream` until it closes it.
fn handshake_answers(mut stream: std::net::TcpStream) -> Vec<dhrt_proto::Handshake> {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    let mut out = Vec::new();
    while let Ok(dhrt_proto::Decoded::Complete { msg, len }) =
        dhrt_proto::decode_frame::<dhrt_proto::Handshake>(&got, 1 << 20)
    {
        out.push(msg);
        got.drain(..len);
    }
    assert!(
        got.is_empty(),
        "bytes after the handshake: {} of them",
        got.len()
    );
    out
}

#[test]
fn a_stranger_and_a_replayed_handshake_get_nothing_and_are_logged() {
    use std::io::{Read, Write};
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let a_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut a = spawn(
        dirs[0].path(),
        &["--listen", &a_addr.to_string(), "--cluster-secret", SECRET],
    );
    wait_serving(a_addr);
    assert_eq!(request(a_addr, "POST", "/secret/k/v", None).0, 200);

    // A legitimate node joins through a proxy that records its handshake.
    let (proxy, recorded) = recording_proxy(a_addr);
    let b = Dhrtd::start(
        dirs[1].path(),
        &["--cluster-secret", SECRET, "--node", &proxy.to_string()],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while request(b.addr, "GET", "/secret/k", None).0 != 200 {
        assert!(Instant::now() < deadline, "b never joined");
        std::thread::sleep(Duration::from_millis(50));
    }
    let recorded = recorded.lock().unwrap().clone();
    // Preamble, Hello, Proof: the dialer's part of the handshake.
    let mut rest = &recorded[dhrt_proto::PREAMBLE_LEN..];
    let mut dialer_said = Vec::new();
    for _ in 0..2 {
        let dhrt_proto::Decoded::Complete { msg, len } =
            dhrt_proto::decode_frame::<dhrt_proto::Handshake>(rest, 1 << 20).unwrap()
        else {
            panic!("no whole handshake recorded")
        };
        dialer_said.push(msg);
        rest = &rest[len..];
    }
    assert!(matches!(
        dialer_said[0],
        dhrt_proto::Handshake::Hello { .. }
    ));
    assert!(matches!(
        dialer_said[1],
        dhrt_proto::Handshake::Proof { .. }
    ));
    let handshake_len = recorded.len() - rest.len();

    // Replayed on a new connection: refused, and nothing sealed follows.
    let mut replay = std::net::TcpStream::connect(a_addr).unwrap();
    replay.write_all(&recorded[..handshake_len]).unwrap();
    let answers = handshake_answers(replay);
    assert!(
        matches!(answers[0], dhrt_proto::Handshake::Challenge { .. }),
        "{answers:?}"
    );
    assert!(
        matches!(answers.last(), Some(dhrt_proto::Handshake::Refused { .. })),
        "{answers:?}"
    );
    assert_eq!(answers.len(), 2, "{answers:?}");

    // Refusals are logged at most once a second (a flood must not fill
    // the disk): the next attempt comes after that.
    std::thread::sleep(Duration::from_millis(1100));

    // A stranger's Hello gets a challenge with nothing to guess from (a
    // nonce and a node id), and a guessed proof gets a refusal.
    let mut stranger = std::net::TcpStream::connect(a_addr).unwrap();
    let mut hello = dhrt_proto::channel_preamble(dhrt_proto::Channel::Peer).to_vec();
    let msg = dhrt_proto::Handshake::Hello {
        node: 0xbad,
        nonce: [7; dhrt_proto::PROOF_LEN],
    };
    dhrt_proto::encode_frame(&msg, &mut hello, 1 << 20).unwrap();
    stranger.write_all(&hello).unwrap();
    let mut first = [0u8; 4096];
    stranger
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let n = stranger.read(&mut first).unwrap();
    match dhrt_proto::decode_frame::<dhrt_proto::Handshake>(&first[..n], 1 << 20).unwrap() {
        dhrt_proto::Decoded::Complete {
            msg: dhrt_proto::Handshake::Challenge { .. },
            len,
        } => {
            assert_eq!(
                len, n,
                "only the challenge before the dialer proves anything"
            );
        }
        other => panic!("{other:?}"),
    }
    let mut guess = Vec::new();
    let proof = dhrt_proto::Handshake::Proof {
        proof: [1; dhrt_proto::PROOF_LEN],
    };
    dhrt_proto::encode_frame(&proof, &mut guess, 1 << 20).unwrap();
    stranger.write_all(&guess).unwrap();
    let answers = handshake_answers(stranger);
    assert!(
        matches!(answers.as_slice(), [dhrt_proto::Handshake::Refused { .. }]),
        "{answers:?}"
    );

    // The legitimate node is still a member; both refusals are counted, and
    // logged with the address they came from.
    assert_eq!(request(b.addr, "GET", "/secret/k", None).0, 200);
    let (_, metrics) = request(a_addr, "GET", "/metrics", None);
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dhrt_peer_refused_total "))
        .expect("dhrt_peer_refused_total");
    assert!(refused.parse::<u64>().unwrap() >= 2, "{metrics}");
    let _ = a.0.kill();
    let mut log = String::new();
    a.0.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    let refusals = log
        .lines()
        .filter(|l| l.contains("refused a peer connection") && l.contains("127.0.0.1:"))
        .count();
    assert!(refusals >= 2, "{log}");
}

/// A node guarding its clients with tokens and no cluster secret takes no
/// peers: a process on the same machine proving the empty secret would
/// otherwise join it and read and write what the tokens guard.
#[test]
fn a_node_with_an_auth_file_and_no_cluster_secret_takes_no_peers() {
    let dir = tempfile::tempdir().unwrap();
    let (admin, auth) = admin_auth_file(dir.path());
    let guarded = Dhrtd::start(
        &dir.path().join("a"),
        &["--auth-file", auth.to_str().unwrap()],
    );
    let (code, body) = request(guarded.addr, "PUT", "/c/k", Some(&admin));
    assert!(code == 201 || code == 200, "{code} {body}");
    // An intruder without a token, told to join it.
    let intruder = Dhrtd::start(
        &dir.path().join("b"),
        &["--node", &guarded.addr.to_string()],
    );
    // Saved on the intruder alone, which never reached the node it was
    // told to join, and says so (504, under the default concern `all`).
    let (code, body) = request(intruder.addr, "PUT", "/c/pwned", None);
    assert_eq!(code, 504, "{body}");
    // Nothing flows either way: the intruder's write never reaches the
    // guarded node, and the guarded node's key never reaches the intruder.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let (code, body) = request(guarded.addr, "GET", "/c/pwned", Some(&admin));
        assert_eq!(
            code, 404,
            "the intruder's write reached the guarded node: {body}"
        );
        let (code, body) = request(intruder.addr, "GET", "/c/k", None);
        assert_eq!(
            code, 404,
            "the guarded node's key reached the intruder: {body}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Nor does an admin's join make it one: refused, and it stays alone
    // (before, it joined, took its peer for dead and answered every write
    // 504).
    let out = dhrt_cli(
        &guarded,
        Some(&admin),
        &["join", &intruder.addr.to_string()],
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("takes no peers"), "{said}");
    let (code, body) = request(guarded.addr, "PUT", "/c/after", Some(&admin));
    assert!(code == 201 || code == 200, "{code} {body}");
    // And a node told to cluster with an auth file and no secret does not
    // start.
    let (code, said) = refused(
        &dir.path().join("c"),
        &[
            "--auth-file",
            auth.to_str().unwrap(),
            "--node",
            &guarded.addr.to_string(),
        ],
    );
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("cluster secret"), "{said}");
}

/// Strangers that connect first and show no valid token cannot keep a
/// client with one out: when every client slot is taken, a newcomer closes
/// the oldest connection that has not shown a token and takes its slot.
/// Connections that have shown one are never closed for a newcomer.
#[test]
fn strangers_holding_every_client_slot_make_room_for_a_client_with_a_token() {
    use std::io::Write;
    use std::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let (admin, auth) = admin_auth_file(dir.path());
    let node = start_with_slots(dir.path(), &auth, "4");
    let at = node.addr;
    // Four strangers take every client slot: two binary connections that
    // send the preamble and nothing more, one that shows a wrong token, and
    // one that sends part of an HTTP head.
    let mut strangers = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(at).unwrap();
        s.write_all(&dhrt_proto::preamble()).unwrap();
        strangers.push(s);
    }
    let mut wrong = TcpStream::connect(at).unwrap();
    let mut auth_frame = Vec::new();
    let wrong_token = dhrt_proto::Request {
        id: 1,
        op: dhrt_proto::Op::Auth {
            token: "dhrt_wrong".into(),
        },
    };
    dhrt_proto::encode_frame(&wrong_token, &mut auth_frame, 1 << 20).unwrap();
    wrong.write_all(&dhrt_proto::preamble()).unwrap();
    wrong.write_all(&auth_frame).unwrap();
    strangers.push(wrong);
    let mut http = TcpStream::connect(at).unwrap();
    http.write_all(b"GET /c/k HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    strangers.push(http);
    std::thread::sleep(Duration::from_millis(300));

    // A client with a token gets in, over HTTP and over the binary
    // protocol, again and again, well within the strangers' 10 s grace.
    let started = Instant::now();
    for round in 0..3 {
        let (code, body) = request(at, "PUT", &format!("/c/k{round}"), Some(&admin));
        assert!(
            code == 200 || code == 201,
            "round {round}: a client with a token was kept out by strangers: {code} {body}"
        );
    }
    let rt = runtime();
    // Four clients with a token now hold every slot.
    let proven: Vec<Client> = rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..4 {
            let c = Client::builder(at.to_string())
                .token(&admin)
                .connect()
                .await
                .expect("a client with a token was kept out by strangers");
            c.set("c", "k", "v").await.unwrap();
            clients.push(c);
        }
        clients
    });
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}: the strangers' grace ran out, not room made",
        started.elapsed()
    );
    // Every stranger was closed for them.
    for s in strangers {
        assert_closed(s, Duration::from_secs(2), "a stranger still holds a slot");
    }
    // A newcomer finds no stranger to close: it is refused, and the clients
    // that showed a token are all still served.
    assert_newcomer_refused(
        at,
        &admin,
        "a fifth connection was served beside four clients",
    );
    rt.block_on(async {
        for c in &proven {
            assert_eq!(c.get("c", "k").await.unwrap().as_deref(), Some(&b"v"[..]));
        }
    });
    assert!(node.stop("TERM").success());
}

/// A token revoked by a reload keeps no client slots: the connections
/// that showed it, idle or not, are spared no more, and a newcomer with a
/// valid token closes the oldest of them for its slot. Connections whose
/// token is still valid stay spared, idle or not.
#[test]
fn connections_of_a_revoked_token_make_room_for_a_newcomer() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let (admin, admin_line) = make_token("admin");
    let (revoked, revoked_line) = make_token("write");
    let auth = dir.path().join("auth");
    std::fs::write(&auth, format!("{admin_line}\n{revoked_line}\n")).unwrap();
    let node = start_with_slots(dir.path(), &auth, "5");
    let at = node.addr;
    // Keep-alive connections that showed a token: the admin's first (the
    // oldest), then three with the token to be revoked (over HTTP one goes
    // on asking, one goes idle; one over the binary protocol goes on
    // asking).
    let ask = |s: &mut TcpStream, token: &str| -> u16 {
        write!(
            s,
            "GET /c/k HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        head.get(9..12)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no answer: {head:?}"))
    };
    let mut kept = TcpStream::connect(at).unwrap();
    assert_eq!(ask(&mut kept, &admin), 404);
    let mut busy = TcpStream::connect(at).unwrap();
    assert_eq!(ask(&mut busy, &revoked), 404);
    let mut idle = TcpStream::connect(at).unwrap();
    assert_eq!(ask(&mut idle, &revoked), 404);
    let frame = |op: dhrt_proto::Op| {
        let mut buf = Vec::new();
        dhrt_proto::encode_frame(&dhrt_proto::Request { id: 1, op }, &mut buf, 1 << 20).unwrap();
        buf
    };
    let get = frame(dhrt_proto::Op::Get {
        collection: "c".into(),
        key: "k".into(),
    });
    // Sends a get and reads its answer (whatever it is).
    let bin_ask = |s: &mut TcpStream| {
        s.write_all(&get).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 4096];
        assert!(s.read(&mut buf).unwrap() > 0, "no answer");
    };
    let mut bin_busy = TcpStream::connect(at).unwrap();
    bin_busy.write_all(&dhrt_proto::preamble()).unwrap();
    bin_busy
        .write_all(&frame(dhrt_proto::Op::Auth {
            token: revoked.clone(),
        }))
        .unwrap();
    bin_ask(&mut bin_busy);
    // One that showed the token to be revoked, then the admin's.
    let mut switched = TcpStream::connect(at).unwrap();
    assert_eq!(ask(&mut switched, &revoked), 404);
    assert_eq!(ask(&mut switched, &admin), 404);
    // Every slot is held by a connection that showed a valid token: a
    // newcomer is refused.
    assert_newcomer_refused(at, &admin, "a sixth connection was served beside five");

    // The token is revoked. One of its connections is refused (and asks no
    // more), the other stays idle, and so does the admin's.
    std::fs::write(&auth, format!("{admin_line}\n")).unwrap();
    node.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ask(&mut busy, &revoked) != 401 {
        assert!(Instant::now() < deadline, "the revoked token still works");
        std::thread::sleep(Duration::from_millis(20));
    }
    bin_ask(&mut bin_busy);

    // Three newcomers with the admin's token get in, in the slots of the
    // revoked token's connections; the admin's, older and idle, is spared:
    // its token is still valid.
    let mut newcomers = Vec::new();
    for i in 0..3 {
        let mut s = TcpStream::connect(at).unwrap();
        assert_eq!(ask(&mut s, &admin), 404, "newcomer {i}");
        newcomers.push(s);
    }
    assert_closed(
        busy,
        Duration::from_secs(2),
        "the revoked token's busy connection holds its slot",
    );
    assert_closed(
        idle,
        Duration::from_secs(2),
        "the revoked token's idle connection holds its slot",
    );
    assert_closed(
        bin_busy,
        Duration::from_secs(2),
        "the revoked token's binary connection holds its slot",
    );
    // Every slot is held by a connection whose token is valid again: a
    // fourth newcomer is refused, the one that switched tokens kept.
    assert_newcomer_refused(
        at,
        &admin,
        "a connection whose last token is valid was closed for a newcomer",
    );
    assert_eq!(ask(&mut switched, &admin), 404);
    assert_eq!(ask(&mut kept, &admin), 404);
    for (i, s) in newcomers.iter_mut().enumerate() {
        assert_eq!(ask(s, &admin), 404, "newcomer {i}");
    }
    assert!(node.stop("TERM").success());
}

/// Strangers that connect and say nothing (or send a peer's preamble and
/// prove nothing), reconnecting as soon as they are closed, cannot keep
/// out a client with a token nor a peer with the secret: when every
/// pending slot is taken, a newcomer closes the oldest connection that has
/// not said what it is (or proved the secret) and takes its slot.
#[test]
fn strangers_holding_every_pending_slot_keep_out_neither_clients_nor_peers() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (admin, auth) = admin_auth_file(dirs[0].path());
    let a = Dhrtd::start(
        &dirs[0].path().join("a"),
        &[
            "--auth-file",
            auth.to_str().unwrap(),
            "--cluster-secret",
            SECRET,
            "--max-connections",
            "4",
            "--max-peer-connections",
            "2",
        ],
    );
    let at = a.addr;
    // Eight strangers for the six pending slots (4 + 2), each opened again
    // as soon as the node closes it.
    let stop = AtomicBool::new(false);
    let reopened = AtomicUsize::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let open = |i: usize| {
                let mut c = TcpStream::connect(at).ok()?;
                if i.is_multiple_of(4) {
                    let peer = dhrt_proto::channel_preamble(dhrt_proto::Channel::Peer);
                    c.write_all(&peer).ok()?;
                }
                c.set_nonblocking(true).ok()?;
                Some(c)
            };
            let mut strangers: Vec<Option<TcpStream>> = (0..8).map(open).collect();
            while !stop.load(Ordering::Relaxed) {
                for (i, c) in strangers.iter_mut().enumerate() {
                    let closed = match c {
                        None => true,
                        Some(s) => !matches!(s.read(&mut [0u8; 64]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
                    };
                    if closed {
                        *c = open(i);
                        reopened.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        // The strangers stop however this ends (a failed assertion too).
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        std::thread::sleep(Duration::from_millis(300));
        for round in 0..3 {
            let headers = format!("Authorization: Bearer {admin}\r\n");
            let answer = http_at(at, "PUT", &format!("/c/k{round}"), &headers, b"");
            assert!(
                matches!(answer, Ok((200 | 201, _))),
                "round {round}: a client with a token was kept out by strangers: {answer:?}"
            );
        }
        // A peer with the secret joins, and is a healthy member.
        let b = Dhrtd::start(
            dirs[1].path(),
            &["--cluster-secret", SECRET, "--node", &at.to_string()],
        );
        crate::cluster::eventually(
            "a peer joins past the strangers",
            Duration::from_secs(20),
            || crate::cluster::all_healthy(&[&b], 2),
        );
        assert_eq!(request(b.addr, "GET", "/c/k2", None).0, 200);
    });
    assert!(
        reopened.load(Ordering::Relaxed) > 0,
        "no stranger was closed for a newcomer"
    );
}

/// The data directory and every file the node makes in it are its user's
/// alone, whatever the umask it was started with: the logs hold every
/// value, readable without a token by whoever can open them. A data
/// directory left open to other users is named in a warning.
#[test]
fn the_data_directory_is_private_to_the_node_user() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let log = parent.path().join("dhrtd.log");
    // Started the way a shell with the usual umask starts it.
    let start = || {
        let addr = free_addr();
        let child = Command::new("sh")
            .args(["-c", "umask 022 && exec \"$0\" \"$@\""])
            .arg(binary())
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(&dir)
            .env("DHRT_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "dhrtd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        (child, addr)
    };
    let (mut child, addr) = start();
    assert_eq!(request(addr, "PUT", "/secrets/k", None).0, 200);
    // The collection's log and its watermark exist once a write is made.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        files.iter().any(|f| f.ends_with("secrets.dhrt")),
        "{files:?}"
    );
    for f in &files {
        assert_eq!(mode(f) & 0o077, 0, "{} is open to others", f.display());
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !std::fs::read_to_string(&log)
            .unwrap()
            .contains("open to other users")
    );
    // A directory made open by hand (or by an earlier build) is named.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (mut child, _) = start();
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("is open to other users of this machine (mode 755)")
            && text.contains("chmod 700"),
        "{text}"
    );
}

/// The files that guard a node are named in a warning when other users of
/// the machine can read the cluster secret in the config file or change
/// the auth file; so are tokens that would cross the network in clear.
#[test]
fn files_others_can_read_or_change_and_tokens_in_clear_are_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (_, line) = make_token("admin");
    let auth = dir.path().join("auth");
    std::fs::write(&auth, format!("{line}\n")).unwrap();
    let config = dir.path().join("dhrtd.toml");
    std::fs::write(
        &config,
        "cluster-secret = \"a config file's secret of at least 32 bytes\"\n",
    )
    .unwrap();
    let log = dir.path().join("dhrtd.log");
    let warnings = |listen: &str, auth_mode: u32, config_mode: u32| -> String {
        std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(auth_mode)).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(config_mode)).unwrap();
        let port = free_addr().port();
        let mut child = Command::new(binary())
            .arg("--listen")
            .arg(format!("{listen}:{port}"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--auth-file")
            .arg(&auth)
            .arg("--config")
            .arg(&config)
            .env_remove("DHRT_CLUSTER_SECRET")
            .env("DHRT_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_serving(format!("127.0.0.1:{port}").parse().unwrap());
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::read_to_string(&log).unwrap()
    };
    let text = warnings("0.0.0.0", 0o666, 0o644);
    for said in [
        "holds the cluster secret and other users of this machine can read it (mode 644)",
        "the auth file",
        "can be changed by other users of this machine (mode 666)",
        "tokens cross the network in clear",
    ] {
        assert!(text.contains(said), "{said:?} not in {text}");
    }
    let text = warnings("127.0.0.1", 0o600, 0o600);
    for unsaid in ["cluster secret", "auth file", "in clear"] {
        assert!(!text.contains(unsaid), "{unsaid:?} in {text}");
    }
}
