//! The leader's half of failover: grants leases, feeds the pure
//! [`Controller`] with what the heartbeats carry, and carries out its
//! commands — placements become raft proposals, start/stop/restart orders
//! wait in a per-node outbox and go out with every answer to that node's
//! renewals until it acknowledges them (a Stop supersedes queued Starts; a
//! fence or a newer placement voids them), fences and alerts become events. Every agent holds one; it acts only while its
//! node leads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vsha_proto::v1 as pb;

use crate::command::Command;
use crate::config::FailoverSettings;
use crate::controller::{
    Cmd, Controller, ControllerConfig, Event, MoveReason, Now, Observed, PlacementChange, SyncKind,
    VserverReport,
};
use crate::liveness::Liveness;
use crate::metrics::Metrics;
use crate::model::NodeId;
use crate::raft_loop::RaftHandle;
use crate::state::ClusterState;
use crate::submit::APPLY_WAIT;

use super::clock::{mono_ms, unix_ms};
use super::events::EventLog;
use super::held::{final_sync_timeout_ms, HeldMoves};

/// A move under way, for status phases and the event that closes it.
#[derive(Debug, Clone)]
struct MoveTrace {
    reason: MoveReason,
    from: Option<NodeId>,
    to: NodeId,
    generation: u64,
    /// When the holder was last heard from (failovers), monotonic ms.
    last_heard_ms: Option<u64>,
    proposed_ms: u64,
    applied_ms: Option<u64>,
}

fn is_start(o: &pb::Order) -> bool {
    o.action == "start" || o.action == "restart"
}

struct Inner {
    ctl: Controller,
    leading_term: Option<u64>,
    order_seq: u64,
    outbox: BTreeMap<NodeId, Vec<pb::Order>>,
    reports: BTreeMap<(String, NodeId), pb::VserverReport>,
    replicas: BTreeMap<(String, NodeId), pb::ReplicaReport>,
    held: HeldMoves,
    /// (vserver, standby) → the newest final-sync order a round answered.
    final_answers: BTreeMap<(String, NodeId), (u64, u64)>,
    moves: BTreeMap<String, MoveTrace>,
    alerts: BTreeMap<String, String>,
    /// vserver → when a Stop was ordered for it (planned-move downtime).
    stop_ordered_ms: BTreeMap<String, u64>,
    /// (vserver, node) → source time last written to the raft log.
    recorded: BTreeMap<(String, NodeId), u64>,
}

impl Inner {
    /// Queues an order for `node`; returns its (term, seq).
    fn queue(
        &mut self,
        node: NodeId,
        action: &str,
        vserver: String,
        generation: u64,
    ) -> (u64, u64) {
        self.order_seq += 1;
        let order = pb::Order {
            action: action.to_string(),
            vserver,
            generation,
            term: self.leading_term.unwrap_or(0),
            seq: self.order_seq,
        };
        let id = (order.term, order.seq);
        self.outbox.entry(node).or_default().push(order);
        id
    }
}

pub struct LeaderRuntime {
    raft: RaftHandle,
    liveness: Liveness,
    metrics: Arc<Metrics>,
    settings: FailoverSettings,
    inner: Mutex<Inner>,
    pub events: Arc<EventLog>,
}

/// A replica's source time is written to the raft log at most this often
/// (the leader also learns it live from every heartbeat).
const RECORD_EVERY_MS: u64 = 5_000;

