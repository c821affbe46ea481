//! Benchmark of vsha-sync against rsync (loopback daemon) and tar.
//!
//! Quick mode (default, seconds, CI runs it): a small synthetic tree.
//! Full mode: `VSHA_BENCH_FULL=1` (about 200k files / 3 GB, a 1 GiB file,
//! and a `debootstrap --variant=minbase` tree when debootstrap works).
//! Knobs: `VSHA_BENCH_FILES`, `VSHA_BENCH_BYTES`, `VSHA_BENCH_BIGFILE`,
//! `VSHA_BENCH_DIR` (work directory, default a temp dir in /var/tmp),
//! `VSHA_BENCH_LAG_SECS`. Cold runs (caches dropped) need root.
//!
//! Prints one line per measurement and the ratios the issue asks for.
//! Not a timed test: nothing here asserts.

#[path = "../tests/common/apt_mirror.rs"]
mod apt_mirror;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use vsha_sync::{PushOptions, RoundStats, SenderState};

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn sync_all() {
    let _ = Command::new("sync").status();
}

fn drop_caches() -> bool {
    if !is_root() {
        return false;
    }
    sync_all();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Lognormal file sizes (median 2.1 KB, p99 ≈ 213 KB, max 17 MB) scaled to `total`.
fn gen_tree(root: &Path, files: u64, total: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let ndirs = (files / 80).max(4);
    let mut dirs: Vec<(PathBuf, u32)> = vec![(root.to_path_buf(), 0)];
    std::fs::create_dir_all(root).unwrap();
    for i in 0..ndirs {
        let (p, d) = loop {
            let (p, d) = dirs[rng.gen_range(0..dirs.len())].clone();
            if d < 5 {
                break (p, d);
            }
        };
        let nd = p.join(format!("d{i}"));
        std::fs::create_dir(&nd).unwrap();
        dirs.push((nd, d + 1));
    }
    let mut sizes: Vec<f64> = (0..files)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (2100f64.ln() + 1.98 * z).exp().min(17e6)
        })
        .collect();
    let sum: f64 = sizes.iter().sum();
    let scale = total as f64 / sum;
    for s in &mut sizes {
        *s = (*s * scale).min(17e6);
    }
    let mut buf = vec![0u8; 17 << 20];
    let mut regular: Vec<PathBuf> = Vec::new();
    for (i, s) in sizes.iter().enumerate() {
        let dir = &dirs[rng.gen_range(0..dirs.len())].0;
        let p = dir.join(format!("f{i}"));
        let roll: f64 = rng.gen();
        if roll < 0.02 && !regular.is_empty() {
            let t = &regular[rng.gen_range(0..regular.len())];
            std::fs::hard_link(t, &p).unwrap();
            continue;
        }
        if roll < 0.05 {
            std::os::unix::fs::symlink(format!("../f{}", rng.gen_range(0..files)), &p).unwrap();
            continue;
        }
        let n = *s as usize;
        rng.fill_bytes(&mut buf[..n]);
        std::fs::write(&p, &buf[..n]).unwrap();
        if rng.gen_bool(0.001) {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o4755)).unwrap();
        }
        if rng.gen_bool(0.01) {
            let _ =
                rustix::fs::lsetxattr(&p, "user.test", b"value", rustix::fs::XattrFlags::empty());
        }
        if is_root() && rng.gen_bool(0.005) {
            let _ = rustix::fs::chownat(
                rustix::fs::CWD,
                &p,
                Some(rustix::fs::Uid::from_raw(1000 + i as u32 % 50)),
                Some(rustix::fs::Gid::from_raw(1000)),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            );
        }
        regular.push(p);
    }
    for i in 0..20 {
        let d = &dirs[rng.gen_range(0..dirs.len())].0;
        if is_root() {
            let _ = rustix::fs::mknodat(
                rustix::fs::CWD,
                d.join(format!("c{i}")),
                rustix::fs::FileType::CharacterDevice,
                rustix::fs::Mode::from_raw_mode(0o600),
                rustix::fs::makedev(1, 3),
            );
        }
        let _ = rustix::fs::mknodat(
            rustix::fs::CWD,
            d.join(format!("p{i}")),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        );
    }
}

