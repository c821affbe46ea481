//! The failover controller (issue 5, item 1): a pure state machine that
//! decides where each clustered vserver runs.
//!
//! # Architecture invariant
//!
//! No I/O, no tokio, no clock, no randomness. Time enters only as the
//! [`Now`] argument of [`Controller::step`]; everything else the controller
//! knows comes from the [`Event`]s it is fed and the replicated
//! [`ClusterState`] passed in with each step. Its output is a list of
//! [`Cmd`]s collected with [`Controller::take_commands`].
//!
//! # Inputs
//!
//! - the replicated [`ClusterState`] (nodes with role and admin state,
//!   vservers with failover group, placement + generation, replica status);
//! - leadership: [`Event::BecameLeader`] / [`Event::LostLeadership`];
//! - lease renewals as seen by the leader ([`Event::LeaseRenewed`], taken at
//!   `now.mono_ms`);
//! - health reports per vserver and node ([`Event::Report`]: running,
//!   stopped or failed with a reason, and the restart count at this
//!   generation);
//! - replica status per vserver and standby ([`Event::Replica`]; the
//!   replicated `Vserver::replicas` is read too, the newer of the two wins);
//! - operator orders: [`Event::ForceFailover`].
//!
//! # Outputs ([`Cmd`])
//!
//! `Propose` (a placement change: vserver → node with generation + 1 and the
//! generation it expects to replace, a compare-and-set), `Start`, `Stop`,
//! `Restart` (always with the current generation), `Fence` (the old holder,
//! before a failover proposal), `Sync` (stream or final delta from the
//! holder to a standby), `Alert`.
//!
//! # Rules
//!
//! - Only the leader decides: a follower's controller records observations
//!   and emits nothing at all.
//! - A new leader proposes nothing before one full lease has passed since it
//!   became leader ([`Controller::can_reassign`]); it also assumes every node
//!   renewed its lease the instant before it became leader.
//! - An unplaced vserver with a failover group goes to the first node of the
//!   group that can host ([`Controller::can_host`]: a member, not a witness,
//!   admin state active, lease alive).
//! - Failover: only once the holder's lease plus the drift margin has surely
//!   passed ([`Controller::lease_surely_expired`]); the target is the first
//!   node of the group, in group order, other than the holder, that can host
//!   and whose newest complete replica is younger than `max_rpo_ms`
//!   (0 = no limit, but some complete replica must exist). None: an alert,
//!   and nothing moves. An operator's [`Event::ForceFailover`] with
//!   `accept_data_loss` skips the replica check, never the lease check; it
//!   is refused outright while the holder's lease is alive (use a migration).
//! - Planned moves (drain, auto failback, health failover) stop the vserver
//!   on its holder first, wait for the holder to report it stopped at the
//!   current generation, then emit a final `Sync` and the `Propose`. A
//!   node in maintenance keeps what it runs but gets nothing new.
//! - Failback: `never` and `manual` do nothing; `auto` moves the vserver back
//!   to the first node of its group once that node has held a live lease
//!   continuously for `failback_stable_ms`.
//! - Health: a vserver reported failed is restarted in place while its
//!   restart count is below `max_restarts`, then moved (planned move).
//! - Generations: every proposal carries `generation = current + 1` and
//!   `expect_generation = current`; the state machine must refuse it if the
//!   placement changed meanwhile. Start/Stop/Restart carry the current
//!   generation; a node acts only on commands with its current generation.
//! - Once a move away from generation `g` is proposed, nothing is started
//!   at `g` again: if the proposal does not apply and the holder is alive,
//!   the vserver is re-placed on the holder at `g + 1` (`replace`), so the
//!   compare-and-set lets at most one of the two proposals win.
//! - A copy reported running on a node that is not the holder gets a `Stop`
//!   carrying the current generation.
//!
//! # How the agent drives it (a later step)
//!
//! The agent keeps one `Controller` per process. Its runtime feeds
//! `BecameLeader` (once the new leader has applied an entry of its own
//! term) and `LostLeadership` from the raft loop, `LeaseRenewed` from
//! the liveness heartbeats, reports from the node supervisors (with
//! [`Controller::step`], or [`Controller::observe`] to batch several
//! observations of one instant), calls `step(state, now, Event::Tick)` at
//! least every heartbeat interval with the applied state, and executes
//! `take_commands()` in order: a `Sync` of kind `Final` must complete
//! before the `Propose` that follows it; `Propose` becomes a raft proposal
//! (see [`PlacementChange`]); `Start`/`Stop`/`Restart` go to the named
//! node's agent; `Fence` and `Alert` become events. The controller keeps no
//! state worth persisting: a restarted agent starts with a fresh one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::model::{AdminState, Desired, NodeId, Role, Vserver};
use crate::state::ClusterState;

/// The controller's clocks. `mono_ms` is the leader's monotonic clock (leases
/// are measured on it); `unix_ms` is wall time, used only to age replicas,
/// whose source times are wall times recorded by the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Now {
    pub mono_ms: u64,
    pub unix_ms: u64,
}

