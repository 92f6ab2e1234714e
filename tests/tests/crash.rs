//! `dhrtd --sync always` killed with SIGKILL in the middle of a write load
//! loses no write it acknowledged.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dhrt_client::Client;

use crate::dhrtd::Dhrtd;

#[test]
fn sigkill_under_sync_always_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    for round in 0..4 {
        let node = Dhrtd::start(dir.path(), &["--sync", "always"]);
        let addr = node.addr.to_string();
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let (addr, acked) = (addr.clone(), acked.clone());
                runtime.spawn(async move {
                    let Ok(client) = Client::connect(addr).await else {
                        return;
                    };
                    for i in 0.. {
                        let key = format!("r{round}-w{w}-{i}");
                        match client.set("crash", &key, key.clone()).await {
                            Ok(()) => acked.lock().unwrap().push(key),
                            Err(_) => return, // the node is gone
                        }
                    }
                })
            })
            .collect();
        let before = acked.lock().unwrap().len();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while acked.lock().unwrap().len() < before + 100 + round * 50 {
            assert!(
                std::time::Instant::now() < deadline,
                "writes are not being acknowledged"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = node.stop("KILL");
        assert!(!status.success());
        for w in writers {
            runtime.block_on(w).unwrap();
        }
        // Restart on the same directory: every acknowledged key is there.
        let node = Dhrtd::start(dir.path(), &["--sync", "always"]);
        let client = runtime
            .block_on(Client::connect(node.addr.to_string()))
            .unwrap();
        for key in acked.lock().unwrap().iter() {
            let value = runtime.block_on(client.get("crash", key)).unwrap();
            assert_eq!(
                value.as_deref(),
                Some(key.as_bytes()),
                "round {round}: acknowledged {key} lost"
            );
        }
        assert!(node.stop("TERM").success());
    }
    assert!(acked.lock().unwrap().len() >= 4 * 100);
}
