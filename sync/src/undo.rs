//! The intent/undo log of a round on the receiver, and applying or reversing it.
//!
//! A round that has a previous snapshot stages every new inode in
//! `.vsha/NAME/tmp/ID` and records, per changed path, an [`Op`]: the old entry
//! (if any), the new entry (if any) and the staged inode. After the digest has
//! been checked, the ops are written to `undo/SEQ.log` and fsynced, and only
//! then applied to the live tree in tree order:
//!
//! 1. an old entry that is replaced or deleted is renamed into `undo/SEQ/I`
//!    (a whole directory subtree moves at once; its deleted descendants are
//!    "covered" and need no op of their own);
//! 2. the new entry is renamed in from the staging directory, created (a new
//!    directory), hardlinked to its group leader, or, for a directory that stays
//!    a directory, given its new metadata in place.
//!
//! Every step is detectable on disk, so a crash or an error at any point can be
//! reversed exactly: see [`reverse`]. A committed round's log and undo
//! directory are kept: they hold the inodes and entries of the previous
//! version (see `Store::materialize`).

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use rustix::fs::{AtFlags, Mode, OFlags};

use crate::entry::{key_cmp, split_parent, Entry, Kind, Reader};
use crate::error::{IoCtx, Result, SyncError};
use crate::fsops::{self, DirCache};

/// One change of a round, on one path.
#[derive(Debug, Clone)]
pub(crate) struct Op {
    /// The path.
    pub path: Vec<u8>,
    /// Its entry in the previous snapshot.
    pub old: Option<Entry>,
    /// Its entry in the new snapshot.
    pub new: Option<Entry>,
    /// Staged inode (`tmp/ID`) to rename in, if any.
    pub stage: Option<u64>,
    /// The old entry went away with an ancestor directory moved by an earlier op.
    pub covered: bool,
}

impl Op {
    /// The old entry is moved into the undo area (not a directory kept in place).
    pub fn moves_old(&self) -> bool {
        match (&self.old, &self.new) {
            (None, _) => false,
            (Some(o), Some(n)) if o.kind == Kind::Dir && n.kind == Kind::Dir => false,
            _ => !self.covered,
        }
    }

    fn in_place_dir(&self) -> bool {
        matches!((&self.old, &self.new), (Some(o), Some(n)) if o.kind == Kind::Dir && n.kind == Kind::Dir)
    }
}

/// Mark the ops whose old entry lies below a directory an earlier op moves away.
pub(crate) fn plan(ops: &mut [Op]) {
    let mut moved: Option<Vec<u8>> = None;
    for op in ops.iter_mut() {
        if let Some(m) = &moved {
            let below = op.path.len() > m.len()
                && (m.is_empty() || op.path[m.len()] == b'/')
                && op.path.starts_with(m);
            if below {
                op.covered = op.old.is_some();
                continue;
            }
            moved = None;
        }
        if op.moves_old() && op.old.as_ref().is_some_and(|o| o.kind == Kind::Dir) {
            moved = Some(op.path.clone());
        }
    }
}

const MAGIC: &[u8] = b"VSHAUNDO1";

/// Encode the log: magic, seq, ops, blake3 of everything before it.
pub(crate) fn encode(seq: u64, ops: &[Op]) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&(ops.len() as u64).to_le_bytes());
    for op in ops {
        let flags = u8::from(op.covered)
            | (u8::from(op.old.is_some()) << 1)
            | (u8::from(op.new.is_some()) << 2)
            | (u8::from(op.stage.is_some()) << 3);
        v.push(flags);
        v.extend_from_slice(&(op.path.len() as u32).to_le_bytes());
        v.extend_from_slice(&op.path);
        if let Some(o) = &op.old {
            o.encode(&mut v);
        }
        if let Some(n) = &op.new {
            n.encode(&mut v);
        }
        if let Some(s) = op.stage {
            v.extend_from_slice(&s.to_le_bytes());
        }
    }
    let h = *blake3::hash(&v).as_bytes();
    v.extend_from_slice(&h);
    v
}

