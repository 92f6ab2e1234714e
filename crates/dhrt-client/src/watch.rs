//! A watch of a collection on a connection of its own, that resumes by
//! itself: after a disconnect it reconnects (to the same node, or to the
//! next of its addresses) and asks for every change after the last token it
//! received. Where a token cannot be resumed (another node's, or one older
//! than the node's purged history) the node answers "gone", and the watch
//! takes a snapshot instead, telling its user first ([`WatchItem::Resync`]).

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use dhrt_proto::{
    DEFAULT_MAX_FRAME, Decoded, EventKind, Op, Reply, Request, Response, Token, WatchEvent,
    WatchRequest, WatchStart, decode_frame, encode_frame,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::connection::{BoxedStream, ClientBuilder};
use crate::error::Error;

/// What a watch yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchItem {
    /// An event from the node.
    Event(WatchEvent),
    /// The watch could not resume where it was (its token is another
    /// node's, compaction purged deletes after it, or the connection broke
    /// during a snapshot): a snapshot follows ([`EventKind::Initial`]
    /// events, then [`EventKind::Synced`]) that replaces everything this
    /// watch said before. The reason is given.
    Resync(String),
}

/// A watch of one collection; see the module documentation. Made by
/// [`ClientBuilder::watch`].
pub struct Watch {
    builder: ClientBuilder,
    /// Where to connect: the builder's address first, then these.
    addrs: Vec<String>,
    at: usize,
    collection: String,
    prefix: Option<bytes::Bytes>,
    /// How the next connection starts.
    start: WatchStart,
    /// The last token received.
    token: Option<Token>,
    /// Inside a snapshot (between its start and its `Synced`).
    in_snapshot: bool,
    conn: Option<(BoxedStream, BytesMut)>,
    pending: VecDeque<WatchItem>,
    backoff: Duration,
    /// Reconnections so far.
    reconnects: u64,
    /// Told of each error retried after.
    on_retry: Option<RetryHook>,
    /// Fail, rather than retry, while no connection has been made yet.
    connect_first: bool,
    /// A connection was made once.
    connected_once: bool,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("collection", &self.collection)
            .field("token", &self.token)
            .field("addrs", &self.addrs)
            .finish()
    }
}

/// What [`Watch::on_retry`] calls.
type RetryHook = Box<dyn FnMut(&Error) + Send>;

const WATCH_ID: u64 = 2;

impl Watch {
    pub(crate) fn new(builder: ClientBuilder, collection: &str, start: WatchStart) -> Watch {
        Watch {
            addrs: vec![builder.addr().to_string()],
            builder,
            at: 0,
            collection: collection.to_string(),
            prefix: None,
            in_snapshot: start == WatchStart::Snapshot,
            token: match &start {
                WatchStart::After(t) => Some(*t),
                _ => None,
            },
            start,
            conn: None,
            pending: VecDeque::new(),
            backoff: Duration::from_millis(50),
            reconnects: 0,
            on_retry: None,
            connect_first: false,
            connected_once: false,
        }
    }

    /// Calls `f` with each error the watch retries after (a connection
    /// that cannot be made, or that broke), before it waits to retry: a
    /// caller can say why nothing comes.
    pub fn on_retry(mut self, f: impl FnMut(&Error) + Send + 'static) -> Self {
        self.on_retry = Some(Box::new(f));
        self
    }

    /// Fails with the error, instead of retrying, when no connection could
    /// be made yet (a wrong address, a node that is down): a command-line
    /// caller tells its user at once. Once connected, breaks are retried.
    pub fn connect_first(mut self) -> Self {
        self.connect_first = true;
        self
    }

