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
    // A crash in the middle of a round and one between manifest and switch.
    let v = t.path().join("dst/.vsha/web");
    write(&v.join("tmp/half/written"), b"junk");
    write(&v.join(format!("v/{}.manifest.tmp", s.seq + 1)), b"junk");
    write(&v.join(format!("v/{}/x", s.seq + 1)), b"junk");
    assert_same(&src, &pair.current("web"));
    write(&src.join("b"), b"2");
    let s2 = pair.round(&src, "web").await.unwrap();
    assert_eq!(s2.seq, s.seq + 1);
    assert_same(&src, &pair.current("web"));
    assert!(!v.join("tmp").exists());
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
    let n = std::fs::read_dir(t.path().join("dst/.vsha/web/v"))
        .unwrap()
        .filter(|e| {
            !e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains('.')
        })
        .count();
    assert_eq!(n, 2);
}
