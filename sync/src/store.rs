//! The receiving side: a destination directory holding, for each tree name,
//! ONE live tree (the current snapshot), its manifest as a base plus an
//! append-only delta journal, and the undo areas of the last rounds.
//!
//! Layout (`T` = `DIR/.vsha/NAME`):
//! `DIR/NAME -> .vsha/NAME/live` (stable symlink), `T/live/` (the current
//! snapshot), `T/manifest` (base manifest: seq, commit time, entries),
//! `T/journal` (one checksummed record per later round: changed entries,
//! deleted paths, digest), `T/tmp/` (the running round's staged inodes),
//! `T/undo/SEQ.log` + `T/undo/SEQ/` (what round SEQ replaced: see
//! [`crate::undo`]), `T/unified` (marker).
//!
//! Architecture invariant: the live tree is only modified between the fsync
//! of a round's undo log and the journal record that commits it; any failure
//! (or crash) in between is reversed from the undo log before anything else
//! touches the tree. A round therefore costs O(changes), not O(tree).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use rustix::fs::{AtFlags, Mode, OFlags};

use crate::entry::{display, key_cmp, split_parent, Entry, Kind, Reader};
use crate::error::{IoCtx, Result, SyncError};
use crate::fsops::{self, DirCache};
use crate::scan::Index;
use crate::undo::{self, Op};

/// How long a round waits for another round of the same name to finish.
pub const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Default number of versions kept per tree (the current one and the undo
/// areas of the `keep - 1` rounds before it).
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
    /// Path of the live tree (`DIR/.vsha/NAME/live`, what `DIR/NAME` points to).
    pub path: PathBuf,
    /// Its manifest.
    pub index: Index,
    /// When it was committed.
    pub committed: std::time::SystemTime,
}

/// A committed state of a tree, as loaded (cached per name).
#[derive(Debug, Clone)]
pub(crate) struct Cached {
    pub seq: u64,
    pub committed: SystemTime,
    pub index: Index,
    /// `Entry::leaf` of each entry (the digest is recomputed from these).
    pub leaves: Vec<[u8; 32]>,
    /// Identity of the manifest and journal files this was read from.
    key: FileKey,
    /// Size of the base manifest and of the valid journal prefix.
    base_len: u64,
    journal_len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct FileKey {
    man_ino: u64,
    man_size: u64,
    jr_ino: u64,
    jr_size: u64,
}

/// A destination directory of replicated trees.
pub struct Store {
    dir: PathBuf,
    fd: OwnedFd,
    keep: usize,
    busy: Mutex<HashSet<String>>,
    freed: std::sync::Condvar,
    pruning: Mutex<()>,
    cache: Mutex<HashMap<String, Arc<Cached>>>,
    fault: Mutex<Option<(usize, bool)>>,
    /// Block signatures of large files by (content hash, block size): the
    /// standby's files change only through rounds, so a signature made once
    /// serves every later delta against that content.
    sigs: Mutex<HashMap<([u8; 32], u32), Signature>>,
    /// Large files written by recent rounds whose signatures are to be made
    /// after the round: (name, path, content hash, size).
    sig_todo: Mutex<Vec<SigTodo>>,
}

/// A block signature: (weak, strong) per block.
type Signature = Arc<Vec<(u32, u64)>>;
/// A large file to make a signature of: (name, path, content hash, size).
type SigTodo = (String, Vec<u8>, [u8; 32], u64);

/// Files at least this large get their delta signature made after the
/// round that wrote them (below, computing it on request is cheap enough).
pub(crate) const SIG_CACHE_MIN: u64 = 32 << 20;
/// Most cached signature entries (12 bytes each).
const SIG_CACHE_MAX: usize = 4 << 20;

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

/// The sender's persisted index format (also the old receiver manifest).
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

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn time_of(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

/// Base manifest: `VSHAMAN2 | seq | time_ns | count | entries | digest`.
fn encode_base(seq: u64, time_ns: u64, idx: &Index) -> Vec<u8> {
    let mut v = b"VSHAMAN2".to_vec();
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&time_ns.to_le_bytes());
    v.extend_from_slice(&(idx.entries.len() as u64).to_le_bytes());
    for e in &idx.entries {
        e.encode(&mut v);
    }
    v.extend_from_slice(&idx.digest);
    v
}

fn decode_base(b: &[u8]) -> Result<(u64, u64, Vec<Entry>, [u8; 32])> {
    if b.len() < 8 + 24 + 32 || &b[..8] != b"VSHAMAN2" {
        return Err(crate::entry::malformed("manifest", "bad header"));
    }
    let mut r = Reader::new(&b[8..b.len() - 32]);
    let seq = r.u64()?;
    let t = r.u64()?;
    let n = r.u64()?;
    let mut v = Vec::with_capacity(n.min(1 << 24) as usize);
    for _ in 0..n {
        v.push(Entry::decode(&mut r)?);
    }
    r.finish("manifest")?;
    let mut d = [0u8; 32];
    d.copy_from_slice(&b[b.len() - 32..]);
    Ok((seq, t, v, d))
}

/// One journal record: the changes of one committed round.
struct Record {
    seq: u64,
    time_ns: u64,
    count: u64,
    digest: [u8; 32],
    puts: Vec<Entry>,
    dels: Vec<Vec<u8>>,
}

/// `u32 len | blake3(payload) | payload`.
fn encode_record(r: &Record) -> Vec<u8> {
    let mut p = b"VJR1".to_vec();
    p.extend_from_slice(&r.seq.to_le_bytes());
    p.extend_from_slice(&r.time_ns.to_le_bytes());
    p.extend_from_slice(&r.count.to_le_bytes());
    p.extend_from_slice(&r.digest);
    p.extend_from_slice(&(r.puts.len() as u64).to_le_bytes());
    for e in &r.puts {
        e.encode(&mut p);
    }
    p.extend_from_slice(&(r.dels.len() as u64).to_le_bytes());
    for d in &r.dels {
        p.extend_from_slice(&(d.len() as u32).to_le_bytes());
        p.extend_from_slice(d);
    }
    let mut v = (p.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(blake3::hash(&p).as_bytes());
    v.extend_from_slice(&p);
    v
}

/// Decode the valid prefix of a journal: records and the prefix's length
/// (a torn last record, from a crash while appending, is not part of it).
fn decode_journal(b: &[u8]) -> (Vec<Record>, u64) {
    let mut out = Vec::new();
    let mut off = 0usize;
    while b.len() - off >= 40 {
        let mut lb = [0u8; 8];
        lb.copy_from_slice(&b[off..off + 8]);
        let len = u64::from_le_bytes(lb) as usize;
        if len > b.len() - off - 40 {
            break;
        }
        let payload = &b[off + 40..off + 40 + len];
        if blake3::hash(payload).as_bytes() != &b[off + 8..off + 40] {
            break;
        }
        let Ok(rec) = decode_record(payload) else {
            break;
        };
        out.push(rec);
        off += 40 + len;
    }
    (out, off as u64)
}

fn decode_record(p: &[u8]) -> Result<Record> {
    if p.len() < 4 || &p[..4] != b"VJR1" {
        return Err(crate::entry::malformed("journal", "bad record"));
    }
    let mut r = Reader::new(&p[4..]);
    let seq = r.u64()?;
    let time_ns = r.u64()?;
    let count = r.u64()?;
    let digest = r.array32()?;
    let n = r.u64()?;
    let mut puts = Vec::new();
    for _ in 0..n {
        puts.push(Entry::decode(&mut r)?);
    }
    let n = r.u64()?;
    let mut dels = Vec::new();
    for _ in 0..n {
        dels.push(r.bytes(crate::entry::MAX_PATH, "journal path")?.to_vec());
    }
    r.finish("journal record")?;
    Ok(Record {
        seq,
        time_ns,
        count,
        digest,
        puts,
        dels,
    })
}

/// Digest from the leaves (same as `entry::tree_digest`).
pub(crate) fn digest_of(leaves: &[[u8; 32]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"vsha-sync tree v1");
    h.update(&(leaves.len() as u64).to_le_bytes());
    // One call over all leaves: blake3 then hashes many chunks at once.
    h.update(leaves.as_flattened());
    *h.finalize().as_bytes()
}

fn leaves_of(entries: &[Entry]) -> Vec<[u8; 32]> {
    entries.par_iter().map(|e| e.leaf()).collect()
}

/// Copy `count` blocks of the basis from block `start`; returns the bytes.
fn copy_blocks(
    inc: &mut Incoming,
    bf: &mut std::fs::File,
    blen: u64,
    block: u32,
    start: u32,
    count: u32,
) -> Result<u64> {
    let nblocks = blen.div_ceil(block as u64);
    let end = start as u64 + count as u64;
    if end > nblocks {
        return Err(SyncError::Protocol(format!(
            "{:?}: delta copies block {end} of {nblocks}",
            inc.entry.display_path()
        )));
    }
    let off = start as u64 * block as u64;
    let len = (end * block as u64).min(blen) - off;
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
        inc.wrote(k as u64);
    }
    Ok(len)
}

/// The content hash of an incoming file: large files are hashed on a
/// second thread while this one copies and writes.
enum IncHasher {
    Inline(Box<blake3::Hasher>),
    Thread(
        std::sync::mpsc::SyncSender<Vec<u8>>,
        std::thread::JoinHandle<[u8; 32]>,
    ),
}

impl IncHasher {
    fn new(size: u64) -> IncHasher {
        if size < 64 << 20 {
            return IncHasher::Inline(Box::new(blake3::Hasher::new()));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let h = std::thread::spawn(move || {
            let mut h = blake3::Hasher::new();
            for b in rx {
                h.update(&b);
            }
            *h.finalize().as_bytes()
        });
        IncHasher::Thread(tx, h)
    }

    fn update(&mut self, d: &[u8]) {
        match self {
            IncHasher::Inline(h) => {
                h.update(d);
            }
            // A failed thread shows as a hash mismatch at the end.
            IncHasher::Thread(tx, _) => {
                let _ = tx.send(d.to_vec());
            }
        }
    }

    fn finalize(self) -> Result<[u8; 32]> {
        match self {
            IncHasher::Inline(h) => Ok(*h.finalize().as_bytes()),
            IncHasher::Thread(tx, h) => {
                drop(tx);
                h.join()
                    .map_err(|_| SyncError::Protocol("hashing thread failed".into()))
            }
        }
    }
}

impl Incoming {
    /// Count written bytes; for large files, start the writeback of each
    /// finished 128 MiB, so the fsync at the end has less left to flush.
    fn wrote(&mut self, n: u64) {
        const STEP: u64 = 128 << 20;
        let before = self.written / STEP;
        self.written += n;
        if self.entry.size >= 2 * STEP && self.written / STEP > before {
            let end = self.written / STEP * STEP;
            let _ = rustix::fs::fadvise(
                &self.file,
                end - STEP,
                std::num::NonZeroU64::new(STEP),
                rustix::fs::Advice::DontNeed,
            );
        }
    }
}

/// A reader that also hashes what it reads.
struct HashTee<'a, R> {
    inner: R,
    h: &'a mut blake3::Hasher,
}

impl<R: std::io::Read> std::io::Read for HashTee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.h.update(&buf[..n]);
        Ok(n)
    }
}

