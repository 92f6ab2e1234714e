//! The layering of docs/ARCHITECTURE.md, checked over `cargo metadata`: which
//! dhrt crate may depend on which, and that nothing depends on a binary.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// For each workspace package, the dhrt packages it may depend on (normal and
/// build dependencies; dev-dependencies are free).
fn allowed() -> BTreeMap<&'static str, &'static [&'static str]> {
    BTreeMap::from([
        ("dhrt-storage", &[][..]),
        ("dhrt-proto", &[][..]),
        ("dhrt-cluster", &["dhrt-storage", "dhrt-proto"][..]),
        ("dhrt-http", &["dhrt-proto"][..]),
        ("dhrt-client", &["dhrt-proto"][..]),
        (
            "dhrtd",
            &["dhrt-cluster", "dhrt-http", "dhrt-proto", "dhrt-storage"][..],
        ),
        ("dhrt-cli", &["dhrt-client", "dhrt-proto"][..]),
        ("dhrt-storage-bench", &["dhrt-storage"][..]),
        ("dhrt-bench", &["dhrt-proto"][..]),
        ("dhrt-tests", &[][..]), // dev-dependencies only
    ])
}

const BINARIES: [&str; 2] = ["dhrtd", "dhrt-cli"];

#[test]
fn crates_depend_only_along_the_allowed_edges() {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let names: BTreeSet<&str> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains("dhrt-storage"),
        "workspace not found: {names:?}"
    );
    let rules = allowed();
    let mut violations = Vec::new();
    for package in packages {
        let name = package["name"].as_str().unwrap();
        let Some(allowed) = rules.get(name) else {
            violations.push(format!(
                "{name}: not in the architecture map; add it to docs/ARCHITECTURE.md and this test"
            ));
            continue;
        };
        for dep in package["dependencies"].as_array().unwrap() {
            let dep_name = dep["name"].as_str().unwrap();
            if BINARIES.contains(&dep_name) {
                violations.push(format!("{name} depends on the binary {dep_name}"));
            }
            let is_dev = dep["kind"].as_str() == Some("dev");
            if names.contains(dep_name) && !is_dev && !allowed.contains(&dep_name) {
                violations.push(format!("{name} -> {dep_name} is not an allowed edge"));
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// The `crate::` modules each source file of `src` names (`use crate::x`
/// or a path through `crate::x::`), by module: a file under `src/m/`
/// belongs to module `m`.
fn module_edges(src: &std::path::Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.to_path_buf()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let rel = path.strip_prefix(src).unwrap();
        let module = rel
            .iter()
            .next()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let entry = edges.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            // `dhrt_cluster::crate::` cannot occur; `{`-groups name more.
            let names: Vec<String> = if name.is_empty() && rest.starts_with('{') {
                rest[1..rest.find('}').unwrap()]
                    .split(',')
                    .map(|s| s.trim().split("::").next().unwrap().to_string())
                    .collect()
            } else {
                vec![name]
            };
            for n in names {
                if !n.is_empty() && n != module && n.chars().all(|c| c.is_lowercase() || c == '_') {
                    entry.insert(n);
                }
            }
        }
    }
    edges
}

#[test]
fn dhrt_cluster_modules_import_each_other_without_a_cycle_and_stay_small() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let src = root.join("crates/dhrt-cluster/src");
    let edges = module_edges(&src);
    assert!(edges.contains_key("cluster") && edges.contains_key("node"));
    // Depth-first search for a cycle.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = path.iter().position(|p| p == m) {
            panic!("module import cycle: {} -> {m}", path[at..].join(" -> "));
        }
        path.push(m.to_string());
        for next in edges.get(m).into_iter().flatten() {
            visit(next, edges, path, done);
        }
        path.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in edges.keys() {
        visit(m, &edges, &mut Vec::new(), &mut done);
    }
    // The edges the split was for: the node is built on the cluster, never
    // the other way round; the peer server is reached from the server.
    assert!(!edges["cluster"].contains("node"), "{:?}", edges["cluster"]);
    assert!(!edges["peer_server"].contains("server"));
    // "About 600 lines" a file.
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            let lines = std::fs::read_to_string(&path).unwrap().lines().count();
            assert!(lines <= 650, "{} has {lines} lines", path.display());
        }
    }
}

#[test]
fn unsafe_code_lives_only_where_it_is_allowed() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    for krate in ["dhrt-proto", "dhrt-http", "dhrt-cluster", "dhrt-client"] {
        let lib =
            std::fs::read_to_string(root.join("crates").join(krate).join("src/lib.rs")).unwrap();
        assert!(lib.contains("#![forbid(unsafe_code)]"), "{krate}");
    }
    let lib = std::fs::read_to_string(root.join("crates/dhrt-storage/src/lib.rs")).unwrap();
    assert!(lib.contains("#![deny(unsafe_code)]"));
    let allowed: Vec<&str> = lib
        .lines()
        .zip(lib.lines().skip(1))
        .filter(|(a, _)| a.trim() == "#[allow(unsafe_code)]")
        .map(|(_, m)| m.trim())
        .collect();
    assert_eq!(allowed, ["mod key;", "mod mmap;", "mod shard;"]);
}
