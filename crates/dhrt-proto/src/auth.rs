//! Client authentication, as pure policy: the three roles, tokens and
//! their hashes, the auth file, and [`Access`], which both servers ask
//! whether a connection may do what it asks. `dhrtd` reads (and on SIGHUP
//! re-reads) the file; `dhrt-cli token` makes tokens.
//!
//! A token is `dhrt_` and 64 hexadecimal digits (256 random bits). The auth
//! file never holds a token, only its SHA-256: a token is random and long,
//! so a fast hash is as safe as a slow one, and checking one costs a
//! microsecond, not the milliseconds a password hash would add to every
//! request.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::message::{ErrorKind, OpError, OpRef};

/// What a token may do. Each role may do everything the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Get, list, stats, metrics, and anything read-only.
    Read,
    /// Read, plus setting and deleting keys.
    Write,
    /// Write, plus dropping collections, joining clusters and every other
    /// cluster operation.
    Admin,
}

impl Role {
    /// Its name in the auth file and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }

    /// Whether this role may do what `needed` may.
    #[inline]
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Role::Read),
            "write" => Ok(Role::Write),
            "admin" => Ok(Role::Admin),
            other => Err(format!("a role is read, write or admin, not {other:?}")),
        }
    }
}

/// The role an operation needs, and what it is called in a refusal.
pub fn needed(op: &OpRef<'_>) -> (Role, &'static str) {
    match op {
        OpRef::Ping => (Role::Read, "ping"),
        OpRef::Get { .. } => (Role::Read, "reading a key"),
        OpRef::List { .. } => (Role::Read, "listing a collection"),
        OpRef::Stats => (Role::Read, "reading stats"),
        OpRef::Set { .. } => (Role::Write, "setting a key"),
        OpRef::Delete { .. } => (Role::Write, "deleting a key"),
        OpRef::DropCollection { .. } => (Role::Admin, "dropping a collection"),
        OpRef::Join { .. } => (Role::Admin, "joining a cluster"),
        OpRef::RemoveMember { .. } => (Role::Admin, "removing a member"),
        OpRef::Auth { .. } => (Role::Read, "authenticating"),
        OpRef::Watch(_) => (Role::Read, "watching a collection"),
        OpRef::Replicas { set: None, .. } => (Role::Read, "reading a replication factor"),
        OpRef::Replicas { set: Some(_), .. } => (Role::Admin, "setting a replication factor"),
    }
}

/// How a token starts.
pub const TOKEN_PREFIX: &str = "dhrt_";

/// A fresh random token: `dhrt_` and 64 hexadecimal digits.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    let mut token = String::with_capacity(TOKEN_PREFIX.len() + 64);
    token.push_str(TOKEN_PREFIX);
    push_hex(&mut token, &bytes);
    token
}

/// A fresh cluster secret: 64 hexadecimal digits (256 random bits).
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    let mut secret = String::with_capacity(64);
    push_hex(&mut secret, &bytes);
    secret
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
}

/// The SHA-256 of a token: what the auth file holds.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// The hash of `token` (its bytes as sent).
    pub fn of(token: &[u8]) -> Self {
        TokenHash(Sha256::digest(token).into())
    }

    fn parse(text: &str) -> Option<Self> {
        let hex = text.strip_prefix("sha256:")?;
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let digits = std::str::from_utf8(pair).ok()?;
            out[i] = u8::from_str_radix(digits, 16).ok()?;
        }
        Some(TokenHash(out))
    }
}

impl fmt::Display for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::with_capacity(71);
        s.push_str("sha256:");
        push_hex(&mut s, &self.0);
        f.write_str(&s)
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The auth-file line that grants `role` to `token`, named `name`.
pub fn auth_line(role: Role, token: &str, name: &str) -> String {
    let hash = TokenHash::of(token.as_bytes());
    if name.is_empty() {
        format!("{role} {hash}")
    } else {
        format!("{role} {hash} {name}")
    }
}

