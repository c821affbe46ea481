//! The receiving side: a destination directory holding, for each tree name,
//! up to N complete versions and a symlink `DIR/NAME` to the current one.
//!
//! Layout: `DIR/.vsha/NAME/v/SEQ/` (a version), `DIR/.vsha/NAME/v/SEQ.manifest`
//! (its index, so no walk of the standby is ever needed),
//! `DIR/.vsha/NAME/tmp/` (the version being built), `DIR/.vsha/NAME/unified`
//! (marker: the tree takes part in unification), `DIR/NAME -> .vsha/NAME/v/SEQ`.
//!
//! Architecture invariant: a version directory is never modified after its
//! commit; a round builds a new one beside it (unchanged files hardlinked from
//! the current version) and switches the symlink with one rename.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::{AtFlags, Mode, OFlags};

use crate::entry::{display, key_cmp, split_parent, tree_digest, Entry, Kind, Reader};
use crate::error::{IoCtx, Result, SyncError};
use crate::fsops::{self, DirCache};
use crate::scan::Index;

/// How long a round waits for another round of the same name to finish.
pub const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Default number of versions kept per tree.
pub const DEFAULT_KEEP: usize = 2;

const META: &[u8] = b".vsha";

/// Check a tree name: 1–64 of `[A-Za-z0-9._-]`, not starting with '.'.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SyncError::BadName(name.to_string()))
    }
}

/// The current snapshot of a tree.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Sequence number.
    pub seq: u64,
    /// Path of the version directory.
    pub path: PathBuf,
    /// Its manifest.
    pub index: Index,
    /// When it was committed (mtime of its manifest).
    pub committed: std::time::SystemTime,
}

/// A destination directory of replicated trees.
pub struct Store {
    dir: PathBuf,
    fd: OwnedFd,
    keep: usize,
    busy: Mutex<HashSet<String>>,
    freed: std::sync::Condvar,
    pruning: Mutex<()>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("keep", &self.keep)
            .finish()
    }
}

/// Releases a tree name's round lock on drop.
pub(crate) struct BusyGuard<'a> {
    store: &'a Store,
    name: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.store
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
        self.store.freed.notify_all();
    }
}

pub(crate) fn encode_manifest(idx: &Index) -> Vec<u8> {
    let mut v = b"VSHAMAN1".to_vec();
    v.extend_from_slice(&(idx.entries.len() as u64).to_le_bytes());
    for e in &idx.entries {
        e.encode(&mut v);
    }
    v.extend_from_slice(&idx.digest);
    v
}

pub(crate) fn decode_manifest(b: &[u8]) -> Result<Index> {
    if b.len() < 8 + 8 + 32 || &b[..8] != b"VSHAMAN1" {
        return Err(crate::entry::malformed("manifest", "bad header"));
    }
    let mut r = Reader::new(&b[8..b.len() - 32]);
    let n = r.u64()?;
    let mut v = Vec::with_capacity(n.min(1 << 24) as usize);
    for _ in 0..n {
        v.push(Entry::decode(&mut r)?);
    }
    r.finish("manifest")?;
    let idx = Index::from_entries(v);
    if idx.digest[..] != b[b.len() - 32..] {
        return Err(crate::entry::malformed(
            "manifest",
            "digest does not match its entries",
        ));
    }
    Ok(idx)
}

