//! `dhrt-cli`: one-shot commands (`dhrt-cli get users ada`) and, with no
//! command, an interactive REPL. Exit codes: 0 found/ok, 1 not found,
//! 2 error. The logic is in `dhrt-client`; this parses and prints.

mod command;
mod repl;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use dhrt_client::{Client, Error, EventKind, WatchItem, WatchStart};
use dhrt_proto::{Reply, Role};

use crate::command::Command;

/// The dhrt command line.
#[derive(Debug, Parser)]
#[command(
    name = "dhrt-cli",
    version,
    about = "The dhrt command line; with no command, a REPL"
)]
struct Args {
    /// The node to talk to.
    #[arg(long, env = "DHRT_ADDR", default_value = "127.0.0.1:7453")]
    addr: String,
    /// The token to authenticate with (see `dhrt-cli token`).
    #[arg(long, env = "DHRT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Speak TLS, trusting this CA (PEM) for the node's certificate.
    #[arg(long, env = "DHRT_TLS_CA", value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// With TLS, the client certificate (PEM) for a node that requires one.
    #[arg(long, env = "DHRT_TLS_CERT", value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "DHRT_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Print results (and errors) as JSON.
    #[arg(long)]
    json: bool,
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND",
        help = "set [collection] key value | get [collection] key | del [collection] key | watch COLLECTION [--since TOKEN] [--snapshot] [--prefix P] | stats | join ADDR | remove MEMBER | replicas COLLECTION|* [N|all] | auth TOKEN | token --role ROLE [--name N] | secret | help; none starts the REPL"
    )]
    command: Vec<String>,
}

/// How a command went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done,
    NotFound,
}

impl Outcome {
    fn exit_code(self) -> ExitCode {
        match self {
            Outcome::Done => ExitCode::SUCCESS,
            Outcome::NotFound => ExitCode::from(1),
        }
    }
}

fn error_text(e: &Error, addr: &str) -> String {
    match e {
        Error::Connect { .. } => {
            format!("{e} (is dhrtd running there? --addr or DHRT_ADDR names another node)")
        }
        Error::Disconnected(_) => format!("{e} (node {addr})"),
        Error::Unauthenticated(_) => format!("{e} (--token or DHRT_TOKEN gives a token)"),
        _ => e.to_string(),
    }
}

/// Sets `field` of `o` to `bytes` as the HTTP API does: a string when they
/// are UTF-8; else base64 in `<field>Base64` (a key also keeps `Key`, with
/// the bytes that are not UTF-8 replaced, to show it), never mangled.
fn json_bytes(o: &mut serde_json::Value, field: &str, bytes: &[u8]) {
    use base64::Engine;
    match std::str::from_utf8(bytes) {
        Ok(text) => o[field] = text.into(),
        Err(_) => {
            if field == "Key" {
                o[field] = String::from_utf8_lossy(bytes).into();
            }
            o[format!("{field}Base64")] = base64::engine::general_purpose::STANDARD
                .encode(bytes)
                .into();
        }
    }
}

/// Prints `message` as an error: a sentence on stderr, or JSON with --json.
pub(crate) fn print_error(message: &str, json: bool) {
    if json {
        println!("{}", serde_json::json!({ "Error": message }));
    } else {
        eprintln!("dhrt-cli: {message}");
    }
}

