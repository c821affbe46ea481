//! The sending side of a round (transport-agnostic).

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant, SystemTime};

use rayon::prelude::*;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::delta::{block_size, DELTA_MIN};
use crate::entry::{key_cmp, Entry, Kind};
use crate::error::{IoCtx, Result, SyncError};
use crate::scan::{io_pool, join, Index};
use crate::session::{run_blocking, Peer};
use crate::wire::{Frame, Source, CHUNK};

/// Options of a push.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// The tree takes part in unification on the receiver.
    pub unified: bool,
    /// Use the fanotify change journal between rounds (needs root).
    pub journal: bool,
    /// Freeze this cgroup (v2 directory or v1 freezer directory) during the
    /// last short pass of a round.
    pub freeze: Option<crate::freeze::FreezeConfig>,
    /// Keep sending rounds as the tree changes (`--watch`); otherwise one round.
    pub watch: bool,
    /// Pause between watch rounds when nothing changed.
    pub interval: Option<Duration>,
    /// Where the sender keeps its index between runs (hash cache and the
    /// receiver's manifest); none: in memory only.
    pub state_file: Option<PathBuf>,
}

/// Figures of one round (what the agent shows).
#[derive(Debug, Clone, Default)]
pub struct RoundStats {
    /// Bytes written to the stream.
    pub bytes_sent: u64,
    /// Bytes read from the stream.
    pub bytes_received: u64,
    /// Entries created or changed on the receiver.
    pub files_changed: u64,
    /// Entries deleted on the receiver.
    pub files_deleted: u64,
    /// File content bytes sent literally.
    pub literal_bytes: u64,
    /// Bytes the receiver rebuilt from its own blocks (deltas).
    pub matched_bytes: u64,
    /// Bytes the receiver took from other unified trees instead of the wire.
    pub unified_bytes: u64,
    /// Entries in the tree.
    pub entries: u64,
    /// Whole round, scan included.
    pub round_duration: Duration,
    /// Scan part.
    pub scan_duration: Duration,
    /// How long the cgroup was frozen (none: no freeze).
    pub freeze_duration: Option<Duration>,
    /// Whether this round walked the whole tree (no journal, start-up, overflow).
    pub full_scan: bool,
    /// Rounds so far that fell back to a full scan although a journal was asked for.
    pub journal_fallbacks: u64,
    /// Receiver's sequence number after the round.
    pub seq: u64,
    /// Nothing had changed.
    pub unchanged: bool,
    /// Age of the newest complete snapshot right after this round: time since
    /// its scan began.
    pub lag: Duration,
}

/// What a sender keeps between rounds.
#[derive(Default)]
pub struct SenderState {
    /// The index the receiver committed last (also the hash cache).
    pub last: Option<Index>,
    /// When the scan of the last committed round began.
    pub last_point: Option<SystemTime>,
    /// The change journal, when used.
    pub journal: Option<crate::journal::Journal>,
    /// Full-scan fallbacks so far.
    pub fallbacks: u64,
    /// The last round failed after the journal was drained: the next round
    /// must scan in full.
    pub needs_full: bool,
    /// Leaves of `last`'s digest, so that a journal round re-hashes only
    /// the entries it changes; valid while `leaves_for` is `last`'s digest.
    leaves: Vec<[u8; 32]>,
    leaves_for: [u8; 32],
}

impl std::fmt::Debug for SenderState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderState")
            .field("entries", &self.last.as_ref().map(|i| i.entries.len()))
            .field("journal", &self.journal.is_some())
            .field("fallbacks", &self.fallbacks)
            .finish()
    }
}

impl SenderState {
    /// The cached leaves of `idx` (which was `last`), recomputed when the
    /// cache is missing or belongs to another index (loaded state, a caller
    /// that replaced `last`).
    fn take_leaves(&mut self, idx: &Index) -> Vec<[u8; 32]> {
        let l = std::mem::take(&mut self.leaves);
        if l.len() == idx.entries.len() && self.leaves_for == idx.digest {
            l
        } else {
            crate::scan::leaves_of(&idx.entries)
        }
    }

    fn set_leaves(&mut self, leaves: Vec<[u8; 32]>) {
        self.leaves_for = self.last.as_ref().map(|l| l.digest).unwrap_or_default();
        self.leaves = leaves;
    }

    /// Age of the newest snapshot this sender completed (the lag).
    pub fn lag(&self) -> Option<Duration> {
        self.last_point.map(|t| t.elapsed().unwrap_or_default())
    }