/// What one token is granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Its role.
    pub role: Role,
    /// Its name in the file (for logs and refusals); may be empty.
    pub name: String,
}

/// The tokens of an auth file.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    grants: HashMap<TokenHash, Grant>,
}

/// A line of an auth file that is not a grant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct AuthFileError {
    /// Its number, from 1.
    pub line: usize,
    /// What is wrong with it.
    pub message: String,
}

impl Tokens {
    /// Parses an auth file: one grant a line, `ROLE sha256:HEX [NAME]`, as
    /// `dhrt-cli token` prints it; blank lines and lines starting with `#`
    /// are skipped. Any other line is an error: a file with a typo is
    /// refused whole, never half applied.
    pub fn parse(text: &str) -> Result<Tokens, AuthFileError> {
        let mut grants = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let err = |message: String| AuthFileError {
                line: line_no,
                message,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let role: Role = words.next().unwrap_or_default().parse().map_err(err)?;
            let hash = words.next().unwrap_or_default();
            let hash = TokenHash::parse(hash).ok_or_else(|| {
                err(format!(
                    "expected sha256: and 64 hexadecimal digits after the role, not {hash:?} \
                     (the file holds token hashes: make a line with `dhrt-cli token --role {role}`)"
                ))
            })?;
            let name = words.collect::<Vec<_>>().join(" ");
            if grants.insert(hash, Grant { role, name }).is_some() {
                return Err(err("this token is already granted above".into()));
            }
        }
        Ok(Tokens { grants })
    }

    /// What `token` is granted, if anything.
    pub fn grant(&self, token: &[u8]) -> Option<&Grant> {
        self.grants.get(&TokenHash::of(token))
    }

    fn grant_of(&self, hash: &TokenHash) -> Option<&Grant> {
        self.grants.get(hash)
    }

    /// How many tokens are granted.
    pub fn len(&self) -> usize {
        self.grants.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }
}

/// Who may use a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Anyone who can reach it, as admin (`--no-auth`).
    Open,
    /// No auth file: clients on loopback, as admin; nobody else.
    LoopbackOnly,
    /// The tokens of the auth file, each with its role.
    Tokens,
}

/// The sentence a refused remote client gets from a node without tokens.
pub const LOOPBACK_ONLY: &str = "this node has no auth file, so it serves clients on \
loopback only: start it with --auth-file FILE and connect with a token (make one with \
`dhrt-cli token --role read|write|admin`), or with --no-auth to let anyone who can reach \
it read and write";

/// The policy a node applies to its clients. Shared by every connection;
/// the tokens can be replaced while it serves (a reload), and connections
/// authenticated before a reload are checked again against the new ones.
#[derive(Debug)]
pub struct Access {
    mode: Mode,
    tokens: ArcSwap<Tokens>,
    /// Bumped by every [`replace`](Access::replace): what a connection
    /// remembered of an earlier set of tokens is stale.
    generation: AtomicU64,
    /// Requests refused: without a valid token, and for the token's role.
    unauthenticated: AtomicU64,
    forbidden: AtomicU64,
}

/// Told that a connection has shown it may use the node (a valid token):
/// the listener stops counting it among the strangers it closes, oldest
/// first, to make room for a newcomer when every client slot is taken.
/// Servers call [`Proven::now_with`] whenever a token is accepted. A proof
/// made once ([`Proven::new`]) is told once; one made with a token
/// ([`Proven::rearmable`]) is told again under each new set of tokens, with
/// the token's hash, so that the listener can tell, after a reload, which
/// connections showed a token that is no longer valid (a revoked token's
/// connections keep no slots).
#[derive(Default)]
pub struct Proven(Option<Proof>);

enum Proof {
    Once(Box<dyn FnOnce() + Send>),
    Rearmable {
        /// The tokens' generation and the token it was last told under.
        told_under: Option<(u64, TokenHash)>,
        told: Box<dyn Fn(u64, TokenHash) + Send>,
    },
}