/// Runs a command that talks to the node; prints its result to `out`.
pub(crate) async fn execute(
    client: &Client,
    command: &Command,
    json: bool,
    out: &mut Vec<u8>,
) -> Result<Outcome, Error> {
    let Some(op) = command.op() else {
        return Ok(Outcome::Done);
    };
    let reply = client.request(op).await?;
    let kv = |key: &str, value: &[u8]| {
        let mut o = serde_json::json!({ "Key": key });
        json_bytes(&mut o, "Value", value);
        o
    };
    let outcome = match (command, reply) {
        (Command::Get { key, .. }, Reply::Value(Some(v))) => {
            if json {
                writeln!(out, "{}", kv(key, &v)).unwrap();
            } else if std::io::stdout().is_terminal() {
                // A value shown on a terminal cannot send it escape
                // sequences (retitle it, rewrite what it showed, ...);
                // piped, it goes out byte for byte.
                writeln!(out, "{}", escaped(&v)).unwrap();
            } else {
                out.extend_from_slice(&v);
                out.push(b'\n');
            }
            Outcome::Done
        }
        (Command::Get { .. } | Command::Del { .. }, Reply::Value(None) | Reply::Deleted(false)) => {
            if json {
                writeln!(out, "null").unwrap();
            } else {
                writeln!(out, "(nil)").unwrap();
            }
            Outcome::NotFound
        }
        (Command::Set { key, value, .. }, Reply::Stored) => {
            if json {
                writeln!(out, "{}", kv(key, value.as_bytes())).unwrap();
            } else {
                writeln!(out, "OK").unwrap();
            }
            Outcome::Done
        }
        (Command::Del { key, .. }, Reply::Deleted(true)) => {
            if json {
                writeln!(out, "{}", serde_json::json!({ "Key": key })).unwrap();
            } else {
                writeln!(out, "OK").unwrap();
            }
            Outcome::Done
        }
        (Command::Join { addr }, Reply::Joined(members)) => {
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "Joined": addr, "Members": members })
                )
                .unwrap();
            } else {
                writeln!(out, "OK: joined through {addr}, {members} members").unwrap();
            }
            Outcome::Done
        }
        (Command::Remove { .. }, Reply::Removed(id)) => {
            if json {
                writeln!(out, "{}", serde_json::json!({ "Removed": id })).unwrap();
            } else {
                writeln!(out, "OK: removed {id}; its collections go to new owners").unwrap();
            }
            Outcome::Done
        }
        (Command::Replicas { .. }, Reply::Replicas(info)) => {
            let name = info.collection.as_deref().unwrap_or("*");
            if json {
                let v = serde_json::json!({
                    "Collection": name,
                    "Replicas": info.replicas,
                    "Owners": info.owners,
                    "UnderReplicated": info.under_replicated,
                });
                writeln!(out, "{v}").unwrap();
            } else if info.collection.is_none() {
                writeln!(out, "cluster default: {} replicas", info.replicas).unwrap();
            } else {
                let under = if info.under_replicated {
                    " (under-replicated)"
                } else {
                    ""
                };
                writeln!(
                    out,
                    "{name}: {} replicas{under}, owners {}",
                    info.replicas,
                    info.owners.join(" ")
                )
                .unwrap();
            }
            Outcome::Done
        }
        (Command::Auth { .. }, Reply::Authenticated(role)) => {
            if json {
                writeln!(out, "{}", serde_json::json!({ "Role": role.as_str() })).unwrap();
            } else {
                writeln!(out, "OK: {role}").unwrap();
            }
            Outcome::Done
        }
        (Command::Stats, Reply::Stats(stats)) => {
            writeln!(out, "{}", serde_json::to_string_pretty(&stats).unwrap()).unwrap();
            Outcome::Done
        }
        (_, other) => return Err(Error::UnexpectedReply(format!("{other:?}"))),
    };
    Ok(outcome)
}

/// `token`: a fresh token, then the auth-file line that grants it.
pub(crate) fn print_token(role: Role, name: &str) {
    let token = dhrt_proto::auth::new_token();
    println!("{token}");
    println!("{}", dhrt_proto::auth::auth_line(role, &token, name));
}

/// How to reach the node: address, token, TLS files.
#[derive(Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) addr: &'a str,
    token: Option<&'a str>,
    tls_ca: Option<&'a std::path::Path>,
    tls_identity: Option<(&'a std::path::Path, &'a std::path::Path)>,
}