impl Now {
    /// Both clocks at the same reading: handy in tests.
    pub fn at(ms: u64) -> Self {
        Now {
            mono_ms: ms,
            unix_ms: ms,
        }
    }
}

/// Timing and policy knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerConfig {
    /// How long a renewal keeps a node's lease alive.
    pub lease_ms: u64,
    /// Added to the lease before a node is surely fenced: covers clock drift
    /// between the leader's and the node's monotonic clocks.
    pub drift_margin_ms: u64,
    /// In-place restarts before a failing vserver is moved.
    pub max_restarts: u32,
    /// A proposal not applied after this long is proposed again (safe: the
    /// compare-and-set on the generation lets at most one apply).
    pub proposal_retry_ms: u64,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            lease_ms: 1500,
            drift_margin_ms: 500,
            max_restarts: 3,
            proposal_retry_ms: 1500,
        }
    }
}

/// What a node reports about one vserver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    Running,
    Stopped,
    Failed { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VserverReport {
    pub vserver: String,
    pub node: NodeId,
    /// The generation the node runs (or last ran) the vserver at.
    pub generation: u64,
    pub state: Observed,
    /// In-place restarts already done at this generation.
    pub restarts: u32,
}

/// An input to [`Controller::step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Nothing new: re-evaluate with the current time and state.
    Tick,
    /// This node just became the raft leader. Feed it only once the leader
    /// has applied an entry of its own term (raft's empty entry), so no
    /// proposal of an earlier leader can still apply afterwards.
    BecameLeader,
    /// This node is no longer the leader.
    LostLeadership,
    /// The leader received a lease renewal from `node` (at `now.mono_ms`).
    LeaseRenewed {
        node: NodeId,
    },
    Report(VserverReport),
    /// The newest complete snapshot of `vserver` on `node` holds the
    /// primary's tree as of `source_unix_ms`.
    Replica {
        vserver: String,
        node: NodeId,
        source_unix_ms: u64,
    },
    /// `vsha migrate VSERVER --to NODE`: a planned move off a live holder.
    Migrate {
        vserver: String,
        to: NodeId,
    },
    /// `vsha failover VSERVER --to NODE [--accept-data-loss]`.
    ForceFailover {
        vserver: String,
        to: NodeId,
        accept_data_loss: bool,
    },
}

/// Why a placement changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MoveReason {
    /// First placement of an unplaced vserver.
    Place,
    /// The holder's lease expired.
    Failover,
    /// An operator's forced failover.
    Forced,
    /// The holder is draining.
    Drain,
    /// Auto failback to the preferred node.
    Failback,
    /// Restarts in place exhausted.
    Health,
    /// An operator's planned migration.
    Migrate,
    /// The holder again, at a new generation: a move was proposed but has
    /// not applied and the holder is back, so the old generation stays
    /// fenced and the proposal still in flight can never apply.
    Replace,
}

impl MoveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::Place => "place",
            MoveReason::Failover => "failover",
            MoveReason::Forced => "forced",
            MoveReason::Drain => "drain",
            MoveReason::Failback => "failback",
            MoveReason::Health => "health",
            MoveReason::Migrate => "migrate",
            MoveReason::Replace => "replace",
        }
    }

    /// A planned move stops the vserver on a live holder first.
    pub fn is_planned(self) -> bool {
        matches!(
            self,
            MoveReason::Drain | MoveReason::Failback | MoveReason::Health | MoveReason::Migrate
        )
    }
}

/// A placement change to propose through raft. Meant to become
/// `command::Command::SetPlacement`, applied only if the vserver's current
/// generation equals `expect_generation` (0 = unplaced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementChange {
    pub vserver: String,
    pub from: Option<NodeId>,
    pub to: NodeId,
    pub generation: u64,
    pub expect_generation: u64,
    pub reason: MoveReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AlertKind {
    /// No node can take the vserver (failover, drain, first placement…).
    NoEligibleNode,
    /// An operator's forced failover was refused.
    TakeoverRefused,
    /// The holder is gone and the vserver has no failover group.
    NoFailoverGroup,
    /// A planned move was abandoned; the vserver restarts where it was.
    MoveAborted,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::NoEligibleNode => "no eligible node",
            AlertKind::TakeoverRefused => "takeover refused",
            AlertKind::NoFailoverGroup => "no failover group",
            AlertKind::MoveAborted => "move aborted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub vserver: String,
    pub kind: AlertKind,
    pub message: String,
}

/// Whether a sync is the continuous stream or the final delta of a move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    Stream,
    Final,
}

