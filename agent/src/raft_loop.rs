//! The dedicated thread that owns the `RaftCore`: it ticks it, feeds it what
//! arrives from peers and callers, ships its messages to the transport and
//! hands applied results and ReadIndex answers back to waiting callers.
//! raft-engine fsyncs on this thread, never on a tokio worker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::command::{Command, ProposalId};
use crate::model::NodeId;
use crate::raft_node::{Outgoing, ProposeRefused, RaftCore};
use crate::state::ClusterState;
use crate::submit::SubmitError;

/// What the raft thread publishes after every pass, for readers elsewhere.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub id: NodeId,
    pub leader_id: NodeId,
    pub is_leader: bool,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    /// Term of the last applied entry (see `RaftCore::applied_term`).
    pub applied_term: u64,
    pub snapshot_index: u64,
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
}

/// node id -> Peer address: from the state machine, the bootstrap list and
/// what peers say about themselves.
pub type AddressBook = Arc<RwLock<BTreeMap<NodeId, String>>>;

pub enum Input {
    Raft {
        bytes: Vec<u8>,
    },
    Propose {
        cmd: Box<Command>,
        reply: oneshot::Sender<Result<(), SubmitError>>,
    },
    /// Answered once this node has applied everything committed when the
    /// leader confirmed the read.
    ReadIndex {
        reply: oneshot::Sender<Result<(), SubmitError>>,
    },
    Unreachable(NodeId),
    SnapshotDone {
        to: NodeId,
        ok: bool,
    },
    Shutdown,
}

#[derive(Clone)]
pub struct RaftHandle {
    tx: Sender<Input>,
    view: Arc<RwLock<View>>,
    state: Arc<RwLock<ClusterState>>,
    pub addresses: AddressBook,
}

impl RaftHandle {
    pub fn view(&self) -> View {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn read_state<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.state.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn address_of(&self, id: NodeId) -> Option<String> {
        self.addresses
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .filter(|a| !a.is_empty())
            .cloned()
    }

    pub fn learn_address(&self, id: NodeId, addr: &str) {
        if id == 0 || addr.is_empty() {
            return;
        }
        let mut book = self.addresses.write().unwrap_or_else(|e| e.into_inner());
        book.entry(id).or_insert_with(|| addr.to_string());
    }

    pub fn step(&self, bytes: Vec<u8>) {
        let _ = self.tx.send(Input::Raft { bytes });
    }

    pub fn report_unreachable(&self, id: NodeId) {
        let _ = self.tx.send(Input::Unreachable(id));
    }

    pub fn report_snapshot(&self, to: NodeId, ok: bool) {
        let _ = self.tx.send(Input::SnapshotDone { to, ok });
    }

    /// Proposes on this node (which must lead) and waits until the command
    /// is applied, returning the state machine's verdict.
    pub async fn propose_local(&self, cmd: Command, wait: Duration) -> Result<(), SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Propose {
                cmd: Box::new(cmd),
                reply,
            })
            .map_err(|_| SubmitError::ShuttingDown)?;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(SubmitError::ShuttingDown),
            Err(_) => Err(SubmitError::Timeout(
                "the proposal was not committed in time: the leader may have lost its quorum (a majority of voters unreachable) or leadership changed; it may still be applied later, check `vsha status --stale` before retrying".into(),
            )),
        }
    }

    /// Linearizable read barrier (ReadIndex through the leader).
    pub async fn read_barrier(&self, wait: Duration) -> Result<(), SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::ReadIndex { reply })
            .map_err(|_| SubmitError::ShuttingDown)?;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(SubmitError::ShuttingDown),
            Err(_) => Err(SubmitError::NoQuorum {
                leader_id: self.view().leader_id,
                leader_addr: self.address_of(self.view().leader_id).unwrap_or_default(),
            }),
        }
    }

    pub fn shutdown(&self) {
        let _ = self.tx.send(Input::Shutdown);
    }
}

