//! A single real node: HTTP routes, the binary protocol on the same port,
//! bad input, graceful shutdown and restart.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use dhrt_proto::{Decoded, Op, Reply, Request, Response, decode_frame, encode_frame, preamble};
use serde_json::{Value, json};

use crate::dhrtd::Dhrtd;

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn http_and_binary_on_one_port_and_data_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &[]);
    assert_eq!(
        node.http("POST", "/greeting/hello", b""),
        (200, r#"{"Key":"greeting","Value":"hello"}"#.into())
    );
    assert_eq!(node.http("GET", "/greeting", b"").0, 200);
    assert_eq!(node.http("POST", "/users/ada/lovelace", b"").0, 200);
    assert_eq!(
        json_of(&node.http("GET", "/users", b"").1),
        json!([{"Key": "ada", "Value": "lovelace"}])
    );
    assert_eq!(node.http("PUT", "/files/a%2Fb", b"body value").0, 200);
    assert_eq!(
        json_of(&node.http("GET", "/files/a%2Fb", b"").1),
        json!({"Key": "a/b", "Value": "body value"})
    );
    let (status, metrics) = node.http("GET", "/metrics", b"");
    assert_eq!(status, 200);
    for want in [
        r#"dhrt_requests_total{op="set",outcome="ok"} 3"#,
        r#"dhrt_requests_total{op="get",outcome="ok"} 2"#,
        r#"dhrt_collection_keys{collection="users"} 1"#,
        r#"dhrt_request_duration_seconds_bucket{op="set",outcome="ok",le="+Inf"} 3"#,
        "dhrt_build_info{",
    ] {
        assert!(metrics.contains(want), "{want} missing from:\n{metrics}");
    }
    let stats = json_of(&node.http("GET", "/", b"").1);
    assert_eq!(stats["node"]["mode"], "persisted");
    assert_eq!(stats["members"][0]["state"], "healthy");
    let names: Vec<&str> = stats["collections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "files", "users"]);

    // The binary protocol on the same port.
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut wire = preamble().to_vec();
    encode_frame(
        &Request {
            id: 1,
            op: Op::Ping,
        },
        &mut wire,
        1 << 20,
    )
    .unwrap();
    let get = Op::Get {
        collection: "users".into(),
        key: Bytes::from_static(b"ada"),
    };
    encode_frame(&Request { id: 2, op: get }, &mut wire, 1 << 20).unwrap();
    s.write_all(&wire).unwrap();
    let mut buf = Vec::new();
    let mut responses = Vec::new();
    while responses.len() < 2 {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
        while let Decoded::Complete { msg, len } = decode_frame::<Response>(&buf, 1 << 20).unwrap()
        {
            responses.push(msg);
            buf.drain(..len);
        }
    }
    assert_eq!(
        responses[0],
        Response {
            id: 1,
            result: Ok(Reply::Pong)
        }
    );
    assert_eq!(
        responses[1],
        Response {
            id: 2,
            result: Ok(Reply::Value(Some(Bytes::from_static(b"lovelace"))))
        }
    );
    drop(s);

    // SIGTERM: exit 0, data flushed; a restart serves the same data.
    assert!(node.stop("TERM").success());
    let node = Dhrtd::start(dir.path(), &[]);
    assert_eq!(
        json_of(&node.http("GET", "/users/ada", b"").1),
        json!({"Key": "ada", "Value": "lovelace"})
    );
    assert_eq!(
        json_of(&node.http("GET", "/greeting", b"").1),
        json!({"Key": "greeting", "Value": "hello"})
    );
    assert!(node.stop("INT").success());
}

#[test]
fn bad_input_gets_4xx_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &["--memory"]);
    for (method, path) in [
        ("GET", "/..%2f..%2fetc/passwd"),
        ("POST", "/%2e%2e%2f/k/v"),
        ("POST", "/a%00b/k/v"),
        ("PUT", "/_system/k"),
        ("GET", "/a/b/c"),
        ("PATCH", "/k"),
    ] {
        let (status, body) = node.http(method, path, b"");
        assert!(
            (400..500).contains(&status),
            "{method} {path} -> {status} {body}"
        );
        assert!(json_of(&body)["Error"].is_string(), "{body}");
    }
    // Garbage on a raw connection, then a client that never speaks.
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.write_all(b"\xd4HRT\x09\x00\x00\x00garbage").unwrap();
    let _idle = TcpStream::connect(node.addr).unwrap();
    assert_eq!(node.http("POST", "/still/alive", b"").0, 200);
    assert!(
        dir.path().read_dir().unwrap().next().is_none(),
        "memory mode wrote files"
    );
    assert!(node.stop("QUIT").success());
}

/// A setting out of its range stops the start with a sentence naming it,
/// rather than being quietly changed to one that works.
#[test]
fn settings_out_of_range_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value) in [
        ("--max-inflight-mib", "16"),
        ("--timeout-ms", "0"),
        ("--idle-timeout-secs", "0"),
        ("--max-clock-offset-ms", "99"),
    ] {
        let (code, said) =
            crate::security::refused(dir.path(), &["--listen", "127.0.0.1:0", flag, value]);
        assert_eq!(code, Some(2), "{flag} {value}: {said}");
        assert!(said.contains(&format!("{flag} must be at least")), "{said}");
    }
}
