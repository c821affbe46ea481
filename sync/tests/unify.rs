//! Unification at replication time and the TCP serve/push pair.

mod common;
use common::*;

use std::os::unix::fs::MetadataExt;

async fn server(
    dst: std::path::PathBuf,
    token: Option<Vec<u8>>,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<vsha_sync::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let h = tokio::spawn(async move {
        vsha_sync::serve(listener, &dst, token, async {
            let _ = rx.await;
        })
        .await
    });
    (addr, tx, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unified_trees_share_files_instead_of_transferring() {
    init_tracing();
    let t = tempfile::tempdir().unwrap();
    let shared: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 251) as u8).collect();
    for name in ["a", "b"] {
        let src = t.path().join(name);
        write(&src.join("usr/lib/libc.so"), &shared);
        set_mtime(&src.join("usr/lib/libc.so"), 1_500_000_000, 0);
        write(&src.join("etc/hostname"), name.as_bytes());
    }
    let dst = t.path().join("dst");
    let (addr, stop, h) = server(dst.clone(), Some(b"tok".to_vec())).await;
    let opts = vsha_sync::PushOptions {
        unified: true,
        ..Default::default()
    };
    let a = vsha_sync::push(
        &t.path().join("a"),
        &addr,
        "a",
        Some(b"tok".to_vec()),
        opts.clone(),
        std::future::pending(),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(a.unified_bytes, 0);
    let b = vsha_sync::push(
        &t.path().join("b"),
        &addr,
        "b",
        Some(b"tok".to_vec()),
        opts,
        std::future::pending(),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(b.unified_bytes, shared.len() as u64, "{b:?}");
    assert!(
        b.bytes_sent < 50_000,
        "sent {} bytes although the content was in the pool",
        b.bytes_sent
    );
    assert_same(&t.path().join("b"), &dst.join("b"));
    let ia = std::fs::metadata(dst.join("a/usr/lib/libc.so"))
        .unwrap()
        .ino();
    let ib = std::fs::metadata(dst.join("b/usr/lib/libc.so"))
        .unwrap()
        .ino();
    assert_eq!(ia, ib, "unified files should be one inode");
    // A wrong token is refused.
    let e = vsha_sync::push(
        &t.path().join("b"),
        &addr,
        "b",
        Some(b"bad".to_vec()),
        Default::default(),
        std::future::pending(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("token"), "{e}");
    let _ = stop.send(());
    h.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_mode_keeps_sending_rounds() {
    init_tracing();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write(&src.join("a"), b"1");
    let dst = t.path().join("dst");
    let (addr, stop, h) = server(dst.clone(), None).await;
    let opts = vsha_sync::PushOptions {
        watch: true,
        journal: is_root(),
        interval: Some(std::time::Duration::from_millis(20)),
        ..Default::default()
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop_push, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let s2 = src.clone();
    let pusher = tokio::spawn(async move {
        vsha_sync::push(
            &s2,
            &addr,
            "w",
            None,
            opts,
            async {
                let _ = stop_rx.await;
            },
            move |s| {
                let _ = tx.send(s.clone());
            },
        )
        .await
    });
    let first = rx.recv().await.unwrap();
    assert!(!first.unchanged);
    write(&src.join("b"), b"2");
    // Wait (bounded by the test harness) for a round that carries the change.
    loop {
        let s = rx.recv().await.unwrap();
        if !s.unchanged && s.seq > first.seq {
            break;
        }
    }
    assert_same(&src, &dst.join("w"));
    let _ = stop_push.send(());
    pusher.await.unwrap().unwrap();
    let _ = stop.send(());
    h.await.unwrap().unwrap();
}
