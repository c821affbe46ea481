//! Consistent rounds: the cgroup is frozen during the final pass, measured,
//! bounded, and always thawed.

mod common;
use common::*;

use std::path::PathBuf;
use std::time::Duration;

use vsha_sync::FreezeConfig;

/// A cgroup v2 directory with a sleeping process in it; removed on drop.
struct Cgroup {
    dir: PathBuf,
    child: std::process::Child,
}

impl Cgroup {
    fn new() -> Option<Cgroup> {
        let base = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.controllers").exists())?;
        let dir = base.join(format!("vsha-sync-test-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        let child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let cg = Cgroup { dir, child };
        std::fs::write(cg.dir.join("cgroup.procs"), cg.child.id().to_string()).unwrap();
        Some(cg)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("cgroup.freeze"), "0");
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_final_pass_is_measured_and_bounded() {
    init_tracing();
    if !need_root() {
        return;
    }
    let Some(cg) = Cgroup::new() else {
        println!("skipped: no cgroup v2 hierarchy to create a test cgroup in");
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    for i in 0..30 {
        write(&src.join(format!("f{i}")), b"data");
    }
    let dst = t.path().join("dst");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let d2 = dst.clone();
    let server = tokio::spawn(async move {
        vsha_sync::serve(listener, &d2, None, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let opts = vsha_sync::PushOptions {
        freeze: Some(FreezeConfig {
            cgroup: cg.dir.clone(),
            max: Duration::from_secs(60),
            attempts: 1,
        }),
        ..Default::default()
    };
    let s = vsha_sync::push(
        &src,
        &addr,
        "web",
        None,
        opts,
        std::future::pending(),
        |_| {},
    )
    .await
    .unwrap();
    let fd = s.freeze_duration.expect("freeze duration reported");
    assert!(fd > Duration::ZERO);
    assert!(!vsha_sync::freeze::is_frozen(&cg.dir), "cgroup left frozen");
    assert_same(&src, &dst.join("web"));

    // A bound nothing can meet: the pass is abandoned, the cgroup thawed,
    // the error says why, and the previous snapshot stays.
    write(&src.join("late"), b"late");
    let opts = vsha_sync::PushOptions {
        freeze: Some(FreezeConfig {
            cgroup: cg.dir.clone(),
            max: Duration::ZERO,
            attempts: 2,
        }),
        ..Default::default()
    };
    let e = vsha_sync::push(
        &src,
        &addr,
        "web",
        None,
        opts,
        std::future::pending(),
        |_| {},
    )
    .await;
    assert!(!vsha_sync::freeze::is_frozen(&cg.dir), "cgroup left frozen");
    match e {
        Err(e) => assert!(e.to_string().contains("freeze"), "{e}"),
        Ok(s) => panic!("a zero freeze bound was met: {s:?}"),
    }
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