    /// Load a persisted index (hash cache and receiver manifest). The inode
    /// numbers (not part of the manifest) live beside it in `PATH.ino`.
    pub fn load(path: &Path) -> SenderState {
        let idx = std::fs::read(path)
            .ok()
            .and_then(|b| crate::store::decode_manifest(&b).ok());
        let idx = idx.map(|mut i| {
            if let Ok(b) = std::fs::read(path.with_extension("ino")) {
                if b.len() == i.entries.len() * 8 {
                    for (e, c) in i.entries.iter_mut().zip(b.chunks_exact(8)) {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(c);
                        e.ino = u64::from_le_bytes(a);
                    }
                }
            }
            i
        });
        SenderState {
            last: idx,
            ..Default::default()
        }
    }

    /// Persist the index.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(i) = &self.last {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, crate::store::encode_manifest(i)).ctx("write", &tmp)?;
            std::fs::rename(&tmp, path).ctx("rename", path)?;
            let inos: Vec<u8> = i.entries.iter().flat_map(|e| e.ino.to_le_bytes()).collect();
            let ino = path.with_extension("ino");
            std::fs::write(&ino, inos).ctx("write", &ino)?;
        }
        Ok(())
    }
}

/// What a round's scan produced.
pub(crate) enum Scanned {
    /// A full scan: the index and its digest's leaves.
    Full(Index, Vec<[u8; 32]>),
    /// A journal rescan: the difference to the last index.
    Journal(crate::scan::Changes),
}

/// Scan the source for a round: through the journal when it has a clean
/// record since the last round, else in full.
#[allow(clippy::too_many_arguments)] // disjoint borrows of SenderState
pub(crate) fn scan_for_round(
    src: &Path,
    last: Option<&Index>,
    journal: &mut Option<crate::journal::Journal>,
    needs_full: &mut bool,
    fallbacks: &mut u64,
    want_journal: bool,
    cache: Option<&Index>,
    want: crate::scan::Want<'_>,
) -> Result<Scanned> {
    if want_journal && journal.is_none() {
        match crate::journal::Journal::start(src) {
            Ok(j) => *journal = Some(j),
            Err(e) => {
                tracing::warn!(error = %e, "change journal unavailable; full scans");
                *fallbacks += 1;
            }
        }
    }
    let full = |prev: Option<&Index>| -> Result<Scanned> {
        let (idx, leaves) = crate::scan::scan_with_leaves(src, prev, want)?;
        Ok(Scanned::Full(idx, leaves))
    };
    if std::mem::take(needs_full) {
        if let Some(j) = journal.as_mut() {
            j.drain();
        }
        return full(last.or(cache));
    }
    if let (Some(j), Some(prev)) = (journal.as_mut(), last) {
        let t = Instant::now();
        let ev0 = j.events;
        match j.changed_dirs(prev) {
            Ok(Some(dirs)) => {
                let t_dirs = t.elapsed();
                let ch = crate::scan::rescan_changes(src, prev, &dirs, want)?;
                tracing::debug!(
                    events = j.events - ev0,
                    dirs = dirs.len(),
                    listed = ch.dirs_listed,
                    added = ch.added.len(),
                    removed = ch.removed.len(),
                    journal_ms = t_dirs.as_millis() as u64,
                    rescan_ms = (t.elapsed() - t_dirs).as_millis() as u64,
                    "journal rescan"
                );
                return Ok(Scanned::Journal(ch));
            }
            Ok(None) => {
                *fallbacks += 1;
                tracing::info!("change journal overflowed or saw unknown objects; full scan");
            }
            Err(e) => {
                *fallbacks += 1;
                tracing::warn!(error = %e, "change journal failed; full scan");
            }
        }
    } else if let Some(j) = journal.as_mut() {
        // First round: drain what happened before, the full scan covers it.
        j.drain();
    }
    full(last.or(cache))
}

/// Send one round of `src` as `name` over `stream`.
pub async fn send<S>(
    stream: S,
    src: PathBuf,
    name: String,
    token: Option<Vec<u8>>,
    opts: PushOptions,
    mut state: SenderState,
) -> (Result<RoundStats>, SenderState)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let r = run_blocking(stream, move |peer| {
        let r = send_blocking(peer, &src, &name, token.as_deref(), &opts, &mut state, None);
        let _ = tx.send(state);
        r
    })
    .await;
    let state = rx.try_recv().unwrap_or_default();
    match r {
        Ok((mut s, c)) => {
            s.bytes_sent = c.sent.load(std::sync::atomic::Ordering::Relaxed);
            s.bytes_received = c.received.load(std::sync::atomic::Ordering::Relaxed);
            (Ok(s), state)
        }
        Err(e) => (Err(e), state),
    }
}

