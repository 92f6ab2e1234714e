//! The real `dhrt-cli` against a real `dhrtd`: one-shot commands with their
//! output and exit codes, and the REPL through piped stdin.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use crate::dhrtd::{Dhrtd, workspace_binary};

pub(crate) fn cli_binary() -> PathBuf {
    workspace_binary(
        "dhrt-cli",
        &[
            "bins/dhrt-cli/src",
            "crates/dhrt-client/src",
            "crates/dhrt-proto/src",
        ],
    )
}

pub(crate) fn cli(node: &Dhrtd, args: &[&str]) -> Output {
    Command::new(cli_binary())
        .arg("--addr")
        .arg(node.addr.to_string())
        .args(args)
        .output()
        .unwrap()
}

pub(crate) fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_cli_against_a_real_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &[]);
    let o = cli(&node, &["set", "greeting", "hello world"]);
    assert_eq!((o.status.code(), out(&o).as_str()), (Some(0), "OK\n"));
    let o = cli(&node, &["get", "greeting"]);
    assert_eq!(
        (o.status.code(), out(&o).as_str()),
        (Some(0), "hello world\n")
    );
    let o = cli(&node, &["set", "users", "ada", "lovelace"]);
    assert_eq!(o.status.code(), Some(0));
    let o = cli(&node, &["get", "users", "nobody"]);
    assert_eq!((o.status.code(), out(&o).as_str()), (Some(1), "(nil)\n"));
    let o = cli(&node, &["--json", "get", "users", "ada"]);
    assert_eq!(out(&o).trim(), r#"{"Key":"ada","Value":"lovelace"}"#);
    // A value that is not UTF-8 comes out whole, in base64, as over HTTP.
    assert_eq!(node.http("PUT", "/users/raw", &[0xff, 0x00, 0xfe]).0, 200);
    let o = cli(&node, &["--json", "get", "users", "raw"]);
    assert_eq!(out(&o).trim(), r#"{"Key":"raw","ValueBase64":"/wD+"}"#);
    let o = cli(&node, &["stats"]);
    let stats: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(stats["collections"].as_array().unwrap().len(), 2);
    // What the CLI wrote, HTTP reads.
    assert_eq!(node.http("GET", "/users/ada", b"").0, 200);
    let o = cli(&node, &["set", "../etc", "k", "v"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid"));

    // The REPL through piped stdin.
    let home = tempfile::tempdir().unwrap();
    let mut child = Command::new(cli_binary())
        .args(["--addr", &node.addr.to_string()])
        .env("HOME", home.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"get users ada\ndel users ada\nget users ada\nnonsense\nstats\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let text = out(&o);
    for want in [
        "lovelace\n",
        "OK\n",
        "(nil)\n",
        "(error) unknown command",
        "\"members\"",
    ] {
        assert!(text.contains(want), "{want:?} missing from {text:?}");
    }

    assert!(node.stop("TERM").success());
    // The CLI's writes survive the restart.
    let node = Dhrtd::start(dir.path(), &[]);
    let o = cli(&node, &["get", "greeting"]);
    assert_eq!(out(&o), "hello world\n");
}

/// Runs the REPL on `node`, feeding it `lines` with the pauses given before
/// each; returns what it printed.
fn repl_with_pauses(node: &Dhrtd, lines: &[(std::time::Duration, &str)]) -> String {
    let home = tempfile::tempdir().unwrap();
    let mut child = Command::new(cli_binary())
        .args(["--addr", &node.addr.to_string()])
        .env("HOME", home.path())
        .env_remove("DHRT_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for (pause, line) in lines {
        std::thread::sleep(*pause);
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    out(&o)
}

#[test]
fn the_repl_connects_again_once_the_node_has_closed_its_connection() {
    use std::time::Duration;
    // The idle timeout closes the REPL's connection between two commands.
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &["--idle-timeout-secs", "1"]);
    let text = repl_with_pauses(
        &node,
        &[
            (Duration::ZERO, "set c k v1"),
            (Duration::from_millis(2500), "get c k"),
        ],
    );
    assert!(!text.contains("lost"), "{text:?}");
    assert_eq!(text, "OK\nv1\n");

    // On a node with an auth file, a REPL started without a token is closed
    // 10 s after connecting; an `auth` typed later connects again with it,
    // and the commands after it use it.
    let (token, line) = crate::security::make_token("write");
    let auth = dir.path().join("auth");
    std::fs::write(&auth, format!("{line}\n")).unwrap();
    let node = Dhrtd::start(
        &dir.path().join("b"),
        &["--auth-file", auth.to_str().unwrap()],
    );
    let text = repl_with_pauses(
        &node,
        &[
            (Duration::from_secs(11), &format!("auth {token}")),
            (Duration::ZERO, "set c k v2"),
            (Duration::ZERO, "get c k"),
        ],
    );
    assert!(!text.contains("lost"), "{text:?}");
    assert!(text.ends_with("OK\nv2\n"), "{text:?}");
}

/// A value holding escape sequences: on a terminal (`script` gives the CLI
/// one), `get` shows them escaped and sends the terminal none; piped, the
/// value comes out byte for byte.
#[test]
fn get_on_a_terminal_sends_it_no_escape_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &[]);
    let value = b"ok\x1b]0;pwned\x07\x1b[2J\\\nline2";
    assert_eq!(node.http("PUT", "/c/k", value).0, 200);
    let piped = cli(&node, &["get", "c", "k"]);
    assert_eq!(piped.stdout, [&value[..], b"\n"].concat());
    let command = format!("{} --addr {} get c k", cli_binary().display(), node.addr);
    let o = Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let shown = out(&o);
    assert!(
        !o.stdout.iter().any(|&b| b == 0x1b || b == 0x07),
        "raw control bytes reached the terminal: {shown:?}"
    );
    assert!(
        shown.contains(r"ok\x1b]0;pwned\x07\x1b[2J\\\nline2"),
        "{shown:?}"
    );
}