impl Store {
    /// Open (creating if needed) a destination directory, keeping `keep` versions per tree.
    pub fn open(dir: &Path, keep: usize) -> Result<Store> {
        std::fs::create_dir_all(dir).ctx("mkdir", dir)?;
        let fd = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ctx("open", dir)?;
        match rustix::fs::mkdirat(&fd, OsStr::from_bytes(META), Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e).ctx("mkdir", dir.join(".vsha")),
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            fd,
            keep: keep.max(1),
            busy: Mutex::new(HashSet::new()),
            freed: std::sync::Condvar::new(),
            pruning: Mutex::new(()),
        })
    }

    /// The destination directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn lock(&self, name: &str) -> Result<BusyGuard<'_>> {
        check_name(name)?;
        // A round that just answered may still be pruning: wait a while for
        // the name before refusing.
        let deadline = std::time::Instant::now() + BUSY_WAIT;
        let mut b = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while b.contains(name) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(SyncError::Busy(name.to_string()));
            }
            b = self
                .freed
                .wait_timeout(b, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        b.insert(name.to_string());
        Ok(BusyGuard {
            store: self,
            name: name.to_string(),
        })
    }

    /// `.vsha/NAME`, created if missing.
    pub(crate) fn tree_dir(&self, name: &str) -> Result<OwnedFd> {
        check_name(name)?;
        let meta = fsops::open_dir_at(self.fd.as_fd(), META, META)?;
        for d in [name.as_bytes()] {
            match rustix::fs::mkdirat(&meta, OsStr::from_bytes(d), Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e).ctx("mkdir", self.dir.join(".vsha").join(name)),
            }
        }
        let t = fsops::open_dir_at(meta.as_fd(), name.as_bytes(), name.as_bytes())?;
        match rustix::fs::mkdirat(&t, "v", Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e).ctx("mkdir", self.dir.join(".vsha").join(name).join("v")),
        }
        Ok(t)
    }

    /// Sequence number of the current version of `name`, from the symlink.
    pub fn current_seq(&self, name: &str) -> Result<Option<u64>> {
        check_name(name)?;
        match rustix::fs::readlinkat(&self.fd, name, Vec::new()) {
            Ok(t) => {
                let t = t.to_bytes();
                let prefix = format!(".vsha/{name}/v/");
                let seq = t
                    .strip_prefix(prefix.as_bytes())
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| {
                        SyncError::Protocol(format!(
                            "{}/{name} is not a symlink made by vsha-sync",
                            self.dir.display()
                        ))
                    })?;
                Ok(Some(seq))
            }
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e).ctx("readlink", self.dir.join(name)),
        }
    }

    /// The current snapshot of `name`, if any.
    pub fn current(&self, name: &str) -> Result<Option<Snapshot>> {
        let Some(seq) = self.current_seq(name)? else {
            return Ok(None);
        };
        let mpath = self
            .dir
            .join(".vsha")
            .join(name)
            .join("v")
            .join(format!("{seq}.manifest"));
        let b = std::fs::read(&mpath).ctx("read", &mpath)?;
        let committed = std::fs::metadata(&mpath)
            .and_then(|m| m.modified())
            .ctx("stat", &mpath)?;
        Ok(Some(Snapshot {
            seq,
            path: self
                .dir
                .join(".vsha")
                .join(name)
                .join("v")
                .join(seq.to_string()),
            index: decode_manifest(&b)?,
            committed,
        }))
    }

    /// Whether `name` is marked unified.
    pub fn is_unified(&self, name: &str) -> bool {
        self.dir.join(".vsha").join(name).join("unified").exists()
    }

    /// Names of all trees with a current snapshot.
    pub fn names(&self) -> Result<Vec<String>> {
        let m = self.dir.join(".vsha");
        let mut v = Vec::new();
        for e in std::fs::read_dir(&m).ctx("readdir", &m)? {
            let e = e.ctx("readdir", &m)?;
            if let Some(n) = e.file_name().to_str() {
                if check_name(n).is_ok() && self.current_seq(n).ok().flatten().is_some() {
                    v.push(n.to_string());
                }
            }
        }
        v.sort();
        Ok(v)
    }

    /// Age of the newest complete snapshot of `name` (the lag).
    pub fn lag(&self, name: &str) -> Result<Option<std::time::Duration>> {
        Ok(self
            .current(name)?
            .map(|s| s.committed.elapsed().unwrap_or_default()))
    }

    /// Remove leftovers of interrupted rounds and versions newer than the current one.
    pub(crate) fn cleanup(&self, name: &str, tree: &OwnedFd) -> Result<()> {
        fsops::remove_tree(tree.as_fd(), b"tmp")?;
        let cur = self.current_seq(name)?.unwrap_or(0);
        let v = fsops::open_dir_at(tree.as_fd(), b"v", b"v")?;
        let mut stale = Vec::new();
        for e in std::fs::read_dir(self.dir.join(".vsha").join(name).join("v"))
            .ctx("readdir", &self.dir)?
        {
            let e = e.ctx("readdir", &self.dir)?;
            let n = e.file_name();
            let s = n.to_string_lossy();
            let seq = s
                .trim_end_matches(".manifest")
                .trim_end_matches(".tmp")
                .parse::<u64>()
                .ok();
            if let Some(seq) = seq {
                if seq > cur || s.ends_with(".tmp") {
                    stale.push(n.as_bytes().to_vec());
                }
            }
        }
        for s in stale {
            fsops::remove_tree(v.as_fd(), &s)?;
        }
        Ok(())
    }

    /// Keep only the newest `keep` versions of `name` (errors are logged: the
    /// round is committed by then, and a concurrent prune may race).
    pub fn prune_old(&self, name: &str) {
        // One prune at a time per store (two would race on the same directories).
        let _one = self.pruning.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.tree_dir(name).and_then(|t| self.prune(name, &t));
        if let Err(e) = r {
            tracing::warn!(%name, error = %e, "pruning old versions failed");
        }
    }

    /// Keep only the newest `keep` versions.
    pub(crate) fn prune(&self, name: &str, tree: &OwnedFd) -> Result<()> {
        let cur = self.current_seq(name)?.unwrap_or(0);
        let vpath = self.dir.join(".vsha").join(name).join("v");
        let v = fsops::open_dir_at(tree.as_fd(), b"v", b"v")?;
        let mut seqs: Vec<u64> = Vec::new();
        for e in std::fs::read_dir(&vpath).ctx("readdir", &vpath)? {
            let e = e.ctx("readdir", &vpath)?;
            if let Some(s) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) {
                seqs.push(s);
            }
        }
        seqs.sort_unstable();
        seqs.retain(|s| *s <= cur);
        let n = seqs.len();
        for s in seqs.into_iter().take(n.saturating_sub(self.keep)) {
            fsops::remove_tree(v.as_fd(), format!("{s}.manifest").as_bytes())?;
            fsops::remove_tree(v.as_fd(), s.to_string().as_bytes())?;
        }
        Ok(())
    }

    /// Hashes of every regular file in the current snapshots of other unified trees.
    pub(crate) fn pool(&self, name: &str) -> Result<HashMap<[u8; 32], (PathBuf, Entry)>> {
        let mut m = HashMap::new();
        for other in self.names()? {
            if other == name || !self.is_unified(&other) {
                continue;
            }
            if let Some(s) = self.current(&other)? {
                let groups: HashSet<&[u8]> = s
                    .index
                    .entries
                    .iter()
                    .filter_map(|e| e.link.as_deref())
                    .collect();
                for e in &s.index.entries {
                    if e.kind == Kind::File
                        && e.link.is_none()
                        && !groups.contains(&e.path[..])
                        && e.size > 0
                    {
                        m.entry(e.hash)
                            .or_insert_with(|| (s.path.clone(), e.clone()));
                    }
                }
            }
        }
        Ok(m)
    }

    /// Commit the tree built in `.vsha/NAME/tmp` as version `seq`.
    pub(crate) fn commit(&self, name: &str, tree: &OwnedFd, seq: u64, idx: &Index) -> Result<()> {
        let v = fsops::open_dir_at(tree.as_fd(), b"v", b"v")?;
        let mname = format!("{seq}.manifest");
        let mtmp = format!("{seq}.manifest.tmp");
        {
            let fd = rustix::fs::openat(
                &v,
                mtmp.as_str(),
                OFlags::WRONLY
                    | OFlags::CREATE
                    | OFlags::TRUNC
                    | OFlags::NOFOLLOW
                    | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .ctx("create", PathBuf::from(&mtmp))?;
            let mut f = std::fs::File::from(fd);
            f.write_all(&encode_manifest(idx))
                .ctx("write", PathBuf::from(&mtmp))?;
        }
        // Everything written this round reaches the disk before the switch.
        rustix::fs::syncfs(&v).ctx("syncfs", self.dir.clone())?;
        rustix::fs::renameat(&v, mtmp.as_str(), &v, mname.as_str())
            .ctx("rename", PathBuf::from(&mname))?;
        rustix::fs::renameat(tree, "tmp", &v, seq.to_string().as_str())
            .ctx("rename", PathBuf::from("tmp"))?;
        rustix::fs::fsync(&v).ctx("fsync", PathBuf::from("v"))?;
        let link_tmp = format!(".{name}.vsha-tmp");
        let _ = rustix::fs::unlinkat(&self.fd, link_tmp.as_str(), AtFlags::empty());
        rustix::fs::symlinkat(
            format!(".vsha/{name}/v/{seq}").as_str(),
            &self.fd,
            link_tmp.as_str(),
        )
        .ctx("symlink", self.dir.join(&link_tmp))?;
        rustix::fs::renameat(&self.fd, link_tmp.as_str(), &self.fd, name)
            .ctx("rename", self.dir.join(name))?;
        rustix::fs::fsync(&self.fd).ctx("fsync", self.dir.clone())?;
        Ok(())
    }

    /// Mark or unmark a tree as taking part in unification.
    pub(crate) fn set_unified(&self, name: &str, tree: &OwnedFd, on: bool) -> Result<()> {
        if on {
            match rustix::fs::openat(
                tree,
                "unified",
                OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            ) {
                Ok(_) => Ok(()),
                Err(e) => Err(e).ctx("create", self.dir.join(".vsha").join(name).join("unified")),
            }
        } else {
            match rustix::fs::unlinkat(tree, "unified", AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
                Err(e) => Err(e).ctx("unlink", self.dir.join(".vsha").join(name).join("unified")),
            }
        }
    }
}