/// Decode a log; `None` if it is torn or not a log (then nothing was applied).
pub(crate) fn decode(b: &[u8]) -> Option<(u64, Vec<Op>)> {
    if b.len() < MAGIC.len() + 16 + 32 || &b[..MAGIC.len()] != MAGIC {
        return None;
    }
    let (body, h) = b.split_at(b.len() - 32);
    if blake3::hash(body).as_bytes() != h {
        return None;
    }
    let mut r = Reader::new(&body[MAGIC.len()..]);
    let mut inner = || -> Result<(u64, Vec<Op>)> {
        let seq = r.u64()?;
        let n = r.u64()?;
        let mut ops = Vec::with_capacity(n.min(1 << 20) as usize);
        for _ in 0..n {
            let flags = r.u8()?;
            let path = r.bytes(crate::entry::MAX_PATH, "undo path")?.to_vec();
            let old = if flags & 2 != 0 {
                Some(Entry::decode(&mut r)?)
            } else {
                None
            };
            let new = if flags & 4 != 0 {
                Some(Entry::decode(&mut r)?)
            } else {
                None
            };
            let stage = if flags & 8 != 0 { Some(r.u64()?) } else { None };
            ops.push(Op {
                path,
                old,
                new,
                stage,
                covered: flags & 1 != 0,
            });
        }
        r.finish("undo log")?;
        Ok((seq, ops))
    };
    inner().ok()
}

fn name_of(i: usize) -> String {
    i.to_string()
}

fn exists_at(dir: BorrowedFd<'_>, name: &[u8]) -> Result<bool> {
    match rustix::fs::statat(dir, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Ok(true),
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(e).ctx("lstat", fsops::p(name)),
    }
}

