//! The fanotify change journal: rounds after the first rescan only the
//! directories that changed, and still make DST equal to SRC.

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_rounds_rescan_only_changed_dirs() {
    init_tracing();
    if !need_root() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    rich_tree(&src);
    for i in 0..40 {
        write(
            &src.join(format!("data/d{}/f{i}", i % 4)),
            format!("file {i}").as_bytes(),
        );
    }
    let mut pair = Pair::new(&t.path().join("dst"));
    pair.opts.journal = true;
    let first = pair.round(&src, "web").await.unwrap();
    assert!(first.full_scan);
    assert_eq!(
        first.journal_fallbacks, 0,
        "fanotify unavailable on this kernel?"
    );

    write(&src.join("data/d0/f0"), b"edited");
    write(&src.join("data/new/deep/file"), b"new");
    std::fs::remove_file(src.join("data/d1/f1")).unwrap();
    std::fs::rename(src.join("data/d2"), src.join("data/d2-renamed")).unwrap();
    chmod(&src.join("data/d3/f3"), 0o600);
    setxattr(&src.join("data/d3/f7"), "user.tag", b"1");
    std::fs::hard_link(src.join("data/d3/f11"), src.join("data/d0/link-to-f11")).unwrap();
    set_mtime(&src.join("etc/hostname"), 1_700_000_000, 5);
    let s = pair.round(&src, "web").await.unwrap();
    assert!(!s.full_scan, "the round should have used the journal");
    assert_eq!(s.journal_fallbacks, 0);
    assert_same(&src, &pair.current("web"));

    // Quiet tree: the journal round finds nothing to do.
    let q = pair.round(&src, "web").await.unwrap();
    assert!(!q.full_scan);
    assert!(q.unchanged, "{q:?}");

    // A change after a quiet round is still seen.
    std::fs::remove_dir_all(src.join("data/new")).unwrap();
    write(&src.join("data/d3/f3"), b"changed again");
    let r = pair.round(&src, "web").await.unwrap();
    assert!(!r.full_scan);
    assert_same(&src, &pair.current("web"));
}