/// What the applier did in one round.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyStats {
    /// Entries created or changed (not inherited unchanged).
    pub changed: u64,
    /// Entries deleted.
    pub deleted: u64,
    /// Content bytes received (literal data).
    pub literal_bytes: u64,
    /// Bytes reconstructed from local blocks by deltas.
    pub matched_bytes: u64,
    /// Bytes of files taken from other unified trees instead of the wire.
    pub unified_bytes: u64,
}

/// Builds one new version in `tmp` from the current one plus a stream of changes.
pub(crate) struct Applier<'a> {
    pub(crate) store: &'a Store,
    pub(crate) name: String,
    tree: OwnedFd,
    old: Option<(DirCache, Index)>,
    old_groups: HashSet<Vec<u8>>,
    new: DirCache,
    cursor: usize,
    pub(crate) entries: Vec<Entry>,
    dirs: Vec<usize>,
    last_key: Option<Vec<u8>>,
    linked_old: Vec<Vec<u8>>,
    pool: HashMap<[u8; 32], (PathBuf, Entry)>,
    pub(crate) stats: ApplyStats,
    workers: Workers,
}

/// Work the applier hands to its threads: creating small files and carrying
/// over unchanged entries are independent once their directory exists, and
/// cold metadata writes are latency bound, so they run in parallel.
enum Job {
    Link {
        from: std::sync::Arc<OwnedFd>,
        to: std::sync::Arc<OwnedFd>,
        name: Vec<u8>,
        path: Vec<u8>,
    },
    Write {
        dir: std::sync::Arc<OwnedFd>,
        name: Vec<u8>,
        entry: Entry,
        data: Vec<u8>,
    },
}