/// 0.1 % of the single-link regular files: ¼ appended 1 KiB, ¼ touched, ¼ deleted, ¼ new 10 KiB files.
fn mutate(root: &Path, frac: f64, seed: u64) -> usize {
    use std::os::unix::fs::MetadataExt;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        dirs.push(d.clone());
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.path().symlink_metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() && m.nlink() == 1 {
                files.push(e.path());
            }
        }
    }
    let n = ((files.len() as f64 * frac).ceil() as usize).max(4);
    let mut buf = vec![0u8; 10 << 10];
    for k in 0..n {
        match k % 4 {
            0 => {
                let p = &files[rng.gen_range(0..files.len())];
                rng.fill_bytes(&mut buf[..1024]);
                let mut f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
                f.write_all(&buf[..1024]).unwrap();
            }
            1 => {
                let p = &files[rng.gen_range(0..files.len())];
                let f = std::fs::File::open(p).unwrap();
                f.set_modified(std::time::SystemTime::now()).unwrap();
            }
            2 => {
                let i = rng.gen_range(0..files.len());
                let p = files.swap_remove(i);
                std::fs::remove_file(p).unwrap();
            }
            _ => {
                let d = &dirs[rng.gen_range(0..dirs.len())];
                rng.fill_bytes(&mut buf);
                std::fs::write(d.join(format!("new{seed}-{k}")), &buf).unwrap();
            }
        }
    }
    n
}

