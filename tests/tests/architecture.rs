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
