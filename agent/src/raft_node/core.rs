//! `RaftCore`: the one place that drives raft-rs. It owns the `RawNode`, the
//! disk storage and the applied state machine, and runs the Ready checklist
//! in the documented order. It does no network I/O and reads no clock: the
//! caller ticks it, feeds it messages and ships what it returns. The same
//! core runs in `vshad` (on a dedicated thread) and in the deterministic
//! simulation tests.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::prelude::{
    ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, MessageType,
    Snapshot,
};
use raft::{RawNode, ReadOnlyOption, SnapshotStatus, StateRole};
use serde::{Deserialize, Serialize};

use super::storage::DiskStorage;
use super::{logger, RaftError};
use crate::command::{Command, Envelope, ProposalId};
use crate::model::{AdminState, NodeId, NodeRecord, Role};
use crate::state::{ClusterState, StateError};

#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub id: NodeId,
    /// Ticks without a leader's word before a follower campaigns.
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    /// Applied entries between two state-machine snapshots.
    pub snapshot_interval: u64,
    /// Learners that want a vote are promoted only while fewer voters exist.
    pub max_voters: usize,
}

impl CoreConfig {
    pub fn new(id: NodeId) -> Self {
        CoreConfig {
            id,
            election_tick: 10,
            heartbeat_tick: 2,
            snapshot_interval: 1000,
            max_voters: 5,
        }
    }
}

/// A raft message ready to go on the wire, already encoded.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub to: NodeId,
    pub bytes: Vec<u8>,
    /// Snapshot messages travel over their own chunked call.
    pub snapshot: bool,
}

/// One applied log entry that carried a command.
#[derive(Debug, Clone)]
pub struct Applied {
    pub index: u64,
    pub id: Option<ProposalId>,
    pub result: Result<(), StateError>,
}

/// What one pass over Ready produced.
#[derive(Debug, Default)]
pub struct Progress {
    pub messages: Vec<Outgoing>,
    pub applied: Vec<Applied>,
    /// ReadIndex answers: (request context, index to wait for).
    pub reads: Vec<(Vec<u8>, u64)>,
}

/// Why a proposal was not put into the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ProposeRefused {
    #[error("this node is not the leader")]
    NotLeader,
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    State(#[from] StateError),
}

/// The state machine as written into a raft snapshot.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    v: u32,
    state: ClusterState,
}

pub struct RaftCore {
    cfg: CoreConfig,
    node: RawNode<DiskStorage>,
    storage: DiskStorage,
    state: Arc<RwLock<ClusterState>>,
    applied: u64,
    /// Term of the last applied entry: a leader whose own term equals it
    /// has applied its first entry, so no earlier leader's proposal can
    /// still apply.
    applied_term: u64,
    snapshot_index: u64,
    /// The term in which this node last proposed Bootstrap, so it does so once.
    bootstrap_term: u64,
    /// Opened with no raft state and no bootstrap list: it must be joined.
    fresh: bool,
}

