//! The receiving side of a round (transport-agnostic).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::entry::{display, Kind};
use crate::error::{Result, SyncError};
use crate::session::{run_blocking, Peer};
use crate::store::{Applier, ApplyStats, Store};
use crate::wire::{Frame, Source, CHUNK, MANIFEST_BATCH};

/// What a received round did.
#[derive(Debug, Clone)]
pub struct Received {
    /// Tree name.
    pub name: String,
    /// Sequence number of the current snapshot after the round.
    pub seq: u64,
    /// Whether a new version was made (false: nothing had changed).
    pub new_version: bool,
    /// Applier figures.
    pub stats: ApplyStats,
    /// Bytes read from the stream.
    pub bytes_received: u64,
    /// Bytes written to the stream.
    pub bytes_sent: u64,
}

fn token_ok(expected: Option<&[u8]>, got: &[u8]) -> bool {
    match expected {
        None => true,
        Some(e) => {
            // Constant-time compare of equal-length tokens.
            e.len() == got.len() && e.iter().zip(got).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
        }
    }
}

/// Receive one round from `stream` into `store`. Any refusal is sent to the
/// peer as `Refused` with the reason and returned as the error; the previous
/// snapshot stays current.
pub async fn receive<S>(store: Arc<Store>, stream: S, token: Option<Vec<u8>>) -> Result<Received>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let store2 = store.clone();
    let res = run_blocking(stream, move |peer| {
        let r = receive_blocking(&store, peer, token.as_deref());
        if let Err(e) = &r {
            tracing::warn!(error = %e, "round refused");
            if !matches!(e, SyncError::Stream(_) | SyncError::Truncated(_)) {
                let _ = peer.send(Frame::Refused(e.to_string()));
            }
        }
        r
    })
    .await;
    // Signatures of the large files just written, for the next delta round
    // (after the answer: not part of this round's time).
    std::thread::spawn(move || store2.fill_signatures());
    let (r, c) = res?;
    Ok(Received {
        bytes_received: c.received.load(std::sync::atomic::Ordering::Relaxed),
        bytes_sent: c.sent.load(std::sync::atomic::Ordering::Relaxed),
        ..r
    })
}