/// The planned change of one entry.
enum Plan {
    Put(usize, Source),
    Delete(Vec<u8>),
}

/// The blocking sender. `deadline` is set when the caller froze the source and
/// bounds the round: past it the round aborts (the receiver keeps its snapshot).
pub(crate) fn send_blocking(
    peer: &mut Peer,
    src: &Path,
    name: &str,
    token: Option<&[u8]>,
    opts: &PushOptions,
    state: &mut SenderState,
    deadline: Option<Instant>,
) -> Result<RoundStats> {
    let r = send_round_inner(peer, src, name, token, opts, state, deadline);
    if r.is_err() {
        // Journal records of this round are consumed: rescan in full next time.
        state.needs_full = true;
    }
    r
}

fn send_round_inner(
    peer: &mut Peer,
    src: &Path,
    name: &str,
    token: Option<&[u8]>,
    opts: &PushOptions,
    state: &mut SenderState,
    deadline: Option<Instant>,
) -> Result<RoundStats> {
    let t0 = Instant::now();
    let point = SystemTime::now();
    peer.send(Frame::Hello {
        name: name.to_string(),
        token: token.unwrap_or_default().to_vec(),
        flags: opts.unified as u32,
    })?;
    let check_deadline = |peer: &Peer| -> Result<()> {
        if let Some(d) = deadline {
            if Instant::now() > d {
                let _ = peer.send(Frame::Abort("freeze bound exceeded".into()));
                return Err(SyncError::Aborted("freeze bound exceeded".into()));
            }
        }
        Ok(())
    };
    let (rdigest, _rseq) = match peer.recv()? {
        Frame::Welcome { digest, seq } => (digest, seq),
        Frame::Refused(r) => return Err(SyncError::PeerRefused(r)),
        f => {
            return Err(SyncError::Handshake(format!(
                "expected Welcome, got {}",
                f.name()
            )))
        }
    };
    // Borrowed, not copied: the receiver's manifest is usually our last index.
    let empty = Index::default();
    let mut received: Option<Index> = None;
    let remote_is_last =
        rdigest != [0; 32] && state.last.as_ref().is_some_and(|l| l.digest == rdigest);
    if rdigest == [0; 32] || remote_is_last {
        peer.send(Frame::HaveManifest)?;
    } else {
        peer.send(Frame::NeedManifest)?;
        let mut v = Vec::new();
        loop {
            match peer.recv()? {
                Frame::ManifestChunk(c) => v.extend(c),
                Frame::ManifestEnd { count } => {
                    if count != v.len() as u64 {
                        return Err(SyncError::Protocol("manifest count mismatch".into()));
                    }
                    break;
                }
                Frame::Refused(r) => return Err(SyncError::PeerRefused(r)),
                f => {
                    return Err(SyncError::Protocol(format!(
                        "unexpected {} in manifest",
                        f.name()
                    )))
                }
            }
        }
        let i = Index::from_entries(v);
        if i.digest != rdigest {
            return Err(SyncError::Protocol(
                "receiver manifest does not match its digest".into(),
            ));
        }
        received = Some(i);
    }
    // Hash during the scan only what could match something the receiver
    // holds (same path or same size); the rest is hashed as it is sent.
    let t_scan = Instant::now();
    let scanned = {
        let remote: &Index = match (&received, remote_is_last) {
            (Some(r), _) => r,
            (None, true) => state.last.as_ref().unwrap_or(&empty),
            (None, false) => &empty,
        };
        // Built only when a file without a cached hash is met (a journal
        // round usually meets none or few).
        let remote_sizes: std::sync::OnceLock<HashSet<u64>> = std::sync::OnceLock::new();
        let sizes = || {
            remote_sizes.get_or_init(|| {
                remote
                    .entries
                    .iter()
                    .filter(|e| e.kind == Kind::File)
                    .map(|e| e.size)
                    .collect()
            })
        };
        // Large files changed in place go as deltas, which hash them as they
        // are read: no separate hashing pass over them.
        let want = |e: &Entry| {
            opts.unified
                || match remote.get(&e.path) {
                    Some(r) => {
                        !(r.kind == Kind::File && r.size >= DELTA_MIN && e.size >= DELTA_MIN)
                    }
                    None => sizes().contains(&e.size),
                }
        };
        scan_for_round(
            src,
            state.last.as_ref(),
            &mut state.journal,
            &mut state.needs_full,
            &mut state.fallbacks,
            opts.journal,
            Some(remote),
            &want,
        )?
    };
    // A journal round splices its changes into the last index (moved, not
    // copied); the changed entries and the previous versions they replace
    // are then all the plan needs when the receiver holds that index.
    let (mut idx, mut leaves, diff) = match scanned {
        Scanned::Full(i, l) => (i, l, None),
        Scanned::Journal(ch) => {
            let t = Instant::now();
            let prev = state.last.take().unwrap_or_default();
            let pl = state.take_leaves(&prev);
            let sp = crate::scan::splice(prev, pl, ch);
            tracing::debug!(
                changed = sp.changed.len(),
                old = sp.old.len(),
                splice_ms = t.elapsed().as_millis() as u64,
                "spliced"
            );
            (sp.index, sp.leaves, Some((sp.changed, sp.old)))
        }
    };
    state.leaves.clear();
    let use_diff = remote_is_last && diff.is_some();
    let remote: &Index = match (&received, remote_is_last && !use_diff) {
        (Some(r), _) => r,
        (None, true) => state.last.as_ref().unwrap_or(&empty),
        (None, false) => &empty,
    };
    let remote_nonempty = rdigest != [0; 32];
    let full = diff.is_none();
    let scan_duration = t_scan.elapsed();
    let mut stats = RoundStats {
        entries: idx.entries.len() as u64,
        scan_duration,
        full_scan: full,
        ..Default::default()
    };
    check_deadline(peer)?;
    if idx.digest == rdigest && remote_nonempty {
        peer.send(Frame::End {
            digest: idx.digest,
            count: idx.entries.len() as u64,
        })?;
        match peer.recv()? {
            Frame::Committed { seq, .. } => stats.seq = seq,
            Frame::Refused(r) => return Err(SyncError::PeerRefused(r)),
            f => {
                return Err(SyncError::Protocol(format!(
                    "expected Committed, got {}",
                    f.name()
                )))
            }
        }
        stats.unchanged = true;
        stats.round_duration = t0.elapsed();
        state.last = Some(idx);
        state.set_leaves(leaves);
        state.last_point = Some(point);
        stats.lag = state.lag().unwrap_or_default();
        stats.journal_fallbacks = state.fallbacks;
        return Ok(stats);
    }
    // Plan: the paths where both sides differ (a merge of both sorted
    // lists, or of the changed entries with their previous versions), then
    // the sources; the maps for rename detection cover only the contents of
    // changed files, so an unchanged tree costs no per-entry hashing.
    let (steps, candidates): (Vec<Step<'_>>, &[Entry]) = match (&diff, use_diff) {
        (Some((changed, old)), true) => (steps_changed(&idx.entries, changed, old), old),
        _ => (steps_full(&idx.entries, &remote.entries), &remote.entries),
    };
    let a = &idx.entries;
    let same_path_has = |e: &Entry, r: Option<&Entry>| {
        r.is_some_and(|r| r.kind == Kind::File && r.hash == e.hash && r.link.is_none())
    };
    let wanted: HashSet<[u8; 32]> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Put(k, r) => {
                let e = &a[*k];
                (e.kind == Kind::File && e.link.is_none() && e.size > 0 && !same_path_has(e, *r))
                    .then_some(e.hash)
            }
            Step::Delete(_) => None,
        })
        .collect();
    let mut by_hash: HashMap<[u8; 32], &Entry> = HashMap::new();
    if !wanted.is_empty() {
        let remote_groups: HashSet<&[u8]> = candidates
            .iter()
            .filter_map(|e| e.link.as_deref())
            .collect();
        for e in candidates {
            if e.kind == Kind::File
                && e.link.is_none()
                && wanted.contains(&e.hash)
                && !remote_groups.contains(&e.path[..])
            {
                by_hash.entry(e.hash).or_insert(e);
            }
        }
    }
    let mut plan = Vec::with_capacity(steps.len());
    // Basis size of each planned delta (by plan position).
    let mut delta_base: HashMap<usize, u64> = HashMap::new();
    for st in steps {
        let (k, r) = match st {
            Step::Delete(o) => {
                plan.push(Plan::Delete(o.path.clone()));
                continue;
            }
            Step::Put(k, r) => (k, r),
        };
        let e = &a[k];
        let source = if e.kind != Kind::File || e.link.is_some() {
            Source::None
        } else if same_path_has(e, r) {
            Source::Old(e.path.clone())
        } else if let Some(o) = by_hash
            .get(&e.hash)
            .filter(|o| e.size > 0 && idx.get(&o.path).is_none())
        {
            Source::Old(o.path.clone())
        } else if let Some(r) =
            r.filter(|r| r.kind == Kind::File && r.size >= DELTA_MIN && e.size >= DELTA_MIN)
        {
            delta_base.insert(plan.len(), r.size);
            Source::Delta(r.path.clone())
        } else {
            Source::Data
        };
        plan.push(Plan::Put(k, source));
    }
    drop(by_hash);
    drop(diff);
    let t_planned = t0.elapsed();
    // Unification: ask which new contents the receiver's pool holds.
    if opts.unified {
        let ask: Vec<usize> = plan
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p, Plan::Put(k, Source::Data) if idx.entries[*k].size > 0))
            .map(|(n, _)| n)
            .collect();
        for chunk in ask.chunks(100_000) {
            let hashes: Vec<[u8; 32]> = chunk
                .iter()
                .map(|n| match &plan[*n] {
                    Plan::Put(k, _) => idx.entries[*k].hash,
                    Plan::Delete(_) => [0; 32],
                })
                .collect();
            peer.send(Frame::HashQuery(hashes))?;
            match peer.recv()? {
                Frame::HashHave(h) if h.len() == chunk.len() => {
                    for (n, have) in chunk.iter().zip(h) {
                        if have {
                            if let Plan::Put(k, _) = plan[*n] {
                                plan[*n] = Plan::Put(k, Source::Pool);
                            }
                        }
                    }
                }
                Frame::Refused(r) => return Err(SyncError::PeerRefused(r)),
                f => {
                    return Err(SyncError::Protocol(format!(
                        "expected HashHave, got {}",
                        f.name()
                    )))
                }
            }
        }
    }
    // Signatures for deltas.
    let mut sigs: HashMap<usize, Vec<(u32, u64)>> = HashMap::new();
    for (n, p) in plan.iter().enumerate() {
        if let Plan::Put(_, Source::Delta(b)) = p {
            let Some(&rsize) = delta_base.get(&n) else {
                continue;
            };
            let block = block_size(rsize);
            let t_sig = Instant::now();
            peer.send(Frame::SigRequest {
                path: b.clone(),
                block,
            })?;
            match peer.recv()? {
                Frame::Signature { block: bl, sums }
                    if bl == block && sums.len() as u64 == rsize.div_ceil(block as u64) =>
                {
                    tracing::debug!(
                        bytes = rsize,
                        ms = t_sig.elapsed().as_millis() as u64,
                        "signature received"
                    );
                    sigs.insert(n, sums);
                }
                Frame::Refused(r) => return Err(SyncError::PeerRefused(r)),
                f => {
                    return Err(SyncError::Protocol(format!(
                        "bad signature answer ({})",
                        f.name()
                    )))
                }
            }
        }
    }
    check_deadline(peer)?;
    // Prefetch small whole files in parallel (cold reads are latency bound).
    let small: Vec<usize> = plan
        .iter()
        .filter_map(|p| match p {
            Plan::Put(k, Source::Data) if is_small(&idx.entries[*k]) => Some(*k),
            _ => None,
        })
        .collect();
    let (ptx, prx) = sync_channel::<Vec<std::io::Result<(Vec<u8>, [u8; 32])>>>(2);
    let src_owned = src.to_path_buf();
    let paths: Vec<(PathBuf, u64)> = small
        .iter()
        .map(|k| (join(src, &idx.entries[*k].path), idx.entries[*k].size))
        .collect();
    let prefetch = std::thread::spawn(move || {
        let _ = &src_owned;
        // Batches of at most 256 files or 64 MiB, read and hashed in parallel.
        let mut start = 0;
        while start < paths.len() {
            let mut end = start;
            let mut bytes = 0u64;
            while end < paths.len() && end - start < 256 && (bytes < (64 << 20) || end == start) {
                bytes += paths[end].1;
                end += 1;
            }
            let batch = &paths[start..end];
            start = end;
            let data: Vec<std::io::Result<(Vec<u8>, [u8; 32])>> = io_pool().install(|| {
                batch
                    .par_iter()
                    .map(|(p, size)| read_small(p, *size))
                    .collect()
            });
            if ptx.send(data).is_err() {
                break;
            }
        }
    });
    let mut pre: std::vec::IntoIter<std::io::Result<(Vec<u8>, [u8; 32])>> = Vec::new().into_iter();
    // Hashes actually sent that differ from the scan's (a file changed
    // while being read): only then is the digest recomputed over a copy.
    let mut sent_hash: Vec<(usize, [u8; 32])> = Vec::new();
    peer.send(Frame::Begin)?;
    let mut res = Ok(());
    for (n, p) in plan.iter().enumerate() {
        if n % 256 == 0 {
            if let Err(e) = check_deadline(peer) {
                res = Err(e);
                break;
            }
        }
        let r = match p {
            Plan::Delete(path) => {
                stats.files_deleted += 1;
                peer.send(Frame::Delete(path.clone()))
            }
            Plan::Put(k, source) => {
                stats.files_changed += 1;
                let e = &idx.entries[*k];
                let r = peer.send(Frame::Put {
                    entry: e.clone(),
                    source: source.clone(),
                });
                match (r, source) {
                    (Err(er), _) => Err(er),
                    (Ok(()), Source::Data) if is_small(e) => {
                        let d = match pre.next() {
                            Some(d) => Some(d),
                            None => match prx.recv() {
                                Ok(v) => {
                                    pre = v.into_iter();
                                    pre.next()
                                }
                                Err(_) => None,
                            },
                        };
                        match d {
                            Some(Ok((d, h))) => {
                                stats.literal_bytes += d.len() as u64;
                                sent_hash.push((*k, h));
                                let r = if d.is_empty() {
                                    Ok(())
                                } else if d.len() <= CHUNK {
                                    peer.send(Frame::Data(d))
                                } else {
                                    d.chunks(CHUNK)
                                        .try_for_each(|c| peer.send(Frame::Data(c.to_vec())))
                                };
                                r.and_then(|_| peer.send(Frame::FileEnd(h)))
                            }
                            Some(Err(er)) => Err(SyncError::Io {
                                op: "read",
                                path: join(src, &e.path),
                                source: er,
                            }),
                            None => Err(SyncError::Protocol("prefetch ended early".into())),
                        }
                    }
                    (Ok(()), Source::Data) => {
                        send_file(peer, src, e, &mut stats).map(|h| sent_hash.push((*k, h)))
                    }
                    (Ok(()), Source::Delta(_)) => {
                        let sums = sigs.get(&n).cloned().unwrap_or_default();
                        let blen = delta_base.get(&n).copied().unwrap_or(0);
                        let t_d = Instant::now();
                        let r = send_delta(peer, src, e, blen, &sums, &mut stats)
                            .map(|h| sent_hash.push((*k, h)));
                        tracing::debug!(
                            bytes = e.size,
                            ms = t_d.elapsed().as_millis() as u64,
                            "delta sent"
                        );
                        r
                    }
                    (Ok(()), _) => Ok(()),
                }
            }
        };
        if let Err(e) = r {
            res = Err(e);
            break;
        }
    }
    drop(prx);
    let _ = prefetch.join();
    res?;
    // Hashes as actually sent; followers take their leader's. Usually they
    // are the scanned ones and the scan's digest stands; else only the
    // entries whose hash changed get new leaves.
    sent_hash.retain(|(k, h)| idx.entries[*k].hash != *h);
    if !sent_hash.is_empty() {
        let mut touched: Vec<usize> = Vec::with_capacity(sent_hash.len());
        let mut by_path: HashMap<Vec<u8>, [u8; 32]> = HashMap::new();
        for (k, h) in &sent_hash {
            idx.entries[*k].hash = *h;
            touched.push(*k);
            by_path.insert(idx.entries[*k].path.clone(), *h);
        }
        for (i, e) in idx.entries.iter_mut().enumerate() {
            if let Some(h) = e.link.as_ref().and_then(|l| by_path.get(l)) {
                if e.hash != *h {
                    e.hash = *h;
                    touched.push(i);
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
        crate::scan::refresh_leaves(&idx.entries, &mut leaves, &touched);
        idx.digest = crate::store::digest_of(&leaves);
    }
    let new_index = idx;
    let digest = new_index.digest;
    let t_sent = t0.elapsed();
    check_deadline(peer)?;
    peer.send(Frame::End {
        digest,
        count: new_index.entries.len() as u64,
    })?;
    match peer.recv()? {
        Frame::Committed { seq, unified_bytes } => {
            stats.seq = seq;
            stats.unified_bytes = unified_bytes;
        }
        Frame::Refused(r) => return Err(SyncError::PeerRefused(r)),
        f => {
            return Err(SyncError::Protocol(format!(
                "expected Committed, got {}",
                f.name()
            )))
        }
    }
    stats.round_duration = t0.elapsed();
    tracing::debug!(
        entries = new_index.entries.len(),
        changed = stats.files_changed,
        journal = !full,
        scan_ms = scan_duration.as_millis() as u64,
        planned_ms = t_planned.as_millis() as u64,
        sent_ms = t_sent.as_millis() as u64,
        committed_ms = stats.round_duration.as_millis() as u64,
        "round sent"
    );
    state.last = Some(new_index);
    state.set_leaves(leaves);
    state.last_point = Some(point);
    stats.lag = state.lag().unwrap_or_default();
    stats.journal_fallbacks = state.fallbacks;
    Ok(stats)
}

/// One path where the new index and the receiver's differ.
enum Step<'r> {
    Delete(&'r Entry),
    Put(usize, Option<&'r Entry>),
}

/// All differences: a merge of both sorted lists.
fn steps_full<'r>(a: &[Entry], b: &'r [Entry]) -> Vec<Step<'r>> {
    let mut steps = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let ord = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) => key_cmp(&x.path, &y.path),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match ord {
            std::cmp::Ordering::Greater => {
                steps.push(Step::Delete(&b[j]));
                j += 1;
            }
            o => {
                let r = if o == std::cmp::Ordering::Equal {
                    j += 1;
                    Some(&b[j - 1])
                } else {
                    None
                };
                i += 1;
                if r.is_some_and(|r| r.same(&a[i - 1])) {
                    continue;
                }
                steps.push(Step::Put(i - 1, r));
            }
        }
    }
    steps
}

