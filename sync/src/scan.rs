//! The scanner: a parallel walk of one filesystem of a tree into a sorted
//! index, hashing file content only when size, mtime or inode changed since
//! the previous index.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::entry::{key_cmp, sort_entries, tree_digest, Entry, Kind};
use crate::error::{IoCtx, Result};

/// A scanned tree: entries in tree order and their digest.
#[derive(Debug, Clone, Default)]
pub struct Index {
    /// Entries, sorted with [`key_cmp`].
    pub entries: Vec<Entry>,
    /// [`tree_digest`] of the entries.
    pub digest: [u8; 32],
}

/// What a scan did.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanStats {
    /// Entries in the tree.
    pub entries: u64,
    /// Files whose content was hashed (the rest reused the previous hash).
    pub hashed_files: u64,
    /// Bytes hashed.
    pub hashed_bytes: u64,
    /// Directories listed.
    pub dirs_listed: u64,
}

impl Index {
    /// Build from unsorted entries: sorts, links hardlink groups, digests.
    pub fn from_entries(mut entries: Vec<Entry>) -> Index {
        sort_entries(&mut entries);
        let digest = tree_digest(&entries);
        Index { entries, digest }
    }

    /// Find an entry by path (binary search in tree order).
    pub fn get(&self, path: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| key_cmp(&e.path, path))
            .ok()
            .map(|i| &self.entries[i])
    }
}

/// Threads used for the walk and for hashing: cold small-file access is
/// latency bound, so more threads than cores keep the disk queue deep.
pub const IO_THREADS: usize = 16;

pub(crate) fn io_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(IO_THREADS)
            .thread_name(|i| format!("vsha-sync-io{i}"))
            .build()
            .unwrap_or_else(|_| {
                // Falling back to a one-thread pool keeps scans correct if threads are scarce.
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .expect("a one-thread pool")
            })
    })
}

/// Join a root and a relative raw path.
pub fn join(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

fn child_path(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        let mut v = Vec::with_capacity(parent.len() + 1 + name.len());
        v.extend_from_slice(parent);
        v.push(b'/');
        v.extend_from_slice(name);
        v
    }
}

/// Read all xattrs of a path without following a final symlink.
pub fn read_xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; 4096];
    let n = loop {
        match rustix::fs::llistxattr(path, &mut names[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) if names.len() < (1 << 20) => {
                names.resize(names.len() * 4, 0)
            }
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e).ctx("llistxattr", path),
        }
    };
    let mut out = Vec::new();
    let mut val = vec![0u8; 4096];
    for name in names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let name_os = OsStr::from_bytes(name);
        let len = loop {
            match rustix::fs::lgetxattr(path, name_os, &mut val[..]) {
                Ok(l) => break Some(l),
                Err(rustix::io::Errno::RANGE) if val.len() < (1 << 17) => {
                    val.resize(val.len() * 4, 0)
                }
                // Removed between list and get.
                Err(rustix::io::Errno::NODATA) => break None,
                Err(e) => return Err(e).ctx("lgetxattr", path),
            }
        };
        if let Some(l) = len {
            out.push((name.to_vec(), val[..l].to_vec()));
        }
    }
    out.sort();
    Ok(out)
}

/// lstat one path into an entry (content hash not filled).
pub fn stat_entry(root: &Path, rel: Vec<u8>) -> Result<Entry> {
    stat_entry_with(root, rel, None).map(|(e, _)| e)
}

/// [`stat_entry`], also returning the device; xattrs and the symlink
/// target are taken from `prev` (the previous scan of the same path) when
/// its inode and ctime are unchanged: one lstat instead of three syscalls.
fn stat_entry_with(root: &Path, rel: Vec<u8>, prev: Option<&Entry>) -> Result<(Entry, u64)> {
    let p = join(root, &rel);
    let md = std::fs::symlink_metadata(&p).ctx("lstat", &p)?;
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_char_device() {
        Kind::Char
    } else if ft.is_block_device() {
        Kind::Block
    } else if ft.is_fifo() {
        Kind::Fifo
    } else {
        Kind::Socket
    };
    let mut e = Entry::new(rel, kind);
    e.mode = md.mode() & 0o7777;
    e.uid = md.uid();
    e.gid = md.gid();
    e.size = if kind == Kind::File { md.size() } else { 0 };
    e.mtime = md.mtime();
    e.mtime_nsec = md.mtime_nsec() as u32;
    e.rdev = if matches!(kind, Kind::Char | Kind::Block) {
        md.rdev()
    } else {
        0
    };
    e.ino = md.ino();
    e.blocks = md.blocks();
    e.nlink = md.nlink();
    e.ctime = md.ctime();
    e.ctime_nsec = md.ctime_nsec() as u32;
    if let Some(o) = prev.filter(|o| {
        o.ctime != 0
            && o.ino == e.ino
            && o.kind == kind
            && o.ctime == e.ctime
            && o.ctime_nsec == e.ctime_nsec
    }) {
        e.target = o.target.clone();
        e.xattrs = o.xattrs.clone();
        return Ok((e, md.dev()));
    }
    if kind == Kind::Symlink {
        e.target = std::fs::read_link(&p)
            .ctx("readlink", &p)?
            .into_os_string()
            .into_encoded_bytes();
    }
    e.xattrs = read_xattrs(&p)?;
    Ok((e, md.dev()))
}