/// What the controller asks the runtime to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    Propose(PlacementChange),
    Start {
        vserver: String,
        node: NodeId,
        generation: u64,
    },
    Stop {
        vserver: String,
        node: NodeId,
        generation: u64,
    },
    Restart {
        vserver: String,
        node: NodeId,
        generation: u64,
    },
    /// `node` is considered fenced for `vserver` at `generation`: its lease
    /// has surely run out, so it stopped the vserver itself. The runtime
    /// records it (event) and may add outside fencing (power, switch port).
    Fence {
        vserver: String,
        node: NodeId,
        generation: u64,
    },
    Sync {
        vserver: String,
        from: NodeId,
        to: NodeId,
        generation: u64,
        kind: SyncKind,
    },
    Alert(Alert),
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cmd::Propose(p) => {
                write!(f, "propose {} -> {} gen {}", p.vserver, p.to, p.generation)?;
                match p.from {
                    Some(n) => write!(f, " (from {n}, {})", p.reason.as_str()),
                    None => write!(f, " ({})", p.reason.as_str()),
                }
            }
            Cmd::Start {
                vserver,
                node,
                generation,
            } => write!(f, "start {vserver} on {node} gen {generation}"),
            Cmd::Stop {
                vserver,
                node,
                generation,
            } => write!(f, "stop {vserver} on {node} gen {generation}"),
            Cmd::Restart {
                vserver,
                node,
                generation,
            } => write!(f, "restart {vserver} on {node} gen {generation}"),
            Cmd::Fence {
                vserver,
                node,
                generation,
            } => write!(f, "fence {node} for {vserver} gen {generation}"),
            Cmd::Sync {
                vserver,
                from,
                to,
                generation,
                kind,
            } => {
                let k = match kind {
                    SyncKind::Stream => "stream",
                    SyncKind::Final => "final",
                };
                write!(f, "sync {vserver} {from} -> {to} gen {generation} {k}")
            }
            Cmd::Alert(a) => write!(f, "alert {}: {}: {}", a.vserver, a.kind.as_str(), a.message),
        }
    }
}

/// The latest report per (vserver, node), with the step it arrived at.
#[derive(Debug, Clone)]
struct SeenReport {
    report: VserverReport,
    seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the holder to report the vserver stopped after `seq`.
    Stopping { seq: u64 },
    /// Proposed at `at_ms`; waiting for the state to show it.
    Proposed { at_ms: u64 },
}

/// A move under way for one vserver, valid while the placement stays at
/// `expect_generation`.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    expect_generation: u64,
    from: Option<NodeId>,
    to: NodeId,
    reason: MoveReason,
    phase: Phase,
}

#[derive(Debug, Clone, Copy)]
struct Forced {
    to: NodeId,
    accept_data_loss: bool,
    /// The generation the order was given at; it lapses when that changes.
    generation: u64,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    last_ms: u64,
    /// Start of the current run of uninterrupted renewals.
    alive_since_ms: u64,
}

/// The failover controller. See the module documentation.
#[derive(Debug, Clone)]
pub struct Controller {
    cfg: ControllerConfig,
    /// `Some(since)` while this node is the leader.
    leader_since: Option<u64>,
    leases: BTreeMap<NodeId, Lease>,
    reports: BTreeMap<(String, NodeId), SeenReport>,
    replicas: BTreeMap<(String, NodeId), u64>,
    in_flight: BTreeMap<String, InFlight>,
    forced: BTreeMap<String, Forced>,
    /// vserver → (target, generation the order was given at).
    migrations: BTreeMap<String, (NodeId, u64)>,
    /// (vserver, generation) → the step a Start was last sent at.
    started: BTreeMap<(String, u64), u64>,
    /// (vserver, generation) whose sync streams were requested.
    synced: BTreeSet<(String, u64)>,
    /// (vserver, generation, restart count) → the step a Restart was sent
    /// at: one Restart per failure, unless the vserver ran again since.
    restarted: BTreeMap<(String, u64, u32), u64>,
    /// (vserver, generation) → the step the holder last reported it running.
    running_seen: BTreeMap<(String, u64), u64>,
    /// (vserver, node, generation) already told to stop as a stray copy.
    stray_stopped: BTreeSet<(String, NodeId, u64)>,
    /// (vserver, generation) a move away from was proposed: until the
    /// placement changes, nothing is started at that generation again.
    fenced: BTreeSet<(String, u64)>,
    /// (vserver, kind, generation): alerts raised once per generation.
    alerted: BTreeSet<(String, AlertKind, u64)>,
    seq: u64,
    commands: Vec<Cmd>,
}

impl Controller {
    pub fn new(cfg: ControllerConfig) -> Self {
        Controller {
            cfg,
            leader_since: None,
            leases: BTreeMap::new(),
            reports: BTreeMap::new(),
            replicas: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            forced: BTreeMap::new(),
            migrations: BTreeMap::new(),
            started: BTreeMap::new(),
            synced: BTreeSet::new(),
            restarted: BTreeMap::new(),
            running_seen: BTreeMap::new(),
            stray_stopped: BTreeSet::new(),
            fenced: BTreeSet::new(),
            alerted: BTreeSet::new(),
            seq: 0,
            commands: Vec::new(),
        }
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.cfg
    }

