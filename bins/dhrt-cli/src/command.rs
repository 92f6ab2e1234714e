//! The command language shared by one-shot use and the REPL:
//! `set [collection] key value`, `get [collection] key`,
//! `del [collection] key`, `stats`, `join ADDR`, `remove MEMBER`,
//! `replicas COLLECTION|* [N|all]`, `auth TOKEN`, `help`;
//! and two that need no node: `token --role R [--name N]`, `secret`.

use dhrt_proto::{Op, Role};

/// The collection used when a command names none.
pub(crate) const DEFAULT_COLLECTION: &str = "default";

/// The command names, for completion and help.
pub(crate) const NAMES: [&str; 14] = [
    "set", "get", "del", "watch", "stats", "join", "remove", "replicas", "auth", "token", "secret",
    "help", "quit", "exit",
];

pub(crate) const HELP: &str = "\
commands:
  set [collection] key value   set a key (collection defaults to \"default\")
  get [collection] key         print a value, or (nil)
  del [collection] key         delete a key
  watch COLLECTION [--since TOKEN] [--snapshot] [--prefix P]
                               print each change of COLLECTION as it happens, one a line
                               (kind, key, value, resume token, tab-separated, with tab,
                               newline, CR and backslash written \\t \\n \\r \\\\, other
                               control characters and bytes that are not UTF-8 \\xNN,
                               byte by byte; --json for JSON lines), resuming by
                               itself after a disconnect (said on stderr); exits 2 if the
                               node cannot be reached at the start; Ctrl-C stops
  stats                        node and cluster statistics
  join ADDR                    make the node join the cluster of the member at ADDR
  remove MEMBER                remove a dead member that will not come back (its id or
                               address; admin): its collections get new owners
  replicas COLLECTION [N|all]  a collection's replication factor and owners; with N or
                               all, set it first (admin); COLLECTION * is the cluster's
                               default
  auth TOKEN                   use TOKEN on this connection from now on
  token --role ROLE [--name N] a new token (read, write or admin): the token on the
                               first line, the line for dhrtd's --auth-file on the second
  secret                       a new cluster secret for --cluster-secret
  help                         this text
  quit | exit                  leave the REPL
words with spaces go in double quotes: set greeting \"hello world\"";

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Set {
        collection: String,
        key: String,
        value: String,
    },
    Get {
        collection: String,
        key: String,
    },
    Del {
        collection: String,
        key: String,
    },
    Stats,
    Watch {
        collection: String,
        since: Option<String>,
        snapshot: bool,
        prefix: Option<String>,
    },
    Join {
        addr: String,
    },
    Remove {
        member: String,
    },
    Replicas {
        /// `None`: the cluster's default (`*` on the command line).
        collection: Option<String>,
        set: Option<String>,
    },
    Auth {
        token: String,
    },
    Token {
        role: Role,
        name: String,
    },
    Secret,
    Help,
    Quit,
}

impl Command {
    /// The protocol operation, for commands that talk to the node.
    pub(crate) fn op(&self) -> Option<Op> {
        Some(match self {
            Command::Set {
                collection,
                key,
                value,
            } => Op::Set {
                collection: collection.clone(),
                key: key.clone().into_bytes().into(),
                value: value.clone().into_bytes().into(),
            },
            Command::Get { collection, key } => Op::Get {
                collection: collection.clone(),
                key: key.clone().into_bytes().into(),
            },
            Command::Del { collection, key } => Op::Delete {
                collection: collection.clone(),
                key: key.clone().into_bytes().into(),
            },
            Command::Stats => Op::Stats,
            Command::Join { addr } => Op::Join { addr: addr.clone() },
            Command::Remove { member } => Op::RemoveMember {
                member: member.clone(),
            },
            Command::Replicas { collection, set } => Op::Replicas {
                collection: collection.clone(),
                set: set.clone(),
            },
            Command::Auth { token } => Op::Auth {
                token: token.clone(),
            },
            Command::Token { .. }
            | Command::Secret
            | Command::Help
            | Command::Quit
            | Command::Watch { .. } => {
                return None;
            }
        })
    }
}

