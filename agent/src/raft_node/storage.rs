//! raft-rs `Storage` on raft-engine: the log, HardState, ConfState and the
//! newest state-machine snapshot, all in one fsynced engine directory.

use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::{Config as EngineConfig, Engine, LogBatch, MessageExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use super::RaftError;

/// The one raft group this engine holds.
const RID: u64 = 1;
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
const KEY_SNAPSHOT: &[u8] = b"snapshot";
/// Peer addresses given at bootstrap, so a restart needs no flags.
const KEY_BOOTSTRAP_PEERS: &[u8] = b"bootstrap_peers";
/// Index and term of the snapshot every initial member starts from.
const BOOTSTRAP_INDEX: u64 = 1;

#[derive(Clone)]
pub struct EntryExt;
impl MessageExt for EntryExt {
    type Entry = Entry;
    fn index(e: &Entry) -> u64 {
        e.index
    }
}

#[derive(Default)]
struct Cached {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
}

/// Cheap to clone: raft-rs owns one copy, the driver another.
#[derive(Clone)]
pub struct DiskStorage {
    engine: Arc<Engine>,
    cached: Arc<RwLock<Cached>>,
    /// Set when raft asked for a snapshot the stored one cannot serve (too
    /// old, or taken before the recipient joined); the core makes a fresh one.
    snapshot_wanted: Arc<AtomicBool>,
}

fn engine_err(e: raft_engine::Error) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl DiskStorage {
    /// Opens (or creates) the engine under `dir` and loads what it holds.
    pub fn open(dir: &Path) -> Result<Self, RaftError> {
        std::fs::create_dir_all(dir).map_err(|e| RaftError::Storage {
            step: "create data dir",
            detail: format!("{}: {e}", dir.display()),
        })?;
        let cfg = EngineConfig {
            dir: dir.to_string_lossy().into_owned(),
            // A torn tail after a crash is normal; anything else is corruption
            // and must stop the agent rather than run with partial state.
            recovery_mode: raft_engine::RecoveryMode::TolerateTailCorruption,
            ..Default::default()
        };
        let engine = Engine::open(cfg).map_err(|e| RaftError::Storage {
            step: "open raft log",
            detail: format!("{}: {e}", dir.display()),
        })?;
        let load = |key: &[u8]| -> Result<Option<Vec<u8>>, RaftError> { Ok(engine.get(RID, key)) };
        let mut cached = Cached::default();
        if let Some(b) = load(KEY_HARD_STATE)? {
            cached.hard_state = decode(&b, "hard state")?;
        }
        if let Some(b) = load(KEY_CONF_STATE)? {
            cached.conf_state = decode(&b, "conf state")?;
        }
        if let Some(b) = load(KEY_SNAPSHOT)? {
            cached.snapshot = decode(&b, "snapshot")?;
        }
        let storage = DiskStorage {
            engine: Arc::new(engine),
            cached: Arc::new(RwLock::new(cached)),
            snapshot_wanted: Arc::new(AtomicBool::new(false)),
        };
        storage.check_consistency()?;
        Ok(storage)
    }

    /// Refuses a log whose pieces do not fit together, so the agent never
    /// starts from partial state.
    fn check_consistency(&self) -> Result<(), RaftError> {
        let c = self.read();
        let snap_index = c.snapshot.get_metadata().index;
        let first = self.engine.first_index(RID);
        let last = self.engine.last_index(RID);
        if let (Some(first), Some(last)) = (first, last) {
            if first > snap_index + 1 {
                return Err(RaftError::Corrupt(format!(
                    "log starts at index {first} but the snapshot ends at {snap_index}: entries are missing"
                )));
            }
            if c.hard_state.commit > last.max(snap_index) {
                return Err(RaftError::Corrupt(format!(
                    "commit index {} is past the last log entry {last}",
                    c.hard_state.commit
                )));
            }
            // Entries are checksummed but only checked when read: read them
            // all now (the log is bounded by the snapshot interval), so a
            // damaged log stops the agent here and not in the middle of work.
            let mut entries = Vec::new();
            self.engine
                .fetch_entries_to::<EntryExt>(RID, first, last + 1, None, &mut entries)
                .map_err(|e| RaftError::Corrupt(format!("log entries {first}..={last}: {e}")))?;
            if let Some((i, e)) = entries
                .iter()
                .enumerate()
                .find(|(i, e)| e.index != first + *i as u64)
            {
                return Err(RaftError::Corrupt(format!(
                    "log entry at position {i} has index {} instead of {}",
                    e.index,
                    first + i as u64
                )));
            }
        } else if c.hard_state.commit > snap_index {
            return Err(RaftError::Corrupt(format!(
                "commit index {} but the log is empty and the snapshot ends at {snap_index}",
                c.hard_state.commit
            )));
        }
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cached> {
        // A poisoned lock means a writer panicked mid-update; the cached
        // values are plain data that are always replaced whole.
        self.cached.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_cache(&self) -> std::sync::RwLockWriteGuard<'_, Cached> {
        self.cached.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_initialized(&self) -> bool {
        let c = self.read();
        !c.conf_state.voters.is_empty()
            || !c.conf_state.learners.is_empty()
            || c.hard_state.term > 0
            || c.snapshot.get_metadata().index > 0
    }

    pub fn hard_state(&self) -> HardState {
        self.read().hard_state.clone()
    }

    pub fn conf_state(&self) -> ConfState {
        self.read().conf_state.clone()
    }

    pub fn snapshot_data(&self) -> Snapshot {
        self.read().snapshot.clone()
    }

    /// A brand-new member of a bootstrapping cluster. Every initial member
    /// starts from the same state: a snapshot at index 1, term 1, holding the
    /// initial voters and `state` (as TiKV does). The log therefore never
    /// holds index 1, so a node that joins later always starts from a
    /// snapshot that carries the configuration, instead of replaying a log
    /// whose first membership is implicit.
    pub fn bootstrap(
        &self,
        voters: &[u64],
        peers_json: Vec<u8>,
        state: Vec<u8>,
    ) -> Result<(), RaftError> {
        let mut cs = ConfState::default();
        cs.set_voters(voters.to_vec());
        let mut snap = Snapshot::default();
        snap.set_data(state.into());
        snap.mut_metadata().index = BOOTSTRAP_INDEX;
        snap.mut_metadata().term = BOOTSTRAP_INDEX;
        snap.mut_metadata().set_conf_state(cs.clone());
        let mut hs = HardState::default();
        hs.set_term(BOOTSTRAP_INDEX);
        hs.set_commit(BOOTSTRAP_INDEX);
        let mut batch = LogBatch::default();
        put(&mut batch, KEY_CONF_STATE, &cs)?;
        put(&mut batch, KEY_SNAPSHOT, &snap)?;
        put(&mut batch, KEY_HARD_STATE, &hs)?;
        batch
            .put(RID, KEY_BOOTSTRAP_PEERS.to_vec(), peers_json)
            .map_err(|e| storage_err("write bootstrap", e))?;
        self.engine
            .write(&mut batch, true)
            .map_err(|e| storage_err("write bootstrap", e))?;
        let mut c = self.write_cache();
        c.conf_state = cs;
        c.snapshot = snap;
        c.hard_state = hs;
        Ok(())
    }

    /// Whether raft asked for a fresher snapshot since the last call.
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.swap(false, Ordering::AcqRel)
    }

    pub fn bootstrap_peers(&self) -> Option<Vec<u8>> {
        self.engine.get(RID, KEY_BOOTSTRAP_PEERS)
    }

    /// Appends entries and the HardState in one atomic, fsynced batch.
    pub fn append(&self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), RaftError> {
        if entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        let mut batch = LogBatch::default();
        if !entries.is_empty() {
            batch
                .add_entries::<EntryExt>(RID, entries)
                .map_err(|e| storage_err("append entries", e))?;
        }
        if let Some(hs) = hs {
            put(&mut batch, KEY_HARD_STATE, hs)?;
        }
        self.engine
            .write(&mut batch, true)
            .map_err(|e| storage_err("append entries", e))?;
        if let Some(hs) = hs {
            self.write_cache().hard_state = hs.clone();
        }
        Ok(())
    }

    pub fn set_commit(&self, commit: u64) -> Result<(), RaftError> {
        let mut hs = self.hard_state();
        hs.commit = commit;
        self.append(&[], Some(&hs))
    }

    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), RaftError> {
        let mut batch = LogBatch::default();
        put(&mut batch, KEY_CONF_STATE, cs)?;
        self.engine
            .write(&mut batch, true)
            .map_err(|e| storage_err("save conf state", e))?;
        self.write_cache().conf_state = cs.clone();
        Ok(())
    }

    /// Installs a snapshot received from the leader: the log is reset to
    /// start right after it.
    pub fn apply_snapshot(&self, snap: &Snapshot) -> Result<(), RaftError> {
        let meta = snap.get_metadata();
        let mut hs = self.hard_state();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        let peers = self.bootstrap_peers();
        let mut batch = LogBatch::default();
        // Clean drops the group's entries and its keys: put them back.
        batch.add_command(RID, raft_engine::Command::Clean);
        put(&mut batch, KEY_HARD_STATE, &hs)?;
        put(&mut batch, KEY_CONF_STATE, meta.get_conf_state())?;
        put(&mut batch, KEY_SNAPSHOT, snap)?;
        if let Some(p) = peers {
            batch
                .put(RID, KEY_BOOTSTRAP_PEERS.to_vec(), p)
                .map_err(|e| storage_err("install snapshot", e))?;
        }
        self.engine
            .write(&mut batch, true)
            .map_err(|e| storage_err("install snapshot", e))?;
        let mut c = self.write_cache();
        c.hard_state = hs;
        c.conf_state = meta.get_conf_state().clone();
        c.snapshot = snap.clone();
        Ok(())
    }

    /// Saves a snapshot of our own state machine and drops the log it covers.
    pub fn save_snapshot(&self, snap: &Snapshot) -> Result<(), RaftError> {
        let mut batch = LogBatch::default();
        put(&mut batch, KEY_SNAPSHOT, snap)?;
        self.engine
            .write(&mut batch, true)
            .map_err(|e| storage_err("save snapshot", e))?;
        self.write_cache().snapshot = snap.clone();
        let index = snap.get_metadata().index;
        self.engine.compact_to(RID, index + 1);
        if let Err(e) = self.engine.purge_expired_files() {
            tracing::warn!(error = %e, "purging old raft log files failed; will retry");
        }
        Ok(())
    }

    fn first(&self) -> u64 {
        let snap_index = self.read().snapshot.get_metadata().index;
        match self.engine.first_index(RID) {
            Some(i) => i.max(snap_index + 1),
            None => snap_index + 1,
        }
    }

    fn last(&self) -> u64 {
        let snap_index = self.read().snapshot.get_metadata().index;
        match self.engine.last_index(RID) {
            Some(i) => i.max(snap_index),
            None => snap_index,
        }
    }
}

fn storage_err(step: &'static str, e: raft_engine::Error) -> RaftError {
    RaftError::Storage {
        step,
        detail: e.to_string(),
    }
}

fn put<M: protobuf::Message>(batch: &mut LogBatch, key: &[u8], m: &M) -> Result<(), RaftError> {
    batch
        .put_message(RID, key.to_vec(), m)
        .map_err(|e| storage_err("encode raft state", e))
}

fn decode<M: protobuf::Message>(b: &[u8], what: &str) -> Result<M, RaftError> {
    M::parse_from_bytes(b)
        .map_err(|e| RaftError::Corrupt(format!("stored {what} is unreadable: {e}")))
}

impl raft::Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.read();
        Ok(RaftState::new(c.hard_state.clone(), c.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out = Vec::with_capacity((high - low) as usize);
        let max = max_size.into().map(|m| m as usize);
        self.engine
            .fetch_entries_to::<EntryExt>(RID, low, high, max, &mut out)
            .map_err(engine_err)?;
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let (snap_index, snap_term) = {
            let c = self.read();
            let m = c.snapshot.get_metadata();
            (m.index, m.term)
        };
        if idx == snap_index {
            return Ok(snap_term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self
            .engine
            .get_entry::<EntryExt>(RID, idx)
            .map_err(engine_err)?
        {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let snap = self.read().snapshot.clone();
        let cs = snap.get_metadata().get_conf_state();
        let knows_recipient = to == 0
            || cs.voters.contains(&to)
            || cs.learners.contains(&to)
            || cs.voters_outgoing.contains(&to)
            || cs.learners_next.contains(&to);
        if snap.get_metadata().index < request_index || !knows_recipient {
            self.snapshot_wanted.store(true, Ordering::Release);
            // The driver makes a fresh one on its next pass.
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        let mut e = Entry::default();
        e.set_index(index);
        e.set_term(term);
        e.set_data(vec![index as u8].into());
        e
    }

    #[test]
    fn append_persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = DiskStorage::open(dir.path()).unwrap();
            s.bootstrap(&[1, 2, 3], b"[]".to_vec(), b"{}".to_vec())
                .unwrap();
            let mut hs = HardState::default();
            hs.set_term(2);
            hs.set_vote(1);
            hs.set_commit(2);
            s.append(&[entry(2, 2), entry(3, 2)], Some(&hs)).unwrap();
        }
        let s = DiskStorage::open(dir.path()).unwrap();
        let st = s.initial_state().unwrap();
        assert_eq!(st.hard_state.term, 2);
        assert_eq!(st.hard_state.commit, 2);
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        // Index 1 is the bootstrap snapshot; the log starts after it.
        assert_eq!(s.first_index().unwrap(), 2);
        assert_eq!(s.last_index().unwrap(), 3);
        assert_eq!(s.term(1).unwrap(), 1);
        assert_eq!(s.term(3).unwrap(), 2);
        let got = s
            .entries(2, 4, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn conflicting_append_truncates_tail() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 1)], None)
            .unwrap();
        s.append(&[entry(2, 2)], None).unwrap();
        assert_eq!(s.last_index().unwrap(), 2);
        assert_eq!(s.term(2).unwrap(), 2);
    }

    #[test]
    fn snapshot_compacts_and_answers_term_of_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        s.append(&(1..=10).map(|i| entry(i, 1)).collect::<Vec<_>>(), None)
            .unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 7;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2];
        snap.set_data(b"state".to_vec().into());
        s.save_snapshot(&snap).unwrap();
        assert_eq!(s.first_index().unwrap(), 8);
        assert_eq!(s.term(7).unwrap(), 1);
        assert!(matches!(
            s.entries(5, 8, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        drop(s);
        let s = DiskStorage::open(dir.path()).unwrap();
        assert_eq!(s.first_index().unwrap(), 8);
        assert_eq!(s.last_index().unwrap(), 10);
        assert_eq!(s.snapshot(7, 2).unwrap().data.as_ref(), b"state");
        // A recipient the snapshot's configuration lacks gets a fresh one.
        assert!(s.snapshot(7, 3).is_err());
        assert!(s.take_snapshot_wanted());
    }

    #[test]
    fn installed_snapshot_resets_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        s.append(&[entry(1, 1), entry(2, 1)], None).unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 50;
        snap.mut_metadata().term = 3;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2];
        s.apply_snapshot(&snap).unwrap();
        assert_eq!(s.first_index().unwrap(), 51);
        assert_eq!(s.last_index().unwrap(), 50);
        assert_eq!(s.conf_state().voters, vec![1, 2]);
        s.append(&[entry(51, 3)], None).unwrap();
        drop(s);
        let s = DiskStorage::open(dir.path()).unwrap();
        assert_eq!(s.last_index().unwrap(), 51);
        assert_eq!(s.hard_state().commit, 50);
    }
}