    pub fn is_leader(&self) -> bool {
        self.leader_since.is_some()
    }

    /// The commands emitted since the last call, in the order to run them.
    pub fn take_commands(&mut self) -> Vec<Cmd> {
        std::mem::take(&mut self.commands)
    }

    /// Feeds one event, then re-evaluates every vserver (leader only).
    pub fn step(&mut self, state: &ClusterState, now: Now, event: Event) {
        self.observe(state, now, event);
        if self.is_leader() {
            for (name, vs) in &state.vservers {
                self.reconcile(state, now, name, vs);
            }
        }
    }

    /// Records one event without re-evaluating: to feed several
    /// observations of one instant (say every renewal of a heartbeat round)
    /// before one decision, `observe` each then `step(.., Event::Tick)`.
    /// Only a forced failover refused on the spot emits something here.
    pub fn observe(&mut self, state: &ClusterState, now: Now, event: Event) {
        self.seq += 1;
        match event {
            Event::Tick => {}
            Event::BecameLeader => self.become_leader(now),
            Event::LostLeadership => {
                self.leader_since = None;
                self.forget_leadership();
            }
            Event::LeaseRenewed { node } => self.renew(node, now),
            Event::Report(r) => {
                let key = (r.vserver.clone(), r.node);
                self.reports.insert(
                    key,
                    SeenReport {
                        report: r,
                        seq: self.seq,
                    },
                );
            }
            Event::Replica {
                vserver,
                node,
                source_unix_ms,
            } => {
                let e = self.replicas.entry((vserver, node)).or_insert(0);
                *e = (*e).max(source_unix_ms);
            }
            Event::ForceFailover {
                vserver,
                to,
                accept_data_loss,
            } => self.force(state, now, vserver, to, accept_data_loss),
            Event::Migrate { vserver, to } => {
                if let Some(p) = state
                    .vservers
                    .get(&vserver)
                    .and_then(|v| v.placement.as_ref())
                {
                    self.migrations.insert(vserver, (to, p.generation));
                }
            }
        }
    }

    fn become_leader(&mut self, now: Now) {
        self.forget_leadership();
        self.leader_since = Some(now.mono_ms);
    }

    /// Everything a leader learned for itself, dropped on a leadership change:
    /// a new leader trusts no lease it did not see renewed.
    fn forget_leadership(&mut self) {
        self.leases.clear();
        self.in_flight.clear();
        self.forced.clear();
        self.migrations.clear();
        self.started.clear();
        self.synced.clear();
        self.restarted.clear();
        self.running_seen.clear();
        self.stray_stopped.clear();
        self.fenced.clear();
        self.alerted.clear();
    }

    fn renew(&mut self, node: NodeId, now: Now) {
        if !self.is_leader() {
            return;
        }
        let alive = self.lease_alive(node, now);
        let l = self.leases.entry(node).or_insert(Lease {
            last_ms: now.mono_ms,
            alive_since_ms: now.mono_ms,
        });
        if !alive {
            l.alive_since_ms = now.mono_ms;
        }
        l.last_ms = l.last_ms.max(now.mono_ms);
    }

    // ---- named predicates ----

    /// A new leader waits one full lease before it moves anything.
    pub fn can_reassign(&self, now: Now) -> bool {
        self.leader_since
            .is_some_and(|since| now.mono_ms >= since.saturating_add(self.cfg.lease_ms))
    }

    /// The leader saw a renewal from `node` less than one lease ago.
    pub fn lease_alive(&self, node: NodeId, now: Now) -> bool {
        self.leases
            .get(&node)
            .is_some_and(|l| now.mono_ms < l.last_ms.saturating_add(self.cfg.lease_ms))
    }

    /// `node`'s lease plus the drift margin has certainly run out, so it has
    /// stopped its vservers itself. Without an observed renewal the node is
    /// assumed to have renewed just before this node became leader.
    pub fn lease_surely_expired(&self, node: NodeId, now: Now) -> bool {
        let Some(since) = self.leader_since else {
            return false;
        };
        let last = self
            .leases
            .get(&node)
            .map_or(since, |l| l.last_ms.max(since));
        now.mono_ms
            >= last
                .saturating_add(self.cfg.lease_ms)
                .saturating_add(self.cfg.drift_margin_ms)
    }

    /// `node` may be given a vserver now: a member, not a witness, active,
    /// with a live lease. `Err` says why not.
    pub fn can_host(&self, state: &ClusterState, node: NodeId, now: Now) -> Result<(), String> {
        let Some(rec) = state.nodes.get(&node) else {
            return Err(format!("node {node} is not a member"));
        };
        if rec.role == Role::Witness {
            return Err(format!("node {node} is a witness"));
        }
        if rec.admin != AdminState::Active {
            return Err(format!("node {node} is {}", rec.admin.as_str()));
        }
        if !self.lease_alive(node, now) {
            return Err(format!("node {node} has no live lease"));
        }
        Ok(())
    }

