//! One simulated node: the machine (clock, vserver copies, guard), its agent
//! (lease, applied state, orders, controller, raft role) and what the agent
//! reports.

use std::collections::BTreeMap;

use vsha_agent::command::Command;
use vsha_agent::controller::{Controller, ControllerConfig, Observed, VserverReport};
use vsha_agent::failover::lease::NodeLease;
use vsha_agent::failover::node_plan::{LocalState, LocalVserver, Order, OrderAction};
use vsha_agent::model::NodeId;
use vsha_agent::state::ClusterState;

use super::clock::Clock;

/// An order waiting in the leader's outbox.
pub type Queued = (u64, OrderAction, String, u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agent {
    Up,
    /// SIGSTOP: nothing runs, messages wait in the socket.
    Paused,
    Down,
}

/// What physically exists of one vserver on one node.
#[derive(Debug, Clone, Default)]
pub struct Copy {
    pub generation: u64,
    /// The context's processes exist.
    pub procs: bool,
    /// The vserver's IP is configured on this node.
    pub ip: bool,
    /// The health check fails (processes may still exist).
    pub failed: bool,
    pub restarts: u32,
    /// A stop under way: (global time its processes are gone, stop id).
    pub stopping: Option<(u64, u64)>,
}

pub struct Node {
    pub id: NodeId,
    pub witness: bool,
    pub machine_up: bool,
    /// Bumped on every boot: cancels the previous boot's timers.
    pub boot: u64,
    pub clock: Clock,
    pub agent: Agent,
    /// Bumped on every agent (re)start, pause and resume: cancels timers.
    pub agent_epoch: u64,
    /// Messages that arrived while the agent was paused.
    pub held: Vec<super::world::Msg>,
    pub lease: NodeLease,
    pub orders: Vec<Order>,
    /// Raft: applied prefix of the committed log and the state it gives.
    pub applied: usize,
    pub state: ClusterState,
    /// Raft: highest term known, and its leader as far as known.
    pub known_term: u64,
    pub known_leader: Option<NodeId>,
    /// Raft: this node believes it leads this term.
    pub leader_term: Option<u64>,
    pub quorum_lost_since: Option<u64>,
    /// The renewal in flight (one at a time, as the runtime): its send
    /// time on this node's clock and the global time its answer is given
    /// up at.
    pub renewing: Option<(u64, u64)>,
    pub ctl: Controller,
    /// `BecameLeader` was fed (and no `LostLeadership` since).
    pub ctl_leader: bool,
    /// The leader's orders per node, sent with the next granted renewal:
    /// (sequence number in this leader's term, action, vserver, generation).
    pub outbox: BTreeMap<NodeId, Vec<Queued>>,
    /// Leader side: the last order sequence number given in this term.
    pub order_seq: u64,
    /// Node side: the newest order received, as (leader term, sequence).
    pub order_ack: (u64, u64),
    /// Guard: kill everything when the node clock reaches this.
    pub guard_kill_at: Option<u64>,
    pub copies: BTreeMap<String, Copy>,
}

impl Node {
    pub fn new(
        id: NodeId,
        witness: bool,
        clock: Clock,
        state: ClusterState,
        applied: usize,
        lease: NodeLease,
        cfg: ControllerConfig,
    ) -> Self {
        Node {
            id,
            witness,
            machine_up: true,
            boot: 0,
            clock,
            agent: Agent::Up,
            agent_epoch: 0,
            held: Vec::new(),
            lease,
            orders: Vec::new(),
            applied,
            state,
            known_term: 0,
            known_leader: None,
            leader_term: None,
            quorum_lost_since: None,
            renewing: None,
            ctl: Controller::new(cfg),
            ctl_leader: false,
            outbox: BTreeMap::new(),
            order_seq: 0,
            order_ack: (0, 0),
            guard_kill_at: None,
            copies: BTreeMap::new(),
        }
    }

    /// A fresh agent process: everything it kept in memory is gone; the
    /// raft log (applied state, term) is on disk and survives.
    pub fn fresh_agent(&mut self, cfg: ControllerConfig) {
        self.agent = Agent::Up;
        self.agent_epoch += 1;
        self.held.clear();
        self.lease.drop_lease();
        self.orders.clear();
        self.order_ack = (0, 0);
        self.known_leader = None;
        self.leader_term = None;
        self.quorum_lost_since = None;
        self.renewing = None;
        self.ctl = Controller::new(cfg);
        self.ctl_leader = false;
        self.outbox.clear();
        self.guard_kill_at = None;
    }

    /// Applies the committed log up to `upto`; returns the placements
    /// (vserver, generation) applied.
    pub fn apply_log(&mut self, log: &[Command], upto: usize) -> Vec<(String, u64)> {
        let mut seen = Vec::new();
        let upto = upto.min(log.len());
        while self.applied < upto {
            let cmd = &log[self.applied];
            self.applied += 1;
            if self.state.apply(cmd).is_ok() {
                if let Command::SetPlacement {
                    vserver,
                    generation,
                    ..
                } = cmd
                {
                    seen.push((vserver.clone(), *generation));
                }
            }
        }
        seen
    }

    pub fn runs(&self, vserver: &str) -> bool {
        self.machine_up && self.copies.get(vserver).is_some_and(|c| c.procs)
    }

    pub fn holds_ip(&self, vserver: &str) -> bool {
        self.machine_up && self.copies.get(vserver).is_some_and(|c| c.ip)
    }

    /// What the agent's supervisor sees of its vservers.
    pub fn local(&self) -> BTreeMap<String, LocalVserver> {
        self.copies
            .iter()
            .map(|(name, c)| {
                let state = match (c.procs, c.failed) {
                    (false, _) => LocalState::Stopped,
                    (true, false) => LocalState::Running,
                    (true, true) => LocalState::Failed {
                        reason: "init exited".into(),
                    },
                };
                (
                    name.clone(),
                    LocalVserver {
                        generation: c.generation,
                        state,
                        restarts: c.restarts,
                    },
                )
            })
            .collect()
    }

    /// The reports a renewal carries: every local copy, and (runtime
    /// contract assumed here) a `Stopped` report at the placement's
    /// generation for a vserver placed here that does not run here, so a
    /// lost `Start` is sent again.
    pub fn reports(&self, placed_here: bool) -> Vec<VserverReport> {
        let mut out = Vec::new();
        for (name, vs) in &self.state.vservers {
            let placed = vs
                .placement
                .as_ref()
                .filter(|p| placed_here && p.node == self.id)
                .map(|p| p.generation);
            let copy = self.copies.get(name);
            let report = match (copy, placed) {
                (Some(c), _) if c.procs => Some((
                    c.generation,
                    if c.failed {
                        Observed::Failed {
                            reason: "init exited".into(),
                        }
                    } else {
                        Observed::Running
                    },
                    c.restarts,
                )),
                (c, Some(g)) => Some((
                    g.max(c.map_or(0, |c| c.generation)),
                    Observed::Stopped,
                    c.filter(|c| c.generation >= g).map_or(0, |c| c.restarts),
                )),
                (Some(c), None) => Some((c.generation, Observed::Stopped, c.restarts)),
                (None, None) => None,
            };
            if let Some((generation, state, restarts)) = report {
                out.push(VserverReport {
                    vserver: name.clone(),
                    node: self.id,
                    generation,
                    state,
                    restarts,
                });
            }
        }
        out
    }
}
