//! Collection names never escape the data directory.

use dhrt_storage::{Error, Store};

use crate::quiet_options;

#[test]
fn path_tricks_are_refused_and_nothing_escapes() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let store = Store::open(&data, quiet_options()).unwrap();
    let tricks = [
        "..",
        ".",
        "../escape",
        "..%2f",
        "%2e%2e%2f",
        "%2e%2e",
        "a/b",
        "/etc/passwd",
        "a\\b",
        "a\0b",
        "%00",
        "nul\0",
        "",
        " ",
        "a b",
        "a.b",
        "é",
        "CON.",
        "a\nb",
        "../../../../tmp/x",
        "..\\..\\x",
        &"x".repeat(65),
    ];
    for name in tricks {
        for result in [
            store.set(name, b"k", b"v").map(|_| ()),
            store.get(name, b"k").map(|_| ()),
            store.delete(name, b"k").map(|_| ()),
            store.drop_collection(name).map(|_| ()),
            store.scan(name).map(|_| ()),
            store.compact(name).map(|_| ()),
        ] {
            assert!(
                matches!(result, Err(Error::InvalidCollection { .. })),
                "{name:?} was accepted"
            );
        }
    }
    store.set("fine_name-1", b"k", b"v").unwrap();
    let mut in_root: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    in_root.sort();
    assert_eq!(in_root, vec!["data"]);
    let mut in_data: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    in_data.sort();
    assert_eq!(
        in_data,
        vec![
            "EPOCH",
            "LOCK",
            "RESERVE",
            "fine_name-1.dhrt",
            "fine_name-1.dhrt.durable"
        ]
    );
}