/// The parent directory of `path` in `tree`, or None if it does not exist.
fn parent_of<'c>(tree: &'c mut DirCache, path: &[u8]) -> Result<Option<BorrowedFd<'c>>> {
    let (parent, _) = split_parent(path);
    match tree.dir(parent) {
        Ok(fd) => Ok(Some(fd)),
        Err(SyncError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Apply `ops` to the live tree. On error, the caller reverses them.
pub(crate) fn apply(
    ops: &[Op],
    live: &mut DirCache,
    stage: BorrowedFd<'_>,
    undo: BorrowedFd<'_>,
) -> Result<()> {
    for (i, op) in ops.iter().enumerate() {
        let (_, name) = split_parent(&op.path);
        if op.moves_old() {
            let Some(pfd) = parent_of(live, &op.path)? else {
                return Err(SyncError::Protocol(format!(
                    "{:?}: parent missing in the live tree",
                    crate::entry::display(&op.path)
                )));
            };
            rustix::fs::renameat(pfd, OsStr::from_bytes(name), undo, name_of(i).as_str())
                .ctx("rename to undo", fsops::p(&op.path))?;
            if op.old.as_ref().is_some_and(|o| o.kind == Kind::Dir) {
                live.clear();
            }
        }
        let Some(new) = &op.new else { continue };
        if op.in_place_dir() {
            let fd = live.dir(&op.path)?;
            fsops::apply_meta_fd(fd, new, false)?;
            fsops::replace_xattrs_fd(fd, new)?;
            continue;
        }
        if new.kind == Kind::Dir {
            let pfd = live.dir(split_parent(&op.path).0)?;
            fsops::make_dir(pfd, name, &op.path)?;
            let fd = live.dir(&op.path)?;
            fsops::apply_meta_fd(fd, new, false)?;
            continue;
        }
        if let Some(leader) = &new.link {
            let (lp, ln) = split_parent(leader);
            let lfd = rustix::io::dup(live.dir(lp)?).ctx("dup", fsops::p(lp))?;
            let pfd = live.dir(split_parent(&op.path).0)?;
            fsops::link(lfd.as_fd(), ln, pfd, name, &op.path)?;
            continue;
        }
        let Some(id) = op.stage else {
            return Err(SyncError::Protocol(format!(
                "{:?}: no staged content",
                crate::entry::display(&op.path)
            )));
        };
        let pfd = live.dir(split_parent(&op.path).0)?;
        rustix::fs::renameat(stage, id.to_string().as_str(), pfd, OsStr::from_bytes(name))
            .ctx("rename into place", fsops::p(&op.path))?;
    }
    Ok(())
}

/// Reverse `ops` (all, some or none of them applied) so the live tree is
/// the previous snapshot again, except directory mtimes (see [`dirs_touched`]).
/// With `link` the undo area is kept (its inodes are hardlinked back, for a
/// materialized copy); otherwise they are renamed back.
pub(crate) fn reverse(
    ops: &[Op],
    live: &mut DirCache,
    undo: BorrowedFd<'_>,
    link: bool,
) -> Result<()> {
    for (i, op) in ops.iter().enumerate().rev() {
        if op.covered {
            continue;
        }
        let (_, name) = split_parent(&op.path);
        let moved = op.moves_old();
        if moved && !exists_at(undo, name_of(i).as_bytes())? {
            // Not started (the old entry is moved away first).
            continue;
        }
        if let Some(new) = &op.new {
            if op.path.is_empty() || op.in_place_dir() {
                if let Some(old) = &op.old {
                    let fd = live.dir(&op.path)?;
                    fsops::apply_meta_fd(fd, old, false)?;
                    fsops::replace_xattrs_fd(fd, old)?;
                }
            } else if let Some(pfd) = parent_of(live, &op.path)? {
                let pfd = rustix::io::dup(pfd).ctx("dup", fsops::p(&op.path))?;
                let _ = new;
                live.clear();
                fsops::remove_tree(pfd.as_fd(), name)?;
            }
        }
        if moved {
            let Some(pfd) = parent_of(live, &op.path)? else {
                return Err(SyncError::Protocol(format!(
                    "{:?}: parent missing while undoing",
                    crate::entry::display(&op.path)
                )));
            };
            if link {
                let pfd = rustix::io::dup(pfd).ctx("dup", fsops::p(&op.path))?;
                link_copy(undo, name_of(i).as_bytes(), pfd.as_fd(), name, &op.path)?;
            } else {
                rustix::fs::renameat(undo, name_of(i).as_str(), pfd, OsStr::from_bytes(name))
                    .ctx("rename from undo", fsops::p(&op.path))?;
            }
            live.clear();
        }
    }
    Ok(())
}

/// Directories whose mtime a round changes: parents of every op, and
/// directories kept in place or created. Sorted, deduplicated.
pub(crate) fn dirs_touched(ops: &[Op]) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = Vec::new();
    for op in ops {
        if !op.path.is_empty() {
            v.push(split_parent(&op.path).0.to_vec());
        }
        if op.new.as_ref().is_some_and(|n| n.kind == Kind::Dir)
            || op.old.as_ref().is_some_and(|o| o.kind == Kind::Dir)
        {
            v.push(op.path.clone());
        }
    }
    v.sort_by(|a, b| key_cmp(a, b));
    v.dedup();
    v
}

/// Set the mtime of each of `dirs` that `index` holds as a directory and
/// that exists in `tree`.
pub(crate) fn set_dir_mtimes(
    dirs: &[Vec<u8>],
    index: &crate::scan::Index,
    tree: &mut DirCache,
) -> Result<()> {
    for d in dirs.iter().rev() {
        let Some(e) = index.get(d).filter(|e| e.kind == Kind::Dir) else {
            continue;
        };
        match tree.dir(d) {
            Ok(fd) => fsops::set_mtime_fd(fd, e)?,
            Err(SyncError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// fsync each of `dirs` that `index` holds as a directory, in parallel
/// (each fsync may wait for a device cache flush; concurrent ones share it).
pub(crate) fn fsync_dirs(
    dirs: &[Vec<u8>],
    index: &crate::scan::Index,
    root: BorrowedFd<'_>,
) -> Result<()> {
    use rayon::prelude::*;
    let todo: Vec<&Vec<u8>> = dirs
        .iter()
        .filter(|d| index.get(d).is_some_and(|e| e.kind == Kind::Dir))
        .collect();
    crate::scan::io_pool().install(|| {
        todo.par_iter().try_for_each(|d| match open_rel(root, d) {
            Ok(fd) => rustix::fs::fsync(&fd).ctx("fsync", fsops::p(d)),
            Err(SyncError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(())
            }
            Err(e) => Err(e),
        })
    })
}

/// Copy `name` in `from` to `to_name` in `to`: directories are re-created
/// with their metadata, everything else hardlinked.
pub(crate) fn link_copy(
    from: BorrowedFd<'_>,
    name: &[u8],
    to: BorrowedFd<'_>,
    to_name: &[u8],
    whole: &[u8],
) -> Result<()> {
    let st = rustix::fs::statat(from, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW)
        .ctx("lstat", fsops::p(whole))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory {
        return fsops::link(from, name, to, to_name, whole);
    }
    let src = fsops::open_dir_at(from, name, whole)?;
    rustix::fs::mkdirat(to, OsStr::from_bytes(to_name), Mode::from_raw_mode(0o700))
        .ctx("mkdir", fsops::p(whole))?;
    let dst = fsops::open_dir_at(to, to_name, whole)?;
    let mut names = Vec::new();
    {
        let d = rustix::fs::Dir::read_from(&src).ctx("readdir", fsops::p(whole))?;
        for ent in d {
            let ent = ent.ctx("readdir", fsops::p(whole))?;
            let b = ent.file_name().to_bytes();
            if b != b"." && b != b".." {
                names.push(b.to_vec());
            }
        }
    }
    for c in names {
        let mut w = whole.to_vec();
        w.push(b'/');
        w.extend_from_slice(&c);
        link_copy(src.as_fd(), &c, dst.as_fd(), &c, &w)?;
    }
    // Owner, mode and xattrs of the directory (its mtime is set from the
    // manifest by the caller).
    let _ = rustix::fs::fchown(
        &dst,
        Some(rustix::fs::Uid::from_raw(st.st_uid)),
        Some(rustix::fs::Gid::from_raw(st.st_gid)),
    );
    rustix::fs::fchmod(&dst, Mode::from_raw_mode(st.st_mode & 0o7777))
        .ctx("chmod", fsops::p(whole))?;
    fsops::copy_xattrs_fd(src.as_fd(), dst.as_fd(), whole)?;
    Ok(())
}

/// Open `rel` below `root` as a directory (no symlinks followed).
pub(crate) fn open_rel(root: BorrowedFd<'_>, rel: &[u8]) -> Result<OwnedFd> {
    let mut fd = rustix::io::dup(root).ctx("dup", PathBuf::from("."))?;
    for c in rel.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
        fd = fsops::open_dir_at(fd.as_fd(), c, rel)?;
    }
    Ok(fd)
}

/// Write a new file `name` in `dir` and fsync it (its directory entry is
/// made durable by the caller's fsync of `dir`). For the undo log, which
/// carries its own checksum: a torn one is recognized and ignored.
pub(crate) fn write_new_synced(dir: BorrowedFd<'_>, name: &str, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .ctx("create", PathBuf::from(name))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(data).ctx("write", PathBuf::from(name))?;
    f.sync_all().ctx("fsync", PathBuf::from(name))
}

/// Write `data` to `name` in `dir` durably (create, write, fsync), replacing it.
pub(crate) fn write_durable(dir: BorrowedFd<'_>, name: &str, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = format!("{name}.tmp");
    let fd = rustix::fs::openat(
        dir,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .ctx("create", PathBuf::from(&tmp))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(data).ctx("write", PathBuf::from(&tmp))?;
    f.sync_all().ctx("fsync", PathBuf::from(&tmp))?;
    rustix::fs::renameat(dir, tmp.as_str(), dir, name).ctx("rename", PathBuf::from(name))?;
    rustix::fs::fsync(dir).ctx("fsync", PathBuf::from("."))?;
    Ok(())
}