struct Walk<'a> {
    root: &'a Path,
    prev: Option<&'a Index>,
    dev: u64,
    out: Mutex<Vec<Entry>>,
    err: Mutex<Option<crate::error::SyncError>>,
    dirs: std::sync::atomic::AtomicU64,
}

impl Walk<'_> {
    fn fail(&self, e: crate::error::SyncError) {
        let mut g = self.err.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
    }

    fn dir<'s>(&'s self, s: &rayon::Scope<'s>, rel: Vec<u8>) {
        self.dirs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = join(self.root, &rel);
        let rd = match std::fs::read_dir(&p).ctx("readdir", &p) {
            Ok(rd) => rd,
            Err(e) => return self.fail(e),
        };
        let mut local = Vec::new();
        for de in rd {
            let de = match de.ctx("readdir", &p) {
                Ok(d) => d,
                Err(e) => return self.fail(e),
            };
            let child = child_path(&rel, de.file_name().as_bytes());
            let old = self.prev.and_then(|p| p.get(&child));
            match stat_entry_with(self.root, child, old) {
                Ok((e, dev)) => {
                    if e.kind == Kind::Dir {
                        // One filesystem: a mount point is kept as an empty directory.
                        if dev == self.dev {
                            let sub = e.path.clone();
                            s.spawn(move |s| self.dir(s, sub));
                        }
                    }
                    local.push(e);
                }
                // Vanished between readdir and lstat: a concurrent delete.
                Err(crate::error::SyncError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return self.fail(e),
            }
        }
        self.out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(local);
    }
}

/// Walk the whole tree at `root` (one filesystem).
fn walk_from(root: &Path, starts: Vec<Vec<u8>>, prev: Option<&Index>) -> Result<(Vec<Entry>, u64)> {
    let dev = std::fs::symlink_metadata(root).ctx("lstat", root)?.dev();
    let w = Walk {
        root,
        prev,
        dev,
        out: Mutex::new(Vec::new()),
        err: Mutex::new(None),
        dirs: Default::default(),
    };
    io_pool().scope(|s| {
        for st in starts {
            let w = &w;
            s.spawn(move |s| w.dir(s, st));
        }
    });
    if let Some(e) = w.err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok((
        w.out.into_inner().unwrap_or_else(|p| p.into_inner()),
        w.dirs.into_inner(),
    ))
}

/// Hash one file's content with blake3.
pub fn hash_file(path: &Path) -> Result<[u8; 32]> {
    let f = std::fs::File::open(path).ctx("open", path)?;
    let mut h = blake3::Hasher::new();
    h.update_reader(f).ctx("read", path)?;
    Ok(*h.finalize().as_bytes())
}

/// Fill hardlink `link` fields and content hashes, reusing `prev` hashes when
/// size, mtime and inode are unchanged.
fn finish(
    root: &Path,
    mut entries: Vec<Entry>,
    prev: Option<&Index>,
    want: Want<'_>,
    st: &mut ScanStats,
) -> Result<Index> {
    sort_entries(&mut entries);
    // Hardlink groups: first name in tree order leads.
    let mut leaders: HashMap<u64, usize> = HashMap::new();
    // Inodes with several names (a partial rescan may hold a stale link
    // count for some of them: one name seen with nlink > 1 is enough).
    let multi: HashSet<u64> = entries
        .iter()
        .filter(|e| e.kind != Kind::Dir && e.nlink > 1)
        .map(|e| e.ino)
        .collect();
    for i in 0..entries.len() {
        let e = &entries[i];
        if e.kind != Kind::Dir && multi.contains(&e.ino) {
            match leaders.get(&e.ino) {
                Some(&l) => {
                    let lp = entries[l].path.clone();
                    entries[i].link = Some(lp);
                }
                None => {
                    leaders.insert(e.ino, i);
                }
            }
        }
    }
    // Entries carried over from the previous index by a partial rescan keep
    // their hash; only the others are looked up (few: binary search; many:
    // one map).
    let lookups = entries
        .iter()
        .filter(|e| e.kind == Kind::File && e.link.is_none() && e.hash == [0; 32])
        .count();
    let prev_map: HashMap<&[u8], &Entry> = match prev {
        Some(p) if lookups > entries.len() / 16 => {
            p.entries.iter().map(|e| (&e.path[..], e)).collect()
        }
        _ => HashMap::new(),
    };
    let prev_get = |path: &[u8]| -> Option<&Entry> {
        if prev_map.is_empty() {
            prev.and_then(|p| p.get(path))
        } else {
            prev_map.get(path).copied()
        }
    };
    // A cached hash is reused where it may stand (`reusable_hash`). Other
    // files are hashed now if `want` says so, else later while they are sent
    // (their hash stays zero until then).
    let mut need = Vec::new();
    for (i, e) in entries.iter_mut().enumerate() {
        if e.kind != Kind::File || e.link.is_some() || e.hash != [0; 32] {
            continue;
        }
        match reusable_hash(prev_get(&e.path[..]), e) {
            Some(h) => e.hash = h,
            None => {
                if want(e) {
                    need.push(i);
                }
            }
        }
    }
    st.hashed_bytes += hash_needed(root, &mut entries, &need)?;
    st.hashed_files += need.len() as u64;
    // Followers take the leader's hash.
    for i in 0..entries.len() {
        if let Some(l) = entries[i].link.clone() {
            if let Ok(j) = entries.binary_search_by(|e| key_cmp(&e.path, &l)) {
                entries[i].hash = entries[j].hash;
            }
        }
    }
    st.entries = entries.len() as u64;
    Ok(Index::from_entries(entries))
}

