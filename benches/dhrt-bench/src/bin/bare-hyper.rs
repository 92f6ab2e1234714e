//! The peer for the HTTP benchmark: a bare hyper 1.x server that answers
//! every request with the JSON body `GET /:key` of a 100-byte value returns,
//! with no routing, no storage, nothing else. What dhrt's HTTP layer costs
//! is the difference.
//!
//! `bare-hyper [ADDR]` (default 127.0.0.1:17454).

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:17454".into());
    let body = Bytes::from(format!(r#"{{"Key":"key","Value":"{}"}}"#, "x".repeat(100)));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let mut r = Response::new(Full::new(body.clone()));
                    r.headers_mut()
                        .insert("content-type", "application/json".parse().unwrap());
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
