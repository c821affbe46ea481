//! Shared helpers of the vsha-sync integration tests.
#![allow(dead_code)]

pub mod apt_mirror;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, Timespec, Timestamps, XattrFlags, CWD};
use vsha_sync::{PushOptions, RoundStats, SenderState, Store};

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Returns false (and prints the skip) when not root.
pub fn need_root() -> bool {
    if !is_root() {
        println!("skipped: needs root");
        return false;
    }
    true
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn write(p: &Path, data: &[u8]) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(p, data).unwrap();
}

pub fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    rustix::fs::utimensat(
        CWD,
        p,
        &Timestamps {
            last_access: Timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            },
            last_modification: Timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            },
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

pub fn chmod(p: &Path, mode: u32) {
    rustix::fs::chmodat(CWD, p, Mode::from_raw_mode(mode), AtFlags::empty()).unwrap();
}

pub fn lchown(p: &Path, uid: u32, gid: u32) {
    rustix::fs::chownat(
        CWD,
        p,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

pub fn setxattr(p: &Path, name: &str, v: &[u8]) {
    rustix::fs::lsetxattr(p, name, v, XattrFlags::empty()).unwrap();
}

/// A file capability: cap_net_raw permitted + effective (VFS_CAP_REVISION_2).
pub fn cap_net_raw() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes());
    v.extend_from_slice(&(1u32 << 13).to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

/// A POSIX access ACL: user::rwx, user:4321:r--, group::r-x, mask::r-x, other::r--.
pub fn acl() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (1u16, 7u16, u32::MAX),
        (2, 4, 4321),
        (4, 5, u32::MAX),
        (0x10, 5, u32::MAX),
        (0x20, 4, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// Build the fidelity tree: every kind of entry a root filesystem holds.
pub fn rich_tree(root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    write(&root.join("etc/hostname"), b"web\n");
    write(&root.join("empty"), b"");
    // Large (3 MiB, not sparse) and sparse (1 MiB data at 8 MiB in a 16 MiB file).
    let big: Vec<u8> = (0..3 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    write(&root.join("var/big.bin"), &big);
    {
        let f = std::fs::File::create(root.join("var/sparse.img")).unwrap();
        f.set_len(16 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&big[..1 << 20], 8 << 20).unwrap();
    }
    // Hardlinks, also across directories.
    write(&root.join("bin/busybox"), b"#!/bin/sh\necho busybox\n");
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::hard_link(root.join("bin/busybox"), root.join("bin/sh")).unwrap();
    std::fs::hard_link(root.join("bin/busybox"), root.join("usr/bin/ls")).unwrap();
    // Symlinks: relative, absolute, dangling.
    std::os::unix::fs::symlink("../bin/busybox", root.join("usr/bin/vi")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("etc/abs-link")).unwrap();
    std::os::unix::fs::symlink("nowhere/at/all", root.join("etc/dangling")).unwrap();
    // Setuid, setgid, sticky.
    write(&root.join("bin/su"), b"su");
    chmod(&root.join("bin/su"), 0o4755);
    write(&root.join("bin/wall"), b"wall");
    chmod(&root.join("bin/wall"), 0o2755);
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    chmod(&root.join("tmp"), 0o1777);
    // Odd filenames.
    write(
        &root.join(OsStr::from_bytes(b"etc/na\xffme with spaces\n")),
        b"x",
    );
    // Nanosecond mtimes.
    set_mtime(&root.join("etc/hostname"), 1_600_000_000, 123_456_789);
    // user.* xattrs, an ACL.
    setxattr(&root.join("etc/hostname"), "user.origin", b"test");
    setxattr(&root.join("etc"), "user.dir", b"yes");
    if is_root() {
        write(&root.join("bin/ping"), b"ping");
        setxattr(
            &root.join("bin/ping"),
            "security.capability",
            &cap_net_raw(),
        );
        setxattr(
            &root.join("etc/hostname"),
            "system.posix_acl_access",
            &acl(),
        );
        // Ids with no name on the host.
        write(&root.join("home/ghost/file"), b"boo");
        lchown(&root.join("home/ghost/file"), 54321, 54322);
        lchown(&root.join("home/ghost"), 54321, 54322);
        lchown(&root.join("etc/dangling"), 54323, 54324);
        // Devices.
        std::fs::create_dir_all(root.join("dev")).unwrap();
        rustix::fs::mknodat(
            CWD,
            root.join("dev/null"),
            rustix::fs::FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .unwrap();
        rustix::fs::mknodat(
            CWD,
            root.join("dev/vda9"),
            rustix::fs::FileType::BlockDevice,
            Mode::from_raw_mode(0o660),
            rustix::fs::makedev(254, 9),
        )
        .unwrap();
    }
    rustix::fs::mknodat(
        CWD,
        root.join("fifo"),
        rustix::fs::FileType::Fifo,
        Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    {
        let l = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
        drop(l);
    }
}

/// `rsync -aHAXn --checksum --delete --itemize-changes SRC/ DST/`: what
/// rsync would still change (empty: the trees are equal for rsync).
pub fn rsync_diff(src: &Path, dst: &Path) -> String {
    let out = Command::new("rsync")
        .arg("-aHAXn")
        .arg("--numeric-ids")
        .arg("--checksum")
        .arg("--delete")
        .arg("--itemize-changes")
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()))
        .output()
        .expect("rsync must be installed (scripts/apt-packages)");
    assert!(
        out.status.success(),
        "rsync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn assert_same(src: &Path, dst: &Path) {
    let d = rsync_diff(src, dst);
    assert!(d.trim().is_empty(), "rsync oracle sees differences:\n{d}");
    let v = vsha_sync::verify(src, dst).unwrap();
    assert!(
        v.is_empty(),
        "verify sees differences:\n{}",
        v.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A receiver and a sender connected over in-process streams.
pub struct Pair {
    pub store: Arc<Store>,
    pub dst: PathBuf,
    pub state: Option<SenderState>,
    pub opts: PushOptions,
}

impl Pair {
    pub fn new(dst: &Path) -> Pair {
        Pair {
            store: Arc::new(Store::open(dst, 2).unwrap()),
            dst: dst.to_path_buf(),
            state: Some(SenderState::default()),
            opts: PushOptions::default(),
        }
    }

    /// One round of `src` as `name` over a tokio duplex pipe.
    pub async fn round(&mut self, src: &Path, name: &str) -> vsha_sync::Result<RoundStats> {
        let (a, b) = tokio::io::duplex(1 << 20);
        let store = self.store.clone();
        let recv = tokio::spawn(async move { vsha_sync::receive(store, b, None).await });
        let (r, st) = vsha_sync::send(
            a,
            src.to_path_buf(),
            name.to_string(),
            None,
            self.opts.clone(),
            self.state.take().unwrap_or_default(),
        )
        .await;
        self.state = Some(st);
        let rr = recv.await.unwrap();
        match (r, rr) {
            (Ok(s), Ok(_)) => Ok(s),
            (Err(e), _) => Err(e),
            (_, Err(e)) => Err(e),
        }
    }

    pub fn current(&self, name: &str) -> PathBuf {
        self.dst.join(name)
    }
}

/// Digest of what is on disk at `p` (a fresh scan, no caches).
pub fn disk_digest(p: &Path) -> [u8; 32] {
    let p = std::fs::canonicalize(p).unwrap();
    vsha_sync::scan_tree(&p, None).unwrap().0.digest
}
