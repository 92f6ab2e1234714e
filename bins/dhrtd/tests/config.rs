//! `dhrtd`'s configuration errors: each is a sentence and exit code 2, before
//! anything is opened. (Also makes `cargo test` build the binary, which the
//! end-to-end tests in `tests/` run.)

use std::process::Command;

fn dhrtd(args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_dhrtd"))
        .args(args)
        .env_remove("DHRT_LISTEN")
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn bad_settings_are_refused_with_a_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = dhrtd(&[
        "--sync",
        "sometimes",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--sync must be always, interval or never"),
        "{err}"
    );
    let (code, err) = dhrtd(&["--log-format", "xml", "--memory"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--log-format"), "{err}");
    let config = dir.path().join("dhrt.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\ncolour = \"blue\"\n").unwrap();
    let (code, err) = dhrtd(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("colour"), "{err}");
    let (code, err) = dhrtd(&["--config", "/nonexistent/dhrt.toml"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/dhrt.toml"), "{err}");
    // Nothing was created for a configuration that was refused.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn help_lists_the_settings() {
    let o = Command::new(env!("CARGO_BIN_EXE_dhrtd"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--listen",
        "--advertise",
        "--data-dir",
        "--memory",
        "--sync",
        "--name",
        "--config",
        "DHRT_LISTEN",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}
