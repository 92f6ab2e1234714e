//! TLS on a real `dhrtd`'s one port, with certificates made here: HTTP
//! through curl, the binary protocol through `dhrt-client` and `dhrt-cli`,
//! client certificates, and a cluster whose peers reach each other off
//! loopback, where a TLS node speaks nothing else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dhrt_client::Client;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use crate::cli::cli_binary;
use crate::dhrtd::{Dhrtd, http_at};
use crate::security::{SECRET, host_ip};

/// PEM files of a CA, a node certificate it signed (for localhost,
/// 127.0.0.1 and this machine's address) and a client certificate it
/// signed; and of a second CA nobody trusts, with its own client.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let new_ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            (cert, Issuer::new(params, key))
        };
        let leaf = |names: Vec<String>, issuer: &Issuer<'_, KeyPair>| {
            let params = CertificateParams::new(names).unwrap();
            let key = KeyPair::generate().unwrap();
            (params.signed_by(&key, issuer).unwrap(), key)
        };
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
        let (ca_cert, ca) = new_ca("dhrt test CA");
        write("ca.pem", ca_cert.pem());
        let names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            host_ip().to_string(),
        ];
        let (node, node_key) = leaf(names, &ca);
        write("node.pem", node.pem());
        write("node.key", node_key.serialize_pem());
        let (client, client_key) = leaf(vec!["client".into()], &ca);
        write("client.pem", client.pem());
        write("client.key", client_key.serialize_pem());
        let (_, stranger_ca) = new_ca("stranger CA");
        let (stranger, stranger_key) = leaf(vec!["stranger".into()], &stranger_ca);
        write("stranger.pem", stranger.pem());
        write("stranger.key", stranger_key.serialize_pem());
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(name)).unwrap()
    }

    /// The flags that give a node TLS.
    fn node_flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path("node.pem"),
            "--tls-key".into(),
            self.path("node.key"),
        ]
    }
}

fn curl(args: &[&str]) -> (bool, String) {
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl");
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), text)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn http_and_the_binary_protocol_over_tls_with_certificates_made_here() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let flags = pki.node_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = Dhrtd::start(&dir.path().join("data"), &flags);
    let port = node.addr.port();
    let url = |path: &str| format!("https://127.0.0.1:{port}{path}");

    // HTTP: curl trusting the CA.
    let ca = pki.path("ca.pem");
    let (ok, out) = curl(&["--cacert", &ca, "-X", "POST", &url("/users/ada/lovelace")]);
    assert!(ok, "{out}");
    assert_eq!(out, r#"{"Key":"ada","Value":"lovelace"}"#);
    let (ok, out) = curl(&["--cacert", &ca, &url("/users/ada")]);
    assert!(ok && out.contains("lovelace"), "{out}");
    // Without the CA, curl refuses the node's certificate.
    let (ok, out) = curl(&[&url("/users/ada")]);
    assert!(!ok, "{out}");
    // Plain HTTP still works on loopback.
    assert_eq!(node.http("GET", "/users/ada", b"").0, 200);

    // The binary protocol: dhrt-client and dhrt-cli, trusting the CA.
    let addr = format!("127.0.0.1:{port}");
    runtime().block_on(async {
        let c = Client::builder(addr.clone())
            .tls_ca(pki.read("ca.pem"))
            .connect()
            .await
            .unwrap();
        c.set("users", "grace", "hopper").await.unwrap();
        assert_eq!(
            c.get("users", "ada").await.unwrap().as_deref(),
            Some(&b"lovelace"[..])
        );
        // Trusting another CA: the handshake fails.
        let e = Client::builder(addr.clone())
            .tls_ca(pki.read("stranger.pem"))
            .connect()
            .await;
        assert!(e.is_err());
    });
    let o = Command::new(cli_binary())
        .args(["--addr", &addr, "--tls-ca", &ca, "get", "users", "grace"])
        .output()
        .unwrap();
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).as_ref()),
        (Some(0), "hopper\n"),
        "{o:?}"
    );
}