pub struct Spawned {
    pub handle: RaftHandle,
    /// Receives the raft thread's outgoing messages.
    pub outgoing: mpsc::UnboundedReceiver<Outgoing>,
    /// Resolves when the thread ends: Ok on shutdown, Err on a fatal error.
    pub done: oneshot::Receiver<Result<(), String>>,
}

/// Starts the raft thread around `core`.
pub fn spawn(core: RaftCore, tick: Duration) -> std::io::Result<Spawned> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (out_tx, outgoing) = mpsc::unbounded_channel();
    let (done_tx, done) = oneshot::channel();
    let view = Arc::new(RwLock::new(View::default()));
    let addresses: AddressBook = Arc::new(RwLock::new(BTreeMap::new()));
    for m in core.bootstrap_peers() {
        addresses
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(m.id, m.addr);
    }
    let handle = RaftHandle {
        tx,
        view: view.clone(),
        state: core.state_handle(),
        addresses: addresses.clone(),
    };
    let mut driver = Driver {
        core,
        rx,
        out: out_tx,
        view,
        addresses,
        tick,
        incarnation: rand::random(),
        next_seq: 0,
        pending: HashMap::new(),
        read_seq: 0,
        pending_reads: HashMap::new(),
        waiting_reads: Vec::new(),
        known_nodes_at: u64::MAX,
    };
    std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || {
            // A panic inside raft-rs must not leave a half-dead agent: it
            // becomes a fatal error that stops the process cleanly.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| driver.run()))
                .unwrap_or_else(|p| {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(format!("raft thread panicked: {msg}"))
                });
            if let Err(e) = &result {
                tracing::error!(error = %e, "raft thread stopped on a fatal error");
            }
            driver.fail_all();
            let _ = done_tx.send(result);
        })?;
    Ok(Spawned {
        handle,
        outgoing,
        done,
    })
}

type Reply = oneshot::Sender<Result<(), SubmitError>>;

struct Driver {
    core: RaftCore,
    rx: Receiver<Input>,
    out: mpsc::UnboundedSender<Outgoing>,
    view: Arc<RwLock<View>>,
    addresses: AddressBook,
    tick: Duration,
    incarnation: u64,
    next_seq: u64,
    pending: HashMap<u64, Reply>,
    read_seq: u64,
    pending_reads: HashMap<u64, Reply>,
    waiting_reads: Vec<(u64, Reply)>,
    /// The applied index at which the address book was last refreshed.
    known_nodes_at: u64,
}

impl Driver {
    fn run(&mut self) -> Result<(), String> {
        let mut next_tick = Instant::now() + self.tick;
        self.publish();
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(Input::Shutdown) => return Ok(()),
                Ok(input) => self.handle(input),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            // Take whatever else queued up, so one Ready covers it all.
            for _ in 0..1024 {
                match self.rx.try_recv() {
                    Ok(Input::Shutdown) => return Ok(()),
                    Ok(input) => self.handle(input),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                self.core.tick();
                self.core.leader_duties();
                next_tick += self.tick;
                if next_tick < now {
                    next_tick = now + self.tick;
                }
                self.pending.retain(|_, r| !r.is_closed());
                self.pending_reads.retain(|_, r| !r.is_closed());
            }
            self.drain().map_err(|e| e.to_string())?;
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Raft { bytes } => {
                if let Err(e) = self.core.step(&bytes) {
                    tracing::warn!(error = %e, "dropping a malformed raft message");
                }
            }
            Input::Propose { cmd, reply } => {
                self.next_seq += 1;
                let seq = self.next_seq;
                let id = ProposalId {
                    proposer: self.core.id(),
                    incarnation: self.incarnation,
                    seq,
                };
                match self.core.propose(Some(id), *cmd) {
                    Ok(()) => {
                        self.pending.insert(seq, reply);
                    }
                    Err(ProposeRefused::NotLeader) => {
                        let leader = self.core.leader_id();
                        let _ = reply.send(Err(SubmitError::NotLeader {
                            leader_id: leader,
                            leader_addr: self.address(leader),
                        }));
                    }
                    Err(ProposeRefused::Busy(m)) => {
                        let _ = reply.send(Err(SubmitError::Busy(m)));
                    }
                    Err(ProposeRefused::State(e)) => {
                        let _ = reply.send(Err(SubmitError::Refused(e)));
                    }
                }
            }
            Input::ReadIndex { reply } => {
                self.read_seq += 1;
                let ctx = self.read_seq;
                self.core.read_index(ctx.to_be_bytes().to_vec());
                self.pending_reads.insert(ctx, reply);
            }
            Input::Unreachable(id) => self.core.report_unreachable(id),
            Input::SnapshotDone { to, ok } => self.core.report_snapshot(to, ok),
            Input::Shutdown => {}
        }
    }