    /// When this leader last heard a renewal from `node` (its monotonic ms).
    pub fn last_renewal_ms(&self, node: NodeId) -> Option<u64> {
        self.leases.get(&node).map(|l| l.last_ms)
    }

    /// Since when this node leads (monotonic ms).
    pub fn leader_since_ms(&self) -> Option<u64> {
        self.leader_since
    }

    /// The newest complete replica of `vs` on `node`, as a source wall time.
    pub fn replica_source(&self, name: &str, vs: &Vserver, node: NodeId) -> Option<u64> {
        let observed = self.replicas.get(&(name.to_string(), node)).copied();
        let recorded = vs.replicas.get(&node).map(|r| r.snapshot_source_unix_ms);
        observed.max(recorded)
    }

    /// `node` holds a complete replica of `vs` younger than its `max_rpo_ms`
    /// (0 = any complete replica).
    pub fn replica_fresh(
        &self,
        name: &str,
        vs: &Vserver,
        node: NodeId,
        now: Now,
    ) -> Result<(), String> {
        let Some(src) = self.replica_source(name, vs, node) else {
            return Err(format!("node {node} has no complete replica"));
        };
        let age = now.unix_ms.saturating_sub(src);
        let max = vs.spec.max_rpo_ms;
        if max != 0 && age >= max {
            return Err(format!(
                "node {node} replica older than max_rpo ({age} ms >= {max} ms)"
            ));
        }
        Ok(())
    }

    /// `node` may take `vs` over from a dead holder.
    pub fn can_failover_to(
        &self,
        state: &ClusterState,
        name: &str,
        vs: &Vserver,
        node: NodeId,
        now: Now,
        accept_data_loss: bool,
    ) -> Result<(), String> {
        self.can_host(state, node, now)?;
        if !accept_data_loss {
            self.replica_fresh(name, vs, node, now)?;
        }
        Ok(())
    }

    // ---- decisions ----

    fn force(&mut self, state: &ClusterState, now: Now, name: String, to: NodeId, loss: bool) {
        if !self.is_leader() {
            return;
        }
        let Some(vs) = state.vservers.get(&name) else {
            return;
        };
        let generation = vs.placement.as_ref().map_or(0, |p| p.generation);
        if let Some(p) = &vs.placement {
            if p.node == to {
                self.alert_now(
                    &name,
                    AlertKind::TakeoverRefused,
                    format!("node {to} already holds it"),
                );
                return;
            }
            if self.lease_alive(p.node, now) {
                self.alert_now(
                    &name,
                    AlertKind::TakeoverRefused,
                    format!(
                        "node {} holds a live lease; a forced failover never skips the lease, migrate instead",
                        p.node
                    ),
                );
                return;
            }
        }
        self.forced.insert(
            name,
            Forced {
                to,
                accept_data_loss: loss,
                generation,
            },
        );
    }

    /// Raises an alert once per (vserver, kind, generation).
    fn alert_once(&mut self, name: &str, kind: AlertKind, generation: u64, message: String) {
        if self.alerted.insert((name.to_string(), kind, generation)) {
            self.alert_now(name, kind, message);
        }
    }

    fn alert_now(&mut self, name: &str, kind: AlertKind, message: String) {
        self.commands.push(Cmd::Alert(Alert {
            vserver: name.to_string(),
            kind,
            message,
        }));
    }

    fn propose(
        &mut self,
        name: &str,
        from: Option<NodeId>,
        to: NodeId,
        expect: u64,
        reason: MoveReason,
        now: Now,
    ) {
        let Some(generation) = expect.checked_add(1) else {
            // Generations must strictly grow; at u64::MAX nothing can.
            self.alert_once(
                name,
                AlertKind::NoEligibleNode,
                expect,
                "the generation counter is exhausted".to_string(),
            );
            return;
        };
        if from.is_some() {
            self.fenced.insert((name.to_string(), expect));
        }
        self.commands.push(Cmd::Propose(PlacementChange {
            vserver: name.to_string(),
            from,
            to,
            generation,
            expect_generation: expect,
            reason,
        }));
        self.in_flight.insert(
            name.to_string(),
            InFlight {
                expect_generation: expect,
                from,
                to,
                reason,
                phase: Phase::Proposed { at_ms: now.mono_ms },
            },
        );
    }

    /// A proposal for `name` is in flight and not yet due for a retry.
    fn proposal_pending(&self, name: &str, now: Now) -> bool {
        self.in_flight.get(name).is_some_and(|f| match f.phase {
            Phase::Proposed { at_ms } => {
                now.mono_ms < at_ms.saturating_add(self.cfg.proposal_retry_ms)
            }
            Phase::Stopping { .. } => false,
        })
    }

