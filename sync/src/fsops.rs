//! Safe *at() helpers for the receiver: directories are opened component by
//! component with O_NOFOLLOW, and nothing is ever resolved through a symlink.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps, XattrFlags};

use crate::entry::{display, Entry, Kind};
use crate::error::{IoCtx, Result, SyncError};

pub(crate) fn p(rel: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(rel))
}

/// Open a directory entry `name` in `dir` as a directory without following symlinks.
pub(crate) fn open_dir_at(dir: BorrowedFd<'_>, name: &[u8], whole: &[u8]) -> Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        OsStr::from_bytes(name),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR {
            SyncError::BadPath {
                path: display(whole),
                why: "a component is not a directory (symlink or file in the way)",
            }
        } else {
            SyncError::Io {
                op: "open dir",
                path: p(whole),
                source: e.into(),
            }
        }
    })
}

/// A cache of open directory fds along the current path of a tree walk in
/// tree order, rooted at an fd.
pub(crate) struct DirCache {
    root: std::sync::Arc<OwnedFd>,
    stack: Vec<(Vec<u8>, std::sync::Arc<OwnedFd>)>,
}

impl DirCache {
    pub(crate) fn new(root: OwnedFd) -> DirCache {
        DirCache {
            root: std::sync::Arc::new(root),
            stack: Vec::new(),
        }
    }

    pub(crate) fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Forget cached fds (after renames inside the tree).
    pub(crate) fn clear(&mut self) {
        self.stack.clear();
    }

    /// The directory `rel` (relative path, "" = root), opened without following symlinks.
    pub(crate) fn dir(&mut self, rel: &[u8]) -> Result<BorrowedFd<'_>> {
        self.dir_arc(rel)?;
        Ok(match self.stack.last() {
            Some((_, fd)) if !rel.is_empty() => fd.as_fd(),
            _ => self.root.as_fd(),
        })
    }

    /// Like `dir`, as a shared fd another thread can use.
    pub(crate) fn dir_arc(&mut self, rel: &[u8]) -> Result<std::sync::Arc<OwnedFd>> {
        if rel.is_empty() {
            return Ok(self.root.clone());
        }
        let comps: Vec<&[u8]> = rel.split(|b| *b == b'/').collect();
        let mut keep = 0;
        while keep < self.stack.len() && keep < comps.len() && self.stack[keep].0 == comps[keep] {
            keep += 1;
        }
        self.stack.truncate(keep);
        for (i, c) in comps.iter().enumerate().skip(keep) {
            let fd = {
                let parent = if i == 0 {
                    self.root.as_fd()
                } else {
                    self.stack[i - 1].1.as_fd()
                };
                open_dir_at(parent, c, rel)?
            };
            self.stack.push((c.to_vec(), std::sync::Arc::new(fd)));
        }
        Ok(match self.stack.last() {
            Some((_, fd)) => fd.clone(),
            None => self.root.clone(),
        })
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn ts(e: &Entry) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: e.mtime,
            tv_nsec: e.mtime_nsec as _,
        },
    }
}

fn owner_err(e: rustix::io::Errno, path: &[u8]) -> Result<()> {
    if e == rustix::io::Errno::PERM && !is_root() {
        let shown = display(path);
        tracing::debug!(path = %shown, "not root: owner not applied");
        Ok(())
    } else {
        Err(e).ctx("chown", p(path))
    }
}

/// Apply owner, mode, xattrs and mtime to an open regular file or directory.
/// Order matters: chown clears setuid bits and file capabilities, so chmod
/// and xattrs come after it.
pub(crate) fn apply_meta_fd(fd: BorrowedFd<'_>, e: &Entry, times: bool) -> Result<()> {
    if let Err(er) = rustix::fs::fchown(
        fd,
        Some(rustix::fs::Uid::from_raw(e.uid)),
        Some(rustix::fs::Gid::from_raw(e.gid)),
    ) {
        owner_err(er, &e.path)?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(e.mode)).ctx("chmod", p(&e.path))?;
    for (n, v) in &e.xattrs {
        rustix::fs::fsetxattr(fd, OsStr::from_bytes(n), v, XattrFlags::empty())
            .ctx("setxattr", p(&e.path))?;
    }
    if times {
        rustix::fs::futimens(fd, &ts(e)).ctx("utimens", p(&e.path))?;
    }
    Ok(())
}

/// Set a directory's mtime (done last, after its content was written).
pub(crate) fn set_mtime_fd(fd: BorrowedFd<'_>, e: &Entry) -> Result<()> {
    rustix::fs::futimens(fd, &ts(e)).ctx("utimens", p(&e.path))
}

