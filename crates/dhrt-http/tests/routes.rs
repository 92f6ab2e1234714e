//! Every route of DESIGN §6 with its exact JSON shape and status.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use dhrt_http::{Api, Limits};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use crate::node::{MAX_VALUE, MapNode};

pub(crate) fn api() -> Arc<Api<MapNode>> {
    Api::new(
        Arc::new(MapNode::default()),
        Limits {
            max_body: 2 << 20,
            list_batch: 7,
            ..Limits::default()
        },
    )
}

pub(crate) async fn call(
    api: &Arc<Api<MapNode>>,
    method: Method,
    uri: &str,
    body: &[u8],
) -> (StatusCode, Bytes) {
    call_with(api, Request::builder().method(method).uri(uri), body).await
}

async fn call_with(
    api: &Arc<Api<MapNode>>,
    req: http::request::Builder,
    body: &[u8],
) -> (StatusCode, Bytes) {
    let req = req.body(Full::new(Bytes::copy_from_slice(body))).unwrap();
    let resp = api.clone().handle(req).await;
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

fn parse(b: &Bytes) -> Value {
    serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(b)))
}

async fn ok_json(api: &Arc<Api<MapNode>>, method: Method, uri: &str, body: &[u8]) -> Value {
    let (status, b) = call(api, method.clone(), uri, body).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{method} {uri}: {}",
        String::from_utf8_lossy(&b)
    );
    parse(&b)
}

async fn error(
    api: &Arc<Api<MapNode>>,
    method: Method,
    uri: &str,
    body: &[u8],
) -> (StatusCode, String) {
    let (status, b) = call(api, method, uri, body).await;
    let v = parse(&b);
    (
        status,
        v["Error"]
            .as_str()
            .unwrap_or_else(|| panic!("no Error field: {v}"))
            .to_string(),
    )
}