    fn drain(&mut self) -> Result<(), crate::raft_node::RaftError> {
        for _ in 0..16 {
            let progress = self.core.process_ready()?;
            let idle = progress.messages.is_empty()
                && progress.applied.is_empty()
                && progress.reads.is_empty();
            for m in progress.messages {
                let _ = self.out.send(m);
            }
            for a in progress.applied {
                let Some(id) = a.id else { continue };
                if id.proposer != self.core.id() || id.incarnation != self.incarnation {
                    continue;
                }
                if let Some(reply) = self.pending.remove(&id.seq) {
                    let _ = reply.send(a.result.map_err(SubmitError::Refused));
                }
            }
            for (ctx, index) in progress.reads {
                let Ok(ctx) = <[u8; 8]>::try_from(ctx.as_slice()) else {
                    continue;
                };
                if let Some(reply) = self.pending_reads.remove(&u64::from_be_bytes(ctx)) {
                    self.waiting_reads.push((index, reply));
                }
            }
            if idle {
                break;
            }
        }
        let applied = self.core.applied_index();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting_reads)
            .into_iter()
            .partition(|(i, _)| *i <= applied);
        self.waiting_reads = waiting;
        for (_, reply) in ready {
            let _ = reply.send(Ok(()));
        }
        self.publish();
        Ok(())
    }

    fn address(&self, id: NodeId) -> String {
        self.addresses
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
            .unwrap_or_default()
    }

    fn publish(&mut self) {
        let (voters, learners) = self.core.membership();
        let v = View {
            id: self.core.id(),
            leader_id: self.core.leader_id(),
            is_leader: self.core.is_leader(),
            term: self.core.term(),
            commit: self.core.commit_index(),
            applied: self.core.applied_index(),
            applied_term: self.core.applied_term(),
            snapshot_index: self.core.snapshot_index(),
            voters,
            learners,
        };
        let applied = v.applied;
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = v;
        if self.known_nodes_at != applied {
            self.known_nodes_at = applied;
            let nodes: Vec<(NodeId, String)> = self.core.read_state(|s| {
                s.nodes
                    .values()
                    .filter(|n| !n.addr.is_empty())
                    .map(|n| (n.id, n.addr.clone()))
                    .collect()
            });
            let mut book = self.addresses.write().unwrap_or_else(|e| e.into_inner());
            for (id, addr) in nodes {
                book.insert(id, addr);
            }
        }
    }

    /// Callers still waiting get a clear answer instead of a timeout.
    fn fail_all(&mut self) {
        for (_, r) in self.pending.drain() {
            let _ = r.send(Err(SubmitError::ShuttingDown));
        }
        for (_, r) in self.pending_reads.drain() {
            let _ = r.send(Err(SubmitError::ShuttingDown));
        }
        for (_, r) in self.waiting_reads.drain(..) {
            let _ = r.send(Err(SubmitError::ShuttingDown));
        }
    }
}
