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
