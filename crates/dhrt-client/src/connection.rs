//! One connection: a writer task that batches pipelined requests into as
//! few writes as it can, a reader task that hands each response to the
//! caller waiting for its id.

use std::collections::HashMap;
use std::fmt::Display;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use dhrt_proto::{
    DEFAULT_MAX_FRAME, Decoded, NodeStats, Op, Page, ReplicasInfo, Reply, Request, Response, Role,
    decode_frame, encode_frame, preamble,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::tls;
use crate::watch::Watch;

type Answer = oneshot::Sender<Result<Reply, Error>>;

struct Call {
    request: Request,
    answer: Answer,
}

#[derive(Default)]
struct Inflight {
    waiting: HashMap<u64, Answer>,
    /// Why the connection is gone, once it is.
    closed: Option<String>,
}

/// A connection to a dhrt node. Clones share it.
#[derive(Clone, Debug)]
pub struct Client {
    /// Batches of calls; a batch goes out in one write.
    calls: mpsc::Sender<Vec<Call>>,
    next_id: Arc<AtomicU64>,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Call({})", self.request.id)
    }
}

fn unexpected(reply: Reply) -> Error {
    Error::UnexpectedReply(format!("{reply:?}"))
}

/// How to connect: [`Client::builder`].
#[derive(Clone)]
pub struct ClientBuilder {
    addr: String,
    token: Option<String>,
    tls: Option<TlsOptions>,
}

/// TLS settings: the CA the node's certificate must chain to, and a client
/// certificate for a node that asks for one.
#[derive(Clone)]
struct TlsOptions {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("ClientBuilder")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "..."))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A connected stream, plain or TLS.
pub(crate) type BoxedStream = Box<dyn Duplex>;

/// What a connection's stream is.
pub(crate) trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

impl ClientBuilder {
    /// The address it connects to.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// The same settings for another address.
    pub(crate) fn with_addr(mut self, addr: String) -> Self {
        self.addr = addr;
        self
    }

    /// The token given, if any.
    pub(crate) fn token_str(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// A watch of `collection` on a connection of its own, starting at
    /// `start`, that resumes by itself after a disconnect (see [`Watch`]).
    /// It connects when first polled.
    pub fn watch(self, collection: &str, start: dhrt_proto::WatchStart) -> Watch {
        Watch::new(self, collection, start)
    }

    /// Connects (TLS if asked) and sends the preamble.
    pub(crate) async fn open(&self) -> Result<BoxedStream, Error> {
        let connect_err = |source| Error::Connect {
            addr: self.addr.clone(),
            source,
        };
        let stream = TcpStream::connect(self.addr.as_str())
            .await
            .map_err(connect_err)?;
        let _ = stream.set_nodelay(true);
        let mut stream: BoxedStream = match &self.tls {
            None => Box::new(stream),
            Some(tls) => {
                let config = tls::client_config(tls.ca.as_slice(), tls.identity.as_ref())
                    .map_err(|e| connect_err(io::Error::other(e)))?;
                let name = tls::server_name(&self.addr).map_err(connect_err)?;
                Box::new(
                    tokio_rustls::TlsConnector::from(config)
                        .connect(name, stream)
                        .await
                        .map_err(connect_err)?,
                )
            }
        };
        stream.write_all(&preamble()).await.map_err(connect_err)?;
        Ok(stream)
    }

    /// Authenticate with `token` (as `dhrt-cli token` makes them) before
    /// anything else; a node with an auth file refuses every request of a
    /// connection without one.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Speak TLS, trusting the certificates of the PEM `ca` (one or more
    /// CA certificates) for the node's. The node's certificate must name
    /// the host of the address connected to.
    pub fn tls_ca(mut self, ca: impl Into<Vec<u8>>) -> Self {
        let identity = self.tls.take().and_then(|t| t.identity);
        self.tls = Some(TlsOptions {
            ca: ca.into(),
            identity,
        });
        self
    }

    /// With TLS, present this certificate chain and private key (PEM) to a
    /// node that requires client certificates (`--tls-client-ca`).
    pub fn tls_identity(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        let ca = self.tls.take().map(|t| t.ca).unwrap_or_default();
        self.tls = Some(TlsOptions {
            ca,
            identity: Some((cert.into(), key.into())),
        });
        self
    }

    /// Connects, and authenticates if a token was given: a token the node
    /// refuses fails here, with [`Error::Unauthenticated`].
    pub async fn connect(self) -> Result<Client, Error> {
        let client = Client::run(self.open().await?);
        if let Some(token) = self.token {
            client.authenticate(&token).await?;
        }
        Ok(client)
    }
}

impl Client {
    /// A builder for a connection to `addr` (e.g. `"127.0.0.1:7453"`) with
    /// options: a token.
    pub fn builder(addr: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            addr: addr.into(),
            token: None,
            tls: None,
        }
    }