    fn latest_report(&self, name: &str, node: NodeId, generation: u64) -> Option<&SeenReport> {
        self.reports
            .get(&(name.to_string(), node))
            .filter(|r| r.report.generation == generation)
    }

    fn reconcile(&mut self, state: &ClusterState, now: Now, name: &str, vs: &Vserver) {
        let generation = vs.placement.as_ref().map_or(0, |p| p.generation);
        // Moves and orders made for an older generation are done or stale.
        if self
            .in_flight
            .get(name)
            .is_some_and(|f| f.expect_generation != generation)
        {
            self.in_flight.remove(name);
        }
        if self
            .forced
            .get(name)
            .is_some_and(|f| f.generation != generation)
        {
            self.forced.remove(name);
        }
        if self
            .migrations
            .get(name)
            .is_some_and(|&(_, g)| g != generation)
        {
            self.migrations.remove(name);
        }
        self.stop_strays(name, vs, generation);

        let Some(p) = vs.placement.clone() else {
            self.place(state, now, name, vs);
            return;
        };
        let holder = p.node;
        // The holder runs the live tree; a replica it reported before is
        // stale from now on (it must never qualify it as a standby later).
        self.replicas.remove(&(name.to_string(), holder));
        if p.desired == Desired::Stopped {
            // Never moved nor started; a copy the holder still reports
            // running is stopped (strays elsewhere are handled above).
            let running = self
                .latest_report(name, holder, generation)
                .is_some_and(|r| r.report.state == Observed::Running);
            if running
                && self
                    .stray_stopped
                    .insert((name.to_string(), holder, generation))
            {
                self.commands.push(Cmd::Stop {
                    vserver: name.to_string(),
                    node: holder,
                    generation,
                });
            }
            return;
        }
        if self.lease_surely_expired(holder, now) {
            self.failover(state, now, name, vs, holder, generation);
            return;
        }
        if !self.lease_alive(holder, now) {
            // Lapsed but maybe still running: wait for the margin.
            return;
        }
        if self.planned(state, now, name, vs, holder, generation) {
            return;
        }
        self.keep_running(state, now, name, vs, holder, generation);
    }

    /// Tells every node that reports a copy it should not run to stop it.
    fn stop_strays(&mut self, name: &str, vs: &Vserver, generation: u64) {
        let holder = vs.placement.as_ref().map(|p| p.node);
        let strays: Vec<NodeId> = self
            .reports
            .iter()
            .filter(|((v, n), r)| {
                v == name
                    && Some(*n) != holder
                    && matches!(r.report.state, Observed::Running | Observed::Failed { .. })
            })
            .map(|((_, n), _)| *n)
            .collect();
        for node in strays {
            if self
                .stray_stopped
                .insert((name.to_string(), node, generation))
            {
                self.commands.push(Cmd::Stop {
                    vserver: name.to_string(),
                    node,
                    generation,
                });
            }
        }
    }

    fn place(&mut self, state: &ClusterState, now: Now, name: &str, vs: &Vserver) {
        if !self.can_reassign(now) || self.proposal_pending(name, now) {
            return;
        }
        if vs.desired() == Desired::Stopped {
            return;
        }
        if let Some(f) = self.forced.get(name).copied() {
            self.forced.remove(name);
            match self.can_host(state, f.to, now) {
                Ok(()) => self.propose(name, None, f.to, 0, MoveReason::Forced, now),
                Err(why) => self.alert_now(name, AlertKind::TakeoverRefused, why),
            }
            return;
        }
        let Some(group) = &vs.group else {
            return;
        };
        let mut why = Vec::new();
        for &n in &group.nodes {
            match self.can_host(state, n, now) {
                Ok(()) => {
                    self.propose(name, None, n, 0, MoveReason::Place, now);
                    return;
                }
                Err(e) => why.push(e),
            }
        }
        self.alert_once(
            name,
            AlertKind::NoEligibleNode,
            0,
            format!("cannot place: {}", why.join("; ")),
        );
    }

    fn failover(
        &mut self,
        state: &ClusterState,
        now: Now,
        name: &str,
        vs: &Vserver,
        holder: NodeId,
        generation: u64,
    ) {
        if !self.can_reassign(now) || self.proposal_pending(name, now) {
            return;
        }
        // A planned move in its stopping phase becomes a failover.
        if self
            .in_flight
            .get(name)
            .is_some_and(|f| matches!(f.phase, Phase::Stopping { .. }))
        {
            self.in_flight.remove(name);
        }
        if let Some(f) = self.forced.get(name).copied() {
            self.forced.remove(name);
            match self.can_failover_to(state, name, vs, f.to, now, f.accept_data_loss) {
                Ok(()) => {
                    self.fence_and_propose(name, holder, f.to, generation, MoveReason::Forced, now)
                }
                Err(why) => self.alert_now(name, AlertKind::TakeoverRefused, why),
            }
            return;
        }
        let Some(group) = &vs.group else {
            self.alert_once(
                name,
                AlertKind::NoFailoverGroup,
                generation,
                format!("node {holder} is lost and the vserver has no failover group"),
            );
            return;
        };
        let mut why = Vec::new();
        for &n in group.nodes.iter().filter(|&&n| n != holder) {
            match self.can_failover_to(state, name, vs, n, now, false) {
                Ok(()) => {
                    self.fence_and_propose(name, holder, n, generation, MoveReason::Failover, now);
                    return;
                }
                Err(e) => why.push(e),
            }
        }
        if why.is_empty() {
            why.push("the group has no other node".to_string());
        }
        self.alert_once(
            name,
            AlertKind::NoEligibleNode,
            generation,
            format!(
                "node {holder} is lost; no eligible standby: {}",
                why.join("; ")
            ),
        );
    }