/// Apply metadata to `name` in `dir` without following a symlink (symlinks,
/// device nodes, FIFOs, sockets: entries we do not open).
pub(crate) fn apply_meta_at(dir: BorrowedFd<'_>, name: &[u8], e: &Entry) -> Result<()> {
    let n = OsStr::from_bytes(name);
    if let Err(er) = rustix::fs::chownat(
        dir,
        n,
        Some(rustix::fs::Uid::from_raw(e.uid)),
        Some(rustix::fs::Gid::from_raw(e.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    ) {
        owner_err(er, &e.path)?;
    }
    if e.kind != Kind::Symlink {
        // fchmodat2 with AT_SYMLINK_NOFOLLOW; the entry was just created by
        // us in a directory only we write to, so plain fchmodat is the fallback.
        match rustix::fs::chmodat(
            dir,
            n,
            Mode::from_raw_mode(e.mode),
            AtFlags::SYMLINK_NOFOLLOW,
        ) {
            Ok(()) => {}
            Err(rustix::io::Errno::NOSYS)
            | Err(rustix::io::Errno::OPNOTSUPP)
            | Err(rustix::io::Errno::INVAL) => {
                rustix::fs::chmodat(dir, n, Mode::from_raw_mode(e.mode), AtFlags::empty())
                    .ctx("chmod", p(&e.path))?
            }
            Err(er) => return Err(er).ctx("chmod", p(&e.path)),
        }
    }
    if !e.xattrs.is_empty() {
        // lsetxattr does not follow the last component; the directory part
        // goes through our own open fd.
        let mut via = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        via.extend_from_slice(name);
        let via = OsStr::from_bytes(&via);
        for (xn, v) in &e.xattrs {
            rustix::fs::lsetxattr(via, OsStr::from_bytes(xn), v, XattrFlags::empty())
                .ctx("lsetxattr", p(&e.path))?;
        }
    }
    rustix::fs::utimensat(dir, n, &ts(e), AtFlags::SYMLINK_NOFOLLOW).ctx("utimens", p(&e.path))?;
    Ok(())
}

/// Create a non-regular, non-directory entry.
pub(crate) fn make_special(dir: BorrowedFd<'_>, name: &[u8], e: &Entry) -> Result<()> {
    let n = OsStr::from_bytes(name);
    use rustix::fs::FileType;
    let r = match e.kind {
        Kind::Symlink => rustix::fs::symlinkat(OsStr::from_bytes(&e.target), dir, n),
        Kind::Char => rustix::fs::mknodat(dir, n, FileType::CharacterDevice, Mode::empty(), e.rdev),
        Kind::Block => rustix::fs::mknodat(dir, n, FileType::BlockDevice, Mode::empty(), e.rdev),
        Kind::Fifo => rustix::fs::mknodat(dir, n, FileType::Fifo, Mode::empty(), 0),
        Kind::Socket => rustix::fs::mknodat(dir, n, FileType::Socket, Mode::empty(), 0),
        Kind::Dir | Kind::File => {
            return Err(SyncError::Protocol("make_special on a dir or file".into()))
        }
    };
    r.ctx("create", p(&e.path))?;
    apply_meta_at(dir, name, e)
}

/// Create a regular file for writing (exclusive, no symlink following).
pub(crate) fn create_file(dir: BorrowedFd<'_>, name: &[u8], whole: &[u8]) -> Result<std::fs::File> {
    let fd = rustix::fs::openat(
        dir,
        OsStr::from_bytes(name),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .ctx("create", p(whole))?;
    Ok(std::fs::File::from(fd))
}

/// Open a regular file for reading (no symlink following).
pub(crate) fn open_read(dir: BorrowedFd<'_>, name: &[u8], whole: &[u8]) -> Result<std::fs::File> {
    let fd = rustix::fs::openat(
        dir,
        OsStr::from_bytes(name),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ctx("open", p(whole))?;
    Ok(std::fs::File::from(fd))
}

/// mkdir, owner-only until metadata is applied.
pub(crate) fn make_dir(dir: BorrowedFd<'_>, name: &[u8], whole: &[u8]) -> Result<()> {
    rustix::fs::mkdirat(dir, OsStr::from_bytes(name), Mode::from_raw_mode(0o700))
        .ctx("mkdir", p(whole))
}

/// Hardlink `from_name` in `from_dir` to `name` in `dir` (never follows).
pub(crate) fn link(
    from_dir: BorrowedFd<'_>,
    from_name: &[u8],
    dir: BorrowedFd<'_>,
    name: &[u8],
    whole: &[u8],
) -> Result<()> {
    rustix::fs::linkat(
        from_dir,
        OsStr::from_bytes(from_name),
        dir,
        OsStr::from_bytes(name),
        AtFlags::empty(),
    )
    .ctx("link", p(whole))
}

/// Remove a whole directory tree below `dir`/`name` without following symlinks.
pub(crate) fn remove_tree(dir: BorrowedFd<'_>, name: &[u8]) -> Result<()> {
    let n = OsStr::from_bytes(name);
    match rustix::fs::statat(dir, n, AtFlags::SYMLINK_NOFOLLOW) {
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e).ctx("lstat", p(name)),
        Ok(st) => {
            if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory {
                return rustix::fs::unlinkat(dir, n, AtFlags::empty()).ctx("unlink", p(name));
            }
        }
    }
    let sub = open_dir_at(dir, name, name)?;
    // Make it writable in case a tree was saved with read-only directories.
    let _ = rustix::fs::fchmod(&sub, Mode::from_raw_mode(0o700));
    let mut names = Vec::new();
    {
        let d = rustix::fs::Dir::read_from(&sub).ctx("readdir", p(name))?;
        for ent in d {
            let ent = ent.ctx("readdir", p(name))?;
            let b = ent.file_name().to_bytes();
            if b != b"." && b != b".." {
                names.push((
                    b.to_vec(),
                    ent.file_type() == rustix::fs::FileType::Directory,
                ));
            }
        }
    }
    for (c, is_dir) in names {
        if is_dir {
            remove_tree(sub.as_fd(), &c)?;
        } else {
            rustix::fs::unlinkat(&sub, OsStr::from_bytes(&c), AtFlags::empty())
                .ctx("unlink", p(&c))?;
        }
    }
    drop(sub);
    rustix::fs::unlinkat(dir, n, AtFlags::REMOVEDIR).ctx("rmdir", p(name))
}

/// Names of the xattrs of an open file or directory.
fn list_xattrs_fd(fd: BorrowedFd<'_>, whole: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut names = vec![0u8; 4096];
    let n = loop {
        match rustix::fs::flistxattr(fd, &mut names[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) if names.len() < (1 << 20) => {
                names.resize(names.len() * 4, 0)
            }
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e).ctx("flistxattr", p(whole)),
        }
    };
    Ok(names[..n]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| s.to_vec())
        .collect())
}

/// Remove the xattrs of an open directory that `e` does not have (for a
/// directory whose metadata changes in place; `apply_meta_fd` sets the rest).
pub(crate) fn replace_xattrs_fd(fd: BorrowedFd<'_>, e: &Entry) -> Result<()> {
    for n in list_xattrs_fd(fd, &e.path)? {
        if e.xattrs.iter().any(|(x, _)| *x == n) {
            continue;
        }
        match rustix::fs::fremovexattr(fd, OsStr::from_bytes(&n)) {
            Ok(()) | Err(rustix::io::Errno::NODATA) => {}
            Err(er) => return Err(er).ctx("removexattr", p(&e.path)),
        }
    }
    Ok(())
}

/// Copy every xattr of `src` to `dst` (open fds).
pub(crate) fn copy_xattrs_fd(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, whole: &[u8]) -> Result<()> {
    let mut val = vec![0u8; 4096];
    for n in list_xattrs_fd(src, whole)? {
        let name = OsStr::from_bytes(&n);
        let len = loop {
            match rustix::fs::fgetxattr(src, name, &mut val[..]) {
                Ok(l) => break Some(l),
                Err(rustix::io::Errno::RANGE) if val.len() < (1 << 17) => {
                    val.resize(val.len() * 4, 0)
                }
                Err(rustix::io::Errno::NODATA) => break None,
                Err(e) => return Err(e).ctx("fgetxattr", p(whole)),
            }
        };
        if let Some(l) = len {
            rustix::fs::fsetxattr(dst, name, &val[..l], XattrFlags::empty())
                .ctx("setxattr", p(whole))?;
        }
    }
    Ok(())
}

/// Start writing a file just written back to disk now (and drop its pages
/// once clean): the receiver's files are not read again soon, and the
/// commit's `syncfs` then has little left to flush, instead of the whole
/// round's data sitting dirty in the page cache until then. Best effort.
pub(crate) fn start_writeback(fd: BorrowedFd<'_>) {
    let _ = rustix::fs::fadvise(fd, 0, None, rustix::fs::Advice::DontNeed);
}
