//! Incremental rounds: one round after any kind of change makes DST equal again.

mod common;
use common::*;

use std::os::unix::fs::MetadataExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_change_is_replicated_in_one_round() {
    init_tracing();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    rich_tree(&src);
    for i in 0..50 {
        write(
            &src.join(format!("data/d{}/f{i}", i % 5)),
            format!("file {i}").as_bytes(),
        );
    }
    let mut pair = Pair::new(&t.path().join("dst"));
    let first = pair.round(&src, "web").await.unwrap();
    assert_same(&src, &pair.current("web"));

    // Nothing changed: no new version, no data.
    let same = pair.round(&src, "web").await.unwrap();
    assert!(same.unchanged);
    assert_eq!(same.seq, first.seq);
    assert_eq!(same.literal_bytes, 0);

    // Edits, appends, truncations, renames, deletions, metadata-only changes, type changes.
    write(&src.join("data/d0/f0"), b"edited content");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(src.join("data/d1/f1"))
            .unwrap();
        f.write_all(b" appended").unwrap();
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(src.join("data/d2/f2"))
        .unwrap()
        .set_len(2)
        .unwrap();
    std::fs::rename(src.join("data/d3/f3"), src.join("data/d4/renamed")).unwrap();
    std::fs::rename(src.join("data/d3"), src.join("data/d3-moved")).unwrap();
    std::fs::remove_file(src.join("data/d4/f4")).unwrap();
    std::fs::remove_dir_all(src.join("data/d0")).unwrap();
    chmod(&src.join("data/d1/f6"), 0o600);
    set_mtime(&src.join("data/d1/f11"), 1_234_567_890, 42);
    setxattr(&src.join("data/d2/f7"), "user.new", b"attr");
    std::fs::remove_file(src.join("empty")).unwrap();
    std::fs::create_dir(src.join("empty")).unwrap();
    write(&src.join("empty/now-a-dir"), b"x");
    std::fs::remove_file(src.join("etc/dangling")).unwrap();
    write(&src.join("etc/dangling"), b"now a file");
    std::fs::remove_file(src.join("bin/sh")).unwrap(); // breaks part of a hardlink group
    if is_root() {
        lchown(&src.join("data/d2/f12"), 777, 778);
    }
    let s = pair.round(&src, "web").await.unwrap();
    assert!(!s.unchanged);
    assert!(s.files_changed > 5 && s.files_deleted > 3, "{s:?}");
    assert_same(&src, &pair.current("web"));

    // The previous version is untouched by the new round (hardlinked files
    // were copied, not modified, for metadata-only changes).
    let store = &pair.store;
    let cur = store.current("web").unwrap().unwrap();
    assert_eq!(cur.seq, first.seq + 1);
    let prev = t.path().join("dst/prev");
    let pidx = store.materialize("web", first.seq, &prev).unwrap();
    assert_eq!(disk_digest(&prev), pidx.digest);
    let pm = std::fs::metadata(prev.join("data/d1/f6")).unwrap();
    assert_eq!(pm.mode() & 0o777, 0o644);
    assert!(store.lag("web").unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_change_in_large_file_sends_a_delta() {
    init_tracing();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let size = 16usize << 20;
    let data: Vec<u8> = (0..size as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    write(&src.join("disk.img"), &data);
    let mut pair = Pair::new(&t.path().join("dst"));
    let first = pair.round(&src, "vm").await.unwrap();
    assert!(first.bytes_sent as usize > size);
    // 64 KiB changed in the middle, and 10 bytes inserted near the start.
    let mut d2 = data.clone();
    for b in &mut d2[size / 2..size / 2 + (64 << 10)] {
        *b ^= 0x5a;
    }
    d2.splice(1000..1000, b"0123456789".iter().copied());
    write(&src.join("disk.img"), &d2);
    let s = pair.round(&src, "vm").await.unwrap();
    assert_same(&src, &pair.current("vm"));
    let wire = s.bytes_sent + s.bytes_received;
    assert!(
        wire < (size / 20) as u64,
        "delta sent {wire} bytes for a {size}-byte file"
    );
    assert!(s.matched_bytes > (size as u64) * 9 / 10, "{s:?}");
    let got = std::fs::read(pair.current("vm").join("disk.img")).unwrap();
    assert_eq!(blake3::hash(&got), blake3::hash(&d2));
    assert_eq!(
        std::fs::metadata(pair.current("vm").join("disk.img"))
            .unwrap()
            .len(),
        d2.len() as u64
    );
}

/// A large file changed round after round: the receiver's signature of
/// each version (made after the round that wrote it, or on request and
/// cached by content) must describe exactly that version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_deltas_of_a_large_file_use_the_right_signature() {
    init_tracing();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let size = 40usize << 20;
    let mut data: Vec<u8> = (0..size as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8)
        .collect();
    write(&src.join("disk.img"), &data);
    write(&src.join("copy.img"), &data);
    let mut pair = Pair::new(&t.path().join("dst"));
    pair.round(&src, "vm").await.unwrap();
    for round in 0..4usize {
        // Give the background signature a chance in some rounds only.
        if round % 2 == 1 {
            tokio::time::sleep(std::time::Duration::from_millis(4000)).await;
        }
        let at = (round * 7 + 3) << 20;
        for b in &mut data[at..at + (256 << 10)] {
            *b = b.wrapping_add(round as u8 + 1);
        }
        if round == 2 {
            data.splice(5000..5000, b"shifted".iter().copied());
        }
        write(&src.join("disk.img"), &data);
        let s = pair.round(&src, "vm").await.unwrap();
        assert_same(&src, &pair.current("vm"));
        assert!(s.matched_bytes > (size as u64) * 9 / 10, "{s:?}");
        assert!(s.literal_bytes < (2 << 20), "{s:?}");
        let got = std::fs::read(pair.current("vm").join("disk.img")).unwrap();
        assert_eq!(blake3::hash(&got), blake3::hash(&data));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_sender_needs_no_resend() {
    init_tracing();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    rich_tree(&src);
    let mut pair = Pair::new(&t.path().join("dst"));
    let first = pair.round(&src, "web").await.unwrap();
    // A sender with no memory: the receiver's manifest is its cache.
    pair.state = Some(Default::default());
    let s = pair.round(&src, "web").await.unwrap();
    assert!(s.unchanged, "{s:?}");
    assert_eq!(s.seq, first.seq);
    assert_eq!(s.literal_bytes, 0);
    // A persisted sender state works the same, without the manifest transfer.
    let state_file = t.path().join("state");
    pair.opts.state_file = Some(state_file.clone());
    pair.state.as_ref().unwrap().save(&state_file).unwrap();
    pair.state = Some(vsha_sync::SenderState::load(&state_file));
    let s2 = pair.round(&src, "web").await.unwrap();
    assert!(s2.unchanged);
    assert!(
        s2.bytes_received < s.bytes_received,
        "manifest was transferred again"
    );
}

/// A replica changed outside the store (the agent ran a vserver from it)
/// no longer matches its manifest; after `forget`, one round makes it
/// equal to the source again, from the same sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_replica_is_copied_whole_again() {
    init_tracing();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    rich_tree(&src);
    let mut pair = Pair::new(&t.path().join("dst"));
    pair.round(&src, "web").await.unwrap();
    let live = pair.current("web");
    write(&live.join("etc/written-by-the-vserver"), b"local");
    std::fs::remove_file(live.join("etc/dangling")).unwrap();
    pair.store.forget("web").unwrap();
    assert!(pair.store.current("web").unwrap().is_none());
    let s = pair.round(&src, "web").await.unwrap();
    assert!(!s.unchanged, "{s:?}");
    assert_same(&src, &pair.current("web"));
    // Forgetting a name the store never had is fine.
    pair.store.forget("never").unwrap();
}