fn receive_blocking(store: &Store, peer: &mut Peer, token: Option<&[u8]>) -> Result<Received> {
    let (name, tok, flags) = match peer.recv()? {
        Frame::Hello { name, token, flags } => (name, token, flags),
        f => {
            return Err(SyncError::Handshake(format!(
                "expected Hello, got {}",
                f.name()
            )))
        }
    };
    if !token_ok(token, &tok) {
        return Err(SyncError::BadToken);
    }
    let mut busy = Some(store.lock(&name)?);
    let unified = flags & 1 != 0;
    // Roll back a round a crash interrupted, before anything reads the tree.
    store.recover(&name, &store.tree_dir(&name)?)?;
    let mut current = store.load(&name)?;
    let (digest, seq) = current
        .as_ref()
        .map(|s| (s.index.digest, s.seq))
        .unwrap_or(([0; 32], 0));
    tracing::info!(%name, seq, "round started");
    peer.send(Frame::Welcome { digest, seq })?;
    let mut applier: Option<Applier<'_>> = None;
    let mut pool_applier_needed = unified;
    loop {
        match peer.recv()? {
            Frame::NeedManifest => {
                let entries = applier
                    .as_ref()
                    .and_then(|a| a.base())
                    .or(current.as_deref())
                    .map(|s| &s.index.entries[..])
                    .unwrap_or(&[]);
                for c in entries.chunks(MANIFEST_BATCH) {
                    peer.send(Frame::ManifestChunk(c.to_vec()))?;
                }
                peer.send(Frame::ManifestEnd {
                    count: entries.len() as u64,
                })?;
            }
            Frame::HaveManifest => {}
            Frame::SigRequest { path, block } => {
                let s = applier
                    .as_ref()
                    .and_then(|a| a.base())
                    .or(current.as_deref())
                    .ok_or_else(|| {
                        SyncError::Protocol("signature request without a snapshot".into())
                    })?;
                let e = s
                    .index
                    .get(&path)
                    .filter(|e| e.kind == Kind::File)
                    .ok_or_else(|| {
                        SyncError::Protocol(format!(
                            "signature of {:?}, not a file of the snapshot",
                            display(&path)
                        ))
                    })?;
                if block != crate::delta::block_size(e.size) {
                    return Err(SyncError::Protocol("signature block size mismatch".into()));
                }
                if let Some(sums) = store.cached_signature(&e.hash, block) {
                    peer.send(Frame::Signature {
                        block,
                        sums: sums.to_vec(),
                    })?;
                    continue;
                }
                let f = crate::fsops::open_read(
                    open_live(store, &name)?.dir(crate::entry::split_parent(&path).0)?,
                    crate::entry::split_parent(&path).1,
                    &path,
                )?;
                let sums =
                    crate::delta::signature(std::io::BufReader::with_capacity(1 << 20, f), block)
                        .map_err(|e| SyncError::Io {
                        op: "read",
                        path: crate::fsops::p(&path),
                        source: e,
                    })?;
                // The name is locked: the file holds the manifest's content.
                store.remember_signature(e.hash, block, Arc::new(sums.clone()));
                peer.send(Frame::Signature { block, sums })?;
            }
            Frame::HashQuery(h) => {
                if applier.is_none() {
                    applier = Some(Applier::begin(store, &name, current.take(), unified)?);
                    pool_applier_needed = false;
                }
                let have = applier.as_ref().map(|a| a.pool_has(&h)).unwrap_or_default();
                peer.send(Frame::HashHave(have))?;
            }
            Frame::Begin => {
                if applier.is_none() {
                    applier = Some(Applier::begin(store, &name, current.take(), unified)?);
                }
                let _ = pool_applier_needed;
                if let Some(a) = &applier {
                    a.set_unified(unified)?;
                }
                return stream_changes(
                    peer,
                    &mut busy,
                    applier
                        .take()
                        .ok_or_else(|| SyncError::Protocol("no applier".into()))?,
                    &name,
                );
            }
            Frame::End { digest: d, count } => {
                // Nothing changed: the sender's tree is the current snapshot.
                let held = applier
                    .as_ref()
                    .and_then(|a| a.base())
                    .or(current.as_deref())
                    .map(|s| s.index.entries.len() as u64);
                if held.is_none() || d != digest || Some(count) != held {
                    return Err(SyncError::Protocol(
                        "End without changes, but the digest differs from the current snapshot"
                            .into(),
                    ));
                }
                peer.send(Frame::Committed {
                    seq,
                    unified_bytes: 0,
                })?;
                return Ok(Received {
                    name,
                    seq,
                    new_version: false,
                    stats: ApplyStats::default(),
                    bytes_received: 0,
                    bytes_sent: 0,
                });
            }
            Frame::Abort(why) => return Err(SyncError::Aborted(format!("sender aborted: {why}"))),
            f => {
                return Err(SyncError::Protocol(format!(
                    "unexpected {} before Begin",
                    f.name()
                )))
            }
        }
    }
}

fn open_live(store: &Store, name: &str) -> Result<crate::fsops::DirCache> {
    let p = store.dir().join(".vsha").join(name).join("live");
    let fd = rustix::fs::open(
        &p,
        rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::CLOEXEC
            | rustix::fs::OFlags::NOFOLLOW,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| SyncError::Io {
        op: "open",
        path: p.clone(),
        source: e.into(),
    })?;
    Ok(crate::fsops::DirCache::new(fd))
}

fn stream_changes(
    peer: &mut Peer,
    busy: &mut Option<crate::store::BusyGuard<'_>>,
    mut a: Applier<'_>,
    name: &str,
) -> Result<Received> {
    let (digest, count) = match stream_changes_inner(peer, &mut a) {
        Ok(x) => x,
        Err(e) => {
            // An error the worker threads found earlier in the stream (a
            // corrupt file) explains the round better than a later one.
            a.sync_workers()?;
            return Err(e);
        }
    };
    let store = a.store;
    let (seq, stats) = a.finish(digest, count)?;
    tracing::info!(%name, seq, changed = stats.changed, deleted = stats.deleted, "round committed");
    let sent = peer.send(Frame::Committed {
        seq,
        unified_bytes: stats.unified_bytes,
    });
    // Compaction of the manifest (rare, O(tree)) and pruning of the undo
    // area of the round that fell out of the kept versions (O(its changes))
    // after the answer, with the name still locked.
    if sent.is_ok() {
        store.maybe_compact(name);
    }
    store.prune_locked(name);
    drop(busy.take());
    sent?;
    Ok(Received {
        name: name.to_string(),
        seq,
        new_version: true,
        stats,
        bytes_received: 0,
        bytes_sent: 0,
    })
}

