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
    if kind == Kind::Symlink {
        e.target = std::fs::read_link(&p)
            .ctx("readlink", &p)?
            .into_os_string()
            .into_encoded_bytes();
    }
    e.xattrs = read_xattrs(&p)?;
    Ok(e)
}

struct Walk<'a> {
    root: &'a Path,
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
            match stat_entry(self.root, child) {
                Ok(e) => {
                    if e.kind == Kind::Dir {
                        let p2 = join(self.root, &e.path);
                        // One filesystem: a mount point is kept as an empty directory.
                        let same_dev = std::fs::symlink_metadata(&p2)
                            .map(|m| m.dev() == self.dev)
                            .unwrap_or(false);
                        if same_dev {
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
fn walk_from(root: &Path, starts: Vec<Vec<u8>>) -> Result<(Vec<Entry>, u64)> {
    let dev = std::fs::symlink_metadata(root).ctx("lstat", root)?.dev();
    let w = Walk {
        root,
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
    // A cached hash is reused when size, mtime and inode match (inode 0: a
    // receiver manifest, which has none: size and mtime, like rsync's quick
    // check). Other files are hashed now if `want` says so, else later while
    // they are sent (their hash stays zero until then).
    let mut need = Vec::new();
    for (i, e) in entries.iter_mut().enumerate() {
        if e.kind != Kind::File || e.link.is_some() || e.hash != [0; 32] {
            continue;
        }
        let hit = prev_get(&e.path[..]).filter(|p| {
            p.kind == Kind::File
                && p.size == e.size
                && p.mtime == e.mtime
                && p.mtime_nsec == e.mtime_nsec
                && (p.ino == e.ino || p.ino == 0)
                && p.hash != [0; 32]
        });
        match hit {
            Some(p) => e.hash = p.hash,
            None => {
                e.hash = [0; 32];
                if want(e) {
                    need.push(i);
                }
            }
        }
    }
    let hashes: Vec<(usize, Result<[u8; 32]>)> = io_pool().install(|| {
        need.par_iter()
            .map(|&i| (i, hash_file(&join(root, &entries[i].path))))
            .collect()
    });
    for (i, h) in hashes {
        entries[i].hash = h?;
        st.hashed_files += 1;
        st.hashed_bytes += entries[i].size;
    }
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
    let (mut entries, dirs) = walk_from(root, vec![Vec::new()])?;
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
        walk_from(root, new_dirs)?
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