/// Tree-order key for ordered maps.
#[derive(PartialEq, Eq)]
struct Key(Vec<u8>);
impl Ord for Key {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        key_cmp(&self.0, &o.0)
    }
}
impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// A change for [`merge`]: a path and its new entry with its leaf, or `None` (deleted).
type Change2 = (Vec<u8>, Option<(Entry, [u8; 32])>);

/// Merge sorted changes (path, new entry or deletion, leaf) into sorted
/// entries and leaves, moving (not copying) the unchanged ones.
fn merge(
    mut old: Vec<Entry>,
    mut old_leaves: Vec<[u8; 32]>,
    changes: Vec<Change2>,
) -> (Vec<Entry>, Vec<[u8; 32]>) {
    // Only replacements of existing paths (touched or rewritten files):
    // in place, the other entries stay where they are.
    let at: Option<Vec<usize>> = changes
        .iter()
        .map(|(p, c)| {
            c.as_ref()?;
            old.binary_search_by(|e| key_cmp(&e.path, p)).ok()
        })
        .collect();
    if let Some(at) = at {
        for (i, (_, c)) in at.into_iter().zip(changes) {
            if let Some((ne, nl)) = c {
                old[i] = ne;
                old_leaves[i] = nl;
            }
        }
        return (old, old_leaves);
    }
    let mut out = Vec::with_capacity(old.len() + changes.len());
    let mut lv = Vec::with_capacity(old.len() + changes.len());
    let mut ci = changes.into_iter().peekable();
    for (e, l) in old.into_iter().zip(old_leaves) {
        while let Some((p, _)) = ci.peek() {
            if key_cmp(p, &e.path) != std::cmp::Ordering::Less {
                break;
            }
            if let Some((_, Some((ne, nl)))) = ci.next() {
                out.push(ne);
                lv.push(nl);
            }
        }
        if ci
            .peek()
            .is_some_and(|(p, _)| key_cmp(p, &e.path) == std::cmp::Ordering::Equal)
        {
            if let Some((_, Some((ne, nl)))) = ci.next() {
                out.push(ne);
                lv.push(nl);
            }
            continue;
        }
        out.push(e);
        lv.push(l);
    }
    for (_, c) in ci {
        if let Some((ne, nl)) = c {
            out.push(ne);
            lv.push(nl);
        }
    }
    (out, lv)
}

fn file_key(tree: &OwnedFd) -> FileKey {
    let st = |n: &str| {
        rustix::fs::statat(tree, n, AtFlags::SYMLINK_NOFOLLOW)
            .map(|s| (s.st_ino, s.st_size as u64))
            .unwrap_or((0, 0))
    };
    let (man_ino, man_size) = st("manifest");
    let (jr_ino, jr_size) = st("journal");
    FileKey {
        man_ino,
        man_size,
        jr_ino,
        jr_size,
    }
}

fn read_at(tree: &OwnedFd, name: &str) -> Result<Option<Vec<u8>>> {
    match rustix::fs::openat(
        tree,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => {
            let mut v = Vec::new();
            std::fs::File::from(fd)
                .read_to_end(&mut v)
                .ctx("read", PathBuf::from(name))?;
            Ok(Some(v))
        }
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e).ctx("open", PathBuf::from(name)),
    }
}