impl Proven {
    /// Runs `told` the first time the connection proves itself.
    pub fn new(told: impl FnOnce() + Send + 'static) -> Proven {
        Proven(Some(Proof::Once(Box::new(told))))
    }

    /// Runs `told` with the tokens' generation ([`Access::generation`])
    /// and the token's hash each time the connection shows a valid token
    /// under a generation, or a token, it has not been told under last.
    pub fn rearmable(told: impl Fn(u64, TokenHash) + Send + 'static) -> Proven {
        Proven(Some(Proof::Rearmable {
            told_under: None,
            told: Box::new(told),
        }))
    }

    /// Nobody listens: a connection that needs no proof, or a test.
    pub fn ignored() -> Proven {
        Proven(None)
    }

    /// The connection has proved itself (a peer: the secret). Only a
    /// proof made once is told so.
    pub fn now(&mut self) {
        if matches!(self.0, Some(Proof::Once(_)))
            && let Some(Proof::Once(told)) = self.0.take()
        {
            told();
        }
    }

    /// The connection has shown a token valid under the tokens of
    /// `generation`, read *before* the token was checked; `token` gives
    /// its hash. A connection goes on with one token, as a rule: its hash
    /// is computed only when the generation moved (and then compared with
    /// the last one told), or, with `changed`, when the server saw another
    /// token than the last.
    #[inline]
    pub fn now_with(
        &mut self,
        generation: u64,
        changed: bool,
        token: impl FnOnce() -> Option<TokenHash>,
    ) {
        match &mut self.0 {
            Some(Proof::Rearmable { told_under, told })
                if changed || told_under.is_none_or(|(g, _)| g != generation) =>
            {
                if let Some(hash) = token()
                    && *told_under != Some((generation, hash))
                {
                    *told_under = Some((generation, hash));
                    told(generation, hash);
                }
            }
            Some(Proof::Once(_)) => self.now(),
            _ => {}
        }
    }
}

impl std::fmt::Debug for Proven {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Proven(done)"),
            Some(Proof::Once(_)) => f.write_str("Proven(waiting)"),
            Some(Proof::Rearmable { told_under, .. }) => {
                write!(f, "Proven(told under {told_under:?})")
            }
        }
    }
}

/// What one connection remembers of its last check, so that the next
/// request with the same token costs an atomic load, not a hash and a
/// lookup. Stale after a reload.
#[derive(Debug, Default)]
pub struct Remembered {
    generation: u64,
    standing: Option<Standing>,
    token: Vec<u8>,
    role: Option<Role>,
}

impl Remembered {
    /// Whether the last request checked carried `token` (and it was
    /// valid then).
    pub fn remembers(&self, token: &[u8]) -> bool {
        self.role.is_some() && self.standing.is_none() && self.token == token
    }
}

/// What a connection has shown so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Allowed `role` without a token (open node, or loopback client of a
    /// node without tokens).
    Trusted(Role),
    /// A remote client of a node without tokens: refused whatever it sends.
    Refused,
    /// Nothing shown yet.
    Anonymous,
    /// Showed the token of this hash.
    Token(TokenHash),
}

impl Access {
    /// A node that needs no token (`--no-auth`).
    pub fn open() -> Arc<Access> {
        Arc::new(Access {
            mode: Mode::Open,
            tokens: ArcSwap::from_pointee(Tokens::default()),
            generation: AtomicU64::new(0),
            unauthenticated: AtomicU64::new(0),
            forbidden: AtomicU64::new(0),
        })
    }

    /// A node without an auth file: loopback clients only.
    pub fn loopback_only() -> Arc<Access> {
        Arc::new(Access {
            mode: Mode::LoopbackOnly,
            tokens: ArcSwap::from_pointee(Tokens::default()),
            generation: AtomicU64::new(0),
            unauthenticated: AtomicU64::new(0),
            forbidden: AtomicU64::new(0),
        })
    }

    /// A node that needs one of `tokens`.
    pub fn tokens(tokens: Tokens) -> Arc<Access> {
        Arc::new(Access {
            mode: Mode::Tokens,
            tokens: ArcSwap::from_pointee(tokens),
            generation: AtomicU64::new(0),
            unauthenticated: AtomicU64::new(0),
            forbidden: AtomicU64::new(0),
        })
    }