    fn fence_and_propose(
        &mut self,
        name: &str,
        holder: NodeId,
        to: NodeId,
        generation: u64,
        reason: MoveReason,
        now: Now,
    ) {
        self.commands.push(Cmd::Fence {
            vserver: name.to_string(),
            node: holder,
            generation,
        });
        self.propose(name, Some(holder), to, generation, reason, now);
    }

    /// The first node of the group, other than `holder`, that can host.
    fn planned_target(
        &self,
        state: &ClusterState,
        vs: &Vserver,
        holder: NodeId,
        now: Now,
    ) -> Result<NodeId, String> {
        let mut why = Vec::new();
        let Some(group) = &vs.group else {
            return Err("the vserver has no failover group".to_string());
        };
        for &n in group.nodes.iter().filter(|&&n| n != holder) {
            match self.can_host(state, n, now) {
                Ok(()) => return Ok(n),
                Err(e) => why.push(e),
            }
        }
        if why.is_empty() {
            why.push("the group has no other node".to_string());
        }
        Err(why.join("; "))
    }

    /// Why `vs` should move off its live holder, and where to.
    fn wants_planned_move(
        &self,
        state: &ClusterState,
        now: Now,
        name: &str,
        vs: &Vserver,
        holder: NodeId,
        generation: u64,
    ) -> Option<(MoveReason, Result<NodeId, String>)> {
        let failed_out = self
            .latest_report(name, holder, generation)
            .is_some_and(|r| {
                matches!(r.report.state, Observed::Failed { .. })
                    && r.report.restarts >= self.cfg.max_restarts
            });
        if failed_out {
            return Some((
                MoveReason::Health,
                self.planned_target(state, vs, holder, now),
            ));
        }
        if let Some(&(to, g)) = self.migrations.get(name) {
            if g == generation && to != holder {
                let target = self.can_host(state, to, now).map(|()| to);
                return Some((MoveReason::Migrate, target));
            }
        }
        if state.admin(holder) == Some(AdminState::Draining) {
            return Some((
                MoveReason::Drain,
                self.planned_target(state, vs, holder, now),
            ));
        }
        let group = vs.group.as_ref()?;
        if group.failback == crate::model::Failback::Auto {
            let preferred = *group.nodes.first()?;
            if preferred != holder
                && self.can_host(state, preferred, now).is_ok()
                && self.leases.get(&preferred).is_some_and(|l| {
                    now.mono_ms >= l.alive_since_ms.saturating_add(group.failback_stable_ms)
                })
            {
                return Some((MoveReason::Failback, Ok(preferred)));
            }
        }
        None
    }

    /// Drives planned moves. True while one is under way (the caller then
    /// neither starts nor restarts the vserver).
    fn planned(
        &mut self,
        state: &ClusterState,
        now: Now,
        name: &str,
        vs: &Vserver,
        holder: NodeId,
        generation: u64,
    ) -> bool {
        if let Some(f) = self.in_flight.get(name).copied() {
            match f.phase {
                Phase::Proposed { .. } if self.proposal_pending(name, now) => return true,
                Phase::Proposed { .. } => {
                    // Retry: the vserver is stopped on the holder for a
                    // planned move, or the proposal was a failover whose
                    // holder came back (then fall through and re-decide).
                    if f.reason.is_planned() {
                        self.finish_planned(state, now, name, vs, holder, generation, f);
                        return true;
                    }
                    self.in_flight.remove(name);
                }
                Phase::Stopping { seq } => {
                    let stopped = self
                        .latest_report(name, holder, generation)
                        .is_some_and(|r| r.seq > seq && r.report.state == Observed::Stopped);
                    if stopped {
                        self.finish_planned(state, now, name, vs, holder, generation, f);
                    }
                    return true;
                }
            }
        }
        if !self.can_reassign(now) {
            return false;
        }
        let Some((reason, target)) =
            self.wants_planned_move(state, now, name, vs, holder, generation)
        else {
            return false;
        };
        match target {
            Ok(to) => {
                self.commands.push(Cmd::Stop {
                    vserver: name.to_string(),
                    node: holder,
                    generation,
                });
                self.in_flight.insert(
                    name.to_string(),
                    InFlight {
                        expect_generation: generation,
                        from: Some(holder),
                        to,
                        reason,
                        phase: Phase::Stopping { seq: self.seq },
                    },
                );
                true
            }
            Err(why) => {
                self.alert_once(
                    name,
                    AlertKind::NoEligibleNode,
                    generation,
                    format!("cannot move off node {holder} ({}): {why}", reason.as_str()),
                );
                false
            }
        }
    }