impl Store {
    /// A cached block signature of content `hash`.
    pub(crate) fn cached_signature(&self, hash: &[u8; 32], block: u32) -> Option<Signature> {
        self.sigs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(*hash, block))
            .cloned()
    }

    /// Remember the block signature of content `hash`.
    pub(crate) fn remember_signature(
        &self,
        hash: [u8; 32],
        block: u32,
        sums: Arc<Vec<(u32, u64)>>,
    ) {
        let mut g = self.sigs.lock().unwrap_or_else(|p| p.into_inner());
        let held: usize = g.values().map(|v| v.len()).sum();
        if held + sums.len() > SIG_CACHE_MAX {
            g.clear();
        }
        if sums.len() <= SIG_CACHE_MAX {
            g.insert((hash, block), sums);
        }
    }

    pub(crate) fn want_signature(&self, name: &str, path: &[u8], hash: [u8; 32], size: u64) {
        self.sig_todo
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.to_string(), path.to_vec(), hash, size));
    }

    /// Open a regular file of NAME's live tree for reading without following
    /// any symlink and without blocking on a FIFO (a later round may have
    /// replaced anything on the way).
    fn open_live_file(&self, name: &str, path: &[u8]) -> Option<std::fs::File> {
        let live = rustix::fs::open(
            self.dir.join(".vsha").join(name).join("live"),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let (parent, file) = split_parent(path);
        let dir = undo::open_rel(live.as_fd(), parent).ok()?;
        let fd = rustix::fs::openat(
            &dir,
            OsStr::from_bytes(file),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let st = rustix::fs::fstat(&fd).ok()?;
        (rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile)
            .then(|| std::fs::File::from(fd))
    }

    /// Make the signatures of the large files recent rounds wrote (run
    /// after a round, off its critical path). A file replaced meanwhile is
    /// recognised by its whole-file hash and skipped.
    pub(crate) fn fill_signatures(&self) {
        let todo = std::mem::take(&mut *self.sig_todo.lock().unwrap_or_else(|p| p.into_inner()));
        for (name, path, hash, size) in todo {
            let block = crate::delta::block_size(size);
            if self.cached_signature(&hash, block).is_some() {
                continue;
            }
            let Some(f) = self.open_live_file(&name, &path) else {
                continue;
            };
            let mut h = blake3::Hasher::new();
            let rd = HashTee {
                inner: std::io::BufReader::with_capacity(1 << 20, f.take(size)),
                h: &mut h,
            };
            match crate::delta::signature(rd, block) {
                Ok(sums) if *h.finalize().as_bytes() == hash => {
                    self.remember_signature(hash, block, Arc::new(sums));
                }
                _ => {}
            }
        }
    }
    /// Open (creating if needed) a destination directory, keeping `keep`
    /// versions per tree. Rounds interrupted by a crash are rolled back here.
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
        let s = Store {
            dir: dir.to_path_buf(),
            fd,
            keep: keep.max(1),
            busy: Mutex::new(HashSet::new()),
            freed: std::sync::Condvar::new(),
            pruning: Mutex::new(()),
            cache: Mutex::new(HashMap::new()),
            fault: Mutex::new(None),
            sigs: Mutex::new(HashMap::new()),
            sig_todo: Mutex::new(Vec::new()),
        };
        let m = dir.join(".vsha");
        for e in std::fs::read_dir(&m).ctx("readdir", &m)? {
            let e = e.ctx("readdir", &m)?;
            if let Some(n) = e.file_name().to_str() {
                if n.starts_with(".forgotten-") {
                    // A `forget` cut short: finish it.
                    let _ = std::fs::remove_dir_all(e.path());
                    continue;
                }
                if check_name(n).is_ok() {
                    let r = s
                        .lock(n)
                        .and_then(|_g| s.tree_dir(n).and_then(|t| s.recover(n, &t)));
                    if let Err(er) = r {
                        tracing::warn!(name = %n, error = %er, "recovery of a tree failed");
                    }
                }
            }
        }
        Ok(s)
    }

    /// Test hook: the next staged round fails after applying `after` of its
    /// ops to the live tree; with `crash`, it leaves the tree as a crash
    /// would (no rollback; the next round or `Store::open` recovers).
    #[doc(hidden)]
    pub fn inject_apply_fault(&self, after: usize, crash: bool) {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = Some((after, crash));
    }

    /// The destination directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn lock(&self, name: &str) -> Result<BusyGuard<'_>> {
        check_name(name)?;
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

    fn tpath(&self, name: &str) -> PathBuf {
        self.dir.join(".vsha").join(name)
    }

    /// `.vsha/NAME` (with `undo/`), created if missing.
    pub(crate) fn tree_dir(&self, name: &str) -> Result<OwnedFd> {
        check_name(name)?;
        let meta = fsops::open_dir_at(self.fd.as_fd(), META, META)?;
        match rustix::fs::mkdirat(&meta, name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e).ctx("mkdir", self.tpath(name)),
        }
        let t = fsops::open_dir_at(meta.as_fd(), name.as_bytes(), name.as_bytes())?;
        match rustix::fs::mkdirat(&t, "undo", Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e).ctx("mkdir", self.tpath(name).join("undo")),
        }
        Ok(t)
    }

    /// The committed state of `name` (cached; re-read when its files changed).
    pub(crate) fn load(&self, name: &str) -> Result<Option<Arc<Cached>>> {
        check_name(name)?;
        let tp = self.tpath(name);
        let tree = match rustix::fs::open(
            &tp,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(t) => t,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(e).ctx("open", tp),
        };
        let key = file_key(&tree);
        if key.man_ino == 0 {
            return Ok(None);
        }
        if let Some(c) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            if c.key == key {
                return Ok(Some(c.clone()));
            }
        }
        let c = Arc::new(self.read_state(&tree, &tp)?);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), c.clone());
        Ok(Some(c))
    }

    fn read_state(&self, tree: &OwnedFd, tp: &Path) -> Result<Cached> {
        let key = file_key(tree);
        let b = read_at(tree, "manifest")?.ok_or_else(|| SyncError::Io {
            op: "read",
            path: tp.join("manifest"),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        let base_len = b.len() as u64;
        let (mut seq, mut t, mut entries, mut digest) = decode_base(&b)?;
        drop(b);
        let j = read_at(tree, "journal")?.unwrap_or_default();
        let (recs, journal_len) = decode_journal(&j);
        drop(j);
        let mut changes: std::collections::BTreeMap<Key, Option<Entry>> = Default::default();
        let mut count = entries.len() as u64;
        for r in recs {
            if r.seq <= seq {
                continue;
            }
            if r.seq != seq + 1 {
                return Err(crate::entry::malformed("journal", "a round is missing"));
            }
            for d in r.dels {
                changes.insert(Key(d), None);
            }
            for e in r.puts {
                changes.insert(Key(e.path.clone()), Some(e));
            }
            seq = r.seq;
            t = r.time_ns;
            digest = r.digest;
            count = r.count;
        }
        if !changes.is_empty() {
            let n = entries.len();
            let ch = changes
                .into_iter()
                .map(|(k, v)| (k.0, v.map(|e| (e, [0u8; 32]))))
                .collect();
            entries = merge(entries, vec![[0u8; 32]; n], ch).0;
        }
        let leaves = leaves_of(&entries);
        if entries.len() as u64 != count || digest_of(&leaves) != digest {
            return Err(crate::entry::malformed(
                "manifest",
                "digest does not match its entries",
            ));
        }
        Ok(Cached {
            seq,
            committed: time_of(t),
            index: Index { entries, digest },
            leaves,
            key,
            base_len,
            journal_len,
        })
    }

    fn uncache(&self, name: &str) -> Option<Arc<Cached>> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
    }

    /// Sequence number of the current version of `name`.
    pub fn current_seq(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.load(name)?.map(|c| c.seq))
    }

    /// The current snapshot of `name`, if any. Its `path` is the live tree:
    /// a complete snapshot whenever no round of `name` is being applied.
    pub fn current(&self, name: &str) -> Result<Option<Snapshot>> {
        Ok(self.load(name)?.map(|c| Snapshot {
            seq: c.seq,
            path: self.tpath(name).join("live"),
            index: c.index.clone(),
            committed: c.committed,
        }))
    }

    /// Whether `name` is marked unified.
    pub fn is_unified(&self, name: &str) -> bool {
        self.tpath(name).join("unified").exists()
    }

    /// Forgets everything about `name`: its live tree, manifest and undo
    /// areas are removed, so the next round is a full initial copy.
    ///
    /// For a tree that was used outside the store (the agent ran a vserver
    /// from its replica): its files no longer match the manifest, and a
    /// round that trusted the manifest would leave those changes behind.
    /// Waits for a round of `name` in progress to end first.
    pub fn forget(&self, name: &str) -> Result<()> {
        let _busy = self.lock(name)?;
        self.uncache(name);
        let link = self.dir.join(name);
        match std::fs::symlink_metadata(&link) {
            Ok(m) if m.file_type().is_symlink() => {
                std::fs::remove_file(&link).ctx("unlink", &link)?;
            }
            Ok(_) => {
                return Err(crate::entry::malformed(
                    "store",
                    "the tree's name in the store is not the store's link",
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).ctx("lstat", &link),
        }
        let tp = self.tpath(name);
        if tp.exists() {
            // Out of the way in one rename (an interrupted removal must not
            // look like a tree), then removed.
            let gone = self
                .dir
                .join(".vsha")
                .join(format!(".forgotten-{name}-{}", std::process::id()));
            std::fs::rename(&tp, &gone).ctx("rename", &tp)?;
            std::fs::remove_dir_all(&gone).ctx("remove", &gone)?;
        }
        tracing::info!(name, "replica forgotten; the next round copies it whole");
        Ok(())
    }

    /// Names of all trees with a current snapshot.
    pub fn names(&self) -> Result<Vec<String>> {
        let m = self.dir.join(".vsha");
        let mut v = Vec::new();
        for e in std::fs::read_dir(&m).ctx("readdir", &m)? {
            let e = e.ctx("readdir", &m)?;
            if let Some(n) = e.file_name().to_str() {
                if check_name(n).is_ok() && m.join(n).join("manifest").exists() {
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
            .load(name)?
            .map(|c| c.committed.elapsed().unwrap_or_default()))
    }

    /// Bring `name` to a committed state after an interrupted round: roll
    /// back an uncommitted round from its undo log, remove staging leftovers,
    /// a half-made first version, and undo areas without a log.
    pub(crate) fn recover(&self, name: &str, tree: &OwnedFd) -> Result<()> {
        fsops::remove_tree(tree.as_fd(), b"tmp")?;
        self.migrate(name, tree)?;
        let state = self.load(name)?;
        let Some(state) = state else {
            // No committed version: nothing of a first round survives.
            fsops::remove_tree(tree.as_fd(), b"live")?;
            let _ = rustix::fs::unlinkat(tree, "journal", AtFlags::empty());
            fsops::remove_tree(tree.as_fd(), b"undo")?;
            self.tree_dir(name)?;
            return Ok(());
        };
        let undo_dir = fsops::open_dir_at(tree.as_fd(), b"undo", b"undo")?;
        let mut logs = Vec::new();
        let mut dirs = Vec::new();
        for e in
            std::fs::read_dir(self.tpath(name).join("undo")).ctx("readdir", self.tpath(name))?
        {
            let e = e.ctx("readdir", self.tpath(name))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(s) = n.strip_suffix(".log").and_then(|s| s.parse::<u64>().ok()) {
                logs.push(s);
            } else if let Ok(s) = n.parse::<u64>() {
                dirs.push(s);
            } else {
                fsops::remove_tree(undo_dir.as_fd(), n.as_bytes())?;
            }
        }
        logs.sort_unstable();
        for &s in logs.iter().rev() {
            if s <= state.seq {
                continue;
            }
            let lname = format!("{s}.log");
            let b = read_at(&undo_dir, &lname)?.unwrap_or_default();
            if let Some((_, ops)) = undo::decode(&b) {
                tracing::warn!(%name, seq = s, "rolling back an interrupted round");
                let ud =
                    match fsops::open_dir_at(undo_dir.as_fd(), s.to_string().as_bytes(), b"undo") {
                        Ok(d) => Some(d),
                        Err(SyncError::Io { source, .. })
                            if source.kind() == std::io::ErrorKind::NotFound =>
                        {
                            None
                        }
                        Err(e) => return Err(e),
                    };
                if let Some(ud) = ud {
                    let live = fsops::open_dir_at(tree.as_fd(), b"live", b"live")?;
                    let mut lc = DirCache::new(live);
                    undo::reverse(&ops, &mut lc, ud.as_fd(), false)?;
                    lc.clear();
                    undo::set_dir_mtimes(&undo::dirs_touched(&ops), &state.index, &mut lc)?;
                    rustix::fs::syncfs(tree).ctx("syncfs", self.tpath(name))?;
                }
            }
            fsops::remove_tree(undo_dir.as_fd(), s.to_string().as_bytes())?;
            fsops::remove_tree(undo_dir.as_fd(), lname.as_bytes())?;
        }
        for s in dirs {
            if s > state.seq || !logs.contains(&s) {
                fsops::remove_tree(undo_dir.as_fd(), s.to_string().as_bytes())?;
            }
        }
        self.ensure_link(name)?;
        Ok(())
    }

    /// A store written by the previous layout (`DIR/NAME -> .vsha/NAME/v/SEQ`
    /// with `v/SEQ.manifest`): its current version becomes the live tree.
    fn migrate(&self, name: &str, tree: &OwnedFd) -> Result<()> {
        let Ok(t) = rustix::fs::readlinkat(&self.fd, name, Vec::new()) else {
            return Ok(());
        };
        let prefix = format!(".vsha/{name}/v/");
        let Some(seq) = t
            .to_bytes()
            .strip_prefix(prefix.as_bytes())
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return Ok(());
        };
        let v = fsops::open_dir_at(tree.as_fd(), b"v", b"v")?;
        let b = read_at(&v, &format!("{seq}.manifest"))?.ok_or_else(|| {
            SyncError::Protocol(format!("old layout without the manifest of version {seq}"))
        })?;
        let idx = decode_manifest(&b)?;
        let t = std::fs::metadata(self.tpath(name).join("v").join(format!("{seq}.manifest")))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_else(now_ns);
        fsops::remove_tree(tree.as_fd(), b"live")?;
        rustix::fs::renameat(&v, seq.to_string().as_str(), tree, "live")
            .ctx("rename", self.tpath(name).join("live"))?;
        let _ = rustix::fs::unlinkat(tree, "journal", AtFlags::empty());
        undo::write_durable(tree.as_fd(), "manifest", &encode_base(seq, t, &idx))?;
        self.ensure_link(name)?;
        drop(v);
        fsops::remove_tree(tree.as_fd(), b"v")?;
        tracing::info!(%name, seq, "converted to the live-tree layout");
        Ok(())
    }

    /// `DIR/NAME -> .vsha/NAME/live`.
    fn ensure_link(&self, name: &str) -> Result<()> {
        let want = format!(".vsha/{name}/live");
        if let Ok(t) = rustix::fs::readlinkat(&self.fd, name, Vec::new()) {
            if t.to_bytes() == want.as_bytes() {
                return Ok(());
            }
        }
        let link_tmp = format!(".{name}.vsha-tmp");
        let _ = rustix::fs::unlinkat(&self.fd, link_tmp.as_str(), AtFlags::empty());
        rustix::fs::symlinkat(want.as_str(), &self.fd, link_tmp.as_str())
            .ctx("symlink", self.dir.join(&link_tmp))?;
        rustix::fs::renameat(&self.fd, link_tmp.as_str(), &self.fd, name)
            .ctx("rename", self.dir.join(name))?;
        rustix::fs::fsync(&self.fd).ctx("fsync", self.dir.clone())?;
        Ok(())
    }

    /// Keep the undo areas of only the newest `keep - 1` rounds of `name`
    /// (errors are logged). Waits for a running round of `name`.
    pub fn prune_old(&self, name: &str) {
        match self.lock(name) {
            Ok(_g) => self.prune_locked(name),
            Err(e) => tracing::warn!(%name, error = %e, "pruning old versions failed"),
        }
    }

    /// `prune_old` with the name already locked by the caller (O(changes)
    /// of the dropped rounds).
    pub(crate) fn prune_locked(&self, name: &str) {
        let _one = self.pruning.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.tree_dir(name).and_then(|t| self.prune(name, &t));
        if let Err(e) = r {
            tracing::warn!(%name, error = %e, "pruning old versions failed");
        }
    }

    pub(crate) fn prune(&self, name: &str, tree: &OwnedFd) -> Result<()> {
        let Some(cur) = self.current_seq(name)? else {
            return Ok(());
        };
        let up = self.tpath(name).join("undo");
        let ud = fsops::open_dir_at(tree.as_fd(), b"undo", b"undo")?;
        // Undo area S turns version S into S - 1: keep S > cur + 1 - keep.
        let min_kept = (cur + 2).saturating_sub(self.keep as u64);
        let mut gone = Vec::new();
        for e in std::fs::read_dir(&up).ctx("readdir", &up)? {
            let e = e.ctx("readdir", &up)?;
            let n = e.file_name().to_string_lossy().into_owned();
            let s = n.trim_end_matches(".log").parse::<u64>().ok();
            if s.is_some_and(|s| s < min_kept) {
                gone.push(n);
            }
        }
        // Logs first: an undo directory without its log is never used.
        gone.sort_by_key(|n| !n.ends_with(".log"));
        for n in gone {
            fsops::remove_tree(ud.as_fd(), n.as_bytes())?;
        }
        Ok(())
    }

    /// Sequence numbers of the versions of `name` that can be materialized
    /// (the current one and those whose undo areas are kept), newest first.
    pub fn versions(&self, name: &str) -> Result<Vec<u64>> {
        let Some(cur) = self.current_seq(name)? else {
            return Ok(Vec::new());
        };
        let mut v = vec![cur];
        let up = self.tpath(name).join("undo");
        let mut s = cur;
        while s > 1 && up.join(format!("{s}.log")).exists() && up.join(s.to_string()).exists() {
            s -= 1;
            v.push(s);
        }
        Ok(v)
    }

    /// Build a copy of version `seq` of `name` at `dest` (a new directory on
    /// the store's filesystem: unchanged inodes are hardlinked, so the copy
    /// must be treated as read-only). Returns its manifest. O(tree).
    /// Only while no round of `name` runs (the name is locked meanwhile).
    pub fn materialize(&self, name: &str, seq: u64, dest: &Path) -> Result<Index> {
        let _g = self.lock(name)?;
        if !self.versions(name)?.contains(&seq) {
            return Err(SyncError::Protocol(format!(
                "version {seq} of {name} is not kept"
            )));
        }
        let state = self
            .load(name)?
            .ok_or_else(|| SyncError::Protocol(format!("no snapshot of {name}")))?;
        let tree = self.tree_dir(name)?;
        let parent = dest.parent().unwrap_or(Path::new("/"));
        let leaf = dest
            .file_name()
            .ok_or_else(|| SyncError::Protocol("materialize: bad destination".into()))?;
        let pfd = rustix::fs::open(
            parent,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ctx("open", parent)?;
        undo::link_copy(tree.as_fd(), b"live", pfd.as_fd(), leaf.as_bytes(), b"live")?;
        let root = fsops::open_dir_at(pfd.as_fd(), leaf.as_bytes(), leaf.as_bytes())?;
        let mut dc = DirCache::new(root);
        let mut entries = state.index.entries.clone();
        let ud = fsops::open_dir_at(tree.as_fd(), b"undo", b"undo")?;
        let mut s = state.seq;
        while s > seq {
            let b = read_at(&ud, &format!("{s}.log"))?.unwrap_or_default();
            let (_, ops) = undo::decode(&b)
                .ok_or_else(|| SyncError::Protocol(format!("undo log of round {s} unreadable")))?;
            let sd = fsops::open_dir_at(ud.as_fd(), s.to_string().as_bytes(), b"undo")?;
            undo::reverse(&ops, &mut dc, sd.as_fd(), true)?;
            dc.clear();
            let ch = ops
                .into_iter()
                .filter(|o| !o.covered || o.old.is_some())
                .map(|o| (o.path, o.old.map(|e| (e, [0u8; 32]))))
                .collect::<Vec<_>>();
            let n = entries.len();
            entries = merge(entries, vec![[0u8; 32]; n], ch).0;
            s -= 1;
        }
        let idx = Index::from_entries(entries);
        let dirs: Vec<Vec<u8>> = idx
            .entries
            .iter()
            .filter(|e| e.kind == Kind::Dir)
            .map(|e| e.path.clone())
            .collect();
        undo::set_dir_mtimes(&dirs, &idx, &mut dc)?;
        Ok(idx)
    }

    /// Hashes of every regular file in the current snapshots of other unified trees.
    pub(crate) fn pool(&self, name: &str) -> Result<HashMap<[u8; 32], (PathBuf, Entry)>> {
        let mut m = HashMap::new();
        for other in self.names()? {
            if other == name || !self.is_unified(&other) {
                continue;
            }
            if let Some(s) = self.load(&other)? {
                let path = self.tpath(&other).join("live");
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
                        m.entry(e.hash).or_insert_with(|| (path.clone(), e.clone()));
                    }
                }
            }
        }
        Ok(m)
    }

    /// Rewrite the base manifest from the current state and empty the
    /// journal, when the journal has grown past a fraction of the base.
    /// Call with the name locked.
    pub(crate) fn maybe_compact(&self, name: &str) {
        let r = (|| -> Result<()> {
            let Some(c) = self.load(name)? else {
                return Ok(());
            };
            if c.journal_len < (1 << 20) + c.base_len / 4 {
                return Ok(());
            }
            let tree = self.tree_dir(name)?;
            let t = c
                .committed
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            undo::write_durable(tree.as_fd(), "manifest", &encode_base(c.seq, t, &c.index))?;
            // Records up to the base's seq are skipped when loading, so a
            // crash between these two steps is harmless.
            undo::write_durable(tree.as_fd(), "journal", &[])?;
            let mut n = (*c).clone();
            n.key = file_key(&tree);
            n.base_len = n.key.man_size;
            n.journal_len = 0;
            self.cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.to_string(), Arc::new(n));
            tracing::info!(%name, seq = c.seq, "manifest compacted");
            Ok(())
        })();
        if let Err(e) = r {
            tracing::warn!(%name, error = %e, "manifest compaction failed");
        }
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
                Err(e) => Err(e).ctx("create", self.tpath(name).join("unified")),
            }
        } else {
            match rustix::fs::unlinkat(tree, "unified", AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
                Err(e) => Err(e).ctx("unlink", self.tpath(name).join("unified")),
            }
        }
    }

    /// Commit a first version built in `tmp`: rename it to `live`, write the base manifest.
    fn commit_first(&self, name: &str, tree: &OwnedFd, c: Cached) -> Result<()> {
        rustix::fs::syncfs(tree).ctx("syncfs", self.dir.clone())?;
        fsops::remove_tree(tree.as_fd(), b"live")?;
        rustix::fs::renameat(tree, "tmp", tree, "live").ctx("rename", self.tpath(name))?;
        let _ = rustix::fs::unlinkat(tree, "journal", AtFlags::empty());
        let t = c
            .committed
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let base = encode_base(c.seq, t, &c.index);
        undo::write_durable(tree.as_fd(), "manifest", &base)?;
        self.ensure_link(name)?;
        let mut c = c;
        c.key = file_key(tree);
        c.base_len = base.len() as u64;
        c.journal_len = 0;
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Arc::new(c));
        Ok(())
    }

    /// Commit a round applied to the live tree: append its journal record.
    fn commit_record(
        &self,
        name: &str,
        tree: &OwnedFd,
        rec: &Record,
        mut c: Cached,
        jlen: u64,
    ) -> Result<()> {
        let fd = rustix::fs::openat(
            tree,
            "journal",
            OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .ctx("open", self.tpath(name).join("journal"))?;
        let mut f = std::fs::File::from(fd);
        // Drop a torn tail left by a crash while appending.
        f.set_len(jlen)
            .ctx("truncate", self.tpath(name).join("journal"))?;
        f.seek(SeekFrom::Start(jlen))
            .ctx("seek", self.tpath(name).join("journal"))?;
        let b = encode_record(rec);
        f.write_all(&b)
            .ctx("write", self.tpath(name).join("journal"))?;
        f.sync_data()
            .ctx("fsync", self.tpath(name).join("journal"))?;
        rustix::fs::fsync(tree).ctx("fsync", self.tpath(name))?;
        c.key = file_key(tree);
        c.journal_len = jlen + b.len() as u64;
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Arc::new(c));
        Ok(())
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

/// Where a round puts new inodes.
enum Target {
    /// No previous snapshot: the whole tree is built in `tmp/` at its paths.
    Direct { new: DirCache },
    /// A previous snapshot: new inodes are staged as `tmp/ID`, the live
    /// tree is read (delta bases, renames) and changed only at the end.
    Staged {
        live: DirCache,
        stage: Arc<OwnedFd>,
        next: u64,
    },
}

/// One changed path of the round, in tree order.
struct Change {
    path: Vec<u8>,
    old: Option<Entry>,
    new: Option<Entry>,
    stage: Option<u64>,
}

/// Receives one round: stages new inodes, then applies them to the live tree.
pub(crate) struct Applier<'a> {
    pub(crate) store: &'a Store,
    pub(crate) name: String,
    tree: OwnedFd,
    base: Option<Cached>,
    old_groups: HashSet<Vec<u8>>,
    target: Target,
    changes: Vec<Change>,
    last_key: Option<Vec<u8>>,
    linked_old: Vec<Vec<u8>>,
    pool: HashMap<[u8; 32], (PathBuf, Entry)>,
    pub(crate) stats: ApplyStats,
    workers: Workers,
    /// Inodes for the next change (set by `order`, used by `push`).
    pending_old: Option<Entry>,
}
/// Work the applier hands to its threads: creating small files and carrying
/// over unchanged entries are independent once their directory exists, and
/// cold metadata writes are latency bound, so they run in parallel.
enum Job {
    Write {
        dir: Arc<OwnedFd>,
        name: Vec<u8>,
        entry: Entry,
        data: Vec<u8>,
        /// fsync it (a staged round: made durable file by file, not by syncfs).
        durable: bool,
    },
    /// A copy of a file of the live tree with new metadata (a metadata-only
    /// change: a committed inode is never modified).
    Copy {
        from: Arc<OwnedFd>,
        from_name: Vec<u8>,
        dir: Arc<OwnedFd>,
        name: Vec<u8>,
        entry: Entry,
    },
}