    /// Its mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Replaces the tokens (a reload): a token no longer listed is refused
    /// from the next request on, on connections already open too.
    pub fn replace(&self, tokens: Tokens) {
        self.tokens.store(Arc::new(tokens));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// How many times the tokens were replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Counts a refusal (for `/metrics`): every `Unauthenticated` or
    /// `Forbidden` answer a server gives goes through here.
    pub fn count_refusal(&self, e: &OpError) {
        match e.kind {
            ErrorKind::Unauthenticated => self.unauthenticated.fetch_add(1, Ordering::Relaxed),
            ErrorKind::Forbidden => self.forbidden.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    /// The metrics of client authentication, in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let mode = match self.mode {
            Mode::Open => "open",
            Mode::LoopbackOnly => "loopback-only",
            Mode::Tokens => "tokens",
        };
        let _ = writeln!(
            out,
            "# HELP dhrt_auth_tokens Tokens the auth file grants, and how clients are admitted (mode).\n# TYPE dhrt_auth_tokens gauge\ndhrt_auth_tokens{{mode=\"{mode}\"}} {}",
            self.token_count()
        );
        let _ = writeln!(
            out,
            "# HELP dhrt_auth_refused_total Client requests refused: without a valid token (401), or beyond the token's role (403).\n# TYPE dhrt_auth_refused_total counter\ndhrt_auth_refused_total{{reason=\"unauthenticated\"}} {}\ndhrt_auth_refused_total{{reason=\"forbidden\"}} {}",
            self.unauthenticated.load(Ordering::Relaxed),
            self.forbidden.load(Ordering::Relaxed)
        );
    }

    /// How many tokens are granted.
    pub fn token_count(&self) -> usize {
        self.tokens.load().len()
    }

    /// The standing of a new connection from `remote`.
    pub fn connect(&self, remote: IpAddr) -> Standing {
        match self.mode {
            Mode::Open => Standing::Trusted(Role::Admin),
            Mode::LoopbackOnly if is_loopback(remote) => Standing::Trusted(Role::Admin),
            Mode::LoopbackOnly => Standing::Refused,
            Mode::Tokens => Standing::Anonymous,
        }
    }

    /// The standing after presenting `token`, or why it is refused
    /// ([`ErrorKind::Unauthenticated`]). A node without tokens keeps the
    /// standing it gave on connecting.
    pub fn present(&self, standing: Standing, token: &[u8]) -> Result<Standing, OpError> {
        match standing {
            Standing::Trusted(_) => Ok(standing),
            Standing::Refused => Err(unauthenticated(LOOPBACK_ONLY)),
            Standing::Anonymous | Standing::Token(_) => {
                let hash = TokenHash::of(token);
                match self.tokens.load().grant_of(&hash) {
                    Some(_) => Ok(Standing::Token(hash)),
                    None => Err(unauthenticated(
                        "the token is not one this node accepts (unknown, mistyped or revoked)",
                    )),
                }
            }
        }
    }

    /// The role `standing` has now, or why it has none.
    pub fn role(&self, standing: Standing) -> Result<Role, OpError> {
        match standing {
            Standing::Trusted(role) => Ok(role),
            Standing::Refused => Err(unauthenticated(LOOPBACK_ONLY)),
            Standing::Anonymous => Err(unauthenticated(
                "this node needs a token: send one (HTTP: Authorization: Bearer TOKEN; \
                 binary protocol: an Auth request first; dhrt-cli: --token or DHRT_TOKEN)",
            )),
            Standing::Token(hash) => match self.tokens.load().grant_of(&hash) {
                Some(grant) => Ok(grant.role),
                None => Err(unauthenticated(
                    "the token is not one this node accepts any more (revoked)",
                )),
            },
        }
    }

    /// Whether `standing` may do what needs `needed` (described as `what`);
    /// [`ErrorKind::Unauthenticated`] or [`ErrorKind::Forbidden`] if not.
    #[inline]
    pub fn check(&self, standing: Standing, needed: Role, what: &str) -> Result<(), OpError> {
        if let Standing::Trusted(role) = standing
            && role.allows(needed)
        {
            return Ok(());
        }
        allow(self.role(standing)?, needed, what)
    }

    /// [`check`](Self::check), remembering the role found in `memo` for the
    /// connection's next request.
    #[inline]
    pub fn check_remembered(
        &self,
        standing: Standing,
        needed: Role,
        what: &str,
        memo: &mut Remembered,
    ) -> Result<(), OpError> {
        let generation = self.generation.load(Ordering::Acquire);
        let role = match memo.role {
            Some(role) if memo.generation == generation && memo.standing == Some(standing) => role,
            _ => {
                let role = self.role(standing)?;
                *memo = Remembered {
                    generation,
                    standing: Some(standing),
                    token: Vec::new(),
                    role: Some(role),
                };
                role
            }
        };
        allow(role, needed, what)
    }

    /// [`request`](Self::request), remembering the token and its role in
    /// `memo` for the connection's next request.
    #[inline]
    pub fn request_remembered(
        &self,
        remote: IpAddr,
        token: Option<&[u8]>,
        memo: &mut Remembered,
    ) -> Result<Role, OpError> {
        let Some(token) = token else {
            return self.request(remote, None);
        };
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(role) = memo.role
            && memo.generation == generation
            && memo.standing.is_none()
            && memo.token == token
        {
            return Ok(role);
        }
        let role = self.request(remote, Some(token))?;
        *memo = Remembered {
            generation,
            standing: None,
            token: token.to_vec(),
            role: Some(role),
        };
        Ok(role)
    }

    /// The role of a request that carries `token` (or none) from `remote`:
    /// the one-shot form HTTP uses.
    pub fn request(&self, remote: IpAddr, token: Option<&[u8]>) -> Result<Role, OpError> {
        let standing = self.connect(remote);
        let standing = match (standing, token) {
            (Standing::Anonymous, Some(token)) => self.present(standing, token)?,
            _ => standing,
        };
        self.role(standing)
    }
}

/// Whether `role` may do what needs `needed` (called `what`); the
/// [`ErrorKind::Forbidden`] refusal naming both roles if not.
#[inline]
pub fn allow(role: Role, needed: Role, what: &str) -> Result<(), OpError> {
    if role.allows(needed) {
        Ok(())
    } else {
        Err(OpError::new(
            ErrorKind::Forbidden,
            format!("{what} needs the {needed} role; this token has the {role} role"),
        ))
    }
}

fn unauthenticated(message: &str) -> OpError {
    OpError::new(ErrorKind::Unauthenticated, message)
}

/// Loopback, IPv4 or IPv6, including IPv4-mapped IPv6 loopback.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(lines: &[String]) -> Tokens {
        Tokens::parse(&lines.join("\n")).unwrap()
    }

    #[test]
    fn a_token_made_here_is_granted_by_the_line_made_with_it() {
        let token = new_token();
        assert!(token.starts_with(TOKEN_PREFIX));
        assert_eq!(token.len(), TOKEN_PREFIX.len() + 64);
        assert_ne!(token, new_token());
        let line = auth_line(Role::Write, &token, "app server");
        assert!(!line.contains(&token[TOKEN_PREFIX.len()..]), "{line}");
        let tokens = file(&["# a comment".into(), String::new(), line]);
        let grant = tokens.grant(token.as_bytes()).unwrap();
        assert_eq!(grant.role, Role::Write);
        assert_eq!(grant.name, "app server");
        assert!(tokens.grant(b"dhrt_guess").is_none());
    }

    #[test]
    fn a_bad_line_is_refused_with_its_number() {
        let ok = auth_line(Role::Read, &new_token(), "");
        for (bad, says) in [
            ("reader sha256:00", "read, write or admin"),
            ("read", "sha256:"),
            ("read sha256:xyz", "sha256:"),
            ("read dhrt_0123", "sha256:"),
        ] {
            let e = Tokens::parse(&format!("{ok}\n{bad}\n")).unwrap_err();
            assert_eq!(e.line, 2, "{bad}");
            assert!(e.message.contains(says), "{bad}: {e}");
        }
        let e = Tokens::parse(&format!("{ok}\n{ok}\n")).unwrap_err();
        assert_eq!(e.line, 2);
    }

    #[test]
    fn roles_nest() {
        assert!(Role::Admin.allows(Role::Write) && Role::Write.allows(Role::Read));
        assert!(!Role::Read.allows(Role::Write) && !Role::Write.allows(Role::Admin));
        for r in [Role::Read, Role::Write, Role::Admin] {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
    }

    #[test]
    fn a_node_without_tokens_serves_loopback_only_unless_open() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        let access = Access::loopback_only();
        assert_eq!(access.request(local, None), Ok(Role::Admin));
        assert_eq!(access.request(mapped, None), Ok(Role::Admin));
        let e = access.request(remote, Some(b"anything")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthenticated);
        assert!(e.message.contains("--auth-file"), "{e}");
        assert_eq!(Access::open().request(remote, None), Ok(Role::Admin));
    }

    #[test]
    fn tokens_are_checked_and_a_reload_revokes_them_on_open_connections() {
        let (reader, writer) = (new_token(), new_token());
        let access = Access::tokens(file(&[
            auth_line(Role::Read, &reader, "r"),
            auth_line(Role::Write, &writer, "w"),
        ]));
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        // Loopback is no exception once there are tokens.
        let e = access.request(local, None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthenticated);
        let e = access.request(local, Some(b"dhrt_wrong")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthenticated);

        let conn = access.connect(local);
        let as_reader = access.present(conn, reader.as_bytes()).unwrap();
        assert_eq!(access.check(as_reader, Role::Read, "reading"), Ok(()));
        let e = access
            .check(as_reader, Role::Write, "setting a key")
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Forbidden);
        assert!(
            e.message.contains("setting a key needs the write role"),
            "{e}"
        );
        let as_writer = access.present(as_reader, writer.as_bytes()).unwrap();
        assert_eq!(access.check(as_writer, Role::Write, "setting"), Ok(()));
        assert_eq!(
            access.check(as_writer, Role::Admin, "x").unwrap_err().kind,
            ErrorKind::Forbidden
        );

        // What a connection remembers answers the same as the long way.
        let (mut memo, mut http) = (Remembered::default(), Remembered::default());
        for _ in 0..3 {
            assert_eq!(
                access.check_remembered(as_writer, Role::Write, "s", &mut memo),
                Ok(())
            );
            assert_eq!(
                access.request_remembered(local, Some(writer.as_bytes()), &mut http),
                Ok(Role::Write)
            );
        }
        let e = access
            .check_remembered(as_reader, Role::Write, "s", &mut memo)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Forbidden);
        assert_eq!(
            access.request_remembered(local, Some(reader.as_bytes()), &mut http),
            Ok(Role::Read)
        );
        assert_eq!(
            access.check_remembered(as_writer, Role::Write, "s", &mut memo),
            Ok(())
        );
        assert_eq!(
            access.request_remembered(local, Some(writer.as_bytes()), &mut http),
            Ok(Role::Write)
        );

        // The writer's line is removed and the file reloaded.
        access.replace(file(&[auth_line(Role::Read, &reader, "r")]));
        // Nothing remembered outlives a reload.
        let e = access
            .check_remembered(as_writer, Role::Read, "reading", &mut memo)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthenticated);
        let e = access
            .request_remembered(local, Some(writer.as_bytes()), &mut http)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthenticated);
        let e = access.check(as_writer, Role::Read, "reading").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthenticated);
        assert!(e.message.contains("revoked"), "{e}");
        assert_eq!(access.check(as_reader, Role::Read, "reading"), Ok(()));
    }
}