/// Scan the whole tree at `root`; `prev` is the index of the previous round
/// (hashes of files whose size, mtime and inode did not change are reused).
pub fn scan(root: &Path, prev: Option<&Index>) -> Result<(Index, ScanStats)> {
    scan_with(root, prev, &|_| true)
}

/// Which files without a cached hash must be hashed during the scan.
pub type Want<'a> = &'a (dyn Fn(&Entry) -> bool + Sync);

/// [`scan`], hashing uncached files only when `want` says so.
pub fn scan_with(root: &Path, prev: Option<&Index>, want: Want<'_>) -> Result<(Index, ScanStats)> {
    let mut st = ScanStats::default();
    let rootent = stat_entry(root, Vec::new())?;
    let (mut entries, dirs) = walk_from(root, vec![Vec::new()], prev)?;
    st.dirs_listed = dirs;
    entries.push(rootent);
    let idx = finish(root, entries, prev, want, &mut st)?;
    Ok((idx, st))
}

/// Rescan only the directories in `dirs` (relative paths) on top of `prev`:
/// each is listed again and its children re-stated; new or replaced
/// subdirectories are walked in full; vanished ones drop with their subtree.
pub fn rescan_dirs(
    root: &Path,
    prev: &Index,
    dirs: &HashSet<Vec<u8>>,
    want: Want<'_>,
) -> Result<(Index, ScanStats)> {
    let mut st = ScanStats::default();
    if dirs.is_empty() {
        st.entries = prev.entries.len() as u64;
        return Ok((prev.clone(), st));
    }
    let mut changed: Vec<Vec<u8>> = dirs.iter().cloned().collect();
    changed.sort_by(|a, b| key_cmp(a, b));
    // Drop directories that are inside another changed directory's... keep all: cheap.
    let dev = std::fs::symlink_metadata(root).ctx("lstat", root)?.dev();
    let mut fresh: HashMap<Vec<u8>, Entry> = HashMap::new();
    let mut removed_prefixes: Vec<Vec<u8>> = Vec::new();
    let mut listed: HashSet<Vec<u8>> = HashSet::new();
    let mut new_dirs: Vec<Vec<u8>> = Vec::new();
    let prev_dirs: HashMap<&[u8], &Entry> = prev
        .entries
        .iter()
        .filter(|e| e.kind == Kind::Dir)
        .map(|e| (&e.path[..], e))
        .collect();
    for d in &changed {
        let p = join(root, d);
        let de = match stat_entry(root, d.clone()) {
            Ok(e) => e,
            Err(crate::error::SyncError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                removed_prefixes.push(d.clone());
                continue;
            }
            Err(e) => return Err(e),
        };
        if de.kind != Kind::Dir {
            fresh.insert(d.clone(), de);
            removed_prefixes.push(d.clone());
            continue;
        }
        fresh.insert(d.clone(), de);
        listed.insert(d.clone());
        st.dirs_listed += 1;
        let rd = std::fs::read_dir(&p).ctx("readdir", &p)?;
        for ent in rd {
            let ent = ent.ctx("readdir", &p)?;
            let child = child_path(d, ent.file_name().as_bytes());
            match stat_entry(root, child.clone()) {
                Ok(e) => {
                    if e.kind == Kind::Dir {
                        let same = prev_dirs
                            .get(&child[..])
                            .map(|o| o.ino == e.ino)
                            .unwrap_or(false);
                        let on_dev = std::fs::symlink_metadata(join(root, &child))
                            .map(|m| m.dev() == dev)
                            .unwrap_or(false);
                        if !same && on_dev {
                            new_dirs.push(child.clone());
                        }
                    } else if prev_dirs.contains_key(&child[..]) {
                        removed_prefixes.push(child.clone());
                    }
                    fresh.insert(child, e);
                }
                Err(crate::error::SyncError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    // Subdirectories of re-listed directories that are gone (renamed away,
    // deleted): their whole previous subtree goes.
    for e in &prev.entries {
        if e.kind == Kind::Dir
            && !e.path.is_empty()
            && listed.contains(crate::entry::split_parent(&e.path).0)
            && !fresh.contains_key(&e.path)
        {
            removed_prefixes.push(e.path.clone());
        }
    }
    // New or replaced subdirectories: their previous content (if any) is void.
    removed_prefixes.extend(new_dirs.iter().cloned());
    let (walked, nd) = if new_dirs.is_empty() {
        (Vec::new(), 0)
    } else {
        walk_from(root, new_dirs, Some(prev))?
    };
    st.dirs_listed += nd;
    let under =
        |p: &[u8], pre: &[u8]| p.len() > pre.len() && p.starts_with(pre) && p[pre.len()] == b'/';
    let mut out: Vec<Entry> = Vec::with_capacity(prev.entries.len() + walked.len());
    for e in &prev.entries {
        let (parent, _) = crate::entry::split_parent(&e.path);
        if !e.path.is_empty() && listed.contains(parent) {
            continue; // re-listed: taken from `fresh`
        }
        if fresh.contains_key(&e.path) {
            continue;
        }
        if removed_prefixes
            .iter()
            .any(|pre| under(&e.path, pre) || (e.path == *pre && !fresh.contains_key(pre)))
        {
            continue;
        }
        out.push(e.clone());
    }
    out.extend(fresh.into_values());
    out.extend(walked);
    // Hardlink groups are recomputed from inode numbers in `finish` (a stale
    // link count is harmless: a group needs two names with one inode).
    for e in out.iter_mut() {
        e.link = None;
    }
    let idx = finish(root, out, Some(prev), want, &mut st)?;
    Ok((idx, st))
}

/// Leaves of the tree digest (`Entry::leaf` of every entry), in parallel.
pub(crate) fn leaves_of(entries: &[Entry]) -> Vec<[u8; 32]> {
    if entries.len() > 4096 {
        entries.par_iter().map(|e| e.leaf()).collect()
    } else {
        entries.iter().map(|e| e.leaf()).collect()
    }
}

/// [`scan_with`], also returning the digest's leaves (kept by the sender so
/// that later journal rounds re-hash only the entries they change).
pub(crate) fn scan_with_leaves(
    root: &Path,
    prev: Option<&Index>,
    want: Want<'_>,
) -> Result<(Index, Vec<[u8; 32]>)> {
    let (idx, _) = scan_with(root, prev, want)?;
    let leaves = leaves_of(&idx.entries);
    Ok((idx, leaves))
}

/// What re-listing some directories found, relative to the index they were
/// listed against: which of its entries go, which come.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    /// Indices of the previous index's entries that are replaced or gone
    /// (sorted, unique).
    pub removed: Vec<usize>,
    /// Fresh entries in tree order, unique paths, hashes filled as
    /// [`finish`] would (cached or hashed when wanted), `link` not yet set.
    pub added: Vec<Entry>,
    /// Directories listed.
    pub dirs_listed: u64,
}

/// `p` lies strictly below `pre` (the root "" holds every other path).
fn under(p: &[u8], pre: &[u8]) -> bool {
    if pre.is_empty() {
        return !p.is_empty();
    }
    p.len() > pre.len() && p.starts_with(pre) && p[pre.len()] == b'/'
}

/// Index range of the entries strictly below `p` in a tree-ordered list: a
/// directory's subtree is contiguous right after it.
fn subtree(entries: &[Entry], p: &[u8]) -> std::ops::Range<usize> {
    let start = entries.partition_point(|e| key_cmp(&e.path, p) != std::cmp::Ordering::Greater);
    let len = entries[start..].partition_point(|e| under(&e.path, p));
    start..start + len
}

/// One re-listed directory.
enum Listed {
    /// Gone: it and its previous subtree go.
    Gone(Vec<u8>),
    /// No longer a directory: its previous subtree goes.
    NotDir(Entry),
    /// Listed: the directory, its children, and the children that are new
    /// or replaced directories (to be walked in full).
    Dir(Entry, Vec<Entry>, Vec<Vec<u8>>),
}

fn list_one(root: &Path, dev: u64, prev: &Index, d: &[u8]) -> Result<Listed> {
    let de = match stat_entry(root, d.to_vec()) {
        Ok(e) => e,
        Err(crate::error::SyncError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(Listed::Gone(d.to_vec()))
        }
        Err(e) => return Err(e),
    };
    if de.kind != Kind::Dir {
        return Ok(Listed::NotDir(de));
    }
    let p = join(root, d);
    let rd = match std::fs::read_dir(&p) {
        Ok(rd) => rd,
        // Removed between the stat and the listing: a concurrent delete.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Listed::Gone(d.to_vec())),
        Err(e) => return Err(e).ctx("readdir", &p),
    };
    let mut kids = Vec::new();
    let mut new_dirs = Vec::new();
    for ent in rd {
        let ent = ent.ctx("readdir", &p)?;
        let child = child_path(d, ent.file_name().as_bytes());
        let old = prev.get(&child);
        match stat_entry_with(root, child, old) {
            Ok((e, edev)) => {
                if e.kind == Kind::Dir {
                    let same = old.is_some_and(|o| o.kind == Kind::Dir && o.ino == e.ino);
                    if !same && edev == dev {
                        new_dirs.push(e.path.clone());
                    }
                }
                kids.push(e);
            }
            Err(crate::error::SyncError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Listed::Dir(de, kids, new_dirs))
}

/// Re-list the directories in `dirs` (relative paths) against `prev` and
/// return only the difference: cost in proportion to the listed directories
/// and what changed, not to the tree. [`splice`] applies the result; both
/// together give the same index as [`rescan_dirs`].
pub(crate) fn rescan_changes(
    root: &Path,
    prev: &Index,
    dirs: &HashSet<Vec<u8>>,
    want: Want<'_>,
) -> Result<Changes> {
    let mut ch = Changes::default();
    if dirs.is_empty() {
        return Ok(ch);
    }
    let mut todo: Vec<&Vec<u8>> = dirs.iter().collect();
    todo.sort_by(|a, b| key_cmp(a, b));
    let dev = std::fs::symlink_metadata(root).ctx("lstat", root)?.dev();
    // Listing many directories is latency bound like the full walk.
    let listed: Vec<Result<Listed>> = io_pool().install(|| {
        todo.par_iter()
            .map(|d| list_one(root, dev, prev, d))
            .collect()
    });
    let es = &prev.entries;
    let mut gone: Vec<std::ops::Range<usize>> = Vec::new();
    let mut added: Vec<Entry> = Vec::new();
    let mut walk_roots: Vec<Vec<u8>> = Vec::new();
    let at = |p: &[u8]| es.binary_search_by(|e| key_cmp(&e.path, p)).ok();
    for l in listed {
        match l? {
            Listed::Gone(d) => {
                if let Some(i) = at(&d) {
                    gone.push(i..i + 1);
                }
                gone.push(subtree(es, &d));
            }
            Listed::NotDir(e) => {
                gone.push(subtree(es, &e.path));
                added.push(e);
            }
            Listed::Dir(de, kids, new_dirs) => {
                ch.dirs_listed += 1;
                let d = de.path.clone();
                added.push(de);
                // Every previous child goes (the listing replaces them); a
                // previous subdirectory keeps its subtree only if it is
                // still the same directory.
                let mut fresh: HashMap<&[u8], &Entry> =
                    kids.iter().map(|k| (&k.path[..], k)).collect();
                for nd in &new_dirs {
                    fresh.remove(&nd[..]);
                }
                let r = subtree(es, &d);
                let mut i = r.start;
                while i < r.end {
                    let c = &es[i];
                    // Most children are files: nothing below them.
                    let sub = if es.get(i + 1).is_some_and(|n| under(&n.path, &c.path)) {
                        subtree(es, &c.path)
                    } else {
                        i + 1..i + 1
                    };
                    gone.push(i..i + 1);
                    let keeps = c.kind == Kind::Dir
                        && fresh.get(&c.path[..]).is_some_and(|k| k.kind == Kind::Dir);
                    if !keeps {
                        gone.push(sub.clone());
                    }
                    i = sub.end.max(i + 1);
                }
                walk_roots.extend(new_dirs);
                added.extend(kids);
            }
        }
    }
    if !walk_roots.is_empty() {
        let (walked, nd) = walk_from(root, walk_roots, Some(prev))?;
        ch.dirs_listed += nd;
        added.extend(walked);
    }
    sort_entries(&mut added);
    // A directory listed twice (also inside a walked one): one copy.
    added.dedup_by(|a, b| a.path == b.path);
    // Anything the listing re-created replaces its previous version.
    for e in &added {
        if let Some(i) = at(&e.path) {
            gone.push(i..i + 1);
        }
    }
    gone.sort_by_key(|r| r.start);
    let mut removed = Vec::new();
    let mut upto = 0;
    for r in gone {
        for i in r.start.max(upto)..r.end {
            removed.push(i);
        }
        upto = upto.max(r.end);
    }
    // Content hashes: cached when size, mtime and inode match (as `finish`).
    let mut need = Vec::new();
    for (i, e) in added.iter_mut().enumerate() {
        if e.kind != Kind::File {
            continue;
        }
        match reusable_hash(at(&e.path).map(|j| &es[j]), e) {
            Some(h) => e.hash = h,
            None => {
                if want(e) {
                    need.push(i);
                }
            }
        }
    }
    hash_needed(root, &mut added, &need)?;
    // A re-listed entry identical to its previous version (the other names
    // in a changed directory) stays as it was: neither re-encoded nor
    // compared again later.
    let mut same_at: HashSet<usize> = HashSet::new();
    added.retain(|e| match at(&e.path) {
        Some(j) if removed.binary_search(&j).is_ok() && identical(&es[j], e) => {
            same_at.insert(j);
            false
        }
        _ => true,
    });
    removed.retain(|j| !same_at.contains(j));
    ch.removed = removed;
    ch.added = added;
    Ok(ch)
}

/// The hash of `prev` when it may stand for file `e`: same size, mtime and
/// inode (inode 0: a receiver manifest, which has none: size and mtime,
/// like rsync's quick check).
fn reusable_hash(prev: Option<&Entry>, e: &Entry) -> Option<[u8; 32]> {
    prev.filter(|p| {
        p.kind == Kind::File
            && p.size == e.size
            && p.mtime == e.mtime
            && p.mtime_nsec == e.mtime_nsec
            && (p.ino == e.ino || p.ino == 0)
            && p.hash != [0; 32]
    })
    .map(|p| p.hash)
}

/// Hashes the files at `need` (indexes into `entries`) on the I/O pool and
/// stores their hashes; returns the bytes hashed.
fn hash_needed(root: &Path, entries: &mut [Entry], need: &[usize]) -> Result<u64> {
    let hashes: Vec<(usize, Result<[u8; 32]>)> = io_pool().install(|| {
        need.par_iter()
            .map(|&i| (i, hash_file(&join(root, &entries[i].path))))
            .collect()
    });
    let mut bytes = 0;
    for (i, h) in hashes {
        entries[i].hash = h?;
        bytes += entries[i].size;
    }
    Ok(bytes)
}

/// Same digest-relevant content and same local facts (inode, link count,
/// blocks): keeping the previous entry is exact.
fn identical(p: &Entry, e: &Entry) -> bool {
    p.same_inode_meta(e)
        && p.ino == e.ino
        && p.nlink == e.nlink
        && p.blocks == e.blocks
        && p.ctime == e.ctime
        && p.ctime_nsec == e.ctime_nsec
}

/// The result of [`splice`].
#[derive(Debug)]
pub(crate) struct Spliced {
    /// The new index.
    pub index: Index,
    /// Its digest's leaves.
    pub leaves: Vec<[u8; 32]>,
    /// Indices (in `index`) of the entries that are new or may differ from
    /// the previous version at their path, sorted.
    pub changed: Vec<usize>,
    /// The previous versions of removed and changed entries, tree order.
    pub old: Vec<Entry>,
}

/// Apply `ch` to `prev` (whose leaves are `leaves`): unchanged entries are
/// moved, not copied or re-encoded; hardlink groups and the digest are
/// brought up to date. The result is what [`finish`] gives for the same
/// entries (checked by a property test).
pub(crate) fn splice(prev: Index, leaves: Vec<[u8; 32]>, ch: Changes) -> Spliced {
    let n = prev.entries.len() - ch.removed.len() + ch.added.len();
    let mut fresh = vec![false; n];
    let mut old: Vec<Entry> = Vec::with_capacity(ch.removed.len());
    // Only replacements (touched, rewritten files): in place, no move of
    // the other entries.
    let in_place = ch.removed.len() == ch.added.len()
        && ch
            .removed
            .iter()
            .zip(&ch.added)
            .all(|(&i, a)| prev.entries[i].path == a.path);
    let (entries, lv) = if in_place {
        let (mut entries, mut lv) = (prev.entries, leaves);
        for (&i, a) in ch.removed.iter().zip(ch.added) {
            old.push(std::mem::replace(&mut entries[i], a));
            lv[i] = [0; 32];
            fresh[i] = true;
        }
        (entries, lv)
    } else {
        merge_changes(prev.entries, leaves, ch, &mut fresh, &mut old)
    };
    splice_finish(entries, lv, fresh, old)
}

/// Merge removals and additions into a new list (moving the entries).
fn merge_changes(
    prev: Vec<Entry>,
    leaves: Vec<[u8; 32]>,
    ch: Changes,
    fresh: &mut [bool],
    old: &mut Vec<Entry>,
) -> (Vec<Entry>, Vec<[u8; 32]>) {
    let n = fresh.len();
    let mut entries: Vec<Entry> = Vec::with_capacity(n);
    let mut lv: Vec<[u8; 32]> = Vec::with_capacity(n);
    let mut rem = ch.removed.iter().peekable();
    let mut add = ch.added.into_iter().peekable();
    for (i, (e, l)) in prev.into_iter().zip(leaves).enumerate() {
        if rem.peek() == Some(&&i) {
            rem.next();
            old.push(e);
            continue;
        }
        while add
            .peek()
            .is_some_and(|a| key_cmp(&a.path, &e.path) == std::cmp::Ordering::Less)
        {
            fresh[entries.len()] = true;
            entries.extend(add.next());
            lv.push([0; 32]);
        }
        entries.push(e);
        lv.push(l);
    }
    for a in add {
        fresh[entries.len()] = true;
        entries.push(a);
        lv.push([0; 32]);
    }
    (entries, lv)
}

/// Continuation of [`splice`]: hardlink groups, leaves, digest.
fn splice_finish(
    mut entries: Vec<Entry>,
    mut lv: Vec<[u8; 32]>,
    mut fresh: Vec<bool>,
    mut old: Vec<Entry>,
) -> Spliced {
    // Hardlink groups from inode numbers, over the whole list as `finish`
    // does (a cheap pass over integers): a stale link count on an entry
    // that was not re-listed must not split or merge a group differently.
    let multi: HashSet<u64, InoHash> = entries
        .iter()
        .filter(|e| e.kind != Kind::Dir && e.nlink > 1)
        .map(|e| e.ino)
        .collect();
    let mut leaders: HashMap<u64, usize, InoHash> = HashMap::default();
    let mut touch = |i: usize, entries: &mut Vec<Entry>, old: &mut Vec<Entry>| {
        if !fresh[i] {
            fresh[i] = true;
            old.push(entries[i].clone());
        }
    };
    for i in 0..entries.len() {
        let e = &entries[i];
        let want_link = if e.kind != Kind::Dir && multi.contains(&e.ino) {
            match leaders.get(&e.ino) {
                Some(&l) => Some(l),
                None => {
                    leaders.insert(e.ino, i);
                    None
                }
            }
        } else {
            None
        };
        match want_link {
            Some(l) => {
                let (lp, lh) = (&entries[l].path, entries[l].hash);
                if entries[i].link.as_deref() != Some(&lp[..]) || entries[i].hash != lh {
                    let lp = lp.clone();
                    touch(i, &mut entries, &mut old);
                    entries[i].link = Some(lp);
                    entries[i].hash = lh;
                }
            }
            None => {
                if entries[i].link.is_some() {
                    touch(i, &mut entries, &mut old);
                    entries[i].link = None;
                }
            }
        }
    }
    let changed: Vec<usize> = (0..entries.len()).filter(|i| fresh[*i]).collect();
    refresh_leaves(&entries, &mut lv, &changed);
    sort_entries(&mut old);
    let digest = crate::store::digest_of(&lv);
    Spliced {
        index: Index { entries, digest },
        leaves: lv,
        changed,
        old,
    }
}

/// Inode numbers are already well spread: one multiplication is hash enough
/// (this set is probed once per entry of the tree every journal round).
#[derive(Default, Clone, Copy)]
struct InoHash;

impl std::hash::BuildHasher for InoHash {
    type Hasher = InoHasher;
    fn build_hasher(&self) -> InoHasher {
        InoHasher(0)
    }
}

struct InoHasher(u64);

impl std::hash::Hasher for InoHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0 ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Recompute the leaves at `which`.
pub(crate) fn refresh_leaves(entries: &[Entry], leaves: &mut [[u8; 32]], which: &[usize]) {
    let new: Vec<[u8; 32]> = if which.len() > 4096 {
        which.par_iter().map(|&i| entries[i].leaf()).collect()
    } else {
        which.iter().map(|&i| entries[i].leaf()).collect()
    };
    for (&i, l) in which.iter().zip(new) {
        leaves[i] = l;
    }
}

#[cfg(test)]
mod splice_tests {
    //! The journal path (re-list some directories, splice the difference
    //! into the previous index) must give exactly what a full scan gives.
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::PermissionsExt;

    /// What the journal would report: directories by their path in `prev`
    /// (mapped through inode numbers, as `Journal::changed_dirs` does).
    struct Marks<'a> {
        prev: &'a Index,
        dirs: HashSet<Vec<u8>>,
    }

    impl Marks<'_> {
        /// An event naming the object with inode `ino` (its own FID).
        fn object(&mut self, ino: u64) {
            for e in self.prev.entries.iter().filter(|e| e.ino == ino) {
                if e.kind == Kind::Dir {
                    self.dirs.insert(e.path.clone());
                }
                if !e.path.is_empty() {
                    self.dirs.insert(split_parent(&e.path).0.to_vec());
                }
            }
        }
        /// An event in directory `dir` (its DFID_NAME), by current path.
        fn in_dir(&mut self, root: &Path, dir: &[u8]) {
            if let Ok(m) = std::fs::symlink_metadata(join(root, dir)) {
                for e in self.prev.entries.iter() {
                    if e.kind == Kind::Dir && e.ino == m.ino() {
                        self.dirs.insert(e.path.clone());
                    }
                }
            }
        }
    }

    fn split_parent(p: &[u8]) -> (&[u8], &[u8]) {
        crate::entry::split_parent(p)
    }

    fn all(root: &Path) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (idx, _) = scan(root, None).unwrap();
        let dirs = idx
            .entries
            .iter()
            .filter(|e| e.kind == Kind::Dir)
            .map(|e| e.path.clone())
            .collect();
        let files = idx
            .entries
            .iter()
            .filter(|e| e.kind != Kind::Dir)
            .map(|e| e.path.clone())
            .collect();
        (dirs, files)
    }

    fn ino(root: &Path, p: &[u8]) -> u64 {
        std::fs::symlink_metadata(join(root, p)).unwrap().ino()
    }

    fn apply(
        root: &Path,
        prev: &Index,
        ops: &[(u8, u16, u16)],
        serial: &mut u32,
    ) -> HashSet<Vec<u8>> {
        let mut m = Marks {
            prev,
            dirs: HashSet::new(),
        };
        for &(op, a, b) in ops {
            let (dirs, files) = all(root);
            let pick = |v: &Vec<Vec<u8>>, i: u16| v.get(i as usize % v.len().max(1)).cloned();
            *serial += 1;
            let fresh = format!("n{serial}").into_bytes();
            let d = pick(&dirs, a).unwrap_or_default();
            let f = pick(&files, b);
            match op % 12 {
                0 => {
                    let p = child_path(&d, &fresh);
                    std::fs::write(join(root, &p), vec![b'x'; (a % 300) as usize]).unwrap();
                    m.in_dir(root, &d);
                }
                1 | 2 | 10 => {
                    let Some(f) = f else { continue };
                    let p = join(root, &f);
                    let md = std::fs::symlink_metadata(&p).unwrap();
                    if !md.file_type().is_file() {
                        continue;
                    }
                    m.object(md.ino());
                    m.in_dir(root, split_parent(&f).0);
                    match op % 12 {
                        1 => {
                            use std::io::Write;
                            let mut h = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
                            h.write_all(b"more").unwrap();
                        }
                        2 => {
                            let h = std::fs::File::open(&p).unwrap();
                            h.set_modified(
                                std::time::SystemTime::UNIX_EPOCH
                                    + std::time::Duration::from_secs(1_000_000 + *serial as u64),
                            )
                            .unwrap();
                        }
                        _ if a % 2 == 1 => {
                            // Only the ctime tells that xattrs changed.
                            let v = format!("v{serial}");
                            let _ = rustix::fs::lsetxattr(
                                &p,
                                "user.t",
                                v.as_bytes(),
                                rustix::fs::XattrFlags::empty(),
                            );
                        }
                        _ => {
                            std::fs::set_permissions(
                                &p,
                                std::fs::Permissions::from_mode(0o600 | (a as u32 & 0o7)),
                            )
                            .unwrap();
                        }
                    }
                }
                3 => {
                    let Some(f) = f else { continue };
                    m.object(ino(root, &f));
                    m.in_dir(root, split_parent(&f).0);
                    std::fs::remove_file(join(root, &f)).unwrap();
                }
                4 => {
                    let p = child_path(&d, &fresh);
                    std::fs::create_dir(join(root, &p)).unwrap();
                    std::fs::write(join(root, &child_path(&p, b"f")), b"in new dir").unwrap();
                    m.in_dir(root, &d);
                }
                5 | 7 => {
                    if d.is_empty() {
                        continue;
                    }
                    // Every directory in the subtree sees its own events.
                    for x in &dirs {
                        if x == &d || under(x, &d) {
                            m.in_dir(root, x);
                        }
                    }
                    m.object(ino(root, &d));
                    m.in_dir(root, split_parent(&d).0);
                    if op % 12 == 5 {
                        std::fs::remove_dir_all(join(root, &d)).unwrap();
                    } else {
                        let to = pick(&dirs, b).unwrap_or_default();
                        if to == d || under(&to, &d) {
                            continue;
                        }
                        m.in_dir(root, &to);
                        std::fs::rename(join(root, &d), join(root, &child_path(&to, &fresh)))
                            .unwrap();
                    }
                }
                6 | 8 => {
                    let Some(f) = f else { continue };
                    m.object(ino(root, &f));
                    m.in_dir(root, split_parent(&f).0);
                    m.in_dir(root, &d);
                    let to = join(root, &child_path(&d, &fresh));
                    if op % 12 == 6 {
                        std::fs::rename(join(root, &f), to).unwrap();
                    } else if std::fs::symlink_metadata(join(root, &f)).unwrap().is_file() {
                        std::fs::hard_link(join(root, &f), to).unwrap();
                    }
                }
                9 => {
                    std::os::unix::fs::symlink("target", join(root, &child_path(&d, &fresh)))
                        .unwrap();
                    m.in_dir(root, &d);
                }
                _ => {
                    // A file replaced by a directory of the same name.
                    let Some(f) = f else { continue };
                    m.object(ino(root, &f));
                    m.in_dir(root, split_parent(&f).0);
                    std::fs::remove_file(join(root, &f)).unwrap();
                    std::fs::create_dir(join(root, &f)).unwrap();
                    std::fs::write(join(root, &child_path(&f, b"g")), b"g").unwrap();
                }
            }
        }
        m.dirs
    }

    fn base_tree(root: &Path) {
        for d in ["a", "a/b", "a/b/c", "d", "e"] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        for (i, d) in ["", "a", "a/b", "a/b/c", "d", "e"].iter().enumerate() {
            for j in 0..3 {
                std::fs::write(
                    root.join(d).join(format!("f{j}")),
                    vec![b'a' + i as u8; j * 10],
                )
                .unwrap();
            }
        }
        std::fs::hard_link(root.join("a/f1"), root.join("d/hl")).unwrap();
        std::fs::hard_link(root.join("a/f1"), root.join("e/hl")).unwrap();
        std::os::unix::fs::symlink("f0", root.join("a/b/s")).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn splice_equals_full_scan(
            batches in proptest::collection::vec(
                proptest::collection::vec((any::<u8>(), any::<u16>(), any::<u16>()), 1..8),
                1..4,
            ),
            extra in any::<u16>(),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path();
            base_tree(root);
            let (mut prev, _) = scan(root, None).unwrap();
            let mut leaves = leaves_of(&prev.entries);
            let mut serial = 0;
            for ops in &batches {
                let mut dirs = apply(root, &prev, ops, &mut serial);
                // The journal may name more than changed: harmless.
                let pd: Vec<&Entry> = prev.entries.iter().filter(|e| e.kind == Kind::Dir).collect();
                dirs.insert(pd[extra as usize % pd.len()].path.clone());
                let ch = rescan_changes(root, &prev, &dirs, &|_| true).unwrap();
                let (full, _) = scan(root, Some(&prev)).unwrap();
                let reference = rescan_dirs(root, &prev, &dirs, &|_| true).unwrap().0;
                let old_prev = prev.clone();
                let sp = splice(prev, leaves, ch);
                prop_assert_eq!(sp.index.entries.len(), full.entries.len());
                for (x, y) in sp.index.entries.iter().zip(&full.entries) {
                    prop_assert!(x.same(y), "{:?} != {:?}", x, y);
                }
                prop_assert_eq!(sp.index.digest, full.digest);
                prop_assert_eq!(sp.index.digest, reference.digest);
                prop_assert_eq!(&sp.leaves, &leaves_of(&sp.index.entries));
                // Every path where old and new differ is among the changed
                // entries or the previous versions kept.
                let touched: HashSet<&[u8]> = sp
                    .changed
                    .iter()
                    .map(|&i| &sp.index.entries[i].path[..])
                    .chain(sp.old.iter().map(|e| &e.path[..]))
                    .collect();
                for e in &old_prev.entries {
                    if full.get(&e.path).is_none_or(|n| !n.same(e)) {
                        prop_assert!(touched.contains(&e.path[..]), "missed {}", e.display_path());
                    }
                }
                for e in &full.entries {
                    if old_prev.get(&e.path).is_none_or(|o| !o.same(e)) {
                        prop_assert!(touched.contains(&e.path[..]), "missed {}", e.display_path());
                    }
                }
                for o in &sp.old {
                    prop_assert!(old_prev.get(&o.path).is_some_and(|p| p.same(o)));
                }
                prev = sp.index;
                leaves = sp.leaves;
            }
        }
    }
}