/// Splits a line into words; double quotes group words, `\"` and `\\`
/// escape inside them.
pub(crate) fn split(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else { break };
        let mut word = String::new();
        if first == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("unterminated quote".into()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => word.push(c),
                        None => return Err("unterminated quote".into()),
                    },
                    Some(c) => word.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        words.push(word);
    }
    Ok(words)
}

/// Parses the words of one command.
pub(crate) fn parse(words: &[String]) -> Result<Command, String> {
    let Some((name, args)) = words.split_first() else {
        return Err("empty command (try help)".into());
    };
    let with_collection = |args: &[String]| -> (String, String) {
        match args {
            [key] => (DEFAULT_COLLECTION.to_string(), key.clone()),
            [collection, key] => (collection.clone(), key.clone()),
            _ => unreachable!("arity checked by the caller"),
        }
    };
    match (name.to_ascii_lowercase().as_str(), args.len()) {
        ("set", 2) => Ok(Command::Set {
            collection: DEFAULT_COLLECTION.into(),
            key: args[0].clone(),
            value: args[1].clone(),
        }),
        ("set", 3) => Ok(Command::Set {
            collection: args[0].clone(),
            key: args[1].clone(),
            value: args[2].clone(),
        }),
        ("set", _) => Err("usage: set [collection] key value".into()),
        ("get", 1 | 2) => {
            let (collection, key) = with_collection(args);
            Ok(Command::Get { collection, key })
        }
        ("get", _) => Err("usage: get [collection] key".into()),
        ("del", 1 | 2) => {
            let (collection, key) = with_collection(args);
            Ok(Command::Del { collection, key })
        }
        ("del", _) => Err("usage: del [collection] key".into()),
        ("watch", _) => parse_watch(args),
        ("stats", 0) => Ok(Command::Stats),
        ("stats", _) => Err("usage: stats".into()),
        ("join", 1) => Ok(Command::Join {
            addr: args[0].clone(),
        }),
        ("join", _) => Err("usage: join ADDR (another member's host:port)".into()),
        ("remove", 1) => Ok(Command::Remove {
            member: args[0].clone(),
        }),
        ("remove", _) => Err("usage: remove MEMBER (a dead member's id or address)".into()),
        ("replicas", 1 | 2) => Ok(Command::Replicas {
            collection: (args[0] != "*").then(|| args[0].clone()),
            set: args.get(1).cloned(),
        }),
        ("replicas", _) => {
            Err("usage: replicas COLLECTION [N|all] (COLLECTION * is the cluster's default)".into())
        }
        ("auth", 1) => Ok(Command::Auth {
            token: args[0].clone(),
        }),
        ("auth", _) => Err("usage: auth TOKEN".into()),
        ("token", _) => parse_token(args),
        ("secret", 0) => Ok(Command::Secret),
        ("secret", _) => Err("usage: secret".into()),
        ("help", _) => Ok(Command::Help),
        ("quit" | "exit", _) => Ok(Command::Quit),
        (other, _) => Err(format!("unknown command {other:?} (try help)")),
    }
}

/// `watch COLLECTION [--since TOKEN] [--snapshot] [--prefix P]`.
fn parse_watch(args: &[String]) -> Result<Command, String> {
    const USAGE: &str = "usage: watch COLLECTION [--since TOKEN] [--snapshot] [--prefix P]";
    let mut collection = None;
    let (mut since, mut snapshot, mut prefix) = (None, false, None);
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || inline.clone().or_else(|| args.next().cloned()).ok_or(USAGE);
        match flag {
            "--since" => since = Some(value()?),
            "--prefix" => prefix = Some(value()?),
            "--snapshot" => snapshot = true,
            f if f.starts_with("--") => return Err(USAGE.into()),
            _ if collection.is_none() => collection = Some(arg.clone()),
            _ => return Err(USAGE.into()),
        }
    }
    Ok(Command::Watch {
        collection: collection.ok_or(USAGE)?,
        since,
        snapshot,
        prefix,
    })
}