#[test]
fn client_certificates_are_required_when_a_client_ca_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut flags = pki.node_flags();
    flags.extend(["--tls-client-ca".to_string(), pki.path("ca.pem")]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = Dhrtd::start(&dir.path().join("data"), &flags);
    let url = format!("https://127.0.0.1:{}/", node.addr.port());
    let ca = pki.path("ca.pem");
    let (ok, out) = curl(&["--cacert", &ca, &url]);
    assert!(!ok, "no client certificate, yet: {out}");
    let (ok, out) = curl(&[
        "--cacert",
        &ca,
        "--cert",
        &pki.path("stranger.pem"),
        "--key",
        &pki.path("stranger.key"),
        &url,
    ]);
    assert!(!ok, "a certificate of another CA, yet: {out}");
    let (ok, out) = curl(&[
        "--cacert",
        &ca,
        "--cert",
        &pki.path("client.pem"),
        "--key",
        &pki.path("client.key"),
        &url,
    ]);
    assert!(ok && out.contains("\"node\""), "{out}");
    let addr = node.addr.to_string();
    runtime().block_on(async {
        let without = async {
            let c = Client::builder(addr.clone())
                .tls_ca(pki.read("ca.pem"))
                .connect()
                .await?;
            c.ping().await
        };
        assert!(without.await.is_err());
        let c = Client::builder(addr.clone())
            .tls_ca(pki.read("ca.pem"))
            .tls_identity(pki.read("client.pem"), pki.read("client.key"))
            .connect()
            .await
            .unwrap();
        c.ping().await.unwrap();
    });
}

#[test]
fn a_cluster_over_tls_off_loopback_where_plain_text_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let ip = host_ip();
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("0.0.0.0:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let start = |i: usize, join: Option<u16>| {
        let mut args = pki.node_flags();
        args.extend([
            "--listen".into(),
            format!("0.0.0.0:{}", ports[i]),
            "--advertise".into(),
            format!("{ip}:{}", ports[i]),
            "--cluster-secret".into(),
            SECRET.into(),
        ]);
        if let Some(p) = join {
            args.extend(["--node".into(), format!("{ip}:{p}")]);
        }
        crate::security::spawn_node(&dir.path().join(format!("n{i}")), &args)
    };
    let a = start(0, None);
    let b = start(1, Some(ports[0]));
    let local = |i: usize| SocketAddr::from(([127, 0, 0, 1], ports[i]));
    let remote = |i: usize| SocketAddr::new(ip, ports[i]);
    crate::security::wait_serving(local(0));
    crate::security::wait_serving(local(1));

    // Plain text from off loopback: refused, with a sentence for HTTP.
    let (status, body) = http_at(remote(0), "GET", "/", "", b"").unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("TLS only"), "{body}");

    // The peers reach each other at their off-loopback addresses, so
    // over TLS: a write on one is read on the other.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, stats) = http_at(local(1), "GET", "/", "", b"").unwrap();
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        let healthy = stats["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["state"] == "healthy")
            .count();
        if healthy == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no cluster over TLS: {stats}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        http_at(local(0), "POST", "/fruit/apple/red", "", b"")
            .unwrap()
            .0,
        200
    );
    let ca = pki.path("ca.pem");
    let url = format!("https://{ip}:{}/fruit/apple", ports[1]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Off loopback, over TLS: the other node's copy, asked with curl.
        // (No auth file: a client off loopback is refused even over TLS.)
        let (ok, out) = curl(&["--cacert", &ca, &url]);
        assert!(ok, "{out}");
        assert!(out.contains("loopback"), "{out}");
        let (_, body) = http_at(local(1), "GET", "/fruit/apple", "", b"").unwrap();
        if body.contains("red") {
            break;
        }
        assert!(Instant::now() < deadline, "not replicated over TLS: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop((a, b));
}

#[test]
fn a_node_with_half_a_tls_setup_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let o = Command::new(crate::dhrtd::binary())
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--tls-cert",
            &pki.path("node.pem"),
            "--tls-key",
            &pki.path("client.key"),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(said.contains("do not go together"), "{said}");
}