fn run_job(job: Job) -> Result<()> {
    match job {
        Job::Link {
            from,
            to,
            name,
            path,
        } => fsops::link(from.as_fd(), &name, to.as_fd(), &name, &path),
        Job::Write {
            dir,
            name,
            entry,
            data,
        } => {
            // Checked here, in parallel; a mismatch fails the round at the
            // next submit or barrier.
            if *blake3::hash(&data).as_bytes() != entry.hash {
                return Err(SyncError::HashMismatch {
                    path: entry.display_path(),
                });
            }
            let mut f = fsops::create_file(dir.as_fd(), &name, &entry.path)?;
            f.write_all(&data).ctx("write", fsops::p(&entry.path))?;
            fsops::apply_meta_fd(f.as_fd(), &entry, true)
        }
    }
}

/// A small pool of threads running `Job`s; `barrier` waits for all and
/// reports the first error.
struct Workers {
    tx: Option<std::sync::mpsc::SyncSender<Job>>,
    done: std::sync::mpsc::Receiver<Result<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pending: u64,
}

const WORKERS: usize = 8;

impl Workers {
    fn new() -> Workers {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(4096);
        let (dtx, done) = std::sync::mpsc::channel();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        let threads = (0..WORKERS)
            .filter_map(|i| {
                let (rx, dtx) = (rx.clone(), dtx.clone());
                std::thread::Builder::new()
                    .name(format!("vsha-sync-apply{i}"))
                    .spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        if dtx.send(run_job(job)).is_err() {
                            return;
                        }
                    })
                    .ok()
            })
            .collect();
        Workers {
            tx: Some(tx),
            done,
            threads,
            pending: 0,
        }
    }

    fn submit(&mut self, job: Job) -> Result<()> {
        // Collect finished results as we go so errors surface early.
        while let Ok(r) = self.done.try_recv() {
            self.pending -= 1;
            r?;
        }
        match &self.tx {
            Some(tx) if !self.threads.is_empty() => {
                tx.send(job)
                    .map_err(|_| SyncError::Protocol("applier threads stopped".into()))?;
                self.pending += 1;
                Ok(())
            }
            _ => run_job(job),
        }
    }

    fn barrier(&mut self) -> Result<()> {
        let mut first = Ok(());
        while self.pending > 0 {
            match self.done.recv() {
                Ok(r) => {
                    self.pending -= 1;
                    if first.is_ok() {
                        first = r;
                    }
                }
                Err(_) => return Err(SyncError::Protocol("applier threads stopped".into())),
            }
        }
        first
    }

    fn stop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A regular file being received.
pub(crate) struct Incoming {
    entry: Entry,
    file: std::fs::File,
    hasher: blake3::Hasher,
    written: u64,
    basis: Option<(std::fs::File, u64, u32)>,
}

static ZEROS: [u8; 65536] = [0; 65536];