struct Daemon {
    child: Child,
    port: u16,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rsync_daemon(work: &Path) -> Option<Daemon> {
    Command::new("rsync").arg("--version").output().ok()?;
    let dst = work.join("rsync-dst");
    std::fs::create_dir_all(&dst).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let conf = work.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "pid file = {w}/rsyncd.pid\nuse chroot = no\nnumeric ids = yes\n[dst]\npath = {d}\nread only = false\nuid = root\ngid = root\n",
            w = work.display(),
            d = dst.display()
        ),
    )
    .unwrap();
    let child = Command::new("rsync")
        .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--config={}", conf.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let d = Daemon { child, port };
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(d);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Run rsync to the daemon; returns (seconds incl. sync, wire bytes).
fn rsync(d: &Daemon, src: &Path, name: &str, extra: &[&str]) -> (f64, u64) {
    let t = Instant::now();
    let out = Command::new("rsync")
        .args(["-aHAX", "--numeric-ids", "--delete", "--stats"])
        .args(extra)
        .arg(format!("{}/", src.display()))
        .arg(format!("rsync://127.0.0.1:{}/dst/{name}/", d.port))
        .output()
        .unwrap();
    sync_all();
    let secs = t.elapsed().as_secs_f64();
    let s = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        eprintln!("rsync failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let num = |key: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(key))
            .map(|l| {
                l[key.len()..]
                    .chars()
                    .take_while(|c| !c.is_alphabetic())
                    .filter(|c| c.is_ascii_digit())
                    .collect::<String>()
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (
        secs,
        num("Total bytes sent:") + num("Total bytes received:"),
    )
}

fn tar_copy(src: &Path, dst: &Path) -> f64 {
    std::fs::create_dir_all(dst).unwrap();
    let t = Instant::now();
    let flags = "--xattrs --xattrs-include='*' --acls --numeric-owner";
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C '{}' {flags} -cf - . | tar -C '{}' {flags} -xpf -",
            src.display(),
            dst.display()
        ))
        .status()
        .unwrap();
    sync_all();
    if !st.success() {
        eprintln!("tar failed");
    }
    t.elapsed().as_secs_f64()
}

struct Ours {
    rt: tokio::runtime::Runtime,
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Ours {
    fn new(dst: &Path) -> Ours {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let d = dst.to_path_buf();
        rt.spawn(async move {
            let _ = vsha_sync::serve(listener, &d, None, async {
                let _ = rx.await;
            })
            .await;
        });
        Ours {
            rt,
            addr,
            stop: Some(tx),
        }
    }

    fn round(
        &self,
        src: &Path,
        name: &str,
        opts: &PushOptions,
        state: SenderState,
    ) -> (f64, RoundStats, SenderState) {
        let t = Instant::now();
        let (r, st) = self.rt.block_on(vsha_sync::push_round(
            src, &self.addr, name, None, opts, state,
        ));
        sync_all();
        let secs = t.elapsed().as_secs_f64();
        (secs, r.expect("vsha-sync round"), st)
    }
}

impl Ours {
    /// A round that scans in full although the state holds a journal (a
    /// state's journal is used whenever present; until 2026-11-29 evening
    /// the "no journal" rows were journal rounds). The journal keeps
    /// recording meanwhile and is put back for the later rounds.
    fn no_journal_round(
        &self,
        src: &Path,
        name: &str,
        opts: &PushOptions,
        mut state: SenderState,
    ) -> (f64, RoundStats, SenderState) {
        let j = state.journal.take();
        let (secs, st, mut state) = self.round(src, name, opts, state);
        assert!(st.full_scan, "a round without a journal scans in full");
        state.journal = j;
        (secs, st, state)
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Overwrites 4 MiB of `path` at `offset` with seeded random bytes.
fn overwrite_random(path: &Path, seed: u64, offset: u64) {
    use std::os::unix::fs::FileExt;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut chunk = vec![0u8; 4 << 20];
    rng.fill_bytes(&mut chunk);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&chunk, offset).unwrap();
}

fn line(case: &str, tool: &str, secs: f64, bytes: u64) {
    println!("{case:<34} {tool:<22} {secs:>9.3} s {:>14} B", bytes);
}

fn ratio(what: &str, ours: f64, theirs: f64, target: &str, met: bool) {
    println!(
        "RATIO {what:<46} {:>8.2}x   target {target:<12} {}",
        theirs / ours.max(1e-9),
        if met { "MET" } else { "MISSED" }
    );
}

fn main() {
    if std::env::var("RUST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let full = std::env::var("VSHA_BENCH_FULL").is_ok();
    // VSHA_BENCH_CASES=a,b,c,d,e,deb selects cases (default: all).
    let cases = std::env::var("VSHA_BENCH_CASES").unwrap_or_else(|_| "a,b,c,d,e,deb".into());
    let want = |c: &str| cases.split(',').any(|x| x.trim() == c);
    let files = env_u64("VSHA_BENCH_FILES", if full { 200_000 } else { 3_000 });
    let bytes = env_u64(
        "VSHA_BENCH_BYTES",
        if full { 3_000_000_000 } else { 40_000_000 },
    );
    let bigfile = env_u64("VSHA_BENCH_BIGFILE", if full { 1 << 30 } else { 64 << 20 });
    let lag_secs = env_u64("VSHA_BENCH_LAG_SECS", if full { 30 } else { 4 });
    let base = std::env::var("VSHA_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/var/tmp"));
    std::fs::create_dir_all(&base).unwrap();
    let work = tempfile::Builder::new()
        .prefix("vsha-bench-")
        .tempdir_in(&base)
        .unwrap();
    let w = work.path();
    println!("vsha-sync benchmark: {} mode, {files} files / {bytes} bytes, big file {bigfile} bytes, work dir {}", if full { "full" } else { "quick" }, w.display());
    let cold_ok = is_root();
    let Some(daemon) = rsync_daemon(w) else {
        println!("rsync not available: no comparison possible");
        return;
    };
    let src = w.join("src");
    let t = Instant::now();
    gen_tree(&src, files, bytes, 1);
    sync_all();
    println!("generated tree in {:.1} s", t.elapsed().as_secs_f64());
    let ours = Ours::new(&w.join("ours-dst"));
    let jopts = PushOptions {
        journal: is_root(),
        ..Default::default()
    };
    let nopts = PushOptions::default();

    // (a) initial copy, cold then warm.
    let mut results = Vec::new();
    for (temp, cold) in [("cold", true), ("warm", false)]
        .into_iter()
        .filter(|_| want("a"))
    {
        if cold && !cold_ok {
            continue;
        }
        drop_caches();
        let (rs, rb) = rsync(&daemon, &src, &format!("init-{temp}"), &[]);
        line(&format!("(a) initial copy {temp}"), "rsync daemon", rs, rb);
        if cold {
            drop_caches();
        }
        let ts = tar_copy(&src, &w.join(format!("tar-{temp}")));
        line(&format!("(a) initial copy {temp}"), "tar c | tar x", ts, 0);
        if cold {
            drop_caches();
        }
        let (os, st, _) = ours.round(
            &src,
            &format!("init-{temp}"),
            &nopts,
            SenderState::default(),
        );
        line(
            &format!("(a) initial copy {temp}"),
            "vsha-sync",
            os,
            st.bytes_sent + st.bytes_received,
        );
        ratio(
            &format!("(a) initial {temp}: rsync time / ours"),
            os,
            rs,
            ">= 1.5x",
            rs / os >= 1.5,
        );
        ratio(
            &format!("(a) initial {temp}: tar time / ours"),
            os,
            ts,
            "(info)",
            true,
        );
        results.push((os, rs, ts));
        let _ = std::fs::remove_dir_all(w.join(format!("tar-{temp}")));
        // The disk is shared: the later cases need the room (each copy of
        // the full tree is ~3.3 GB).
        let _ = std::fs::remove_dir_all(w.join("rsync-dst").join(format!("init-{temp}")));
        if let Ok(st) = vsha_sync::Store::open(&w.join("ours-dst"), 2) {
            let _ = st.forget(&format!("init-{temp}"));
        }
        sync_all();
    }
    // The tree used for the incremental cases: a state with the journal on.
    let (_, _, mut state) = ours.round(&src, "main", &jopts, SenderState::default());
    let _ = rsync(&daemon, &src, "main", &[]);
    // (b) no change.
    for (temp, cold) in [("warm", false), ("cold", true)]
        .into_iter()
        .filter(|_| want("b"))
    {
        if cold && !cold_ok {
            continue;
        }
        if cold {
            drop_caches();
        }
        let (rs, rb) = rsync(&daemon, &src, "main", &[]);
        line(&format!("(b) no change {temp}"), "rsync daemon", rs, rb);
        if cold {
            drop_caches();
        }
        let (os, st, s2) = ours.no_journal_round(&src, "main", &nopts, state);
        state = s2;
        line(
            &format!("(b) no change {temp}, no journal"),
            "vsha-sync",
            os,
            st.bytes_sent + st.bytes_received,
        );
        ratio(
            &format!("(b) no change {temp}, no journal: ours/rsync"),
            rs,
            os,
            "<= 0.5",
            os / rs <= 0.5,
        );
        if cold {
            drop_caches();
        }
        let (js, jst, s3) = ours.round(&src, "main", &jopts, state);
        state = s3;
        line(
            &format!("(b) no change {temp}, journal"),
            "vsha-sync",
            js,
            jst.bytes_sent + jst.bytes_received,
        );
        println!(
            "    journal round full_scan={} fallbacks={}",
            jst.full_scan, jst.journal_fallbacks
        );
        ratio(
            &format!("(b) no change {temp}, journal: rsync/ours"),
            js,
            rs,
            ">= 20x",
            rs / js >= 20.0,
        );
    }
    if want("c") {
        // (c) 0.1 % changed, warm, journal.
        let n = mutate(&src, 0.001, 7);
        let (rs, rb) = rsync(&daemon, &src, "main", &[]);
        line(
            &format!("(c) 0.1% changed ({n} ops) warm"),
            "rsync daemon",
            rs,
            rb,
        );
        let (os, st, s2) = ours.round(&src, "main", &jopts, state);
        state = s2;
        line(
            &format!("(c) 0.1% changed ({n} ops) warm, journal"),
            "vsha-sync",
            os,
            st.bytes_sent + st.bytes_received,
        );
        println!(
            "    files_changed={} deleted={} full_scan={}",
            st.files_changed, st.files_deleted, st.full_scan
        );
        ratio(
            "(c) 0.1% change, journal: rsync/ours",
            os,
            rs,
            ">= 10x",
            rs / os >= 10.0,
        );
        let n2 = mutate(&src, 0.001, 8);
        let (rs2, _) = rsync(&daemon, &src, "main", &[]);
        let (os2, st2, s3) = ours.no_journal_round(&src, "main", &nopts, state);
        state = s3;
        line(
            &format!("(c) 0.1% changed ({n2} ops) warm"),
            "rsync daemon",
            rs2,
            0,
        );
        line(
            &format!("(c) 0.1% changed ({n2} ops) warm, no journal"),
            "vsha-sync",
            os2,
            st2.bytes_sent + st2.bytes_received,
        );
        ratio(
            "(c) 0.1% change, no journal: rsync/ours",
            os2,
            rs2,
            "(info)",
            true,
        );
        let v = vsha_sync::verify(&src, &w.join("ours-dst/main")).unwrap();
        println!("    verify(src, ours-dst/main): {} differences", v.len());
    }
    if want("d") {
        // (d) big file, 4 MiB changed in the middle.
        let bsrc = w.join("bigsrc");
        std::fs::create_dir_all(&bsrc).unwrap();
        {
            let mut rng = rand::rngs::StdRng::seed_from_u64(3);
            let mut f = std::fs::File::create(bsrc.join("disk.img")).unwrap();
            let mut buf = vec![0u8; 8 << 20];
            let mut left = bigfile;
            while left > 0 {
                let k = left.min(buf.len() as u64) as usize;
                rng.fill_bytes(&mut buf[..k]);
                f.write_all(&buf[..k]).unwrap();
                left -= k as u64;
            }
            // An older mtime, so the change below is visible to rsync's quick check.
            f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
                .unwrap();
        }
        let _ = rsync(&daemon, &bsrc, "big", &[]);
        let (_, _, bstate) = ours.round(&bsrc, "big", &nopts, SenderState::default());
        overwrite_random(&bsrc.join("disk.img"), 5, bigfile / 2 - (1 << 20) + 12345);
        sync_all();
        let (rs, rb) = rsync(&daemon, &bsrc, "big", &[]);
        line(
            "(d) big file, 4 MiB changed, warm",
            "rsync daemon (delta)",
            rs,
            rb,
        );
        let (os, st, bstate) = ours.round(&bsrc, "big", &nopts, bstate);
        let ob = st.bytes_sent + st.bytes_received;
        line(
            "(d) big file, 4 MiB changed, warm",
            "vsha-sync (delta)",
            os,
            ob,
        );
        let h = |p: &Path| blake3::hash(&std::fs::read(p).unwrap());
        let same = h(&bsrc.join("disk.img")) == h(&w.join("ours-dst/big/disk.img"));
        println!(
            "    blake3(src) == blake3(ours dst): {same}; literal {} matched {}",
            st.literal_bytes, st.matched_bytes
        );
        ratio(
            "(d) wire bytes ours/rsync",
            rb as f64,
            ob as f64,
            "<= 1.05",
            (ob as f64) <= 1.05 * rb as f64,
        );
        ratio("(d) time rsync/ours", os, rs, ">= 1.0x", os <= rs);

        // The same with a receiver just started (its signature cache is in
        // memory): it reads and sums the basis before the delta can match.
        overwrite_random(&bsrc.join("disk.img"), 7, bigfile / 4 + 777);
        sync_all();
        let (rs, rb) = rsync(&daemon, &bsrc, "big", &[]);
        line(
            "(d) big file, receiver restarted",
            "rsync daemon (delta)",
            rs,
            rb,
        );
        let fresh = Ours::new(&w.join("ours-dst"));
        let (os, st, _) = fresh.round(&bsrc, "big", &nopts, bstate);
        drop(fresh);
        let ob = st.bytes_sent + st.bytes_received;
        line(
            "(d) big file, receiver restarted",
            "vsha-sync (delta)",
            os,
            ob,
        );
        let same = h(&bsrc.join("disk.img")) == h(&w.join("ours-dst/big/disk.img"));
        println!("    blake3(src) == blake3(ours dst): {same}");
        ratio(
            "(d, receiver restarted) time rsync/ours",
            os,
            rs,
            ">= 1.0x",
            os <= rs,
        );
    }
    if want("e") {
        // (e) lag under a writer touching 100 files/s, continuous journal rounds.
        // On the main tree (the 200k-file tree in full mode), into its
        // up-to-date replica "main" (until 2026-11-29 the rounds went to a new
        // name, so the window also held that name's initial copy).
        let lsrc = src.clone();
        let lag_files: Vec<PathBuf> = (0..100).map(|i| lsrc.join(format!("touch{i}"))).collect();
        for p in &lag_files {
            std::fs::write(p, b"x").unwrap();
        }
        let (_, _, mut lstate) = ours.round(&lsrc, "main", &jopts, state);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writes = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
        let (s2, w2, lf) = (stop.clone(), writes.clone(), lag_files.clone());
        let writer = std::thread::spawn(move || {
            let mut i = 0;
            let start = Instant::now();
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                let f = std::fs::File::open(&lf[i % lf.len()]).unwrap();
                let now = Instant::now();
                f.set_modified(std::time::SystemTime::now()).unwrap();
                w2.lock().unwrap().push(now);
                i += 1;
                let next = start + Duration::from_millis(10 * i as u64);
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        });
        let mut rounds: Vec<(Instant, Instant)> = Vec::new(); // (scan start, commit)
        let mut durs: Vec<(f64, f64)> = Vec::new(); // (round, scan) per sender stats
        let t_end = Instant::now() + Duration::from_secs(lag_secs);
        while Instant::now() < t_end {
            let start = Instant::now();
            let (r, st) = ours.rt.block_on(vsha_sync::push_round(
                &lsrc, &ours.addr, "main", None, &jopts, lstate,
            ));
            lstate = st;
            let r = r.expect("lag round");
            durs.push((
                r.round_duration.as_secs_f64(),
                r.scan_duration.as_secs_f64(),
            ));
            rounds.push((start, Instant::now()));
            if let Some(j) = lstate.journal.as_ref() {
                j.wait(Duration::from_millis(200));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        let mut lags: Vec<f64> = writes
            .lock()
            .unwrap()
            .iter()
            .filter_map(|w| {
                rounds
                    .iter()
                    .find(|(s, _)| s >= w)
                    .map(|(_, c)| (*c - *w).as_secs_f64())
            })
            .collect();
        lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if !lags.is_empty() {
            let p = |q: f64| lags[((lags.len() as f64 * q) as usize).min(lags.len() - 1)];
            println!(
                "(e) lag ({} entries) under 100 touches/s over {lag_secs} s:",
                lstate.last.as_ref().map(|i| i.entries.len()).unwrap_or(0)
            );
            println!(
                "    {} writes, {} rounds, p50 {:.3} s, p99 {:.3} s, max {:.3} s",
                lags.len(),
                rounds.len(),
                p(0.5),
                p(0.99),
                lags[lags.len() - 1]
            );
            let n = durs.len().max(1) as f64;
            println!(
                "    sender round duration mean {:.3} s (max {:.3} s), of which scan mean {:.3} s",
                durs.iter().map(|d| d.0).sum::<f64>() / n,
                durs.iter().map(|d| d.0).fold(0.0, f64::max),
                durs.iter().map(|d| d.1).sum::<f64>() / n,
            );
            println!(
                "RATIO (e) lag p99 {:.3} s                                target <= 1 s       {}",
                p(0.99),
                if p(0.99) <= 1.0 { "MET" } else { "MISSED" }
            );
        }
    }
    // Debootstrap tree, full mode only.
    if full
        && want("deb")
        && Command::new("debootstrap")
            .arg("--version")
            .output()
            .is_ok()
    {
        let deb = w.join("deb");
        let t = Instant::now();
        let ok = Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&deb)
            .arg(apt_mirror::apt_mirror().unwrap_or_default())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            println!("debootstrap tree in {:.1} s", t.elapsed().as_secs_f64());
            for (temp, cold) in [("cold", true), ("warm", false)] {
                if cold && !cold_ok {
                    continue;
                }
                if cold {
                    drop_caches();
                }
                let (rs, rb) = rsync(&daemon, &deb, &format!("deb-{temp}"), &[]);
                line(
                    &format!("(a) debootstrap initial {temp}"),
                    "rsync daemon",
                    rs,
                    rb,
                );
                if cold {
                    drop_caches();
                }
                let ts = tar_copy(&deb, &w.join(format!("tar-deb-{temp}")));
                line(
                    &format!("(a) debootstrap initial {temp}"),
                    "tar c | tar x",
                    ts,
                    0,
                );
                if cold {
                    drop_caches();
                }
                let (os, st, _) =
                    ours.round(&deb, &format!("deb-{temp}"), &nopts, SenderState::default());
                line(
                    &format!("(a) debootstrap initial {temp}"),
                    "vsha-sync",
                    os,
                    st.bytes_sent + st.bytes_received,
                );
                ratio(
                    &format!("(a) debootstrap {temp}: rsync/ours"),
                    os,
                    rs,
                    ">= 1.5x",
                    rs / os >= 1.5,
                );
            }
            let v = vsha_sync::verify(&deb, &w.join("ours-dst/deb-warm")).unwrap();
            println!("    verify(debootstrap, ours): {} differences", v.len());
        } else {
            println!("debootstrap failed here: skipped the debootstrap tree");
        }
    }
    drop(ours);
    drop(daemon);
    println!("done; removing {}", w.display());
}
