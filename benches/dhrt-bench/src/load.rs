//! One load connection, as lean as redis-benchmark's: a request frame is
//! encoded once, and each request is that template with its id and key
//! digits patched in place, so the load generator spends its CPU on the
//! socket, not on building messages. Every answer is still decoded and
//! checked: the id it echoes, and that it is the reply its request expects.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use dhrt_proto::{
    DEFAULT_MAX_FRAME, Decoded, Op, Reply, Request, Response, decode, encode_frame, frame_bounds,
    preamble,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Length of every key: `key:` and 12 digits, or `key:__rand_int__`.
pub(crate) const KEY_LEN: usize = 16;
/// The key used without a keyspace (redis-benchmark's, unsubstituted).
const FIXED_KEY: &[u8; KEY_LEN] = b"key:__rand_int__";
/// Ids are patched as one varint byte, so a batch holds at most this many.
pub(crate) const MAX_DEPTH: u64 = 250;

/// What a test sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Set,
    Get,
}

/// An encoded request frame and where its id byte and key lie in it.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    frame: Vec<u8>,
    /// Where the id byte lies (`None`: RESP, which has no ids).
    id_at: Option<usize>,
    key_at: usize,
}

impl Template {
    /// The same request in Redis's protocol (RESP), for a Redis server
    /// measured with this very client: `SET key value` or `GET key`, the
    /// collection ignored.
    pub(crate) fn resp(kind: Kind, value: &[u8]) -> Template {
        let mut frame = Vec::new();
        let mut bulk = |s: &[u8]| {
            frame.extend_from_slice(format!("${}\r\n", s.len()).as_bytes());
            frame.extend_from_slice(s);
            frame.extend_from_slice(b"\r\n");
        };
        let key = [b'0'; KEY_LEN];
        match kind {
            Kind::Set => {
                bulk(b"SET");
                bulk(&key);
                bulk(value);
            }
            Kind::Get => {
                bulk(b"GET");
                bulk(&key);
            }
        }
        let count: &[u8] = if kind == Kind::Set {
            b"*3\r\n"
        } else {
            b"*2\r\n"
        };
        let frame = [count, &frame].concat();
        // The key is the second bulk string: after `$16\r\n`.
        let key_at = frame
            .windows(KEY_LEN)
            .position(|w| w == key)
            .expect("the key is in the command");
        Template {
            frame,
            id_at: None,
            key_at,
        }
    }

    pub(crate) fn new(kind: Kind, collection: &str, value: &[u8]) -> Template {
        let encode = |id: u64, key: &[u8]| {
            let key = bytes::Bytes::copy_from_slice(key);
            let op = match kind {
                Kind::Set => Op::Set {
                    collection: collection.to_owned(),
                    key,
                    value: bytes::Bytes::copy_from_slice(value),
                },
                Kind::Get => Op::Get {
                    collection: collection.to_owned(),
                    key,
                },
            };
            let mut frame = Vec::new();
            encode_frame(&Request { id, op }, &mut frame, DEFAULT_MAX_FRAME)
                .expect("a benchmark request fits in a frame");
            frame
        };
        // Two encodings that differ only in the id, and two that differ only
        // in the key, show where each lies without assuming bincode's layout.
        let base = encode(0, &[b'0'; KEY_LEN]);
        let other_id = encode(1, &[b'0'; KEY_LEN]);
        let other_key = encode(0, &[b'1'; KEY_LEN]);
        let first_difference = |other: &[u8]| {
            assert_eq!(base.len(), other.len(), "patching keeps the frame length");
            base.iter()
                .zip(other)
                .position(|(a, b)| a != b)
                .expect("the encodings differ")
        };
        Template {
            id_at: Some(first_difference(&other_id)),
            key_at: first_difference(&other_key),
            frame: base,
        }
    }

    /// Appends a request for key number `key` (or the fixed key) with
    /// `id` (below [`MAX_DEPTH`]) to `out`.
    pub(crate) fn append(&self, out: &mut Vec<u8>, id: u8, key: Option<u64>) {
        let start = out.len();
        out.extend_from_slice(&self.frame);
        if let Some(at) = self.id_at {
            out[start + at] = id;
        }
        let slot = &mut out[start + self.key_at..start + self.key_at + KEY_LEN];
        match key {
            Some(n) => format_key(slot, n),
            None => slot.copy_from_slice(FIXED_KEY),
        }
    }
}