#[tokio::test]
async fn set_get_delete_in_default_and_named_collections() {
    let api = api();
    assert_eq!(
        ok_json(&api, Method::POST, "/greeting/hello", b"").await,
        json!({"Key": "greeting", "Value": "hello"})
    );
    assert_eq!(
        ok_json(&api, Method::GET, "/greeting", b"").await,
        json!({"Key": "greeting", "Value": "hello"})
    );
    assert_eq!(
        ok_json(&api, Method::GET, "/default/greeting", b"").await,
        json!({"Key": "greeting", "Value": "hello"})
    );
    assert_eq!(
        ok_json(&api, Method::POST, "/users/ada/lovelace", b"").await,
        json!({"Key": "ada", "Value": "lovelace"})
    );
    assert_eq!(
        ok_json(&api, Method::GET, "/users/ada", b"").await,
        json!({"Key": "ada", "Value": "lovelace"})
    );
    assert_eq!(
        ok_json(&api, Method::DELETE, "/users/ada", b"").await,
        json!({"Key": "ada"})
    );
    let (status, msg) = error(&api, Method::GET, "/users/ada", b"").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(msg.contains("not found"), "{msg}");
    assert_eq!(
        error(&api, Method::DELETE, "/users/ada", b"").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        ok_json(&api, Method::DELETE, "/greeting", b"").await,
        json!({"Key": "greeting"})
    );
    assert_eq!(
        error(&api, Method::GET, "/greeting", b"").await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn a_single_segment_means_the_collection_when_it_exists() {
    let api = api();
    ok_json(&api, Method::POST, "/fruit/apple/red", b"").await;
    ok_json(&api, Method::POST, "/fruit/banana/yellow", b"").await;
    ok_json(&api, Method::POST, "/fruit/fig", b"").await; // the key "fruit" of default
    assert_eq!(
        ok_json(&api, Method::GET, "/fruit", b"").await,
        json!([{"Key": "apple", "Value": "red"}, {"Key": "banana", "Value": "yellow"}])
    );
    assert_eq!(
        ok_json(&api, Method::GET, "/default/fruit", b"").await,
        json!({"Key": "fruit", "Value": "fig"})
    );
    assert_eq!(
        ok_json(&api, Method::DELETE, "/fruit", b"").await,
        json!(["apple", "banana"])
    );
    // Now that the collection is gone, the segment names the key.
    assert_eq!(
        ok_json(&api, Method::GET, "/fruit", b"").await,
        json!({"Key": "fruit", "Value": "fig"})
    );
    assert_eq!(
        ok_json(&api, Method::DELETE, "/fruit", b"").await,
        json!({"Key": "fruit"})
    );
}

/// `DELETE /x` of a collection this node holds nothing of, that another
/// node holds (a write to it through that node has not reached this one),
/// drops it: it does not delete the key `x` of `default` instead.
#[tokio::test]
async fn a_delete_of_a_collection_held_only_elsewhere_drops_it_not_the_key() {
    let api = api();
    ok_json(&api, Method::POST, "/fruit/precious", b"").await;
    api_node(&api)
        .elsewhere
        .lock()
        .unwrap()
        .push("fruit".into());
    assert_eq!(
        ok_json(&api, Method::DELETE, "/fruit", b"").await,
        json!([])
    );
    assert_eq!(
        ok_json(&api, Method::GET, "/default/fruit", b"").await,
        json!({"Key": "fruit", "Value": "precious"})
    );
    // Held nowhere: the key.
    api_node(&api).elsewhere.lock().unwrap().clear();
    assert_eq!(
        ok_json(&api, Method::DELETE, "/fruit", b"").await,
        json!({"Key": "fruit"})
    );
}

/// A drop of many keys lists them all (sent a piece at a time).
#[tokio::test]
async fn a_drop_of_many_keys_lists_every_one() {
    let api = api();
    let mut expected = Vec::new();
    for i in 0..20_000 {
        let key = format!("k{i:05}-ключ");
        let uri = format!("/many/{}", urlencode(&key));
        ok_json(&api, Method::PUT, &uri, b"v").await;
        expected.push(key);
    }
    assert_eq!(
        ok_json(&api, Method::DELETE, "/many", b"").await,
        json!(expected)
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn listings_stream_in_batches_with_limit_and_after() {
    let api = api();
    for i in 0..50 {
        ok_json(&api, Method::POST, &format!("/many/k{i:02}/v{i}"), b"").await;
    }
    let all = ok_json(&api, Method::GET, "/many", b"").await;
    let keys: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 50);
    assert_eq!(keys[0], "k00");
    assert_eq!(keys[49], "k49");
    let page = ok_json(&api, Method::GET, "/many?limit=10&after=k09", b"").await;
    let keys: Vec<&str> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        (10..20).map(|i| format!("k{i:02}")).collect::<Vec<_>>()
    );
    assert_eq!(
        ok_json(&api, Method::GET, "/many?limit=0", b"").await,
        json!([])
    );
    assert_eq!(
        ok_json(&api, Method::GET, "/many?after=k49", b"").await,
        json!([])
    );
    assert_eq!(
        error(&api, Method::GET, "/many?limit=-1", b"").await.0,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn keys_that_are_not_utf8_are_paged_by_their_base64_bytes() {
    use base64::Engine;
    let api = api();
    // Keys ff00 .. ff09 (not UTF-8) and a0 .. a9 (ASCII).
    for i in 0..10u8 {
        let (status, _) = call(&api, Method::PUT, &format!("/odd/%FF%0{i}"), b"v").await;
        assert_eq!(status, StatusCode::OK);
        ok_json(&api, Method::POST, &format!("/odd/a{i}/v"), b"").await;
    }
    let mut seen = Vec::new();
    let mut after = String::new();
    for _ in 0..40 {
        let page = ok_json(&api, Method::GET, &format!("/odd?limit=3{after}"), b"").await;
        let page = page.as_array().unwrap();
        let Some(last) = page.last() else { break };
        for e in page {
            seen.push(match e.get("KeyBase64") {
                Some(b) => base64::engine::general_purpose::STANDARD
                    .decode(b.as_str().unwrap())
                    .unwrap(),
                None => e["Key"].as_str().unwrap().as_bytes().to_vec(),
            });
        }
        let bytes = match last.get("KeyBase64") {
            Some(b) => base64::engine::general_purpose::STANDARD
                .decode(b.as_str().unwrap())
                .unwrap(),
            None => last["Key"].as_str().unwrap().as_bytes().to_vec(),
        };
        after = format!(
            "&after={}",
            bytes
                .iter()
                .map(|b| format!("%{b:02X}"))
                .collect::<String>()
        );
    }
    let mut want: Vec<Vec<u8>> = (0..10u8)
        .flat_map(|i| [vec![0xff, i], format!("a{i}").into_bytes()])
        .collect();
    want.sort();
    assert_eq!(seen, want, "each key once, in order, and the paging ends");
}

#[tokio::test]
async fn a_listing_that_fails_midway_is_cut_not_completed() {
    let api = api();
    for i in 0..30 {
        ok_json(&api, Method::POST, &format!("/c/k{i:02}/v"), b"").await;
    }
    // The first batch succeeds (and the status is sent); the third fails.
    let node: &MapNode = api_node(&api);
    *node.fail_list_after.lock().unwrap() = Some(2);
    let req = Request::get("/c").body(Full::new(Bytes::new())).unwrap();
    let resp = api.clone().handle(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.into_body().collect().await.is_err(),
        "an aborted listing must not look complete"
    );
}

fn api_node(api: &Arc<Api<MapNode>>) -> &MapNode {
    api.ops()
}

/// Status, content type and body of a response.
async fn answer(
    api: &Arc<Api<MapNode>>,
    req: http::request::Builder,
) -> (StatusCode, Option<http::HeaderValue>, Bytes) {
    let resp = api.handle(req.body(Full::new(Bytes::new())).unwrap()).await;
    let content_type = resp.headers().get(http::header::CONTENT_TYPE).cloned();
    (
        resp.status(),
        content_type,
        resp.into_body().collect().await.unwrap().to_bytes(),
    )
}

#[tokio::test]
async fn gets_answered_at_once_match_gets_answered_the_long_way() {
    let (slow, fast) = (api(), api());
    api_node(&fast).answers_now.store(true, Ordering::Relaxed);
    for api in [&slow, &fast] {
        ok_json(api, Method::POST, "/key/value", b"").await;
        ok_json(api, Method::POST, "/fruit/apple/red", b"").await;
        ok_json(api, Method::POST, "/fruit/fig/%22quoted%22", b"").await;
        call(api, Method::PUT, "/bin/%ff%fe", &[0, 159, 146, 150]).await;
    }
    let gets = [
        "/key",
        "/default/key",
        "/fruit/apple",
        "/fruit/fig",
        "/bin/%ff%fe",
        "/missing",
        "/fruit/missing",
        "/fruit",
        "/fruit?limit=1",
        "/bad%20name/k",
        "/",
        "/metrics",
    ];
    for uri in gets {
        for accept in [None, Some("application/octet-stream")] {
            let request = || {
                let r = Request::builder().method(Method::GET).uri(uri);
                match accept {
                    Some(a) => r.header(http::header::ACCEPT, a),
                    None => r,
                }
            };
            assert_eq!(
                answer(&slow, request()).await,
                answer(&fast, request()).await,
                "GET {uri} (Accept: {accept:?})"
            );
        }
    }
    // Smuggling is refused on the hot path too.
    let smuggled = || {
        Request::builder()
            .method(Method::GET)
            .uri("/key")
            .header(http::header::CONTENT_LENGTH, "0")
            .header(http::header::TRANSFER_ENCODING, "chunked")
    };
    let (status, ..) = answer(&fast, smuggled()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        answer(&slow, smuggled()).await,
        answer(&fast, smuggled()).await
    );
    // The keys (and the key that was missing) were answered at once; the
    // listings, stats and metrics were not.
    let answered_now = api_node(&fast).answered_now.load(Ordering::Relaxed);
    assert_eq!(answered_now, 2 * 8, "gets answered through get_now");
    assert_eq!(api_node(&slow).answered_now.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn put_takes_the_value_from_the_body_and_binary_values_survive() {
    let api = api();
    let value: Vec<u8> = (0..=255u8).collect();
    assert_eq!(
        ok_json(&api, Method::PUT, "/bin", &value).await,
        json!({"Key": "bin", "Bytes": 256})
    );
    assert_eq!(
        ok_json(&api, Method::PUT, "/files/a%2Fb.txt", b"slashes/ok").await,
        json!({"Key": "a/b.txt", "Bytes": 10})
    );
    assert_eq!(
        ok_json(&api, Method::GET, "/files/a%2Fb.txt", b"").await,
        json!({"Key": "a/b.txt", "Value": "slashes/ok"})
    );
    // Not UTF-8: JSON carries base64; octet-stream carries the bytes.
    let v = ok_json(&api, Method::GET, "/bin", b"").await;
    assert!(v.get("Value").is_none());
    assert_eq!(v["ValueBase64"].as_str().unwrap().len(), 344);
    let (status, raw) = call_with(
        &api,
        Request::builder()
            .uri("/default/bin")
            .header("accept", "application/octet-stream"),
        b"",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&raw[..], &value[..]);
}

#[tokio::test]
async fn metrics_come_from_the_node_as_prometheus_text() {
    let api = api();
    ok_json(&api, Method::POST, "/c/k/v", b"").await;
    let (status, body) = call(&api, Method::GET, "/metrics", b"").await;
    assert_eq!(status, StatusCode::OK);
    // The node's metrics, then the API's own: who is admitted, and how
    // many requests were refused.
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.starts_with("map_entries 1\n"), "{text}");
    assert!(
        text.contains("dhrt_auth_tokens{mode=\"loopback-only\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains("dhrt_auth_refused_total{reason=\"unauthenticated\"} 0\n"),
        "{text}"
    );
}

#[tokio::test]
async fn stats_have_the_documented_shape() {
    let api = api();
    ok_json(&api, Method::POST, "/c/k/v", b"").await;
    let s = ok_json(&api, Method::GET, "/", b"").await;
    for field in [
        "id", "name", "addr", "version", "mode", "data_dir", "uptime_s",
    ] {
        assert!(s["node"].get(field).is_some(), "node.{field}");
    }
    assert_eq!(
        s["collections"],
        json!([{"name": "c", "keys": 1, "bytes": 1, "digest": "", "replicas": "all",
                "owners": [], "under_replicated": false, "moving": null}])
    );
    assert_eq!(s["members"][0]["state"], "healthy");
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_with_the_right_status() {
    let api = api();
    for (method, uri, status) in [
        (Method::GET, "/a/b/c", StatusCode::NOT_FOUND),
        (Method::PATCH, "/k", StatusCode::METHOD_NOT_ALLOWED),
        (Method::GET, "/..%2f/k", StatusCode::BAD_REQUEST),
        (Method::GET, "/%2e%2e%2f/k", StatusCode::BAD_REQUEST),
        (Method::POST, "/a%00b/k/v", StatusCode::BAD_REQUEST),
        (Method::POST, "/../k/v", StatusCode::BAD_REQUEST),
        (Method::PUT, "/a.b/k", StatusCode::BAD_REQUEST),
        (Method::GET, "//", StatusCode::NOT_FOUND),
        (Method::GET, "/c?bogus=1", StatusCode::BAD_REQUEST),
        (Method::GET, "/c?limit=1&limit=2", StatusCode::BAD_REQUEST),
        // Routes that take no parameter refuse any.
        (Method::GET, "/?bogus=1", StatusCode::BAD_REQUEST),
        (Method::GET, "/?limit=abc", StatusCode::BAD_REQUEST),
        (Method::GET, "/default/k?bogus=1", StatusCode::BAD_REQUEST),
        (Method::POST, "/q1/k/v?bogus=1", StatusCode::BAD_REQUEST),
        (Method::PUT, "/q1/k?x", StatusCode::BAD_REQUEST),
        (Method::DELETE, "/q1/k?x=1", StatusCode::BAD_REQUEST),
        (Method::GET, "/metrics?bogus=1", StatusCode::BAD_REQUEST),
        (Method::GET, "/c?replicas&limit=5", StatusCode::BAD_REQUEST),
        (
            Method::DELETE,
            "/?member=x&limit=5",
            StatusCode::BAD_REQUEST,
        ),
        // A watch would ignore a listing's paging.
        (Method::GET, "/?watch=c&limit=5", StatusCode::BAD_REQUEST),
        (Method::GET, "/?watch=c&after=x", StatusCode::BAD_REQUEST),
    ] {
        let (got, msg) = error(&api, method.clone(), uri, b"").await;
        assert_eq!(got, status, "{method} {uri}: {msg}");
        assert!(!msg.is_empty());
    }
    for accept in ["application/x-ndjson", "text/event-stream"] {
        for query in ["limit=5", "after=k"] {
            let (status, b) = call_with(
                &api,
                Request::builder()
                    .method(Method::GET)
                    .uri(format!("/c?{query}"))
                    .header("accept", accept),
                b"",
            )
            .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{accept} {query}");
            assert!(parse(&b)["Error"].as_str().unwrap().contains("not watches"));
        }
    }
    // Over the node's value limit (413 from the node), over the body limit
    // (413 from the API, before the node sees it).
    let big = vec![b'x'; MAX_VALUE + 1];
    assert_eq!(
        error(&api, Method::PUT, "/k", &big).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let huge = vec![b'x'; (2 << 20) + 1];
    let (status, msg) = error(&api, Method::PUT, "/k", &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(msg.contains("limit"), "{msg}");
    // Both Content-Length and Transfer-Encoding: refused.
    let (status, _) = call_with(
        &api,
        Request::builder()
            .method(Method::PUT)
            .uri("/k")
            .header("content-length", "1")
            .header("transfer-encoding", "chunked"),
        b"x",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn tokens_and_roles_decide_who_may_do_what() {
    use dhrt_proto::auth::{Access, Role, Tokens, auth_line, new_token};
    let (reader, writer, admin) = (new_token(), new_token(), new_token());
    let file = [
        auth_line(Role::Read, &reader, "r"),
        auth_line(Role::Write, &writer, ""),
        auth_line(Role::Admin, &admin, "ops"),
    ]
    .join("\n");
    let api = Api::new(
        Arc::new(MapNode::default()),
        Limits {
            access: Access::tokens(Tokens::parse(&file).unwrap()),
            ..Limits::default()
        },
    );
    let send = |method: Method, uri: &'static str, token: Option<&str>| {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("bearer {t}"));
        }
        let api = api.clone();
        async move {
            let resp = api.handle(req.body(Full::new(Bytes::new())).unwrap()).await;
            let challenge = resp.headers().get("www-authenticate").cloned();
            if resp.status() == StatusCode::UNAUTHORIZED {
                // A client without a valid token does not keep the connection.
                assert_eq!(resp.headers().get("connection").unwrap(), "close");
            }
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, challenge, parse(&body))
        }
    };
    // 401 with the Bearer challenge and a sentence, even on the hot path
    // (a GET of a key the node holds) and even from loopback.
    assert_eq!(
        send(Method::POST, "/k/v", Some(&writer)).await.0,
        StatusCode::OK
    );
    for token in [None, Some("dhrt_nope")] {
        let (status, challenge, body) = send(Method::GET, "/k", token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(challenge.unwrap(), "Bearer realm=\"dhrt\"");
        assert!(body["Error"].is_string());
    }
    assert_eq!(
        send(Method::GET, "/k", Some(&reader)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send(Method::GET, "/", Some(&reader)).await.0,
        StatusCode::OK
    );
    let (status, challenge, body) = send(Method::PUT, "/k", Some(&reader)).await;
    assert_eq!((status, challenge), (StatusCode::FORBIDDEN, None));
    assert!(
        body["Error"].as_str().unwrap().contains("write role"),
        "{body}"
    );
    assert_eq!(
        send(Method::DELETE, "/k", Some(&reader)).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(Method::POST, "/c/a/1", Some(&writer)).await.0,
        StatusCode::OK
    );
    // DELETE /c drops the collection c: an admin's job.
    assert_eq!(
        send(Method::DELETE, "/c", Some(&writer)).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(Method::GET, "/c/a", Some(&reader)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send(Method::DELETE, "/c", Some(&admin)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send(Method::GET, "/c/a", Some(&reader)).await.0,
        StatusCode::NOT_FOUND
    );
    // DELETE /x of a key (no collection x) is a writer's.
    assert_eq!(
        send(Method::DELETE, "/k", Some(&writer)).await.0,
        StatusCode::OK
    );
    // The other nodes are asked whether they hold a collection x only for
    // a client that may drop it: a writer's DELETE /x is the key's.
    api_node(&api).elsewhere.lock().unwrap().push("e".into());
    for token in [&writer, &admin] {
        assert_eq!(
            send(Method::POST, "/e/v", Some(&writer)).await.0,
            StatusCode::OK
        );
        assert_eq!(
            send(Method::DELETE, "/e", Some(token)).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(api_node(&api).probed.load(Ordering::Relaxed), 1);
    assert_eq!(
        send(Method::GET, "/default/e", Some(&reader)).await.0,
        StatusCode::OK,
        "the admin's DELETE /e dropped the collection, not the key"
    );
}

/// A web page's request (it carries an `Origin`) is refused unless the
/// node allows its origin; an allowed one gets the CORS headers on every
/// answer, its preflight is answered without a token, and the request
/// after it is authenticated as any other.
#[tokio::test]
async fn web_pages_of_allowed_origins_only() {
    use dhrt_http::Cors;
    use dhrt_proto::auth::{Access, Role, Tokens, auth_line, new_token};
    let writer = new_token();
    let node = |cors: Cors| {
        Api::new(
            Arc::new(MapNode::default()),
            Limits {
                access: Access::tokens(
                    Tokens::parse(&auth_line(Role::Write, &writer, "")).unwrap(),
                ),
                cors,
                ..Limits::default()
            },
        )
    };
    let send = |api: &Arc<Api<MapNode>>, method: Method, uri: &str, headers: &[(&str, &str)]| {
        let mut req = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let api = api.clone();
        let req = req.body(Full::new(Bytes::new())).unwrap();
        async move {
            let resp = api.handle(req).await;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            (parts.status, parts.headers, body)
        }
    };
    let bearer = format!("Bearer {writer}");
    let page = "https://app.example.com";
    // No origin allowed (the default): a page may not even write with a
    // token; clients without an Origin are served as before.
    let closed = node(Cors::default());
    for (method, uri) in [
        (Method::POST, "/c/k/v"),
        (Method::PUT, "/c/k"),
        (Method::DELETE, "/c/k"),
    ] {
        let (status, headers, body) = send(
            &closed,
            method,
            uri,
            &[("origin", page), ("authorization", &bearer)],
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(headers.get("access-control-allow-origin").is_none());
        assert!(String::from_utf8_lossy(&body).contains("--cors-origin"));
    }
    let (status, ..) = send(
        &closed,
        Method::POST,
        "/c/k/v",
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Its reads are answered, without the headers that would let the page
    // see the answer.
    let (status, headers, _) = send(
        &closed,
        Method::GET,
        "/c/k",
        &[("origin", page), ("authorization", &bearer)],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("access-control-allow-origin").is_none());

    let open = node(Cors::new(&[page]).unwrap());
    // Another origin: refused, preflight included.
    let (status, ..) = send(
        &open,
        Method::OPTIONS,
        "/c/k",
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "PUT"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The preflight of the allowed one: 204, no token needed.
    let (status, headers, _) = send(
        &open,
        Method::OPTIONS,
        "/c/k",
        &[
            ("origin", page),
            ("access-control-request-method", "PUT"),
            (
                "access-control-request-headers",
                "authorization, content-type",
            ),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(headers["access-control-allow-origin"], page);
    assert!(
        headers["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("PUT")
    );
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("last-event-id"));
    // The request itself: authenticated as any other, with the headers on
    // success and on failure alike (so the page can read its 401).
    let (status, headers, _) = send(
        &open,
        Method::POST,
        "/c/k/v",
        &[("origin", page), ("authorization", &bearer)],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["access-control-allow-origin"], page);
    let (status, headers, _) = send(&open, Method::GET, "/c/k", &[("origin", page)]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["access-control-allow-origin"], page);
    let (status, headers, body) = send(
        &open,
        Method::GET,
        "/c/k",
        &[
            ("origin", "HTTPS://APP.example.com"),
            ("authorization", &bearer),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert_eq!(
        headers["access-control-allow-origin"],
        "HTTPS://APP.example.com"
    );
    assert_eq!(headers["vary"], "Origin");
    assert_eq!(parse(&body)["Value"], "v");

    // `*`: any page, even a sandboxed one (`null`).
    let any = node(Cors::new(&["*"]).unwrap());
    let (status, headers, _) = send(
        &any,
        Method::POST,
        "/c/k/w",
        &[("origin", "null"), ("authorization", &bearer)],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["access-control-allow-origin"], "null");
}

/// A value handed to the node owns its bytes: the node may keep it for as
/// long as a peer is away (a hint), and a view into the connection's read
/// buffer kept that whole buffer (8 KiB and more) for each 100-byte value.
#[tokio::test]
async fn a_value_is_not_a_view_into_the_buffer_it_came_in() {
    let api = api();
    let buffer = Bytes::from(vec![7u8; 8192]);
    let req = Request::builder()
        .method(Method::PUT)
        .uri("/c/k")
        .body(Full::new(buffer.slice(100..200)))
        .unwrap();
    let resp = api.handle(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(buffer.is_unique(), "the stored value keeps the buffer");
    let (status, _, body) = answer(
        &api,
        Request::builder()
            .uri("/c/k")
            .header("accept", "application/octet-stream"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, buffer.slice(100..200));
}

#[tokio::test]
async fn a_large_value_is_escaped_in_pieces_and_arrives_whole() {
    let api = api();
    let control = vec![1u8; 1 << 20];
    assert_eq!(
        call(&api, Method::PUT, "/big", &control).await.0,
        StatusCode::OK
    );
    let (status, body) = call(&api, Method::GET, "/big", b"").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body.len(),
        (1 << 20) * 6 + r#"{"Key":"big","Value":""}"#.len()
    );
    let v = parse(&body);
    assert_eq!(v["Value"].as_str().unwrap().as_bytes(), &control[..]);
    // Not UTF-8: base64, in pieces too.
    let mut binary = vec![0xffu8; (1 << 20) - 1];
    binary[7] = 0;
    assert_eq!(
        call(&api, Method::PUT, "/c/bin", &binary).await.0,
        StatusCode::OK
    );
    let (_, body) = call(&api, Method::GET, "/c/bin", b"").await;
    let v = parse(&body);
    let b64 = v["ValueBase64"].as_str().unwrap();
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert_eq!(decoded, binary);
    // And in a listing.
    let (_, body) = call(&api, Method::GET, "/c", b"").await;
    let v = parse(&body);
    assert_eq!(v[0]["ValueBase64"].as_str().unwrap(), b64);
}