/// The differences of a spliced index to the one it came from: every other
/// entry was moved over unchanged, so only `changed` (indices into `a`) and
/// `old` (the previous versions, tree order) are compared.
fn steps_changed<'r>(a: &[Entry], changed: &[usize], old: &'r [Entry]) -> Vec<Step<'r>> {
    let mut steps = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < changed.len() || j < old.len() {
        let ord = match (changed.get(i), old.get(j)) {
            (Some(&x), Some(y)) => key_cmp(&a[x].path, &y.path),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match ord {
            std::cmp::Ordering::Greater => {
                steps.push(Step::Delete(&old[j]));
                j += 1;
            }
            o => {
                let k = changed[i];
                let r = if o == std::cmp::Ordering::Equal {
                    j += 1;
                    Some(&old[j - 1])
                } else {
                    None
                };
                i += 1;
                if r.is_some_and(|r| r.same(&a[k])) {
                    continue;
                }
                steps.push(Step::Put(k, r));
            }
        }
    }
    steps
}

/// Files read whole (and in parallel) ahead of sending.
fn is_small(e: &Entry) -> bool {
    e.size <= 16 << 20 && !is_sparse(e)
}

fn is_sparse(e: &Entry) -> bool {
    e.blocks.saturating_mul(512) < e.size
}

