//! `dhrt-bench` refuses what it cannot run, with exit code 2 and a sentence.
//! (Its runs against a real node are tested in `tests/tests/bench.rs`; this
//! test target also makes `cargo test` build the binary for them.)

use std::net::TcpListener;
use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dhrt-bench"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_arguments_exit_2_with_a_reason() {
    let o = bench(&["-t", "incr"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown test"), "{}", stderr(&o));
    for depth in ["0", "251"] {
        let o = bench(&["-P", depth]);
        assert_eq!(o.status.code(), Some(2), "-P {depth}");
        assert!(stderr(&o).contains("-P"), "{}", stderr(&o));
    }
    let o = bench(&["-r", "1000000000001"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn an_unreachable_node_exits_2() {
    // A port nobody listens on: bound, then released.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let o = bench(&["--addr", &addr, "-n", "1", "-c", "1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot connect"), "{}", stderr(&o));
}