/// `token --role ROLE [--name NAME]`.
fn parse_token(args: &[String]) -> Result<Command, String> {
    const USAGE: &str = "usage: token --role read|write|admin [--name NAME]";
    let (mut role, mut name) = (None, String::new());
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (flag.as_str(), None),
        };
        let value = inline
            .or_else(|| args.next().cloned())
            .ok_or_else(|| USAGE.to_string())?;
        match flag {
            "--role" => role = Some(value.parse::<Role>()?),
            "--name" if value.chars().any(char::is_control) => {
                return Err("a token's name may not hold control characters".into());
            }
            "--name" => name = value,
            _ => return Err(USAGE.into()),
        }
    }
    let role = role.ok_or_else(|| USAGE.to_string())?;
    Ok(Command::Token { role, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        split(s).unwrap()
    }

    #[test]
    fn splitting_and_quotes() {
        assert_eq!(words("  set a  b "), ["set", "a", "b"]);
        assert_eq!(words(r#"set k "hello world""#), ["set", "k", "hello world"]);
        assert_eq!(words(r#"set k "say \"hi\"""#), ["set", "k", r#"say "hi""#]);
        assert_eq!(words(r#"set k """#), ["set", "k", ""]);
        assert!(split(r#"set k "open"#).is_err());
    }

    #[test]
    fn parsing_with_and_without_a_collection() {
        assert_eq!(
            parse(&words("set k v")).unwrap(),
            Command::Set {
                collection: "default".into(),
                key: "k".into(),
                value: "v".into()
            }
        );
        assert_eq!(
            parse(&words("SET users ada lovelace")).unwrap(),
            Command::Set {
                collection: "users".into(),
                key: "ada".into(),
                value: "lovelace".into()
            }
        );
        assert_eq!(
            parse(&words("get k")).unwrap(),
            Command::Get {
                collection: "default".into(),
                key: "k".into()
            }
        );
        assert_eq!(
            parse(&words("del c k")).unwrap(),
            Command::Del {
                collection: "c".into(),
                key: "k".into()
            }
        );
        assert_eq!(parse(&words("stats")).unwrap(), Command::Stats);
        assert_eq!(
            parse(&words("replicas users 3")).unwrap(),
            Command::Replicas {
                collection: Some("users".into()),
                set: Some("3".into())
            }
        );
        assert_eq!(
            parse(&words("replicas *")).unwrap(),
            Command::Replicas {
                collection: None,
                set: None
            }
        );
        assert!(parse(&words("replicas")).is_err());
        assert_eq!(
            parse(&words("remove 00000000000000ff")).unwrap(),
            Command::Remove {
                member: "00000000000000ff".into()
            }
        );
        assert!(parse(&words("remove")).is_err());
        assert_eq!(
            parse(&words("join 10.0.0.2:7453")).unwrap(),
            Command::Join {
                addr: "10.0.0.2:7453".into()
            }
        );
        assert_eq!(
            parse(&words("token --role write --name \"app one\"")).unwrap(),
            Command::Token {
                role: Role::Write,
                name: "app one".into()
            }
        );
        assert_eq!(
            parse(&words("token --role=admin")).unwrap(),
            Command::Token {
                role: Role::Admin,
                name: String::new()
            }
        );
        assert_eq!(parse(&words("secret")).unwrap(), Command::Secret);
        for bad in [
            "token",
            "token --role",
            "token --role owner",
            "token --rol read",
            "secret x",
            "auth",
            "set k",
            "get",
            "get a b c",
            "del",
            "stats x",
            "frobnicate",
            "",
        ] {
            assert!(parse(&words(bad)).is_err(), "{bad:?}");
        }
    }
}
