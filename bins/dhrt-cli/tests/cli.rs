//! The real `dhrt-cli` binary against a node served in this process: one-shot
//! commands with their output and exit codes, and its errors. (The REPL, and
//! the CLI against a real `dhrtd`, are tested in `tests/tests/cli.rs`.)

use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};

use dhrt_cluster::{BinaryLimits, Cluster, Identity, Node, serve_binary};
use dhrt_storage::{Options, Store};

/// A node on a loopback port, served by a runtime that lives as long as the
/// test binary.
fn node() -> &'static str {
    static ADDR: OnceLock<String> = OnceLock::new();
    ADDR.get_or_init(|| {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let node = Arc::new(Node::new(Cluster::single(
            Store::memory(Options::default()),
            Identity {
                id: 7,
                name: "cli-test".into(),
                addr: addr.clone(),
            },
        )));
        runtime.spawn(async move {
            loop {
                let (socket, remote) = listener.accept().await.unwrap();
                tokio::spawn(serve_binary(
                    socket,
                    remote,
                    node.clone(),
                    BinaryLimits::default(),
                    std::future::pending(),
                    dhrt_proto::Proven::ignored(),
                ));
            }
        });
        std::mem::forget(runtime);
        addr
    })
}

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dhrt-cli"))
        .arg("--addr")
        .arg(node())
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn one_shot_commands_print_and_exit_as_documented() {
    let o = cli(&["set", "greeting", "hello world"]);
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(0), "OK\n"));
    let o = cli(&["get", "greeting"]);
    assert_eq!(
        (o.status.code(), stdout(&o).as_str()),
        (Some(0), "hello world\n")
    );
    let o = cli(&["set", "users", "ada", "lovelace"]);
    assert_eq!(o.status.code(), Some(0));
    let o = cli(&["get", "users", "ada"]);
    assert_eq!(stdout(&o), "lovelace\n");
    let o = cli(&["get", "users", "nobody"]);
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(1), "(nil)\n"));
    let o = cli(&["--json", "get", "users", "ada"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v, serde_json::json!({"Key": "ada", "Value": "lovelace"}));
    let o = cli(&["del", "users", "ada"]);
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(0), "OK\n"));
    let o = cli(&["del", "users", "ada"]);
    assert_eq!(o.status.code(), Some(1));
    let o = cli(&["stats"]);
    assert_eq!(o.status.code(), Some(0));
    let stats: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(stats["node"]["name"], "cli-test");
}

#[test]
fn errors_are_sentences_with_exit_code_2() {
    for args in [
        &["frobnicate"][..],
        &["get"],
        &["set", "only-key"],
        &["set", "../x", "k", "v"],
    ] {
        let o = cli(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.starts_with("dhrt-cli: ") && err.len() > 20,
            "{args:?}: {err}"
        );
    }
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_dhrt-cli"))
        .args(["--addr", &dead, "get", "k"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot connect"));
}