impl<'a> Target<'a> {
    fn of(args: &'a Args) -> Self {
        Target {
            addr: &args.addr,
            token: args.token.as_deref(),
            tls_ca: args.tls_ca.as_deref(),
            tls_identity: args.tls_cert.as_deref().zip(args.tls_key.as_deref()),
        }
    }
}

/// A connection to the target, over TLS and authenticated as it says.
pub(crate) async fn connect(target: &Target<'_>) -> Result<Client, Error> {
    builder(target)?.connect().await
}

/// How to connect to the target.
fn builder(target: &Target<'_>) -> Result<dhrt_client::ClientBuilder, Error> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| Error::Connect {
            addr: format!("{} (reading {})", target.addr, path.display()),
            source,
        })
    };
    let mut builder = Client::builder(target.addr);
    if let Some(token) = target.token {
        builder = builder.token(token);
    }
    if let Some(ca) = target.tls_ca {
        builder = builder.tls_ca(read(ca)?);
    }
    if let Some((cert, key)) = target.tls_identity {
        builder = builder.tls_identity(read(cert)?, read(key)?);
    }
    Ok(builder)
}

/// `watch`: prints each event as it comes, until Ctrl-C (Ok) or an error
/// reconnecting cannot fix.
pub(crate) async fn watch(target: &Target<'_>, command: &Command, json: bool) -> Result<(), Error> {
    let Command::Watch {
        collection,
        since,
        snapshot,
        prefix,
    } = command
    else {
        unreachable!("a watch command");
    };
    let start = match (since, snapshot) {
        (Some(t), _) => WatchStart::After(
            t.parse()
                .map_err(|e: dhrt_proto::OpError| Error::InvalidInput(e.message))?,
        ),
        (None, true) => WatchStart::Snapshot,
        (None, false) => WatchStart::Now,
    };
    // A wrong address or a node that is down is told at once (exit 2, as
    // for `get`); once watching, a break is retried, and said on stderr
    // (at most every 10 s) so that a silent terminal is not a mystery.
    let mut last_told: Option<std::time::Instant> = None;
    let mut w = builder(target)?
        .watch(collection, start)
        .connect_first()
        .on_retry(move |e| {
            if last_told.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(10)) {
                last_told = Some(std::time::Instant::now());
                eprintln!("dhrt-cli: watch: {e}; retrying");
            }
        });
    if let Some(p) = prefix {
        w = w.prefix(p.clone().into_bytes());
    }
    let mut stdout = std::io::stdout();
    loop {
        let item = tokio::select! {
            item = w.next() => item?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let line = match item {
            WatchItem::Resync(why) if json => {
                serde_json::json!({ "Collection": collection, "Kind": "resync", "Reason": why })
                    .to_string()
            }
            WatchItem::Resync(why) => format!("resync\t\t\t{why}"),
            WatchItem::Event(e) if json => {
                let mut o =
                    serde_json::json!({ "Collection": collection, "Kind": e.kind.as_str() });
                if !e.key.is_empty() {
                    json_bytes(&mut o, "Key", &e.key);
                }
                if let Some(v) = &e.value {
                    json_bytes(&mut o, "Value", v);
                }
                if let Some(v) = e.version {
                    o["Version"] = dhrt_client::version_hex(v).into();
                }
                if let Some(t) = e.token {
                    o["Token"] = t.to_string().into();
                }
                o.to_string()
            }
            // Text: one line per change; progress only refreshes the token.
            WatchItem::Event(e) if e.kind == EventKind::Progress => continue,
            WatchItem::Event(e) => format!(
                "{}\t{}\t{}\t{}",
                e.kind.as_str(),
                escaped(&e.key),
                e.value.as_deref().map(escaped).unwrap_or_default(),
                e.token.map(|t| t.to_string()).unwrap_or_default()
            ),
        };
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // The reader of our output went away (a closed pipe).
            return Ok(());
        }
    }
}

