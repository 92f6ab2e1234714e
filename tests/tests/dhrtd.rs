//! Starting and talking to real `dhrtd` processes, and finding the
//! workspace's binaries.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

/// A binary of the workspace, from the target directory this test binary
/// runs in. `cargo test --workspace` (the README's test command) builds
/// every binary before it runs any test; run alone, this package does not,
/// so a missing binary, or one older than the sources it is built from, is
/// an error that says what to run.
pub(crate) fn workspace_binary(name: &str, sources: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let bin = dir.join(name);
    let hint = format!("run `cargo test --workspace`, or `cargo build -p {name}` first");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing: {hint}", bin.display()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for source in sources {
        if let Some(newer) = newest(&root.join(source)).filter(|(t, _)| *t > built) {
            panic!(
                "{} is older than {}: {hint}",
                bin.display(),
                newer.1.display()
            );
        }
    }
    bin
}

/// The most recently modified file under `dir` (or `dir` itself, a file).
fn newest(dir: &Path) -> Option<(SystemTime, PathBuf)> {
    if dir.is_file() {
        let modified = std::fs::metadata(dir).ok()?.modified().ok()?;
        return Some((modified, dir.to_path_buf()));
    }
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest(&path)
        } else {
            entry.metadata().ok()?.modified().ok().map(|t| (t, path))
        };
        if let Some(c) = candidate
            && best.as_ref().is_none_or(|b| c.0 > b.0)
        {
            best = Some(c);
        }
    }
    best
}

/// The sources `dhrtd` is built from.
const DHRTD_SOURCES: [&str; 5] = [
    "bins/dhrtd/src",
    "crates/dhrt-cluster/src",
    "crates/dhrt-http/src",
    "crates/dhrt-proto/src",
    "crates/dhrt-storage/src",
];

/// The `dhrtd` binary.
pub(crate) fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_binary("dhrtd", &DHRTD_SOURCES))
}

/// A free loopback port (the listener is dropped; another test could grab
/// it, so callers retry on a bind failure).
pub(crate) fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A running `dhrtd`.
pub(crate) struct Dhrtd {
    pub(crate) addr: SocketAddr,
    child: Child,
}

impl Dhrtd {
    /// Starts `dhrtd` on a free port with `args`, and waits until it serves.
    pub(crate) fn start(data_dir: &Path, args: &[&str]) -> Dhrtd {
        Dhrtd::start_on(None, data_dir, args)
    }

    /// Starts `dhrtd` on `addr` (a restart keeps its address), or on a free
    /// port.
    pub(crate) fn start_on(at: Option<SocketAddr>, data_dir: &Path, args: &[&str]) -> Dhrtd {
        Dhrtd::start_in(None, at, data_dir, args)
    }

    /// Starts `dhrtd` inside network namespace `netns` (through `ip netns
    /// exec`, which execs it in place), listening on `addr`.
    pub(crate) fn start_in_netns(
        netns: &str,
        addr: SocketAddr,
        data_dir: &Path,
        args: &[&str],
    ) -> Dhrtd {
        Dhrtd::start_in(Some(netns), Some(addr), data_dir, args)
    }

    fn start_in(
        netns: Option<&str>,
        at: Option<SocketAddr>,
        data_dir: &Path,
        args: &[&str],
    ) -> Dhrtd {
        for _ in 0..5 {
            let addr = at.unwrap_or_else(free_addr);
            let mut command = match netns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns]).arg(binary());
                    c
                }
                None => Command::new(binary()),
            };
            let mut child = command
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--data-dir")
                .arg(data_dir)
                .args(args)
                // DHRT_TEST_LOG=info shows the nodes' own account of a run.
                .env(
                    "DHRT_LOG",
                    std::env::var("DHRT_TEST_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn dhrtd");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Some(status) = child.try_wait().unwrap() {
                    eprintln!("dhrtd exited early ({status}); retrying on another port");
                    break;
                }
                if TcpStream::connect(addr).is_ok() {
                    return Dhrtd { addr, child };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("dhrtd did not start");
    }

    /// Sends `signal` (e.g. "TERM") and waits for the exit status.
    pub(crate) fn stop(mut self, signal: &str) -> ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([&format!("-{signal}"), &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "dhrtd did not exit after SIG{signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (e.g. "HUP") and goes on.
    pub(crate) fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([&format!("-{signal}"), &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub(crate) fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// One HTTP request on its own connection: the status and the body.
    pub(crate) fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        self.try_http(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Like [`http`](Self::http), with connection errors returned.
    pub(crate) fn try_http(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, String)> {
        http_at(self.addr, method, path, "", body)
    }
}

/// One HTTP request to `addr` with `headers` (whole lines, each ending in
/// CRLF): the status and the body.
pub(crate) fn http_at(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

impl Dhrtd {
    /// `GET path` with `Accept: application/octet-stream`: the status and
    /// the raw bytes of the body.
    pub(crate) fn get_raw(&self, path: &str) -> (u16, Vec<u8>) {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/octet-stream\r\nConnection: close\r\n\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let split = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head");
        let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
        let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        assert!(
            !head.contains("transfer-encoding: chunked"),
            "a chunked answer to GET {path}"
        );
        (status, out[split + 4..].to_vec())
    }
}

impl Drop for Dhrtd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    out
}

/// Asserts that the node has closed `stream` within `within`: a read ends
/// (end of stream, or a reset), it does not time out. `what` says what was
/// expected closed.
pub(crate) fn assert_closed(mut stream: TcpStream, within: Duration, what: &str) {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut rest = Vec::new();
    if let Err(e) = stream.read_to_end(&mut rest) {
        assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{what}: {e}"
        );
    }
}