impl LeaderRuntime {
    pub fn new(
        raft: RaftHandle,
        liveness: Liveness,
        settings: FailoverSettings,
        events: Arc<EventLog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let ctl = Controller::new(ControllerConfig {
            lease_ms: settings.lease_ms,
            drift_margin_ms: settings.drift_margin_ms,
            max_restarts: settings.max_restarts,
            proposal_retry_ms: settings.lease_ms.max(1000),
        });
        LeaderRuntime {
            raft,
            liveness,
            metrics,
            settings,
            inner: Mutex::new(Inner {
                ctl,
                leading_term: None,
                order_seq: 0,
                outbox: BTreeMap::new(),
                reports: BTreeMap::new(),
                replicas: BTreeMap::new(),
                held: HeldMoves::default(),
                final_answers: BTreeMap::new(),
                moves: BTreeMap::new(),
                alerts: BTreeMap::new(),
                stop_ordered_ms: BTreeMap::new(),
                recorded: BTreeMap::new(),
            }),
            events,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now() -> Now {
        Now {
            mono_ms: mono_ms(),
            unix_ms: unix_ms(),
        }
    }

    /// A node's lease renewal. Granted only by a leader that confirmed its
    /// leadership with a quorum after the request arrived, so a deposed
    /// leader can never extend a lease past its successor's wait.
    pub async fn on_heartbeat(&self, hb: pb::HeartbeatRequest) -> pb::HeartbeatResponse {
        let view = self.raft.view();
        let mut resp = pb::HeartbeatResponse {
            is_leader: view.is_leader,
            leader_id: view.leader_id,
            leader_addr: self.raft.address_of(view.leader_id).unwrap_or_default(),
            term: view.term,
            seq: hb.seq,
            lease_granted: false,
            lease_ms: self.settings.lease_ms,
            orders: vec![],
        };
        if !view.is_leader {
            return resp;
        }
        self.raft.learn_address(hb.node_id, &hb.addr);
        self.liveness
            .record(hb.node_id, hb.applied_index, &hb.ipv4root);
        let wait = Duration::from_millis(self.settings.lease_ms / 2);
        if self.raft.read_barrier(wait).await.is_err() {
            return resp;
        }
        let after = self.raft.view();
        if !after.is_leader || after.term != view.term {
            resp.is_leader = after.is_leader;
            resp.leader_id = after.leader_id;
            return resp;
        }
        let known = self.raft.read_state(|s| s.nodes.contains_key(&hb.node_id));
        if !known {
            // Not a member (removed): no lease, so it runs nothing.
            return resp;
        }
        resp.lease_granted = true;
        let now = Self::now();
        let node = hb.node_id;
        for ev in hb.events {
            self.events.record(ev);
        }
        let mut g = self.lock();
        let inner = &mut *g;
        self.raft.read_state(|s| {
            inner.ctl.observe(s, now, Event::LeaseRenewed { node });
            for r in &hb.reports {
                let state = match r.state.as_str() {
                    "running" => Observed::Running,
                    "failed" => Observed::Failed {
                        reason: r.reason.clone(),
                    },
                    _ => Observed::Stopped,
                };
                inner.ctl.observe(
                    s,
                    now,
                    Event::Report(VserverReport {
                        vserver: r.vserver.clone(),
                        node,
                        generation: r.generation,
                        state,
                        restarts: r.restarts,
                    }),
                );
                inner.reports.insert((r.vserver.clone(), node), r.clone());
            }
            for r in &hb.replicas {
                inner.ctl.observe(
                    s,
                    now,
                    Event::Replica {
                        vserver: r.vserver.clone(),
                        node: r.node,
                        source_unix_ms: r.source_unix_ms,
                    },
                );
                let e = inner
                    .replicas
                    .entry((r.vserver.clone(), r.node))
                    .or_insert_with(|| r.clone());
                if r.source_unix_ms >= e.source_unix_ms {
                    *e = r.clone();
                }
                let answered = (r.final_order_term, r.final_order_seq);
                if answered > (0, 0) {
                    let a = inner
                        .final_answers
                        .entry((r.vserver.clone(), r.node))
                        .or_default();
                    *a = (*a).max(answered);
                }
            }
        });
        // Orders stay queued until the node acknowledges them, and go out
        // again with every answer; those behind the applied placement are
        // dropped.
        let acked = (hb.acked_term, hb.acked_seq);
        let q = inner.outbox.entry(node).or_default();
        self.raft.read_state(|s| {
            q.retain(|o| {
                let current = s
                    .vservers
                    .get(&o.vserver)
                    .and_then(|v| v.placement.as_ref())
                    .map_or(0, |p| p.generation);
                (o.term, o.seq) > acked && o.generation >= current
            })
        });
        resp.orders = q.clone();
        resp
    }

    /// Operator orders that go through the controller.
    pub fn order(&self, ev: Event) {
        let now = Self::now();
        let mut g = self.lock();
        self.raft.read_state(|s| g.ctl.step(s, now, ev));
    }

    pub fn is_leading(&self) -> bool {
        self.lock().leading_term.is_some()
    }

    /// Runs until the task is dropped: leadership changes, controller ticks.
    pub async fn run(self: Arc<Self>, every: Duration) {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.tick();
        }
    }

    fn tick(self: &Arc<Self>) {
        let view = self.raft.view();
        let now = Self::now();
        let mut g = self.lock();
        let inner = &mut *g;
        // BecameLeader only once an entry of our term is applied: then no
        // proposal of an earlier leader can still change the placements.
        let ready = view.is_leader && view.applied_term == view.term;
        match (inner.leading_term, ready) {
            (None, true) => {
                inner.leading_term = Some(view.term);
                self.raft
                    .read_state(|s| inner.ctl.observe(s, now, Event::BecameLeader));
                inner.outbox.clear();
                inner.held.clear();
                inner.final_answers.clear();
                inner.moves.clear();
                self.events.record(EventLog::event(
                    "leader",
                    "",
                    view.id,
                    format!(
                        "node {} leads (term {}); no vserver moves for one lease ({} ms)",
                        view.id, view.term, self.settings.lease_ms
                    ),
                ));
            }
            (Some(t), _) if !view.is_leader || view.term != t => {
                inner.leading_term = None;
                self.raft
                    .read_state(|s| inner.ctl.observe(s, now, Event::LostLeadership));
                inner.outbox.clear();
                inner.held.clear();
                inner.final_answers.clear();
                inner.moves.clear();
            }
            _ => {}
        }
        if inner.leading_term.is_none() {
            return;
        }
        let cmds = self.raft.read_state(|s| {
            inner.ctl.step(s, now, Event::Tick);
            inner.ctl.take_commands()
        });
        for c in cmds {
            self.execute(inner, c, now);
        }
        self.release_held(inner, now);
        self.raft.read_state(|s| self.trace_moves(inner, s, now));
        self.record_replicas(inner);
    }

    fn execute(self: &Arc<Self>, inner: &mut Inner, c: Cmd, now: Now) {
        match c {
            Cmd::Propose(pc) => {
                if let Some(h) = inner.held.get(&pc.vserver) {
                    if h.change == pc {
                        return;
                    }
                }
                let last_heard_ms = pc.from.and_then(|n| inner.ctl.last_renewal_ms(n));
                inner.moves.insert(
                    pc.vserver.clone(),
                    MoveTrace {
                        reason: pc.reason,
                        from: pc.from,
                        to: pc.to,
                        generation: pc.generation,
                        last_heard_ms,
                        proposed_ms: now.mono_ms,
                        applied_ms: None,
                    },
                );
                if pc.reason.is_planned() {
                    if let Some(h) = inner.held.get_mut(&pc.vserver) {
                        h.change = pc;
                        return;
                    }
                }
                self.propose(pc);
            }
            Cmd::Start {
                vserver,
                node,
                generation,
            } => {
                inner.queue(node, "start", vserver, generation);
            }
            Cmd::Stop {
                vserver,
                node,
                generation,
            } => {
                inner.stop_ordered_ms.insert(vserver.clone(), now.mono_ms);
                // A Stop supersedes the Start/Restart still queued before it.
                if let Some(q) = inner.outbox.get_mut(&node) {
                    q.retain(|o| o.vserver != vserver || !is_start(o));
                }
                inner.queue(node, "stop", vserver, generation);
            }
            Cmd::Restart {
                vserver,
                node,
                generation,
            } => {
                inner.queue(node, "restart", vserver, generation);
            }
            Cmd::Fence {
                vserver,
                node,
                generation,
            } => {
                // Never deliver a start at a generation just fenced.
                for q in inner.outbox.values_mut() {
                    q.retain(|o| o.vserver != vserver || o.generation > generation || !is_start(o));
                }
                let heard = inner
                    .ctl
                    .last_renewal_ms(node)
                    .map(|t| format!("{} ms ago", now.mono_ms.saturating_sub(t)))
                    .unwrap_or_else(|| "not since this leader took over".into());
                self.events.record(EventLog::event(
                    "node_lost",
                    &vserver,
                    node,
                    format!(
                        "node {node} holds {vserver} at generation {generation}; its lease ran out (last renewal {heard}): it has fenced itself"
                    ),
                ));
            }
            Cmd::Sync {
                vserver,
                from,
                to,
                generation,
                kind: SyncKind::Final,
            } => {
                // The proposal that follows waits for the final delta.
                let order = inner.queue(
                    from,
                    &format!("final-sync:{to}"),
                    vserver.clone(),
                    generation,
                );
                inner
                    .held
                    .hold(vserver, from, to, generation, order, now.mono_ms);
            }
            Cmd::Sync {
                kind: SyncKind::Stream,
                ..
            } => {
                // Holders stream to every standby of the group on their own
                // (see replication); nothing to order.
            }
            Cmd::Alert(a) => {
                inner.alerts.insert(
                    a.vserver.clone(),
                    format!("{}: {}", a.kind.as_str(), a.message),
                );
                self.events.record(EventLog::event(
                    "alert",
                    &a.vserver,
                    0,
                    format!("{}: {}", a.kind.as_str(), a.message),
                ));
            }
        }
    }

    fn propose(self: &Arc<Self>, pc: PlacementChange) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let cmd = Command::SetPlacement {
                vserver: pc.vserver.clone(),
                node: pc.to,
                generation: pc.generation,
                expect_generation: pc.expect_generation,
                reason: pc.reason.as_str().to_string(),
            };
            match me.raft.propose_local(cmd, APPLY_WAIT).await {
                Ok(()) => {
                    let from = pc
                        .from
                        .map_or("nowhere".to_string(), |n| format!("node {n}"));
                    me.events.record(EventLog::event(
                        "placed",
                        &pc.vserver,
                        pc.to,
                        format!(
                            "{} placed on node {} at generation {} ({}, from {from})",
                            pc.vserver,
                            pc.to,
                            pc.generation,
                            pc.reason.as_str()
                        ),
                    ));
                }
                Err(e) => {
                    tracing::warn!(vserver = %pc.vserver, error = %e, "placement not applied")
                }
            }
        });
    }

    /// Proposals held for a final sync go out once the target reports a
    /// replica taken after the vserver stopped.
    fn release_held(self: &Arc<Self>, inner: &mut Inner, now: Now) {
        let limit = final_sync_timeout_ms(self.settings.lease_ms);
        for h in inner.held.take_expired(now.mono_ms, limit) {
            let Some(from) = h.change.from else {
                continue;
            };
            let name = h.change.vserver.clone();
            let msg = format!(
                "move aborted: the final delta of {name} to node {} did not arrive within {} s; it starts again on node {from}",
                h.change.to,
                limit / 1000
            );
            inner
                .alerts
                .insert(name.clone(), format!("move aborted: {msg}"));
            self.events
                .record(EventLog::event("alert", &name, from, msg));
            // Back on the holder at a new generation: the compare-and-set
            // voids the held move for good.
            self.propose(PlacementChange {
                vserver: name,
                from: Some(from),
                to: from,
                generation: h.change.expect_generation + 1,
                expect_generation: h.change.expect_generation,
                reason: MoveReason::Replace,
            });
        }
        for change in inner.held.take_ready(&inner.final_answers) {
            self.propose(change);
        }
    }

    /// Closes moves whose new holder reports the vserver running, with an
    /// event carrying the phase durations.
    fn trace_moves(&self, inner: &mut Inner, s: &ClusterState, now: Now) {
        let mut done = Vec::new();
        for (name, m) in inner.moves.iter_mut() {
            let Some(p) = s.vservers.get(name).and_then(|v| v.placement.as_ref()) else {
                done.push(name.clone());
                continue;
            };
            if p.generation < m.generation {
                continue;
            }
            if p.generation > m.generation || p.node != m.to {
                done.push(name.clone());
                continue;
            }
            if m.applied_ms.is_none() {
                m.applied_ms = Some(now.mono_ms);
            }
            let running = inner
                .reports
                .get(&(name.clone(), m.to))
                .is_some_and(|r| r.generation == m.generation && r.state == "running");
            if !running {
                continue;
            }
            let mut phases = Vec::new();
            if let Some(h) = m.last_heard_ms {
                phases.push(pb::Phase {
                    name: "detect+lease wait".into(),
                    ms: m.proposed_ms.saturating_sub(h),
                });
            }
            let applied = m.applied_ms.unwrap_or(now.mono_ms);
            phases.push(pb::Phase {
                name: "commit".into(),
                ms: applied.saturating_sub(m.proposed_ms),
            });
            phases.push(pb::Phase {
                name: "start+report".into(),
                ms: now.mono_ms.saturating_sub(applied),
            });
            let total = phases.iter().map(|p| p.ms).sum::<u64>();
            if matches!(m.reason, MoveReason::Failover | MoveReason::Forced) {
                self.metrics.failovers.inc();
                for p in &phases {
                    self.metrics.observe_phase(&p.name, p.ms);
                }
            }
            if m.reason.is_planned() {
                if let Some(t) = inner.stop_ordered_ms.remove(name) {
                    self.metrics
                        .migration_downtime_seconds
                        .observe(now.mono_ms.saturating_sub(t) as f64 / 1000.0);
                }
            }
            let kind = match m.reason {
                MoveReason::Failover | MoveReason::Forced => "failover_done",
                MoveReason::Place => "placed_running",
                _ => "move_done",
            };
            let from = m
                .from
                .map_or("nowhere".to_string(), |n| format!("node {n}"));
            let mut ev = EventLog::event(
                kind,
                name,
                m.to,
                format!(
                    "{name} runs on node {} at generation {} ({} from {from}) after {total} ms",
                    m.to,
                    m.generation,
                    m.reason.as_str()
                ),
            );
            ev.phases = phases;
            self.events.record(ev);
            done.push(name.clone());
        }
        for n in done {
            inner.moves.remove(&n);
        }
    }

    /// Writes replica progress to the raft log now and then, so a new
    /// leader knows how fresh each standby is.
    fn record_replicas(self: &Arc<Self>, inner: &mut Inner) {
        // The holder of a vserver has no replica of it.
        let holders: Vec<(String, NodeId)> = self.raft.read_state(|s| {
            s.vservers
                .iter()
                .filter_map(|(n, v)| v.placement.as_ref().map(|p| (n.clone(), p.node)))
                .collect()
        });
        for key in holders {
            inner.replicas.remove(&key);
            inner.recorded.remove(&key);
        }
        for ((name, node), r) in &inner.replicas {
            let last = inner
                .recorded
                .get(&(name.clone(), *node))
                .copied()
                .unwrap_or(0);
            if r.source_unix_ms < last.saturating_add(RECORD_EVERY_MS) {
                continue;
            }
            inner
                .recorded
                .insert((name.clone(), *node), r.source_unix_ms);
            let cmd = Command::RecordReplica {
                vserver: name.clone(),
                node: *node,
                snapshot_source_unix_ms: r.source_unix_ms,
                digest: r.digest.clone(),
            };
            let raft = self.raft.clone();
            tokio::spawn(async move {
                if let Err(e) = raft.propose_local(cmd, APPLY_WAIT).await {
                    tracing::debug!(error = %e, "replica record not applied");
                }
            });
        }
    }

    /// The live view of each vserver for `vsha status`.
    pub fn runtime_view(&self) -> BTreeMap<String, pb::VserverRuntime> {
        let now = Self::now();
        let g = self.lock();
        let leading = g.leading_term.is_some();
        self.raft.read_state(|s| {
            let mut out = BTreeMap::new();
            for (name, vs) in &s.vservers {
                let mut rt = pb::VserverRuntime {
                    alert: g.alerts.get(name).cloned().unwrap_or_default(),
                    ..Default::default()
                };
                let holder = vs.placement.as_ref().map(|p| (p.node, p.generation));
                match holder.and_then(|(n, gen)| {
                    g.reports
                        .get(&(name.clone(), n))
                        .filter(|r| r.generation == gen)
                }) {
                    Some(r) if r.state == "failed" => {
                        rt.observed = format!("failed: {}", r.reason);
                        rt.restarts = r.restarts;
                    }
                    Some(r) => {
                        rt.observed = r.state.clone();
                        rt.restarts = r.restarts;
                    }
                    None => rt.observed = "unknown".into(),
                }
                if let (Some((node, _)), true) = (holder, leading) {
                    let expiry = g
                        .ctl
                        .last_renewal_ms(node)
                        .or(g.ctl.leader_since_ms())
                        .map(|t| t + self.settings.lease_ms + self.settings.drift_margin_ms);
                    if let Some(m) = g.moves.get(name) {
                        rt.phase = if m.applied_ms.is_some() {
                            "starting".into()
                        } else {
                            "moving (placement proposed)".into()
                        };
                    } else if g.held.contains(name) {
                        rt.phase = "final sync before the move".into();
                    } else if !g.ctl.lease_alive(node, now) {
                        // The lease ran out; the margin is still running,
                        // or no standby qualifies (then an alert says why).
                        let left = expiry.map_or(0, |e| e.saturating_sub(now.mono_ms));
                        rt.phase = if left > 0 {
                            "waiting for lease expiry".into()
                        } else {
                            "checking replica".into()
                        };
                        rt.phase_ms_left = left;
                    } else if g
                        .ctl
                        .last_renewal_ms(node)
                        .is_some_and(|t| now.mono_ms.saturating_sub(t) > 2 * self.settings.renew_ms)
                    {
                        rt.phase = format!("detecting (node {node} missed renewals)");
                        rt.phase_ms_left = expiry.map_or(0, |e| e.saturating_sub(now.mono_ms));
                    } else if rt.observed == "unknown" || rt.observed == "stopped" {
                        rt.phase = "starting".into();
                    }
                }
                if let Some(group) = &vs.group {
                    for &n in &group.nodes {
                        if Some(n) == holder.map(|h| h.0) {
                            continue;
                        }
                        let src = g.ctl.replica_source(name, vs, n);
                        rt.lag.push(pb::ReplicaLag {
                            node: n,
                            lag_ms: src.map_or(0, |t| now.unix_ms.saturating_sub(t)),
                            known: src.is_some(),
                        });
                    }
                }
                out.insert(name.clone(), rt);
            }
            out
        })
    }

    /// `vsha simulate node-down NODE`: what the controller would do once
    /// NODE's lease surely ran out, with every other node alive.
    pub fn simulate_node_down(&self, down: NodeId) -> pb::SimulateResponse {
        let now = Self::now();
        let g = self.lock();
        let mut ctl = g.ctl.clone();
        drop(g);
        let mut notes = Vec::new();
        self.raft.read_state(|s| {
            if !ctl.is_leader() {
                ctl.observe(s, now, Event::BecameLeader);
                notes.push("this agent does not lead now: the simulation assumes a leader that has waited out its first lease".to_string());
            }
            let later = Now {
                mono_ms: now.mono_ms
                    + 2 * (self.settings.lease_ms + self.settings.drift_margin_ms),
                unix_ms: now.unix_ms,
            };
            for &n in s.nodes.keys() {
                if n != down {
                    ctl.observe(s, later, Event::LeaseRenewed { node: n });
                }
            }
            ctl.step(s, later, Event::Tick);
            let mut moves = Vec::new();
            let mut refusals: BTreeMap<String, String> = BTreeMap::new();
            for c in ctl.take_commands() {
                match c {
                    Cmd::Propose(pc) if pc.from == Some(down) => {
                        let vs = &s.vservers[&pc.vserver];
                        let src = ctl.replica_source(&pc.vserver, vs, pc.to);
                        moves.push(pb::SimulatedMove {
                            vserver: pc.vserver.clone(),
                            from: down,
                            to: pc.to,
                            refusal: String::new(),
                            data_loss_ms: src.map_or(0, |t| now.unix_ms.saturating_sub(t)),
                            replica_known: src.is_some(),
                        });
                    }
                    Cmd::Alert(a) => {
                        refusals.insert(a.vserver.clone(), a.message);
                    }
                    _ => {}
                }
            }
            for (name, vs) in &s.vservers {
                let held_there = vs.placement.as_ref().is_some_and(|p| p.node == down);
                if held_there && !moves.iter().any(|m| &m.vserver == name) {
                    moves.push(pb::SimulatedMove {
                        vserver: name.clone(),
                        from: down,
                        to: 0,
                        refusal: refusals
                            .remove(name)
                            .unwrap_or_else(|| "it would stay where it is".into()),
                        data_loss_ms: 0,
                        replica_known: false,
                    });
                }
            }
            notes.push(format!(
                "moves happen {} ms (lease + drift margin) after node {down}'s last renewal",
                self.settings.lease_ms + self.settings.drift_margin_ms
            ));
            pb::SimulateResponse { moves, notes }
        })
    }
}
