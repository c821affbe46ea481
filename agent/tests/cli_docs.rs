//! Generated shell completions and man pages.

use std::process::Command;

const VSHA: &str = env!("CARGO_BIN_EXE_vsha");

#[test]
fn bash_completion_is_valid_bash_and_knows_the_commands() {
    let out = Command::new(VSHA)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for word in [
        "migrate",
        "failover",
        "simulate",
        "node-down",
        "--accept-data-loss",
    ] {
        assert!(text.contains(word), "no {word} in the completion");
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("vsha.bash");
    std::fs::write(&f, &text).unwrap();
    let check = Command::new("bash").arg("-n").arg(&f).output().unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn man_pages_cover_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(VSHA)
        .arg("manpages")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "vsha.1",
        "vsha-migrate.1",
        "vsha-node-drain.1",
        "vsha-vserver-boot.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page} is no man page"
        );
    }
    let bad = Command::new(VSHA)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}