    /// The holder stopped the vserver: final delta, then the proposal; or,
    /// with nowhere to go any more, start it again where it was.
    #[allow(clippy::too_many_arguments)]
    fn finish_planned(
        &mut self,
        state: &ClusterState,
        now: Now,
        name: &str,
        vs: &Vserver,
        holder: NodeId,
        generation: u64,
        f: InFlight,
    ) {
        let to = if self.can_host(state, f.to, now).is_ok() && f.to != holder {
            Ok(f.to)
        } else {
            self.planned_target(state, vs, holder, now)
        };
        match to {
            Ok(to) => {
                self.commands.push(Cmd::Sync {
                    vserver: name.to_string(),
                    from: holder,
                    to,
                    generation,
                    kind: SyncKind::Final,
                });
                self.propose(name, f.from, to, generation, f.reason, now);
            }
            Err(why) => {
                self.in_flight.remove(name);
                self.alert_now(
                    name,
                    AlertKind::MoveAborted,
                    format!(
                        "{} move off node {holder} abandoned: {why}",
                        f.reason.as_str()
                    ),
                );
                // Restart it where it was, unless a proposal for this move
                // is out (then the next step re-places it, see keep_running).
                if !self.fenced.contains(&(name.to_string(), generation)) {
                    self.commands.push(Cmd::Start {
                        vserver: name.to_string(),
                        node: holder,
                        generation,
                    });
                }
            }
        }
    }

    /// The holder is alive and nothing moves: make sure it runs, restart it
    /// in place after a failure, and keep the standbys streaming.
    fn keep_running(
        &mut self,
        state: &ClusterState,
        now: Now,
        name: &str,
        vs: &Vserver,
        holder: NodeId,
        generation: u64,
    ) {
        if self.fenced.contains(&(name.to_string(), generation)) {
            // A move proposed at this generation may still apply: never run
            // it again here at this generation; re-place it on its holder at
            // a new one, which the compare-and-set makes exclusive.
            if self.can_reassign(now) && !self.proposal_pending(name, now) {
                self.propose(
                    name,
                    Some(holder),
                    holder,
                    generation,
                    MoveReason::Replace,
                    now,
                );
            }
            return;
        }
        let seen = self.latest_report(name, holder, generation);
        let report_seq = seen.map(|r| r.seq);
        let report = seen.map(|r| r.report.clone());
        match report.as_ref().map(|r| (&r.state, r.restarts)) {
            Some((Observed::Failed { .. }, n)) if n < self.cfg.max_restarts => {
                // Again at the same count only if it ran since the last
                // Restart: a restart the node could not finish (its lease
                // lapsed meanwhile) is not counted, and the vserver may
                // have come back by a plain Start and failed again.
                let key = (name.to_string(), generation, n);
                let ran_since = |sent: u64| {
                    self.running_seen
                        .get(&(name.to_string(), generation))
                        .is_some_and(|&r| r > sent)
                };
                let due = self.restarted.get(&key).is_none_or(|&sent| ran_since(sent));
                if due {
                    self.restarted.insert(key, self.seq);
                    self.commands.push(Cmd::Restart {
                        vserver: name.to_string(),
                        node: holder,
                        generation,
                    });
                }
            }
            Some((Observed::Running, _)) => {
                if let Some(seq) = report_seq {
                    self.running_seen
                        .insert((name.to_string(), generation), seq);
                }
            }
            Some((Observed::Failed { .. }, _)) => {}
            Some((Observed::Stopped, _)) | None => {
                // Start once; again only if the holder reports it stopped
                // after the last Start (an agent restart, a self-fence).
                let key = (name.to_string(), generation);
                let due = match (self.started.get(&key), report_seq) {
                    (None, _) => true,
                    (Some(&sent), Some(seen)) => seen > sent,
                    (Some(_), None) => false,
                };
                if due {
                    self.started.insert(key, self.seq);
                    self.commands.push(Cmd::Start {
                        vserver: name.to_string(),
                        node: holder,
                        generation,
                    });
                }
            }
        }
        if self.synced.insert((name.to_string(), generation)) {
            if let Some(group) = &vs.group {
                for &n in &group.nodes {
                    let runs_things = state.nodes.get(&n).is_some_and(|r| r.role != Role::Witness);
                    if n != holder && runs_things {
                        self.commands.push(Cmd::Sync {
                            vserver: name.to_string(),
                            from: holder,
                            to: n,
                            generation,
                            kind: SyncKind::Stream,
                        });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