    /// Only keys starting with `prefix` (drops always come).
    pub fn prefix(mut self, prefix: impl Into<bytes::Bytes>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Other nodes to go on with when the first one cannot be reached.
    pub fn fallback<I, S>(mut self, addrs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.addrs.extend(addrs.into_iter().map(Into::into));
        self
    }

    /// The last token received: resuming from it misses nothing.
    pub fn token(&self) -> Option<Token> {
        self.token
    }

    /// How many times the watch reconnected.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// The next item. Waits for one, reconnecting as often as it takes;
    /// fails only on what reconnecting cannot fix (a refused token or
    /// role, an invalid name).
    pub async fn next(&mut self) -> Result<WatchItem, Error> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Ok(item);
            }
            if self.conn.is_none() {
                match self.connect().await {
                    Ok(conn) => self.conn = Some(conn),
                    Err(e) if fatal(&e) => return Err(e),
                    Err(e) if self.connect_first && !self.connected_once => return Err(e),
                    Err(e) => {
                        tracing::debug!("watch of {:?}: {e}; retrying", self.collection);
                        self.told(&e);
                        self.retry_later().await;
                        continue;
                    }
                }
            }
            match self.read().await {
                Ok(()) => {}
                Err(e) if fatal(&e) => {
                    self.conn = None;
                    return Err(e);
                }
                Err(Error::Gone(why)) => {
                    self.conn = None;
                    self.resync(why);
                }
                Err(e) if self.connect_first && !self.connected_once => {
                    self.conn = None;
                    return Err(e);
                }
                Err(e) => {
                    tracing::debug!("watch of {:?} broke: {e}; resuming", self.collection);
                    self.told(&e);
                    self.conn = None;
                    self.after_break();
                    self.retry_later().await;
                }
            }
        }
    }

    /// Into a `Stream` of items.
    pub fn into_stream(self) -> impl futures_util::Stream<Item = Result<WatchItem, Error>> {
        futures_util::stream::unfold(self, |mut w| async move {
            let item = w.next().await;
            Some((item, w))
        })
    }

    /// The next connection takes a snapshot, and the user is told.
    fn resync(&mut self, why: String) {
        self.start = WatchStart::Snapshot;
        self.in_snapshot = true;
        self.token = None;
        self.pending.push_back(WatchItem::Resync(why));
    }

    /// How to go on after a broken connection.
    fn after_break(&mut self) {
        if self.in_snapshot {
            // Halfway through a snapshot: a fresh one replaces it.
            self.resync("the connection broke during a snapshot".into());
            return;
        }
        // The node sends a token as soon as a watch opens, so this is
        // `Now` only if the connection broke before that.
        self.start = match self.token {
            Some(t) => WatchStart::After(t),
            None => self.start.clone(),
        };
    }

    fn told(&mut self, e: &Error) {
        if let Some(f) = &mut self.on_retry {
            f(e);
        }
    }

    async fn retry_later(&mut self) {
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
        self.at = (self.at + 1) % self.addrs.len();
    }

    async fn connect(&mut self) -> Result<(BoxedStream, BytesMut), Error> {
        let addr = self.addrs[self.at].clone();
        self.reconnects += u64::from(self.token.is_some() || self.in_snapshot);
        let mut stream = self.builder.clone().with_addr(addr).open().await?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        if let Some(token) = self.builder.token_str() {
            let auth = Request {
                id: 1,
                op: Op::Auth {
                    token: token.to_string(),
                },
            };
            send(&mut stream, &auth).await?;
            let response = read_frame(&mut stream, &mut buf).await?;
            response.result.map_err(Error::from)?;
        }
        let watch = Request {
            id: WATCH_ID,
            op: Op::Watch(WatchRequest {
                collection: self.collection.clone(),
                start: self.start.clone(),
                prefix: self.prefix.clone(),
            }),
        };
        send(&mut stream, &watch).await?;
        Ok((stream, buf))
    }

    /// Reads the next frame of the watch into `pending`.
    async fn read(&mut self) -> Result<(), Error> {
        let (stream, buf) = self.conn.as_mut().expect("connected");
        let response = read_frame(stream, buf).await?;
        if response.id != WATCH_ID {
            return Err(Error::UnexpectedReply(format!(
                "an answer to request {}",
                response.id
            )));
        }
        match response.result {
            Ok(Reply::Events(events)) => {
                self.connected_once = true;
                if events.iter().any(|e| e.kind != EventKind::Progress) {
                    // Getting somewhere: the next break retries at once.
                    self.backoff = Duration::from_millis(50);
                }
                for e in events {
                    if let Some(t) = e.token
                        && !self.in_snapshot
                    {
                        self.token = Some(t);
                        self.start = WatchStart::After(t);
                    }
                    if e.kind == EventKind::Synced {
                        self.in_snapshot = false;
                        self.token = e.token;
                        self.start = e.token.map_or(WatchStart::Now, WatchStart::After);
                    }
                    self.pending.push_back(WatchItem::Event(e));
                }
                Ok(())
            }
            Ok(other) => Err(Error::UnexpectedReply(format!("{other:?}"))),
            Err(e) => Err(Error::from(e)),
        }
    }
}

/// Whether reconnecting cannot help.
fn fatal(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidInput(_)
            | Error::Unauthenticated(_)
            | Error::Forbidden(_)
            | Error::NotFound(_)
    )
}

async fn send(stream: &mut BoxedStream, request: &Request) -> Result<(), Error> {
    let mut out = Vec::new();
    encode_frame(request, &mut out, DEFAULT_MAX_FRAME)?;
    stream
        .write_all(&out)
        .await
        .map_err(|e| Error::Disconnected(format!("write failed: {e}")))
}

async fn read_frame(stream: &mut BoxedStream, buf: &mut BytesMut) -> Result<Response, Error> {
    loop {
        match decode_frame::<Response>(buf, DEFAULT_MAX_FRAME)? {
            Decoded::Complete { msg, len } => {
                buf.advance(len);
                return Ok(msg);
            }
            Decoded::Incomplete { needed } => buf.reserve(needed.max(16 * 1024)),
        }
        match stream.read_buf(buf).await {
            Ok(0) => return Err(Error::Disconnected("the node closed the connection".into())),
            Ok(_) => {}
            Err(e) => return Err(Error::Disconnected(format!("read failed: {e}"))),
        }
    }
}