fn run_job(job: Job) -> Result<()> {
    match job {
        Job::Copy {
            from,
            from_name,
            dir,
            name,
            entry,
        } => {
            let mut src = fsops::open_read(from.as_fd(), &from_name, &entry.path)?;
            let mut f = fsops::create_file(dir.as_fd(), &name, &entry.path)?;
            copy_all(&mut src, &mut f, &entry.path)?;
            fsops::apply_meta_fd(f.as_fd(), &entry, true)?;
            f.sync_all().ctx("fsync", fsops::p(&entry.path))
        }
        Job::Write {
            dir,
            name,
            entry,
            data,
            durable,
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
            fsops::apply_meta_fd(f.as_fd(), &entry, true)?;
            if durable {
                f.sync_all().ctx("fsync", fsops::p(&entry.path))?;
            } else {
                fsops::start_writeback(f.as_fd());
            }
            Ok(())
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
    hasher: IncHasher,
    written: u64,
    basis: Option<(std::fs::File, u64, u32)>,
    stage: Option<u64>,
}

static ZEROS: [u8; 65536] = [0; 65536];

impl<'a> Applier<'a> {
    /// Start a round of `name` (locked and recovered by the caller) on top
    /// of `cur`, its committed state.
    pub(crate) fn begin(
        store: &'a Store,
        name: &str,
        cur: Option<Arc<Cached>>,
        unified: bool,
    ) -> Result<Applier<'a>> {
        let tree = store.tree_dir(name)?;
        fsops::remove_tree(tree.as_fd(), b"tmp")?;
        fsops::make_dir(tree.as_fd(), b"tmp", b"tmp")?;
        let tmp = fsops::open_dir_at(tree.as_fd(), b"tmp", b"tmp")?;
        // Take the state out of the cache: the round consumes it (a failed
        // round leaves the cache empty and the state is re-read from disk).
        drop(store.uncache(name));
        let base = cur.map(|c| Arc::try_unwrap(c).unwrap_or_else(|c| (*c).clone()));
        let target = match &base {
            Some(_) => Target::Staged {
                live: DirCache::new(fsops::open_dir_at(tree.as_fd(), b"live", b"live")?),
                stage: Arc::new(tmp),
                next: 0,
            },
            None => Target::Direct {
                new: DirCache::new(tmp),
            },
        };
        let old_groups = base
            .as_ref()
            .map(|c| {
                c.index
                    .entries
                    .iter()
                    .filter_map(|e| e.link.clone())
                    .collect()
            })
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
            base,
            old_groups,
            target,
            changes: Vec::new(),
            last_key: None,
            linked_old: Vec::new(),
            pool,
            stats: ApplyStats::default(),
            workers: Workers::new(),
            pending_old: None,
        })
    }

    /// The committed state this round builds on.
    pub(crate) fn base(&self) -> Option<&Cached> {
        self.base.as_ref()
    }

    /// Which of these hashes the unification pool holds.
    pub(crate) fn pool_has(&self, hashes: &[[u8; 32]]) -> Vec<bool> {
        hashes.iter().map(|h| self.pool.contains_key(h)).collect()
    }

    fn old_entry(&self, path: &[u8]) -> Option<&Entry> {
        self.base.as_ref().and_then(|c| c.index.get(path))
    }

    /// The entry of `path` in the tree being built (so far).
    fn new_entry(&self, path: &[u8]) -> Option<&Entry> {
        match self.changes.binary_search_by(|c| key_cmp(&c.path, path)) {
            Ok(i) => self.changes[i].new.as_ref(),
            Err(_) => self.old_entry(path),
        }
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
        self.pending_old = self.old_entry(path).cloned();
        Ok(())
    }

    /// The parent of a new entry must be a directory of the new tree (a
    /// symlink or file in the way is refused before anything is written).
    fn check_parent(&self, path: &[u8]) -> Result<()> {
        if path.is_empty() {
            return Ok(());
        }
        match self.new_entry(split_parent(path).0) {
            Some(p) if p.kind == Kind::Dir => Ok(()),
            _ => Err(SyncError::BadPath {
                path: display(path),
                why: "a component is not a directory (symlink or file in the way)",
            }),
        }
    }

    fn push(&mut self, e: Entry, stage: Option<u64>) {
        self.changes.push(Change {
            path: e.path.clone(),
            old: self.pending_old.take(),
            new: Some(e),
            stage,
        });
    }

    /// Where the new inode of `path` is created: (directory, name, stage id).
    fn target(&mut self, path: &[u8]) -> Result<(Arc<OwnedFd>, Vec<u8>, Option<u64>)> {
        match &mut self.target {
            Target::Direct { new } => {
                let (parent, name) = split_parent(path);
                Ok((new.dir_arc(parent)?, name.to_vec(), None))
            }
            Target::Staged { stage, next, .. } => {
                let id = *next;
                *next += 1;
                Ok((stage.clone(), id.to_string().into_bytes(), Some(id)))
            }
        }
    }

    /// The directory `rel` of the live tree (the previous snapshot).
    fn live_dir(&mut self, rel: &[u8]) -> Result<Arc<OwnedFd>> {
        match &mut self.target {
            Target::Staged { live, .. } => live.dir_arc(rel),
            Target::Direct { .. } => Err(SyncError::Protocol(
                "local source without a current snapshot".into(),
            )),
        }
    }

    /// Delete `path` of the current snapshot.
    pub(crate) fn delete(&mut self, path: &[u8]) -> Result<()> {
        if self.old_entry(path).is_none() {
            return Err(SyncError::Protocol(format!(
                "delete of {:?}, which the current snapshot does not hold",
                display(path)
            )));
        }
        self.order(path)?;
        self.stats.deleted += 1;
        self.changes.push(Change {
            path: path.to_vec(),
            old: self.pending_old.take(),
            new: None,
            stage: None,
        });
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
        self.check_parent(&e.path)?;
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
            if key_cmp(&leader, &e.path) != std::cmp::Ordering::Less {
                return Err(SyncError::Protocol(format!(
                    "{:?}: hardlink to {:?}, not (yet) in the tree",
                    e.display_path(),
                    display(&leader)
                )));
            }
            let le = self.new_entry(&leader).cloned().ok_or_else(|| {
                SyncError::Protocol(format!(
                    "{:?}: hardlink to {:?}, not (yet) in the tree",
                    e.display_path(),
                    display(&leader)
                ))
            })?;
            // The leader's hash is what was actually sent for it.
            e.hash = le.hash;
            if !le.same_inode_meta(&e) || le.link.is_some() || le.kind == Kind::Dir {
                return Err(SyncError::Protocol(format!(
                    "{:?}: hardlink metadata differs from its leader",
                    e.display_path()
                )));
            }
            if let Target::Direct { new } = &mut self.target {
                // The leader may still be being written by a worker.
                self.workers.barrier()?;
                let (lp, ln) = split_parent(&leader);
                let (pp, pn) = split_parent(&e.path);
                let lfd = new.dir_arc(lp)?;
                let pfd = new.dir_arc(pp)?;
                fsops::link(lfd.as_fd(), ln, pfd.as_fd(), pn, &e.path)?;
            }
            self.push(e, None);
            return Ok(None);
        }
        match e.kind {
            Kind::Dir => {
                if let Target::Direct { new } = &mut self.target {
                    if e.path.is_empty() {
                        fsops::apply_meta_fd(new.root(), &e, false)?;
                    } else {
                        let (parent, name) = split_parent(&e.path);
                        fsops::make_dir(new.dir(parent)?, name, &e.path)?;
                        fsops::apply_meta_fd(new.dir(&e.path)?, &e, false)?;
                    }
                }
                self.push(e, None);
                Ok(None)
            }
            Kind::Symlink | Kind::Char | Kind::Block | Kind::Fifo | Kind::Socket => {
                let (dir, name, id) = self.target(&e.path)?;
                fsops::make_special(dir.as_fd(), &name, &e)?;
                self.push(e, id);
                Ok(None)
            }
            Kind::File => match src {
                Source::None => Err(SyncError::Protocol(format!(
                    "{:?}: regular file without content",
                    e.display_path()
                ))),
                Source::Data => {
                    let (dir, name, stage) = self.target(&e.path)?;
                    let f = fsops::create_file(dir.as_fd(), &name, &e.path)?;
                    Ok(Some(Incoming {
                        hasher: IncHasher::new(e.size),
                        entry: e,
                        file: f,
                        written: 0,
                        basis: None,
                        stage,
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
                    let bdir = self.live_dir(bp)?;
                    let bf = fsops::open_read(bdir.as_fd(), bn, &b)?;
                    let (dir, name, stage) = self.target(&e.path)?;
                    let f = fsops::create_file(dir.as_fd(), &name, &e.path)?;
                    Ok(Some(Incoming {
                        hasher: IncHasher::new(e.size),
                        entry: e,
                        file: f,
                        written: 0,
                        basis: Some((bf, be.size, crate::delta::block_size(be.size))),
                        stage,
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
                    let ffd = self.live_dir(fp)?;
                    let (dir, name, stage) = self.target(&e.path)?;
                    if from != e.path && !in_group && oe.same_inode_meta(&e) {
                        // A rename: share the inode (checked at the end: `from` must be gone).
                        fsops::link(ffd.as_fd(), fname, dir.as_fd(), &name, &e.path)?;
                        self.linked_old.push(from);
                    } else {
                        // Never change a shared inode: copy (in-kernel), on a
                        // worker thread (copy and fsync are latency bound).
                        self.workers.submit(Job::Copy {
                            from: ffd,
                            from_name: fname.to_vec(),
                            dir,
                            name,
                            entry: e.clone(),
                        })?;
                    }
                    self.push(e, stage);
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
                    let ofd = undo::open_rel(other.as_fd(), op)?;
                    let (dir, name, stage) = self.target(&e.path)?;
                    if pe.same_inode_meta(&e) {
                        fsops::link(ofd.as_fd(), on, dir.as_fd(), &name, &e.path)?;
                    } else {
                        let mut src = fsops::open_read(ofd.as_fd(), on, &pe.path)?;
                        let mut f = fsops::create_file(dir.as_fd(), &name, &e.path)?;
                        copy_all(&mut src, &mut f, &e.path)?;
                        fsops::apply_meta_fd(f.as_fd(), &e, true)?;
                        if stage.is_some() {
                            f.sync_all().ctx("fsync", fsops::p(&e.path))?;
                        }
                    }
                    self.stats.unified_bytes += e.size;
                    self.push(e, stage);
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
        self.check_parent(&e.path)?;
        self.stats.changed += 1;
        self.stats.literal_bytes += data.len() as u64;
        e.hash = hash;
        let (dir, name, stage) = self.target(&e.path)?;
        self.workers.submit(Job::Write {
            dir,
            name,
            entry: e.clone(),
            data,
            durable: stage.is_some(),
        })?;
        self.push(e, stage);
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
        inc.wrote(d.len() as u64);
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
        let Some((mut bf, blen, block)) = inc.basis.take() else {
            return Err(SyncError::Protocol("Copy outside a delta".into()));
        };
        let r = copy_blocks(inc, &mut bf, blen, block, start, count);
        inc.basis = Some((bf, blen, block));
        self.stats.matched_bytes += r?;
        Ok(())
    }

    /// End of the incoming file: check size and hash, apply metadata.
    pub(crate) fn file_end(&mut self, inc: Incoming, hash: [u8; 32]) -> Result<()> {
        let Incoming {
            mut entry,
            file,
            hasher,
            written,
            stage,
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
        if hasher.finalize()? != entry.hash {
            return Err(SyncError::HashMismatch {
                path: entry.display_path(),
            });
        }
        file.set_len(entry.size)
            .ctx("truncate", fsops::p(&entry.path))?;
        fsops::apply_meta_fd(file.as_fd(), &entry, true)?;
        let t = std::time::Instant::now();
        if stage.is_some() {
            file.sync_all().ctx("fsync", fsops::p(&entry.path))?;
        } else {
            fsops::start_writeback(file.as_fd());
        }
        if entry.size >= SIG_CACHE_MIN {
            self.store
                .want_signature(&self.name, &entry.path, entry.hash, entry.size);
        }
        if entry.size >= 64 << 20 {
            tracing::debug!(
                bytes = entry.size,
                fsync_ms = t.elapsed().as_millis() as u64,
                "large file written"
            );
        }
        self.push(entry, stage);
        Ok(())
    }

    /// All changes received: check the digest, apply, commit. Returns the
    /// new sequence number.
    pub(crate) fn finish(mut self, digest: [u8; 32], count: u64) -> Result<(u64, ApplyStats)> {
        let t0 = std::time::Instant::now();
        self.workers.barrier()?;
        let t_barrier = t0.elapsed();
        for from in &self.linked_old {
            let gone = self
                .changes
                .binary_search_by(|c| key_cmp(&c.path, from))
                .is_ok_and(|i| self.changes[i].new.is_none());
            if !gone {
                return Err(SyncError::Protocol(format!(
                    "{:?} was used as a rename source but is still in the tree",
                    display(from)
                )));
            }
        }
        let changes = std::mem::take(&mut self.changes);
        let base = self.base.take();
        let seq = base.as_ref().map(|b| b.seq).unwrap_or(0) + 1;
        let committed = time_of(now_ns());
        let check = |n: usize, got: [u8; 32]| -> Result<()> {
            if n as u64 != count {
                return Err(SyncError::Protocol(format!(
                    "built {n} entries, sender announced {count}"
                )));
            }
            if got != digest {
                return Err(SyncError::DigestMismatch {
                    expected: crate::entry::hex(&digest),
                    got: crate::entry::hex(&got),
                });
            }
            Ok(())
        };
        let Some(base) = base else {
            // First version: the tree is complete in `tmp`.
            let entries: Vec<Entry> = changes.into_iter().filter_map(|c| c.new).collect();
            let leaves = leaves_of(&entries);
            check(entries.len(), digest_of(&leaves))?;
            if let Target::Direct { new } = &mut self.target {
                new.clear();
                for e in entries.iter().rev().filter(|e| e.kind == Kind::Dir) {
                    fsops::set_mtime_fd(new.dir(&e.path)?, e)?;
                }
                new.clear();
            }
            let c = Cached {
                seq,
                committed,
                index: Index { entries, digest },
                leaves,
                key: FileKey::default(),
                base_len: 0,
                journal_len: 0,
            };
            self.store.commit_first(&self.name, &self.tree, c)?;
            return Ok((seq, self.stats));
        };
        let Cached {
            index,
            leaves,
            journal_len,
            base_len,
            ..
        } = base;
        let new_leaves: Vec<Option<[u8; 32]>> = changes
            .par_iter()
            .map(|c| c.new.as_ref().map(|e| e.leaf()))
            .collect();
        let mut ops: Vec<Op> = Vec::with_capacity(changes.len());
        let mut merged = Vec::with_capacity(changes.len());
        let mut puts = Vec::new();
        let mut dels = Vec::new();
        for (c, l) in changes.into_iter().zip(new_leaves) {
            match &c.new {
                Some(e) => puts.push(e.clone()),
                None => dels.push(c.path.clone()),
            }
            merged.push((c.path.clone(), c.new.clone().zip(l)));
            ops.push(Op {
                path: c.path,
                old: c.old,
                new: c.new,
                stage: c.stage,
                covered: false,
            });
        }
        undo::plan(&mut ops);
        let touched = undo::dirs_touched(&ops);
        let old_dirs = Index {
            entries: touched
                .iter()
                .filter_map(|d| index.get(d).cloned())
                .collect(),
            digest: [0; 32],
        };
        let (entries, leaves) = merge(index.entries, leaves, merged);
        check(entries.len(), digest_of(&leaves))?;
        let new_index = Index { entries, digest };

        // The intent/undo log reaches the disk before the live tree changes.
        let ud = fsops::open_dir_at(self.tree.as_fd(), b"undo", b"undo")?;
        let lname = format!("{seq}.log");
        undo::write_new_synced(ud.as_fd(), &lname, &undo::encode(seq, &ops))?;
        fsops::remove_tree(ud.as_fd(), seq.to_string().as_bytes())?;
        fsops::make_dir(ud.as_fd(), seq.to_string().as_bytes(), b"undo")?;
        let sd = fsops::open_dir_at(ud.as_fd(), seq.to_string().as_bytes(), b"undo")?;
        rustix::fs::fsync(&ud).ctx("fsync", PathBuf::from("undo"))?;
        let Target::Staged { live, stage, .. } = &mut self.target else {
            return Err(SyncError::Protocol("staged round without a stage".into()));
        };
        live.clear();
        let stage = stage.clone();
        let rec = Record {
            seq,
            time_ns: committed
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
            count,
            digest,
            puts,
            dels,
        };
        let c = Cached {
            seq,
            committed,
            index: new_index,
            leaves,
            key: FileKey::default(),
            base_len,
            journal_len: 0,
        };
        let fault = self
            .store
            .fault
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let t_logged = t0.elapsed();
        let r = match fault {
            Some((after, crash)) => {
                let n = after.min(ops.len());
                undo::apply(&ops[..n], live, stage.as_fd(), sd.as_fd())?;
                if crash {
                    // Leave everything as a crash would: no rollback now.
                    drop(sd);
                    return Err(SyncError::Aborted("injected crash while applying".into()));
                }
                Err(SyncError::Aborted("injected fault while applying".into()))
            }
            None => undo::apply(&ops, live, stage.as_fd(), sd.as_fd()),
        };
        let r = r
            .and_then(|()| {
                live.clear();
                undo::set_dir_mtimes(&touched, &c.index, live)
            })
            .and_then(|()| {
                // Durability of the applied round, O(changes): the staged
                // files were fsynced as written; now the directories whose
                // entries changed, the undo area. (No syncfs: on a shared
                // machine it would flush everyone's dirty data.)
                live.clear();
                undo::fsync_dirs(&touched, &c.index, live.root())?;
                rustix::fs::fsync(&sd).ctx("fsync", PathBuf::from("undo"))
            })
            .and_then(|()| {
                self.store
                    .commit_record(&self.name, &self.tree, &rec, c, journal_len)
            });
        if let Err(e) = r {
            tracing::warn!(name = %self.name, error = %e, "applying a round failed: rolling back");
            // The record may be half written: cut the journal back first.
            if let Ok(fd) = rustix::fs::openat(
                &self.tree,
                "journal",
                OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                let _ = std::fs::File::from(fd).set_len(journal_len);
            }
            live.clear();
            undo::reverse(&ops, live, sd.as_fd(), false)?;
            live.clear();
            undo::set_dir_mtimes(&touched, &old_dirs, live)?;
            rustix::fs::syncfs(&self.tree).ctx("syncfs", self.store.dir.clone())?;
            drop(sd);
            fsops::remove_tree(ud.as_fd(), seq.to_string().as_bytes())?;
            fsops::remove_tree(ud.as_fd(), lname.as_bytes())?;
            return Err(e);
        }
        tracing::debug!(
            name = %self.name,
            ops = ops.len(),
            barrier_ms = t_barrier.as_millis() as u64,
            merged_and_logged_ms = (t_logged - t_barrier).as_millis() as u64,
            applied_and_committed_ms = (t0.elapsed() - t_logged).as_millis() as u64,
            "round applied"
        );
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

fn copy_all(src: &mut std::fs::File, dst: &mut std::fs::File, path: &[u8]) -> Result<()> {
    // std::io::copy uses copy_file_range between files (in-kernel copy).
    std::io::copy(src, dst).ctx("copy", fsops::p(path))?;
    Ok(())
}

impl Drop for Applier<'_> {
    fn drop(&mut self) {
        self.workers.stop();
        // Staged inodes of a round that did not commit (and the empty
        // staging directory of one that did). Best effort: `recover` at the
        // next round removes anything left.
        let _ = fsops::remove_tree(self.tree.as_fd(), b"tmp");
    }
}