/// A key or value for a tab-separated line, or a value `get` shows on a
/// terminal: a backslash, tab, newline or carriage return is written as
/// `\\`, `\t`, `\n` or `\r`, and any other control character, and any
/// byte that is not part of valid UTF-8, as `\xNN` for each of its bytes,
/// so a value can neither split its line, forge another event's, nor send
/// the terminal escape sequences, and every byte can be read back.
fn escaped(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                // C0, DEL and C1 (whose UTF-8 is two bytes).
                c if c.is_control() => {
                    for b in c.encode_utf8(&mut [0; 4]).bytes() {
                        let _ = write!(out, "\\x{b:02x}");
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("start the runtime");
    if args.command.is_empty() {
        return repl::run(&runtime, &Target::of(&args), args.json);
    }
    let command = match command::parse(&args.command) {
        Ok(c) => c,
        Err(e) => {
            print_error(&e, args.json);
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            println!("{}", command::HELP);
            return ExitCode::SUCCESS;
        }
        Command::Quit => return ExitCode::SUCCESS,
        Command::Token { role, name } => {
            print_token(role, &name);
            return ExitCode::SUCCESS;
        }
        Command::Secret => {
            println!("{}", dhrt_proto::auth::new_secret());
            return ExitCode::SUCCESS;
        }
        Command::Watch { .. } => {
            return match runtime.block_on(watch(&Target::of(&args), &command, args.json)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    print_error(&error_text(&e, &args.addr), args.json);
                    ExitCode::from(2)
                }
            };
        }
        _ => {}
    }
    let result = runtime.block_on(async {
        let client = connect(&Target::of(&args)).await?;
        let mut out = Vec::new();
        let outcome = execute(&client, &command, args.json, &mut out).await?;
        Ok::<_, Error>((outcome, out))
    });
    match result {
        Ok((outcome, out)) => {
            let _ = std::io::stdout().write_all(&out);
            outcome.exit_code()
        }
        Err(e) => {
            print_error(&error_text(&e, &args.addr), args.json);
            // Saved, on fewer replicas than asked: not the same as failed.
            let code = if matches!(e, Error::WriteConcern(_)) {
                3
            } else {
                2
            };
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::escaped;

    /// What [`escaped`] wrote, read back.
    fn unescaped(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = text.as_bytes();
        while let Some((&b, tail)) = rest.split_first() {
            rest = tail;
            if b != b'\\' {
                out.push(b);
                continue;
            }
            let (&e, tail) = rest.split_first().expect("an escape is whole");
            rest = tail;
            match e {
                b'\\' => out.push(b'\\'),
                b't' => out.push(b'\t'),
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b'x' => {
                    let hex = std::str::from_utf8(&rest[..2]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    rest = &rest[2..];
                }
                other => panic!("unknown escape \\{}", other as char),
            }
        }
        out
    }

    #[test]
    fn every_byte_is_written_so_that_it_reads_back_and_no_control_passes() {
        let mut cases: Vec<Vec<u8>> = vec![
            b"a\xff\xfeb\x01\\".to_vec(),
            "ключ\u{85}\u{9b}[31m\u{1b}[0m\t\r\n✓".as_bytes().to_vec(),
            (0..=255).collect(),
            vec![0xe2, 0x9c], // a character cut short
        ];
        // Pseudo-random bytes, a fixed sequence.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in [1, 7, 64, 1000] {
            let v = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            cases.push(v);
        }
        for bytes in cases {
            let text = escaped(&bytes);
            assert_eq!(unescaped(&text), bytes, "{text}");
            assert!(!text.chars().any(char::is_control), "{text:?}");
            assert!(!text.contains('\u{fffd}'), "{text:?}");
        }
        assert_eq!(escaped(b"a\xff\xfeb\x01\\"), "a\\xff\\xfeb\\x01\\\\");
    }
}