/// Apply Put/Delete frames until End; returns End's digest and count.
fn stream_changes_inner(peer: &mut Peer, a: &mut Applier<'_>) -> Result<([u8; 32], u64)> {
    loop {
        match peer.recv()? {
            Frame::Put { entry, source } => {
                if source == Source::Data
                    && entry.kind == Kind::File
                    && entry.size <= CHUNK as u64
                    && entry.link.is_none()
                    && !entry.path.is_empty()
                {
                    // Small file: gather its frames; all Data → written by a worker.
                    let mut frames = Vec::new();
                    let mut total = 0u64;
                    let hash = loop {
                        match peer.recv()? {
                            Frame::FileEnd(h) => break h,
                            Frame::Abort(why) => {
                                return Err(SyncError::Aborted(format!("sender aborted: {why}")))
                            }
                            f @ (Frame::Data(_) | Frame::Hole(_)) => {
                                total += match &f {
                                    Frame::Data(d) => d.len() as u64,
                                    _ => 0,
                                };
                                if total > entry.size || frames.len() > 4096 {
                                    return Err(SyncError::Protocol(format!(
                                        "{:?}: more data than its declared size",
                                        entry.display_path()
                                    )));
                                }
                                frames.push(f);
                            }
                            f => {
                                return Err(SyncError::Protocol(format!(
                                    "unexpected {} inside a file",
                                    f.name()
                                )))
                            }
                        }
                    };
                    if frames.iter().all(|f| matches!(f, Frame::Data(_))) {
                        let data = if frames.len() == 1 {
                            match frames.pop() {
                                Some(Frame::Data(d)) => d,
                                _ => Vec::new(),
                            }
                        } else {
                            let mut data = Vec::with_capacity(total as usize);
                            for f in frames {
                                if let Frame::Data(d) = f {
                                    data.extend_from_slice(&d);
                                }
                            }
                            data
                        };
                        if data.len() as u64 != entry.size {
                            return Err(SyncError::Protocol(format!(
                                "{:?}: {} bytes received, {} declared",
                                entry.display_path(),
                                data.len(),
                                entry.size
                            )));
                        }
                        a.put_small(entry, data, hash)?;
                    } else if let Some(mut inc) = a.put(entry, source)? {
                        for f in frames {
                            match f {
                                Frame::Data(d) => a.data(&mut inc, &d)?,
                                Frame::Hole(n) => a.hole(&mut inc, n)?,
                                _ => {}
                            }
                        }
                        a.file_end(inc, hash)?;
                    }
                    continue;
                }
                if let Some(mut inc) = a.put(entry, source)? {
                    loop {
                        match peer.recv()? {
                            Frame::Data(d) => a.data(&mut inc, &d)?,
                            Frame::Hole(n) => a.hole(&mut inc, n)?,
                            Frame::Copy { start, count } => a.copy(&mut inc, start, count)?,
                            Frame::FileEnd(h) => {
                                a.file_end(inc, h)?;
                                break;
                            }
                            Frame::Abort(why) => {
                                return Err(SyncError::Aborted(format!("sender aborted: {why}")))
                            }
                            f => {
                                return Err(SyncError::Protocol(format!(
                                    "unexpected {} inside a file",
                                    f.name()
                                )))
                            }
                        }
                    }
                }
            }
            Frame::Delete(p) => a.delete(&p)?,
            Frame::End { digest, count } => return Ok((digest, count)),
            Frame::Abort(why) => return Err(SyncError::Aborted(format!("sender aborted: {why}"))),
            f => {
                return Err(SyncError::Protocol(format!(
                    "unexpected {} in the change stream",
                    f.name()
                )))
            }
        }
    }
}