impl RaftCore {
    /// Opens the node's storage under `dir`. `initial` lists the members of
    /// a cluster being bootstrapped; it is used only when the storage is new
    /// (a restarted node resumes from disk and ignores it).
    pub fn open(
        cfg: CoreConfig,
        dir: &Path,
        initial: Option<&[NodeRecord]>,
    ) -> Result<Self, RaftError> {
        if cfg.id == 0 {
            return Err(RaftError::Config("node id must not be 0".into()));
        }
        let storage = DiskStorage::open(dir)?;
        let fresh = !storage.is_initialized() && initial.is_none();
        if !storage.is_initialized() {
            if let Some(members) = initial {
                let voters: Vec<u64> = members.iter().map(|m| m.id).collect();
                let peers = serde_json::to_vec(members).unwrap_or_default();
                let state = encode_snapshot(&ClusterState::default())?;
                storage.bootstrap(&voters, peers, state)?;
            }
        }
        let snap = storage.snapshot_data();
        let snapshot_index = snap.get_metadata().index;
        let state = if snapshot_index > 0 {
            decode_snapshot(snap.data.as_ref())?
        } else {
            ClusterState::default()
        };
        let raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_tick,
            heartbeat_tick: cfg.heartbeat_tick,
            // The state machine is restored from the snapshot; every entry
            // after it is applied again, deterministically.
            applied: snapshot_index,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            read_only_option: ReadOnlyOption::Safe,
            max_uncommitted_size: 64 * 1024 * 1024,
            ..Default::default()
        };
        raft_cfg
            .validate()
            .map_err(|e| RaftError::Config(e.to_string()))?;
        let node = RawNode::new(&raft_cfg, storage.clone(), &logger::logger())
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        Ok(RaftCore {
            cfg,
            node,
            storage,
            state: Arc::new(RwLock::new(state)),
            applied: snapshot_index,
            applied_term: 0,
            snapshot_index,
            bootstrap_term: 0,
            fresh,
        })
    }

    /// True when the node has no raft state yet and waits to be joined.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    /// The applied state, shared with readers on other threads.
    pub fn state_handle(&self) -> Arc<RwLock<ClusterState>> {
        self.state.clone()
    }

    pub fn read_state<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner());
        f(&s)
    }

    pub fn leader_id(&self) -> NodeId {
        self.node.raft.leader_id
    }

    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    pub fn commit_index(&self) -> u64 {
        self.node.raft.raft_log.committed
    }

    pub fn applied_term(&self) -> u64 {
        self.applied_term
    }

    pub fn applied_index(&self) -> u64 {
        self.applied
    }

    pub fn snapshot_index(&self) -> u64 {
        self.snapshot_index
    }

    /// (voters, learners) of the applied configuration.
    pub fn membership(&self) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
        let cs = self.storage.conf_state();
        (
            cs.voters.iter().copied().collect(),
            cs.learners.iter().copied().collect(),
        )
    }

    /// Peer addresses given at bootstrap (before the state machine has them).
    pub fn bootstrap_peers(&self) -> Vec<NodeRecord> {
        self.storage
            .bootstrap_peers()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn tick(&mut self) {
        self.node.tick();
    }

    /// Steps an encoded raft message from a peer. A message that does not
    /// decode is refused; raft-level rejections (stale terms, unknown
    /// peers) are normal and only logged.
    pub fn step(&mut self, bytes: &[u8]) -> Result<(), RaftError> {
        let msg = Message::parse_from_bytes(bytes)
            .map_err(|e| RaftError::Malformed(format!("raft message: {e}")))?;
        if let Err(e) = self.node.step(msg) {
            tracing::debug!(error = %e, "raft message not stepped");
        }
        Ok(())
    }

    pub fn report_unreachable(&mut self, id: NodeId) {
        self.node.report_unreachable(id);
    }

    pub fn report_snapshot(&mut self, id: NodeId, ok: bool) {
        let status = if ok {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        self.node.report_snapshot(id, status);
    }

    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.node.read_index(ctx);
    }

    /// Puts a command into the log if this node leads and the command would
    /// be accepted by the current state. Membership commands become raft
    /// conf changes.
    pub fn propose(&mut self, id: Option<ProposalId>, cmd: Command) -> Result<(), ProposeRefused> {
        if !self.is_leader() {
            return Err(ProposeRefused::NotLeader);
        }
        self.read_state(|s| s.check(&cmd))?;
        let change = match &cmd {
            Command::AddNode(rec) => Some((ConfChangeType::AddLearnerNode, rec.id)),
            Command::PromoteNode { id } => Some((ConfChangeType::AddNode, *id)),
            Command::RemoveNode { id } => Some((ConfChangeType::RemoveNode, *id)),
            _ => None,
        };
        let env = Envelope::new(id, cmd);
        match change {
            None => self
                .node
                .propose(vec![], env.encode())
                .map_err(|e| ProposeRefused::Busy(format!("proposal dropped: {e}"))),
            Some((kind, node_id)) => {
                self.check_membership_change(kind, node_id)?;
                let mut single = ConfChangeSingle::default();
                single.set_change_type(kind);
                single.node_id = node_id;
                let mut cc = ConfChangeV2::default();
                cc.set_changes(vec![single].into());
                self.node
                    .propose_conf_change(env.encode(), cc)
                    .map_err(|e| ProposeRefused::Busy(format!("membership change dropped: {e}")))
            }
        }
    }

    fn check_membership_change(
        &mut self,
        kind: ConfChangeType,
        node_id: NodeId,
    ) -> Result<(), ProposeRefused> {
        if self.node.raft.has_pending_conf() {
            return Err(ProposeRefused::Busy(
                "another membership change is still being applied; retry in a moment".into(),
            ));
        }
        let (voters, learners) = self.membership();
        match kind {
            ConfChangeType::RemoveNode => {
                if voters.contains(&node_id) && voters.len() == 1 {
                    return Err(StateError::precondition(
                        "id",
                        format!("node {node_id} is the last voter"),
                    )
                    .into());
                }
                if node_id == self.cfg.id {
                    // Leadership moves first; the caller's retry then reaches
                    // the new leader, which removes this node safely.
                    if let Some(to) = voters.iter().copied().find(|v| *v != node_id) {
                        self.node.transfer_leader(to);
                    }
                    return Err(ProposeRefused::Busy(format!(
                        "node {node_id} is the leader; leadership is being handed over, retry in a moment"
                    )));
                }
            }
            ConfChangeType::AddNode => {
                if voters.contains(&node_id) {
                    return Err(StateError::precondition(
                        "id",
                        format!("node {node_id} is already a voter"),
                    )
                    .into());
                }
                if !learners.contains(&node_id) {
                    return Err(StateError::precondition(
                        "id",
                        format!("node {node_id} is not a learner"),
                    )
                    .into());
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Leader housekeeping, called once per tick: bootstrap the state machine
    /// of a new cluster, promote learners that want a vote and caught up.
    pub fn leader_duties(&mut self) {
        if !self.is_leader() || !self.node.raft.commit_to_current_term() {
            return;
        }
        let term = self.term();
        let needs_bootstrap = self.read_state(|s| s.cluster_id.is_empty());
        if needs_bootstrap && self.bootstrap_term != term {
            self.bootstrap_term = term;
            let mut members = self.bootstrap_peers();
            if members.is_empty() {
                let (voters, _) = self.membership();
                members = voters
                    .into_iter()
                    .map(|id| NodeRecord {
                        id,
                        addr: String::new(),
                        role: Role::Voter,
                        iface: String::new(),
                        admin: AdminState::Active,
                    })
                    .collect();
            }
            let cluster_id = format!("{:016x}", rand::random::<u64>());
            if let Err(e) = self.propose(
                None,
                Command::Bootstrap {
                    cluster_id,
                    members,
                },
            ) {
                tracing::warn!(error = %e, "bootstrap proposal refused");
            }
            return;
        }
        if self.node.raft.has_pending_conf() {
            return;
        }
        let (voters, learners) = self.membership();
        if voters.len() >= self.cfg.max_voters {
            return;
        }
        let committed = self.commit_index();
        let candidate = self.read_state(|s| {
            learners.iter().copied().find(|id| {
                s.nodes.get(id).is_some_and(|n| n.role.wants_vote())
                    && self
                        .node
                        .raft
                        .prs()
                        .get(*id)
                        .is_some_and(|p| p.matched >= committed)
            })
        });
        if let Some(id) = candidate {
            tracing::info!(node = id, "learner caught up; promoting to voter");
            if let Err(e) = self.propose(None, Command::PromoteNode { id }) {
                tracing::warn!(node = id, error = %e, "promotion refused");
            }
        }
    }

    /// Runs the Ready checklist once, if raft has anything ready.
    pub fn process_ready(&mut self) -> Result<Progress, RaftError> {
        let mut out = Progress::default();
        if !self.node.has_ready() {
            return Ok(out);
        }
        // 1. Take the batch of work raft-rs has for us.
        let mut rd = self.node.ready();
        // 2. Leader-only messages may leave before our own fsync (thesis 10.2.1).
        encode_into(&mut out.messages, rd.take_messages());
        // 3. A snapshot from the leader replaces the state machine and the log.
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot())?;
        }
        // 4. New entries and HardState in one atomic fsynced batch.
        self.storage.append(rd.entries(), rd.hs())?;
        // 5. Votes and append responses only after step 4 is durable.
        encode_into(&mut out.messages, rd.take_persisted_messages());
        // 6. Apply what is committed (raft-rs hands out only persisted entries).
        let committed = rd.take_committed_entries();
        self.apply_entries(committed, &mut out.applied)?;
        // 7. ReadIndex answers; the caller serves each once applied >= index.
        for rs in rd.take_read_states() {
            out.reads.push((rs.request_ctx, rs.index));
        }
        // 8. Advance; persist the new commit index before applying past it.
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.storage.set_commit(commit)?;
        }
        encode_into(&mut out.messages, light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_entries(committed, &mut out.applied)?;
        self.node.advance_apply();
        // 9. Compact the log behind a fresh snapshot now and then.
        self.maybe_snapshot()?;
        Ok(out)
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), RaftError> {
        let state = decode_snapshot(snap.data.as_ref())?;
        self.storage.apply_snapshot(snap)?;
        let index = snap.get_metadata().index;
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = state;
        self.applied = index;
        self.applied_term = snap.get_metadata().term;
        self.snapshot_index = index;
        tracing::info!(index, "installed snapshot from the leader");
        Ok(())
    }

    fn apply_entries(
        &mut self,
        entries: Vec<Entry>,
        out: &mut Vec<Applied>,
    ) -> Result<(), RaftError> {
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    // A new leader's empty entry carries no command.
                    if !entry.data.is_empty() {
                        out.push(self.apply_command(entry.index, entry.data.as_ref()));
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    out.push(self.apply_conf_change(&entry)?);
                }
                EntryType::EntryConfChange => {
                    tracing::warn!(index = entry.index, "ignoring a v1 conf change entry");
                }
            }
            self.applied = entry.index;
            self.applied_term = entry.term;
        }
        Ok(())
    }

    fn apply_command(&mut self, index: u64, data: &[u8]) -> Applied {
        match Envelope::decode(data) {
            Ok(env) => {
                let result = if env.cmd.is_membership() {
                    Err(StateError::invalid(
                        "command",
                        "membership change outside a conf change entry",
                    ))
                } else {
                    self.state
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .apply(&env.cmd)
                };
                Applied {
                    index,
                    id: env.id,
                    result,
                }
            }
            Err(e) => {
                // Every node refuses it the same way: the state stays equal.
                tracing::error!(index, error = %e, "skipping unreadable log entry");
                Applied {
                    index,
                    id: None,
                    result: Err(StateError::invalid("command", e.to_string())),
                }
            }
        }
    }

    fn apply_conf_change(&mut self, entry: &Entry) -> Result<Applied, RaftError> {
        let cc = ConfChangeV2::parse_from_bytes(entry.data.as_ref())
            .map_err(|e| RaftError::Malformed(format!("conf change at {}: {e}", entry.index)))?;
        let env = match Envelope::decode(entry.context.as_ref()) {
            Ok(env) => env,
            Err(e) => {
                tracing::error!(index = entry.index, error = %e, "skipping conf change without a readable command");
                return Ok(Applied {
                    index: entry.index,
                    id: None,
                    result: Err(StateError::invalid("command", e.to_string())),
                });
            }
        };
        let result = self
            .state
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .apply(&env.cmd);
        if result.is_ok() {
            // The state accepted it, so raft's configuration follows; a refused
            // change is not applied to raft either (raft-rs allows skipping).
            let cs = self
                .node
                .apply_conf_change(&cc)
                .map_err(|e| RaftError::Raft(format!("apply conf change: {e}")))?;
            self.storage.set_conf_state(&cs)?;
            tracing::info!(index = entry.index, voters = ?cs.voters, learners = ?cs.learners, "membership changed");
        }
        Ok(Applied {
            index: entry.index,
            id: env.id,
            result,
        })
    }

    fn maybe_snapshot(&mut self) -> Result<(), RaftError> {
        if self.storage.take_snapshot_wanted() {
            return self.make_snapshot();
        }
        if self.applied < self.snapshot_index + self.cfg.snapshot_interval {
            return Ok(());
        }
        self.make_snapshot()
    }

    /// Writes the applied state as a snapshot and compacts the log behind it.
    pub fn make_snapshot(&mut self) -> Result<(), RaftError> {
        let index = self.applied;
        if index == 0 || index == self.snapshot_index {
            return Ok(());
        }
        let term = raft::Storage::term(&self.storage, index)
            .map_err(|e| RaftError::Raft(format!("term of applied index {index}: {e}")))?;
        let payload = self.read_state(encode_snapshot)?;
        let mut snap = Snapshot::default();
        snap.set_data(payload.into());
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.storage.conf_state());
        self.storage.save_snapshot(&snap)?;
        self.snapshot_index = index;
        tracing::debug!(index, "state machine snapshot written; log compacted");
        Ok(())
    }
}

fn encode_snapshot(state: &ClusterState) -> Result<Vec<u8>, RaftError> {
    serde_json::to_vec(&SnapshotPayload {
        v: 1,
        state: state.clone(),
    })
    .map_err(|e| RaftError::Malformed(format!("encoding snapshot: {e}")))
}

fn decode_snapshot(data: &[u8]) -> Result<ClusterState, RaftError> {
    let p: SnapshotPayload = serde_json::from_slice(data)
        .map_err(|e| RaftError::Corrupt(format!("snapshot payload: {e}")))?;
    if p.v != 1 {
        return Err(RaftError::Corrupt(format!(
            "snapshot payload version {} is not understood",
            p.v
        )));
    }
    Ok(p.state)
}

fn encode_into(out: &mut Vec<Outgoing>, msgs: Vec<Message>) {
    for m in msgs {
        match m.write_to_bytes() {
            Ok(bytes) => out.push(Outgoing {
                to: m.to,
                snapshot: m.get_msg_type() == MessageType::MsgSnapshot,
                bytes,
            }),
            Err(e) => tracing::error!(error = %e, "could not encode a raft message"),
        }
    }
}