fn read_small(p: &Path, size: u64) -> std::io::Result<(Vec<u8>, [u8; 32])> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_nofollow()
        .open(p)?;
    let mut v = Vec::with_capacity(size as usize);
    f.take(size).read_to_end(&mut v)?;
    // A file that shrank since the scan: pad; the next round fixes it.
    v.resize(size as usize, 0);
    let h = *blake3::hash(&v).as_bytes();
    Ok((v, h))
}

trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}
impl NoFollow for std::fs::OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
    }
}

/// Stream a file (large or sparse) as Data/Hole frames; returns its hash.
fn send_file(peer: &mut Peer, src: &Path, e: &Entry, stats: &mut RoundStats) -> Result<[u8; 32]> {
    let path = join(src, &e.path);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_nofollow()
        .open(&path)
        .ctx("open", &path)?;
    let mut h = blake3::Hasher::new();
    let mut off = 0u64;
    let sparse = is_sparse(e);
    let mut buf = vec![0u8; CHUNK];
    while off < e.size {
        if sparse {
            let data = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(off)) {
                Ok(d) => d.min(e.size),
                Err(rustix::io::Errno::NXIO) => e.size,
                Err(er) => return Err(er).ctx("seek", &path),
            };
            if data > off {
                let n = data - off;
                peer.send(Frame::Hole(n))?;
                let z = [0u8; 65536];
                let mut left = n;
                while left > 0 {
                    let k = left.min(z.len() as u64) as usize;
                    h.update(&z[..k]);
                    left -= k as u64;
                }
                off = data;
                continue;
            }
            let hole = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(off)) {
                Ok(x) => x.min(e.size),
                Err(_) => e.size,
            };
            f.seek(SeekFrom::Start(off)).ctx("seek", &path)?;
            let mut left = hole - off;
            while left > 0 {
                let k = left.min(CHUNK as u64) as usize;
                let got = read_full(&mut f, &mut buf[..k]).ctx("read", &path)?;
                buf[got..k].fill(0);
                h.update(&buf[..k]);
                peer.send(Frame::Data(buf[..k].to_vec()))?;
                stats.literal_bytes += k as u64;
                left -= k as u64;
                off += k as u64;
            }
        } else {
            let k = (e.size - off).min(CHUNK as u64) as usize;
            let got = read_full(&mut f, &mut buf[..k]).ctx("read", &path)?;
            // A file that shrank since the scan: pad; the next round fixes it.
            buf[got..k].fill(0);
            h.update(&buf[..k]);
            peer.send(Frame::Data(buf[..k].to_vec()))?;
            stats.literal_bytes += k as u64;
            off += k as u64;
        }
    }
    let h = *h.finalize().as_bytes();
    peer.send(Frame::FileEnd(h))?;
    Ok(h)
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// Hashes what a delta reads on a second thread, beside the block matching
/// (the whole-file blake3 is as much work as the strong block sums).
struct HashingReader<R> {
    inner: R,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    hasher: Option<std::thread::JoinHandle<[u8; 32]>>,
    left: u64,
}

