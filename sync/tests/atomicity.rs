//! Atomicity: cut the stream or kill the receiver at random points of a
//! round: DST is exactly the previous snapshot, and the next round succeeds.

mod common;
use common::*;

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vsha_sync::Store;

/// Run a round through a proxy that forwards `cut` bytes from the sender and
/// then either closes both streams or aborts the receiver task.
async fn cut_round(store: Arc<Store>, src: &std::path::Path, cut: usize, kill: bool) -> bool {
    let (sa, mut pa) = tokio::io::duplex(1 << 16);
    let (rb, mut pb) = tokio::io::duplex(1 << 16);
    let recv = tokio::spawn(async move { vsha_sync::receive(store, rb, None).await });
    let abort = recv.abort_handle();
    let proxy = tokio::spawn(async move {
        let mut left = cut;
        let mut b1 = vec![0u8; 8192];
        let mut b2 = vec![0u8; 8192];
        loop {
            tokio::select! {
                n = pa.read(&mut b1) => {
                    let n = match n { Ok(0) | Err(_) => break, Ok(n) => n };
                    let k = n.min(left);
                    if pb.write_all(&b1[..k]).await.is_err() { break; }
                    left -= k;
                    if left == 0 {
                        if kill { abort.abort(); }
                        break;
                    }
                }
                n = pb.read(&mut b2) => {
                    let n = match n { Ok(0) | Err(_) => break, Ok(n) => n };
                    if pa.write_all(&b2[..n]).await.is_err() { break; }
                }
            }
        }
        // Dropping both ends cuts the stream.
    });
    let (r, _) = vsha_sync::send(
        sa,
        src.to_path_buf(),
        "web".into(),
        None,
        Default::default(),
        Default::default(),
    )
    .await;
    let _ = proxy.await;
    let rr = recv.await;
    r.is_ok() && matches!(rr, Ok(Ok(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_or_killed_rounds_leave_the_previous_snapshot() {
    init_tracing();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    rich_tree(&src);
    let mut pair = Pair::new(&t.path().join("dst"));
    pair.round(&src, "web").await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for i in 0..16 {
        // A fresh change set each time: new files, an edit, a deletion.
        for k in 0..20 {
            let data: Vec<u8> = (0..rng.gen_range(0..40_000)).map(|_| rng.gen()).collect();
            write(&src.join(format!("round{i}/f{k}")), &data);
        }
        write(&src.join("etc/hostname"), format!("host{i}\n").as_bytes());
        if i > 0 {
            let _ = std::fs::remove_dir_all(src.join(format!("round{}", i - 1)));
        }
        let before = pair.store.current("web").unwrap().unwrap();
        let before_disk = disk_digest(&pair.current("web"));
        assert_eq!(before_disk, before.index.digest);
        let cut = if i < 3 {
            [0, 1, 13][i]
        } else {
            rng.gen_range(0..500_000)
        };
        let kill = i % 2 == 1;
        let ok = cut_round(pair.store.clone(), &src, cut, kill).await;
        let after = pair.store.current("web").unwrap().unwrap();
        if ok {
            assert_eq!(after.seq, before.seq + 1);
            assert_same(&src, &pair.current("web"));
        } else {
            assert!(after.seq == before.seq || after.seq == before.seq + 1);
            if after.seq == before.seq {
                assert_eq!(
                    disk_digest(&pair.current("web")),
                    before.index.digest,
                    "cut at {cut} (kill {kill}) changed the snapshot"
                );
            } else {
                // The cut came after End: the commit is complete and exact.
                assert_same(&src, &pair.current("web"));
            }
        }
        // The next round succeeds and is exact.
        pair.state = Some(Default::default());
        // A killed receiver's round thread may still be rolling back: wait
        // (bounded) until the name is free again.
        let mut tries = 0;
        loop {
            match pair.round(&src, "web").await {
                Ok(_) => break,
                Err(e) if e.to_string().contains("already in progress") && tries < 400 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(25)).await;
                }
                Err(e) => panic!("round after cut at {cut}: {e}"),
            }
        }
        assert_same(&src, &pair.current("web"));
        assert!(!t.path().join("dst/.vsha/web/tmp").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_a_crashed_receiver_are_ignored_and_cleaned() {
    init_tracing();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write(&src.join("a"), b"1");
    let mut pair = Pair::new(&t.path().join("dst"));
    let s = pair.round(&src, "web").await.unwrap();
    // A crash while staging, and one while writing the undo log.
    let v = t.path().join("dst/.vsha/web");
    write(&v.join("tmp/half/written"), b"junk");
    write(&v.join(format!("undo/{}.log", s.seq + 1)), b"junk");
    write(&v.join(format!("undo/{}/x", s.seq + 1)), b"junk");
    write(&v.join("manifest.tmp"), b"junk");
    assert_same(&src, &pair.current("web"));
    write(&src.join("b"), b"2");
    let s2 = pair.round(&src, "web").await.unwrap();
    assert_eq!(s2.seq, s.seq + 1);
    assert_same(&src, &pair.current("web"));
    assert!(!v.join("tmp").exists());
    assert!(!v.join(format!("undo/{}/x", s.seq + 1)).exists());
}

/// A round that fails (or crashes) half-way through applying its changes to
/// the live tree: the previous snapshot is restored exactly, by the round
/// itself or by the recovery at the next open / round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_while_applying_is_rolled_back() {
    init_tracing();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    rich_tree(&src);
    for k in 0..30 {
        write(
            &src.join(format!("d{}/f{k}", k % 3)),
            format!("v0 {k}").as_bytes(),
        );
    }
    let dst = t.path().join("dst");
    let mut pair = Pair::new(&dst);
    pair.round(&src, "web").await.unwrap();
    for (i, crash) in [false, false, true, true, true].into_iter().enumerate() {
        // Edits, new files, a deleted directory, a file replacing a directory,
        // a metadata-only change of a directory.
        for k in (0..30).filter(|k| i < 2 || k % 3 != 2) {
            write(
                &src.join(format!("d{}/f{k}", k % 3)),
                format!("v{} {k}", i + 1).as_bytes(),
            );
        }
        write(&src.join(format!("new{i}/x")), b"x");
        if i > 0 {
            let _ = std::fs::remove_dir_all(src.join(format!("new{}", i - 1)));
        }
        if i == 2 {
            std::fs::remove_dir_all(src.join("d2")).unwrap();
            write(&src.join("d2"), b"now a file");
        }
        chmod(&src.join("d0"), 0o700 + i as u32);
        let before = pair.store.current("web").unwrap().unwrap();
        assert_eq!(disk_digest(&pair.current("web")), before.index.digest);
        pair.store.inject_apply_fault([0, 7, 25, 60, 3][i], crash);
        let r = pair.round(&src, "web").await;
        assert!(r.is_err(), "the injected fault must fail the round");
        if crash {
            // A "restart": a new Store recovers the tree at open.
            pair.store = Arc::new(Store::open(&dst, 2).unwrap());
        }
        let now = pair.store.current("web").unwrap().unwrap();
        assert_eq!(now.seq, before.seq);
        assert_eq!(
            disk_digest(&pair.current("web")),
            before.index.digest,
            "round {i} (crash {crash}) changed the snapshot"
        );
        pair.state = Some(Default::default());
        pair.round(&src, "web").await.unwrap();
        assert_same(&src, &pair.current("web"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_n_versions() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let mut pair = Pair::new(&t.path().join("dst"));
    for i in 0..5 {
        write(&src.join("f"), format!("{i}").as_bytes());
        pair.round(&src, "web").await.unwrap();
    }
    let cur = pair.store.current("web").unwrap().unwrap();
    assert_eq!(
        pair.store.versions("web").unwrap(),
        vec![cur.seq, cur.seq - 1]
    );
    let n = std::fs::read_dir(t.path().join("dst/.vsha/web/undo"))
        .unwrap()
        .count();
    assert_eq!(n, 2, "one undo area and its log");
    // The previous version can be materialized, exactly.
    let old = t.path().join("dst/old");
    let idx = pair.store.materialize("web", cur.seq - 1, &old).unwrap();
    assert_eq!(std::fs::read(old.join("f")).unwrap(), b"3");
    assert_eq!(disk_digest(&old), idx.digest);
    assert!(pair
        .store
        .materialize("web", cur.seq - 2, &t.path().join("dst/older"))
        .is_err());
}