impl<'a> Applier<'a> {
    /// Start a new version of `name`: `old` is the current snapshot.
    pub(crate) fn begin(
        store: &'a Store,
        name: &str,
        old: Option<Snapshot>,
        unified: bool,
    ) -> Result<Applier<'a>> {
        let tree = store.tree_dir(name)?;
        store.cleanup(name, &tree)?;
        fsops::make_dir(tree.as_fd(), b"tmp", b"tmp")?;
        let new = DirCache::new(fsops::open_dir_at(tree.as_fd(), b"tmp", b"tmp")?);
        let old = match old {
            Some(s) => {
                let v = fsops::open_dir_at(tree.as_fd(), b"v", b"v")?;
                let fd = fsops::open_dir_at(v.as_fd(), s.seq.to_string().as_bytes(), b"v")?;
                Some((DirCache::new(fd), s.index))
            }
            None => None,
        };
        let old_groups = old
            .as_ref()
            .map(|(_, i)| i.entries.iter().filter_map(|e| e.link.clone()).collect())
            .unwrap_or_default();
        let pool = if unified {
            store.pool(name)?
        } else {
            HashMap::new()
        };
        Ok(Applier {
            store,
            name: name.to_string(),
            tree,
            old,
            old_groups,
            new,
            cursor: 0,
            entries: Vec::new(),
            dirs: Vec::new(),
            last_key: None,
            linked_old: Vec::new(),
            pool,
            stats: ApplyStats::default(),
            workers: Workers::new(),
        })
    }

    /// Which of these hashes the unification pool holds.
    pub(crate) fn pool_has(&self, hashes: &[[u8; 32]]) -> Vec<bool> {
        hashes.iter().map(|h| self.pool.contains_key(h)).collect()
    }

    fn old_entry(&self, path: &[u8]) -> Option<&Entry> {
        self.old.as_ref().and_then(|(_, i)| i.get(path))
    }

    fn order(&mut self, path: &[u8]) -> Result<()> {
        if let Some(l) = &self.last_key {
            if key_cmp(l, path) != std::cmp::Ordering::Less {
                return Err(SyncError::Protocol(format!(
                    "entry {:?} out of order or repeated (after {:?})",
                    display(path),
                    display(l)
                )));
            }
        }
        self.last_key = Some(path.to_vec());
        // Carry over every unchanged entry that sorts before this one.
        while let Some(e) = self
            .old
            .as_ref()
            .and_then(|(_, idx)| idx.entries.get(self.cursor))
        {
            match key_cmp(&e.path, path) {
                std::cmp::Ordering::Less => {
                    let e = e.clone();
                    self.cursor += 1;
                    self.inherit(e)?;
                }
                std::cmp::Ordering::Equal => {
                    self.cursor += 1;
                    break;
                }
                std::cmp::Ordering::Greater => break,
            }
        }
        Ok(())
    }

    fn push(&mut self, e: Entry) {
        if e.kind == Kind::Dir {
            self.dirs.push(self.entries.len());
        }
        self.entries.push(e);
    }

    fn inherit(&mut self, e: Entry) -> Result<()> {
        if e.path.is_empty() || e.kind == Kind::Dir {
            return self.put_dir(e);
        }
        let (parent, name) = split_parent(&e.path);
        let Some((oldc, _)) = self.old.as_mut() else {
            return Err(SyncError::Protocol(
                "inherit without a current snapshot".into(),
            ));
        };
        let from = oldc.dir_arc(parent)?;
        let to = self.new.dir_arc(parent)?;
        self.workers.submit(Job::Link {
            from,
            to,
            name: name.to_vec(),
            path: e.path.clone(),
        })?;
        self.push(e);
        Ok(())
    }

    fn put_dir(&mut self, e: Entry) -> Result<()> {
        if e.path.is_empty() {
            let fd = self.new.root();
            fsops::apply_meta_fd(fd, &e, false)?;
        } else {
            let (parent, name) = split_parent(&e.path);
            let pfd = self.new.dir(parent)?;
            fsops::make_dir(pfd, name, &e.path)?;
            let fd = self.new.dir(&e.path)?;
            fsops::apply_meta_fd(fd, &e, false)?;
        }
        self.push(e);
        Ok(())
    }

    /// Delete `path` of the current snapshot (it is simply not carried over).
    pub(crate) fn delete(&mut self, path: &[u8]) -> Result<()> {
        if self.old_entry(path).is_none() {
            return Err(SyncError::Protocol(format!(
                "delete of {:?}, which the current snapshot does not hold",
                display(path)
            )));
        }
        self.order(path)?;
        self.stats.deleted += 1;
        Ok(())
    }

    /// A non-file entry, a hardlink follower, or a file whose content is local.
    /// Returns `Some(Incoming)` when content frames follow.
    pub(crate) fn put(
        &mut self,
        mut e: Entry,
        src: crate::wire::Source,
    ) -> Result<Option<Incoming>> {
        use crate::wire::Source;
        if e.path.is_empty() && (e.kind != Kind::Dir || self.last_key.is_some()) {
            return Err(SyncError::Protocol(
                "the root must be a directory and come first".into(),
            ));
        }
        self.order(&e.path)?;
        self.stats.changed += 1;
        if e.kind != Kind::File && src != Source::None {
            return Err(SyncError::Protocol(format!(
                "{:?}: only regular files have content",
                e.display_path()
            )));
        }
        if let Some(leader) = e.link.clone() {
            if src != Source::None || e.kind == Kind::Dir {
                return Err(SyncError::Protocol(format!(
                    "{:?}: bad hardlink",
                    e.display_path()
                )));
            }
            let li = self
                .entries
                .binary_search_by(|x| key_cmp(&x.path, &leader))
                .map_err(|_| {
                    SyncError::Protocol(format!(
                        "{:?}: hardlink to {:?}, not (yet) in the tree",
                        e.display_path(),
                        display(&leader)
                    ))
                })?;
            // The leader may still be being written by a worker.
            self.workers.barrier()?;
            // The leader's hash is what was actually sent for it.
            e.hash = self.entries[li].hash;
            if !self.entries[li].same_inode_meta(&e) || self.entries[li].link.is_some() {
                return Err(SyncError::Protocol(format!(
                    "{:?}: hardlink metadata differs from its leader",
                    e.display_path()
                )));
            }
            let (lp, ln) = split_parent(&leader);
            let (pp, pn) = split_parent(&e.path);
            let root = self.new.root();
            let lfd = open_parent(root, lp)?;
            let pfd = open_parent(root, pp)?;
            fsops::link(lfd.as_fd(), ln, pfd.as_fd(), pn, &e.path)?;
            self.new.clear();
            self.push(e);
            return Ok(None);
        }
        match e.kind {
            Kind::Dir => {
                self.put_dir(e)?;
                Ok(None)
            }
            Kind::Symlink | Kind::Char | Kind::Block | Kind::Fifo | Kind::Socket => {
                let (parent, name) = split_parent(&e.path);
                let pfd = self.new.dir(parent)?;
                fsops::make_special(pfd, name, &e)?;
                self.push(e);
                Ok(None)
            }
            Kind::File => match src {
                Source::None => Err(SyncError::Protocol(format!(
                    "{:?}: regular file without content",
                    e.display_path()
                ))),
                Source::Data => {
                    let (parent, name) = split_parent(&e.path);
                    let f = fsops::create_file(self.new.dir(parent)?, name, &e.path)?;
                    Ok(Some(Incoming {
                        entry: e,
                        file: f,
                        hasher: blake3::Hasher::new(),
                        written: 0,
                        basis: None,
                    }))
                }
                Source::Delta(b) => {
                    let be = self
                        .old_entry(&b)
                        .filter(|x| x.kind == Kind::File)
                        .cloned()
                        .ok_or_else(|| {
                            SyncError::Protocol(format!(
                                "delta basis {:?} is not a file of the current snapshot",
                                display(&b)
                            ))
                        })?;
                    let (bp, bn) = split_parent(&b);
                    let Some((oldc, _)) = self.old.as_mut() else {
                        return Err(SyncError::Protocol(
                            "delta without a current snapshot".into(),
                        ));
                    };
                    let bf = fsops::open_read(oldc.dir(bp)?, bn, &b)?;
                    let (parent, name) = split_parent(&e.path);
                    let f = fsops::create_file(self.new.dir(parent)?, name, &e.path)?;
                    Ok(Some(Incoming {
                        entry: e,
                        file: f,
                        hasher: blake3::Hasher::new(),
                        written: 0,
                        basis: Some((bf, be.size, crate::delta::block_size(be.size))),
                    }))
                }
                Source::Old(from) => {
                    let oe = self
                        .old_entry(&from)
                        .filter(|x| x.kind == Kind::File && x.hash == e.hash && x.size == e.size)
                        .cloned()
                        .ok_or_else(|| {
                            SyncError::Protocol(format!(
                                "{:?}: local source {:?} does not hold that content",
                                e.display_path(),
                                display(&from)
                            ))
                        })?;
                    let in_group = oe.link.is_some() || self.old_groups.contains(&oe.path);
                    let (fp, fname) = split_parent(&from);
                    let (parent, name) = split_parent(&e.path);
                    let Some((oldc, _)) = self.old.as_mut() else {
                        return Err(SyncError::Protocol(
                            "local source without a current snapshot".into(),
                        ));
                    };
                    let ffd = oldc.dir(fp)?;
                    if from != e.path && !in_group && oe.same_inode_meta(&e) {
                        // A rename: share the inode (checked at the end: `from` must be gone).
                        let pfd = self.new.dir(parent)?;
                        fsops::link(ffd, fname, pfd, name, &e.path)?;
                        self.linked_old.push(from);
                    } else {
                        let mut src = fsops::open_read(ffd, fname, &from)?;
                        let mut f = fsops::create_file(self.new.dir(parent)?, name, &e.path)?;
                        copy_all(&mut src, &mut f, &e.path)?;
                        fsops::apply_meta_fd(f.as_fd(), &e, true)?;
                    }
                    self.push(e);
                    Ok(None)
                }
                Source::Pool => {
                    let (root, pe) = self.pool.get(&e.hash).cloned().ok_or_else(|| {
                        SyncError::Protocol(format!(
                            "{:?}: content not in the unification pool",
                            e.display_path()
                        ))
                    })?;
                    let other = rustix::fs::open(
                        &root,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .ctx("open", &root)?;
                    let (op, on) = split_parent(&pe.path);
                    let ofd = open_parent(other.as_fd(), op)?;
                    let (parent, name) = split_parent(&e.path);
                    if pe.same_inode_meta(&e) {
                        fsops::link(ofd.as_fd(), on, self.new.dir(parent)?, name, &e.path)?;
                    } else {
                        let mut src = fsops::open_read(ofd.as_fd(), on, &pe.path)?;
                        let mut f = fsops::create_file(self.new.dir(parent)?, name, &e.path)?;
                        copy_all(&mut src, &mut f, &e.path)?;
                        fsops::apply_meta_fd(f.as_fd(), &e, true)?;
                    }
                    self.stats.unified_bytes += e.size;
                    self.push(e);
                    Ok(None)
                }
            },
        }
    }

    /// A whole small file in one piece (the common case): written by a worker.
    pub(crate) fn put_small(&mut self, mut e: Entry, data: Vec<u8>, hash: [u8; 32]) -> Result<()> {
        if e.path.is_empty()
            || e.kind != Kind::File
            || e.link.is_some()
            || data.len() as u64 != e.size
        {
            return Err(SyncError::Protocol(format!(
                "{:?}: file content does not match its entry",
                e.display_path()
            )));
        }
        self.order(&e.path)?;
        self.stats.changed += 1;
        self.stats.literal_bytes += data.len() as u64;
        e.hash = hash;
        let (parent, name) = split_parent(&e.path);
        let dir = self.new.dir_arc(parent)?;
        self.workers.submit(Job::Write {
            dir,
            name: name.to_vec(),
            entry: e.clone(),
            data,
        })?;
        self.push(e);
        Ok(())
    }

    /// Content bytes of the incoming file.
    pub(crate) fn data(&mut self, inc: &mut Incoming, d: &[u8]) -> Result<()> {
        if inc.written + d.len() as u64 > inc.entry.size {
            return Err(SyncError::Protocol(format!(
                "{:?}: more data than its declared size",
                inc.entry.display_path()
            )));
        }
        inc.file
            .write_all(d)
            .ctx("write", fsops::p(&inc.entry.path))?;
        inc.hasher.update(d);
        inc.written += d.len() as u64;
        self.stats.literal_bytes += d.len() as u64;
        Ok(())
    }

    /// A hole in the incoming file.
    pub(crate) fn hole(&mut self, inc: &mut Incoming, n: u64) -> Result<()> {
        if inc.basis.is_some()
            || inc
                .written
                .checked_add(n)
                .is_none_or(|w| w > inc.entry.size)
        {
            return Err(SyncError::Protocol(format!(
                "{:?}: hole beyond its declared size",
                inc.entry.display_path()
            )));
        }
        inc.file
            .seek(SeekFrom::Current(n as i64))
            .ctx("seek", fsops::p(&inc.entry.path))?;
        let mut left = n;
        while left > 0 {
            let k = left.min(ZEROS.len() as u64) as usize;
            inc.hasher.update(&ZEROS[..k]);
            left -= k as u64;
        }
        inc.written += n;
        Ok(())
    }

    /// Delta: copy blocks of the basis.
    pub(crate) fn copy(&mut self, inc: &mut Incoming, start: u32, count: u32) -> Result<()> {
        let Some((bf, blen, block)) = inc.basis.as_mut() else {
            return Err(SyncError::Protocol("Copy outside a delta".into()));
        };
        let nblocks = blen.div_ceil(*block as u64);
        let end = start as u64 + count as u64;
        if end > nblocks {
            return Err(SyncError::Protocol(format!(
                "{:?}: delta copies block {end} of {nblocks}",
                inc.entry.display_path()
            )));
        }
        let off = start as u64 * *block as u64;
        let len = (end * *block as u64).min(*blen) - off;
        if inc.written + len > inc.entry.size {
            return Err(SyncError::Protocol(format!(
                "{:?}: more data than its declared size",
                inc.entry.display_path()
            )));
        }
        bf.seek(SeekFrom::Start(off))
            .ctx("seek", fsops::p(&inc.entry.path))?;
        let mut buf = vec![0u8; (len as usize).min(4 << 20)];
        let mut left = len;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            bf.read_exact(&mut buf[..k])
                .ctx("read basis", fsops::p(&inc.entry.path))?;
            inc.file
                .write_all(&buf[..k])
                .ctx("write", fsops::p(&inc.entry.path))?;
            inc.hasher.update(&buf[..k]);
            left -= k as u64;
        }
        inc.written += len;
        self.stats.matched_bytes += len;
        Ok(())
    }

    /// End of the incoming file: check size and hash, apply metadata.
    pub(crate) fn file_end(&mut self, inc: Incoming, hash: [u8; 32]) -> Result<()> {
        let Incoming {
            mut entry,
            file,
            hasher,
            written,
            ..
        } = inc;
        // The sender hashes what it actually read (a live file may have
        // changed since its scan); the digest at End covers this hash.
        entry.hash = hash;
        if written != entry.size {
            return Err(SyncError::Protocol(format!(
                "{:?}: {written} bytes received, {} declared",
                entry.display_path(),
                entry.size
            )));
        }
        if *hasher.finalize().as_bytes() != entry.hash {
            return Err(SyncError::HashMismatch {
                path: entry.display_path(),
            });
        }
        file.set_len(entry.size)
            .ctx("truncate", fsops::p(&entry.path))?;
        fsops::apply_meta_fd(file.as_fd(), &entry, true)?;
        self.push(entry);
        Ok(())
    }

    /// All changes received: carry over the rest, set directory times, check
    /// the digest, commit. Returns the new sequence number.
    pub(crate) fn finish(mut self, digest: [u8; 32], count: u64) -> Result<(u64, ApplyStats)> {
        let n_old = self.old.as_ref().map(|(_, i)| i.entries.len()).unwrap_or(0);
        while self.cursor < n_old {
            let e = self
                .old
                .as_ref()
                .map(|(_, i)| i.entries[self.cursor].clone());
            self.cursor += 1;
            if let Some(e) = e {
                self.inherit(e)?;
            }
        }
        self.workers.barrier()?;
        for from in &self.linked_old {
            if self
                .entries
                .binary_search_by(|x| key_cmp(&x.path, from))
                .is_ok()
            {
                return Err(SyncError::Protocol(format!(
                    "{:?} was used as a rename source but is still in the tree",
                    display(from)
                )));
            }
        }
        if self.entries.len() as u64 != count {
            return Err(SyncError::Protocol(format!(
                "built {} entries, sender announced {count}",
                self.entries.len()
            )));
        }
        let got = tree_digest(&self.entries);
        if got != digest {
            return Err(SyncError::DigestMismatch {
                expected: crate::entry::hex(&digest),
                got: crate::entry::hex(&got),
            });
        }
        // Directory mtimes last, deepest first.
        self.new.clear();
        for &i in self.dirs.iter().rev() {
            let e = &self.entries[i];
            let fd = self.new.dir(&e.path)?;
            fsops::set_mtime_fd(fd, e)?;
        }
        self.new.clear();
        let seq = self.store.current_seq(&self.name)?.unwrap_or(0) + 1;
        let idx = Index {
            entries: std::mem::take(&mut self.entries),
            digest,
        };
        self.store.commit(&self.name, &self.tree, seq, &idx)?;
        // Pruning old versions is left to the caller, after the sender has
        // its answer: removing a whole version is O(tree) and not part of the round.
        Ok((seq, self.stats))
    }

    /// Wait for the worker threads; their first error, if any.
    pub(crate) fn sync_workers(&mut self) -> Result<()> {
        self.workers.barrier()
    }

    /// Set the unified marker of this tree.
    pub(crate) fn set_unified(&self, on: bool) -> Result<()> {
        self.store.set_unified(&self.name, &self.tree, on)
    }
}

fn open_parent(root: std::os::fd::BorrowedFd<'_>, rel: &[u8]) -> Result<OwnedFd> {
    let mut c = DirCache::new(rustix::io::dup(root).ctx("dup", PathBuf::from("."))?);
    let fd = c.dir(rel)?;
    rustix::io::dup(fd).ctx("dup", fsops::p(rel))
}

fn copy_all(src: &mut std::fs::File, dst: &mut std::fs::File, path: &[u8]) -> Result<()> {
    // std::io::copy uses copy_file_range between files (in-kernel copy).
    std::io::copy(src, dst).ctx("copy", fsops::p(path))?;
    Ok(())
}

impl Drop for Applier<'_> {
    fn drop(&mut self) {
        self.workers.stop();
        // If the round did not commit, `tmp` is left for `cleanup` at the next
        // round; remove it now to free space early. Best effort.
        let _ = fsops::remove_tree(self.tree.as_fd(), b"tmp");
    }
}

/// Keep `OsStr` import used for path joins in this module.
#[allow(dead_code)]
fn _os(p: &[u8]) -> &OsStr {
    OsStr::from_bytes(p)
}