/// Writes `key:` and the last 12 decimal digits of `n` (zero-padded) into
/// `slot`, as `format!("key:{n:012}")` would for `n` below 10^12.
pub(crate) fn format_key(slot: &mut [u8], mut n: u64) {
    slot[..4].copy_from_slice(b"key:");
    for b in slot[4..].iter_mut().rev() {
        *b = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// A byte stream to the node: TCP, or TLS over it.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// How to open connections: the address, TLS, a token, the protocol.
#[derive(Clone)]
pub(crate) struct Dial {
    pub(crate) addr: String,
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    pub(crate) token: Option<String>,
    /// Speak RESP to a Redis server instead of dhrt's protocol.
    pub(crate) resp: bool,
}

/// A TLS client configuration trusting the CA certificates of the PEM file
/// `path`.
pub(crate) fn tls_config(path: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| format!("{path}: {e}"))? {
        roots
            .add(cert.map_err(|e| format!("{path}: {e}"))?)
            .map_err(|e| format!("{path}: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One connection to the node.
pub(crate) struct Connection {
    stream: Box<dyn Stream>,
    out: Vec<u8>,
    buf: BytesMut,
    resp: bool,
}

impl Connection {
    pub(crate) async fn open(dial: &Dial) -> Result<Connection, String> {
        let addr = dial.addr.as_str();
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut stream: Box<dyn Stream> = match &dial.tls {
            None => Box::new(tcp),
            Some(config) => {
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| format!("{host}: {e}"))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS to {addr}: {e}"))?;
                Box::new(tls)
            }
        };
        if !dial.resp {
            stream
                .write_all(&preamble())
                .await
                .map_err(|e| format!("cannot write to {addr}: {e}"))?;
        }
        let mut connection = Connection {
            stream,
            out: Vec::with_capacity(16 * 1024),
            buf: BytesMut::with_capacity(64 * 1024),
            resp: dial.resp,
        };
        if let Some(token) = &dial.token {
            connection.authenticate(token).await?;
        }
        Ok(connection)
    }

    /// Presents `token`; the node must accept it.
    async fn authenticate(&mut self, token: &str) -> Result<(), String> {
        let auth = Request {
            id: 0,
            op: Op::Auth {
                token: token.to_string(),
            },
        };
        self.out.clear();
        encode_frame(&auth, &mut self.out, DEFAULT_MAX_FRAME).map_err(|e| e.to_string())?;
        self.stream
            .write_all(&self.out)
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        loop {
            if let Decoded::Complete { msg, len } = frame_bounds(&self.buf, DEFAULT_MAX_FRAME)
                .map_err(|e| format!("the node sent a bad frame: {e}"))?
            {
                let response: Response = decode(&self.buf[msg])
                    .map_err(|e| format!("the node sent an unreadable answer: {e}"))?;
                self.buf.advance(len);
                return match response.result {
                    Ok(Reply::Authenticated(_)) => Ok(()),
                    other => Err(format!("the token was refused: {other:?}")),
                };
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err("the node closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read failed: {e}")),
            }
        }
    }

    /// Sends one request per entry of `keys` in one write and waits for
    /// every answer. Returns when the batch was written.
    pub(crate) async fn batch(
        &mut self,
        template: &Template,
        kind: Kind,
        keys: impl Iterator<Item = Option<u64>>,
    ) -> Result<Instant, String> {
        self.out.clear();
        let mut sent = 0u8;
        for key in keys {
            template.append(&mut self.out, sent, key);
            sent += 1;
        }
        let started = Instant::now();
        self.stream
            .write_all(&self.out)
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        let mut answered = 0u8;
        while answered < sent {
            if self.resp {
                match resp_reply(&self.buf, kind)? {
                    Some(len) => {
                        self.buf.advance(len);
                        answered += 1;
                    }
                    None => {
                        self.buf.reserve(16 * 1024);
                        match self.stream.read_buf(&mut self.buf).await {
                            Ok(0) => return Err("the server closed the connection".into()),
                            Ok(_) => {}
                            Err(e) => return Err(format!("read failed: {e}")),
                        }
                    }
                }
                continue;
            }
            match frame_bounds(&self.buf, DEFAULT_MAX_FRAME)
                .map_err(|e| format!("the node sent a bad frame: {e}"))?
            {
                Decoded::Complete { msg, len } => {
                    let response: Response = decode(&self.buf[msg])
                        .map_err(|e| format!("the node sent an unreadable answer: {e}"))?;
                    self.buf.advance(len);
                    check(&response, kind, answered)?;
                    answered += 1;
                }
                Decoded::Incomplete { needed } => {
                    self.buf.reserve(needed.max(16 * 1024));
                    match self.stream.read_buf(&mut self.buf).await {
                        Ok(0) => return Err("the node closed the connection".into()),
                        Ok(_) => {}
                        Err(e) => return Err(format!("read failed: {e}")),
                    }
                }
            }
        }
        Ok(started)
    }
}

/// The length of the RESP reply at the start of `buf`, if it is whole: `+OK`
/// to a SET, a bulk string or nil to a GET; anything else is an error.
fn resp_reply(buf: &[u8], kind: Kind) -> Result<Option<usize>, String> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = &buf[..eol];
    match (line.first(), kind) {
        (Some(b'+'), Kind::Set) if line == b"+OK" => Ok(Some(eol + 2)),
        (Some(b'$'), Kind::Get) if line == b"$-1" => Ok(Some(eol + 2)),
        (Some(b'$'), Kind::Get) => {
            let n: usize = std::str::from_utf8(&line[1..])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("a bad bulk length {:?}", String::from_utf8_lossy(line)))?;
            let whole = eol + 2 + n + 2;
            Ok((buf.len() >= whole).then_some(whole))
        }
        _ => Err(format!(
            "the server answered {:?} to a {kind:?}",
            String::from_utf8_lossy(line)
        )),
    }
}

/// Whether `response` is the `id`th answer of a batch of `kind` requests.
fn check(response: &Response, kind: Kind, id: u8) -> Result<(), String> {
    if response.id != u64::from(id) {
        return Err(format!(
            "answer {} came where answer {id} was due",
            response.id
        ));
    }
    match (&response.result, kind) {
        (Ok(Reply::Stored), Kind::Set) | (Ok(Reply::Value(_)), Kind::Get) => Ok(()),
        (Err(e), _) => Err(format!("the node refused a request: {e}")),
        (Ok(other), _) => Err(format!("unexpected answer {other:?} to a {kind:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patched_template_is_the_request_encoded_from_scratch() {
        for kind in [Kind::Set, Kind::Get] {
            let template = Template::new(kind, "bench", b"some value");
            for (id, n) in [(0u8, 0u64), (7, 42), (249, 999_999_999_999)] {
                let key = bytes::Bytes::from(format!("key:{n:012}"));
                let op = match kind {
                    Kind::Set => Op::Set {
                        collection: "bench".into(),
                        key,
                        value: "some value".into(),
                    },
                    Kind::Get => Op::Get {
                        collection: "bench".into(),
                        key,
                    },
                };
                let mut expected = Vec::new();
                encode_frame(
                    &Request { id: id.into(), op },
                    &mut expected,
                    DEFAULT_MAX_FRAME,
                )
                .unwrap();
                let mut patched = vec![1, 2, 3];
                template.append(&mut patched, id, Some(n));
                assert_eq!(&patched[..3], &[1, 2, 3]);
                assert_eq!(&patched[3..], &expected[..], "{kind:?} id {id} key {n}");
            }
        }
    }

    #[test]
    fn a_resp_template_is_the_command_and_replies_are_checked() {
        let t = Template::resp(Kind::Set, b"vv");
        let mut out = Vec::new();
        t.append(&mut out, 9, Some(42));
        assert_eq!(
            out,
            b"*3\r\n$3\r\nSET\r\n$16\r\nkey:000000000042\r\n$2\r\nvv\r\n"
        );
        let t = Template::resp(Kind::Get, b"");
        out.clear();
        t.append(&mut out, 0, Some(7));
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$16\r\nkey:000000000007\r\n");
        assert_eq!(resp_reply(b"+OK\r\n+O", Kind::Set), Ok(Some(5)));
        assert_eq!(resp_reply(b"+O", Kind::Set), Ok(None));
        assert_eq!(resp_reply(b"$-1\r\n", Kind::Get), Ok(Some(5)));
        assert_eq!(resp_reply(b"$3\r\nabc\r\n", Kind::Get), Ok(Some(9)));
        assert_eq!(resp_reply(b"$3\r\nab", Kind::Get), Ok(None));
        assert!(resp_reply(b"-ERR oom\r\n", Kind::Set).is_err());
    }

    #[test]
    fn keys_are_zero_padded_to_twelve_digits() {
        let mut slot = [0u8; KEY_LEN];
        format_key(&mut slot, 123);
        assert_eq!(&slot, b"key:000000000123");
        format_key(&mut slot, 1_000_000_000_007);
        assert_eq!(&slot, b"key:000000000007");
    }

    #[test]
    fn an_answer_out_of_order_or_of_the_wrong_kind_is_an_error() {
        let stored = Response {
            id: 3,
            result: Ok(Reply::Stored),
        };
        assert!(check(&stored, Kind::Set, 3).is_ok());
        assert!(check(&stored, Kind::Set, 2).is_err());
        assert!(check(&stored, Kind::Get, 3).is_err());
        let refused = Response {
            id: 0,
            result: Err(dhrt_proto::OpError::new(
                dhrt_proto::ErrorKind::TooLarge,
                "too large",
            )),
        };
        assert!(check(&refused, Kind::Set, 0).is_err());
    }
}