impl<R> HashingReader<R> {
    fn new(inner: R, len: u64) -> HashingReader<R> {
        let (tx, rx) = sync_channel::<Vec<u8>>(4);
        let hasher = std::thread::spawn(move || {
            let mut h = blake3::Hasher::new();
            for b in rx {
                h.update(&b);
            }
            *h.finalize().as_bytes()
        });
        HashingReader {
            inner,
            tx: Some(tx),
            hasher: Some(hasher),
            left: len,
        }
    }

    fn finish(mut self) -> std::io::Result<[u8; 32]> {
        drop(self.tx.take());
        self.hasher
            .take()
            .and_then(|h| h.join().ok())
            .ok_or_else(|| std::io::Error::other("hashing thread failed"))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let cap = (buf.len() as u64).min(self.left) as usize;
        let mut n = self.inner.read(&mut buf[..cap])?;
        if n == 0 && cap > 0 {
            // Shrunk since the scan: pad with zeros up to the declared size.
            buf[..cap].fill(0);
            n = cap;
        }
        if n > 0 {
            let sent = self.tx.as_ref().map(|t| t.send(buf[..n].to_vec()));
            if !matches!(sent, Some(Ok(()))) {
                return Err(std::io::Error::other("hashing thread failed"));
            }
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn send_delta(
    peer: &mut Peer,
    src: &Path,
    e: &Entry,
    basis_len: u64,
    sums: &[(u32, u64)],
    stats: &mut RoundStats,
) -> Result<[u8; 32]> {
    let path = join(src, &e.path);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_nofollow()
        .open(&path)
        .ctx("open", &path)?;
    let block = block_size(basis_len);
    let mut rd = HashingReader::new(std::io::BufReader::with_capacity(1 << 20, f), e.size);
    let mut err: Option<SyncError> = None;
    crate::delta::diff(&mut rd, block, basis_len, sums, CHUNK, |op| {
        let r = match op {
            crate::delta::Op::Copy { start, count } => {
                let end = ((start as u64 + count as u64) * block as u64).min(basis_len);
                stats.matched_bytes += end - start as u64 * block as u64;
                peer.send(Frame::Copy { start, count })
            }
            crate::delta::Op::Literal(l) => {
                stats.literal_bytes += l.len() as u64;
                peer.send(Frame::Data(l))
            }
        };
        r.map_err(|e| {
            let m = e.to_string();
            err = Some(e);
            std::io::Error::other(m)
        })
    })
    .map_err(|er| {
        err.take().unwrap_or(SyncError::Io {
            op: "read",
            path: path.clone(),
            source: er,
        })
    })?;
    let h = rd.finish().map_err(|er| SyncError::Io {
        op: "hash",
        path: path.clone(),
        source: er,
    })?;
    peer.send(Frame::FileEnd(h))?;
    Ok(h)
}