    /// Presents `token` on this connection; returns the role it grants.
    /// Requests sent after it are judged by that role. A node with an auth
    /// file closes a connection that has not shown a valid token 10 s
    /// after connecting: present it right away (as
    /// [`ClientBuilder::token`] does), not when the first request needs it.
    pub async fn authenticate(&self, token: &str) -> Result<Role, Error> {
        match self
            .request(Op::Auth {
                token: token.to_string(),
            })
            .await?
        {
            Reply::Authenticated(role) => Ok(role),
            other => Err(unexpected(other)),
        }
    }

    /// Connects to the node at `addr` (e.g. `"127.0.0.1:7453"`), without a
    /// token (see [`Client::builder`]).
    pub async fn connect(addr: impl ToSocketAddrs + Display) -> Result<Client, Error> {
        let connect_err = |source| Error::Connect {
            addr: addr.to_string(),
            source,
        };
        let stream = TcpStream::connect(&addr).await.map_err(connect_err)?;
        let _ = stream.set_nodelay(true);
        Client::start(stream).await.map_err(connect_err)
    }

    /// Sends the preamble on `stream` and starts its writer and reader.
    async fn start<S>(mut stream: S) -> io::Result<Client>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        stream.write_all(&preamble()).await?;
        Ok(Client::run(stream))
    }

    /// Starts the writer and reader of a stream whose preamble was sent.
    fn run<S>(stream: S) -> Client
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        let inflight = Arc::new(Mutex::new(Inflight::default()));
        let (calls, queue) = mpsc::channel(4096);
        tokio::spawn(writer(queue, write, inflight.clone()));
        tokio::spawn(reader(read, inflight));
        Client {
            calls,
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Sends one operation and waits for its reply. Many calls may be in
    /// flight at once on one connection.
    pub async fn request(&self, op: Op) -> Result<Reply, Error> {
        let mut replies = self.send(vec![op]).await?;
        Self::wait(replies.pop().expect("one reply per operation")).await
    }

    /// Sends `ops` together (one write, like a Redis pipeline) and waits for
    /// all their replies, in order. Each operation succeeds or fails on its
    /// own.
    pub async fn pipeline(&self, ops: Vec<Op>) -> Result<Vec<Result<Reply, Error>>, Error> {
        let replies = self.send(ops).await?;
        let mut out = Vec::with_capacity(replies.len());
        for reply in replies {
            out.push(Self::wait(reply).await);
        }
        Ok(out)
    }

    async fn send(
        &self,
        ops: Vec<Op>,
    ) -> Result<Vec<oneshot::Receiver<Result<Reply, Error>>>, Error> {
        let first = self.next_id.fetch_add(ops.len() as u64, Ordering::Relaxed);
        let mut calls = Vec::with_capacity(ops.len());
        let mut replies = Vec::with_capacity(ops.len());
        for (i, op) in ops.into_iter().enumerate() {
            let (answer, reply) = oneshot::channel();
            calls.push(Call {
                request: Request {
                    id: first + i as u64,
                    op,
                },
                answer,
            });
            replies.push(reply);
        }
        self.calls
            .send(calls)
            .await
            .map_err(|_| Error::Disconnected("the connection is closed".into()))?;
        Ok(replies)
    }

    async fn wait(reply: oneshot::Receiver<Result<Reply, Error>>) -> Result<Reply, Error> {
        reply
            .await
            .map_err(|_| Error::Disconnected("the connection closed before the answer".into()))?
    }

    /// Checks that the node answers.
    pub async fn ping(&self) -> Result<(), Error> {
        match self.request(Op::Ping).await? {
            Reply::Pong => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The value of `key` in `collection`, or `None`.
    pub async fn get(
        &self,
        collection: &str,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<Bytes>, Error> {
        let op = Op::Get {
            collection: collection.into(),
            key: Bytes::copy_from_slice(key.as_ref()),
        };
        match self.request(op).await? {
            Reply::Value(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    /// Sets `key` in `collection` to `value`.
    pub async fn set(
        &self,
        collection: &str,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
    ) -> Result<(), Error> {
        let op = Op::Set {
            collection: collection.into(),
            key: Bytes::copy_from_slice(key.as_ref()),
            value: value.into(),
        };
        match self.request(op).await? {
            Reply::Stored => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, collection: &str, key: impl AsRef<[u8]>) -> Result<bool, Error> {
        let op = Op::Delete {
            collection: collection.into(),
            key: Bytes::copy_from_slice(key.as_ref()),
        };
        match self.request(op).await? {
            Reply::Deleted(existed) => Ok(existed),
            other => Err(unexpected(other)),
        }
    }

    /// Up to `limit` entries of `collection` after the key `after`; pass the
    /// page's `next` as `after` for the following page.
    pub async fn list(
        &self,
        collection: &str,
        after: Option<&[u8]>,
        limit: u32,
    ) -> Result<Page, Error> {
        let op = Op::List {
            collection: collection.into(),
            after: after.map(Bytes::copy_from_slice),
            limit,
        };
        match self.request(op).await? {
            Reply::Page(page) => Ok(page),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a whole collection; returns the keys it held.
    pub async fn drop_collection(&self, collection: &str) -> Result<Vec<Bytes>, Error> {
        match self
            .request(Op::DropCollection {
                collection: collection.into(),
            })
            .await?
        {
            Reply::Dropped(keys) => Ok(keys),
            other => Err(unexpected(other)),
        }
    }

    /// Node and cluster statistics.
    pub async fn stats(&self) -> Result<NodeStats, Error> {
        match self.request(Op::Stats).await? {
            Reply::Stats(stats) => Ok(*stats),
            other => Err(unexpected(other)),
        }
    }

    /// Removes a dead member that will not come back (its id, 16 hex
    /// digits, or its address) from the cluster; returns its id. Its
    /// collections get new owners. Needs the `admin` role; refused for a
    /// member that is not dead.
    pub async fn remove_member(&self, member: &str) -> Result<String, Error> {
        let op = Op::RemoveMember {
            member: member.to_string(),
        };
        match self.request(op).await? {
            Reply::Removed(id) => Ok(id),
            other => Err(unexpected(other)),
        }
    }

    /// The replication factor and owners of `collection` (the cluster's
    /// default with `None`).
    pub async fn replicas(&self, collection: Option<&str>) -> Result<ReplicasInfo, Error> {
        self.replicas_op(collection, None).await
    }

    /// Sets the replication factor of `collection` (the cluster's default
    /// with `None`) to `replicas` (`all` or a number); returns the
    /// placement that follows. Needs the `admin` role.
    pub async fn set_replicas(
        &self,
        collection: Option<&str>,
        replicas: &str,
    ) -> Result<ReplicasInfo, Error> {
        self.replicas_op(collection, Some(replicas)).await
    }

    async fn replicas_op(
        &self,
        collection: Option<&str>,
        set: Option<&str>,
    ) -> Result<ReplicasInfo, Error> {
        let op = Op::Replicas {
            collection: collection.map(str::to_string),
            set: set.map(str::to_string),
        };
        match self.request(op).await? {
            Reply::Replicas(info) => Ok(info),
            other => Err(unexpected(other)),
        }
    }

    /// Tells the node to join the cluster of the member at `addr`; returns
    /// how many members it then knows, itself included.
    pub async fn join(&self, addr: &str) -> Result<u32, Error> {
        match self.request(Op::Join { addr: addr.into() }).await? {
            Reply::Joined(members) => Ok(members),
            other => Err(unexpected(other)),
        }
    }
}

async fn writer<W: AsyncWrite + Unpin>(
    mut queue: mpsc::Receiver<Vec<Call>>,
    mut write: W,
    inflight: Arc<Mutex<Inflight>>,
) {
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Some(mut batch) = queue.recv().await {
        // Whatever else is queued goes out in the same write.
        while batch.len() < 1024 {
            match queue.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        {
            let mut state = inflight.lock().unwrap();
            for Call { request, answer } in batch {
                if let Some(reason) = &state.closed {
                    let _ = answer.send(Err(Error::Disconnected(reason.clone())));
                    continue;
                }
                match encode_frame(&request, &mut buf, DEFAULT_MAX_FRAME) {
                    Ok(()) => {
                        state.waiting.insert(request.id, answer);
                    }
                    Err(e) => {
                        let _ = answer.send(Err(e.into()));
                    }
                }
            }
        }
        if buf.is_empty() {
            continue;
        }
        if let Err(e) = write.write_all(&buf).await {
            close(&inflight, format!("write failed: {e}"));
            return;
        }
        buf.clear();
    }
}

async fn reader<R: AsyncRead + Unpin>(mut read: R, inflight: Arc<Mutex<Inflight>>) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let reason = 'read: loop {
        loop {
            match decode_frame::<Response>(&buf, DEFAULT_MAX_FRAME) {
                Ok(Decoded::Complete { msg, len }) => {
                    buf.advance(len);
                    let answer = inflight.lock().unwrap().waiting.remove(&msg.id);
                    match answer {
                        Some(a) => {
                            let _ = a.send(msg.result.map_err(Error::from));
                        }
                        None => tracing::warn!(id = msg.id, "a response nobody waits for"),
                    }
                }
                Ok(Decoded::Incomplete { needed }) => {
                    buf.reserve(needed.max(16 * 1024));
                    break;
                }
                Err(e) => break 'read format!("the node sent a bad frame: {e}"),
            }
        }
        match read.read_buf(&mut buf).await {
            Ok(0) => break "the node closed the connection".to_string(),
            Ok(_) => {}
            Err(e) => break format!("read failed: {e}"),
        }
    };
    close(&inflight, reason);
}

/// Marks the connection gone and fails every call still waiting.
fn close(inflight: &Mutex<Inflight>, reason: String) {
    let mut state = inflight.lock().unwrap();
    for (_, answer) in state.waiting.drain() {
        let _ = answer.send(Err(Error::Disconnected(reason.clone())));
    }
    state.closed.get_or_insert(reason);
}
