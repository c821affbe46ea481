//! The simulated cluster: a discrete-event loop over global time driving
//! the real controller, node plan, lease and state code.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use vsha_agent::command::Command;
use vsha_agent::controller::{Cmd, Event, Now, VserverReport};
use vsha_agent::failover::lease::NodeLease;
use vsha_agent::failover::node_plan::{self, Action, Order, OrderAction, StopWhy};
use vsha_agent::model::{
    AdminState, Failback, FailoverGroup, Limits, NodeId, NodeRecord, Role, VserverSpec,
};
use vsha_agent::state::ClusterState;

use super::checks;
use super::clock::Clock;
use super::config::{Contract, Faults, Timing};
use super::faults::{self, Fault};
use super::net::Net;
use super::node::{Agent, Node, Queued};
use super::raft::{Raft, RaftEvent};

const UNIX0: u64 = 1_700_000_000_000;
const RAFT_TICK_MS: u64 = 10;
const OPERATOR_EVERY_MS: u64 = 500;
const FAULTS_FROM_MS: u64 = 3000;
const TRACE_KEEP: usize = 600;
const TRACE_SHOW: usize = 120;

#[derive(Debug, Clone)]
pub enum Msg {
    Renew {
        from: NodeId,
        to: NodeId,
        sent_at: u64,
        reports: Vec<VserverReport>,
        /// The newest order received: (leader term, sequence).
        acked: (u64, u64),
    },
    Grant {
        from: NodeId,
        to: NodeId,
        sent_at: u64,
        /// The lease granted; 0 = refused (not the confirmed leader).
        granted_ms: u64,
        term: u64,
        orders: Vec<Queued>,
    },
    Append {
        from: NodeId,
        to: NodeId,
        term: u64,
        upto: usize,
    },
}

impl Msg {
    fn ends(&self) -> (NodeId, NodeId) {
        match self {
            Msg::Renew { from, to, .. }
            | Msg::Grant { from, to, .. }
            | Msg::Append { from, to, .. } => (*from, *to),
        }
    }
}

#[derive(Debug)]
enum Ev {
    AgentTick {
        node: NodeId,
        epoch: u64,
    },
    Guard {
        node: NodeId,
        boot: u64,
    },
    StopDone {
        node: NodeId,
        vserver: String,
        id: u64,
    },
    Deliver(Msg),
    RaftTick,
    Fault(Fault),
}

/// What a run exercised, so a schedule that tests nothing is noticed.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub runs: u64,
    pub elections: u64,
    pub faults: BTreeMap<&'static str, u64>,
    /// Applied placement changes by reason.
    pub moves: BTreeMap<String, u64>,
    pub guard_kills: u64,
    pub self_fences: u64,
    pub starts: u64,
    pub max_recovery_ms: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.runs += o.runs;
        self.elections += o.elections;
        for (k, v) in &o.faults {
            *self.faults.entry(k).or_default() += v;
        }
        for (k, v) in &o.moves {
            *self.moves.entry(k.clone()).or_default() += v;
        }
        self.guard_kills += o.guard_kills;
        self.self_fences += o.self_fences;
        self.starts += o.starts;
        self.max_recovery_ms = self.max_recovery_ms.max(o.max_recovery_ms);
    }
}

/// A violated invariant, with what led to it.
#[derive(Debug)]
pub struct Failure {
    pub seed: u64,
    pub invariant: &'static str,
    /// Every invariant violated at that instant (the first is `invariant`).
    pub all: Vec<&'static str>,
    pub at_ms: u64,
    pub detail: String,
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {}: invariant `{}` violated at t={} ms: {} (violated then: {:?})",
            self.seed, self.invariant, self.at_ms, self.detail, self.all
        )?;
        writeln!(
            f,
            "rerun: VSHA_SIM_SEED={} cargo test -p vsha-agent --test failover_sim",
            self.seed
        )?;
        writeln!(f, "--- last {} trace lines ---", self.trace.len())?;
        for l in &self.trace {
            writeln!(f, "{l}")?;
        }
        Ok(())
    }
}

pub struct Sim {
    seed: u64,
    rng: StdRng,
    now: u64,
    t: Timing,
    f: Faults,
    c: Contract,
    nodes: BTreeMap<NodeId, Node>,
    ids: Vec<NodeId>,
    hosts: Vec<NodeId>,
    vservers: Vec<String>,
    raft: Raft,
    /// The committed log applied in order: the ground truth.
    truth: ClusterState,
    truth_applied: usize,
    net: Net,
    events: BTreeMap<(u64, u64), Ev>,
    seq: u64,
    stop_ids: u64,
    /// (node, vserver) -> highest generation the node has applied.
    seen_gen: BTreeMap<(NodeId, String), u64>,
    busy: BTreeSet<NodeId>,
    admin_wanted: BTreeMap<NodeId, AdminState>,
    heal_at: u64,
    end_at: u64,
    recovered_since: Option<u64>,
    trace: VecDeque<String>,
    failure: Option<Failure>,
    stats: Stats,
}

fn spec(name: &str, i: usize) -> VserverSpec {
    VserverSpec {
        name: name.into(),
        tree: format!("/vservers/{name}"),
        ip: Ipv4Addr::new(10, 9, 0, 10 + i as u8),
        prefix: 24,
        dev: String::new(),
        hostname: name.into(),
        capabilities: vec![],
        limits: Limits::default(),
        start_command: vec![],
        stop_command: vec![],
        health: None,
        max_rpo_ms: 0,
    }
}

impl Sim {
    pub fn new(seed: u64, t: Timing, f: Faults, c: Contract) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let n: u64 = rng.gen_range(3..=7);
        let ids: Vec<NodeId> = (1..=n).collect();
        let witnesses = match n {
            3 if rng.gen_bool(0.6) => 1,
            4..=7 => rng.gen_range(0..=1),
            _ => 0,
        };
        let mut shuffled = ids.clone();
        shuffled.shuffle(&mut rng);
        let witness: BTreeSet<NodeId> = shuffled[..witnesses].iter().copied().collect();
        let hosts: Vec<NodeId> = ids
            .iter()
            .copied()
            .filter(|i| !witness.contains(i))
            .collect();
        let mut log = vec![Command::Bootstrap {
            cluster_id: format!("sim-{seed}"),
            members: ids
                .iter()
                .map(|&id| NodeRecord {
                    id,
                    addr: format!("sim-{id}:7700"),
                    role: if witness.contains(&id) {
                        Role::Witness
                    } else {
                        Role::Voter
                    },
                    iface: String::new(),
                    admin: AdminState::Active,
                })
                .collect(),
        }];
        let nv = rng.gen_range(2..=5usize);
        let mut vservers = Vec::new();
        for i in 0..nv {
            let name = format!("vs{i}");
            let mut g = hosts.clone();
            g.shuffle(&mut rng);
            g.truncate(rng.gen_range(2..=3usize.min(hosts.len())));
            let failback = *[Failback::Never, Failback::Auto, Failback::Manual]
                .choose(&mut rng)
                .unwrap_or(&Failback::Never);
            log.push(Command::AddVserver(spec(&name, i)));
            log.push(Command::SetPair {
                vserver: name.clone(),
                group: FailoverGroup {
                    nodes: g.clone(),
                    failback,
                    failback_stable_ms: 2000,
                },
            });
            // Replication is not simulated: every standby holds a complete
            // replica and max_rpo is 0, so every live member is eligible.
            for &node in &g {
                log.push(Command::RecordReplica {
                    vserver: name.clone(),
                    node,
                    snapshot_source_unix_ms: UNIX0,
                    digest: "d".into(),
                });
            }
            vservers.push(name);
        }
        let mut state = ClusterState::default();
        for c in &log {
            state.apply(c).expect("initial log applies");
        }
        let mut nodes = BTreeMap::new();
        for &id in &ids {
            let clock = Clock {
                offset: rng.gen_range(1_000_000..1_000_000_000),
                ppm: rng.gen_range(-t.max_drift_ppm..=t.max_drift_ppm),
            };
            nodes.insert(
                id,
                Node::new(
                    id,
                    witness.contains(&id),
                    clock,
                    state.clone(),
                    log.len(),
                    NodeLease::new(t.lease_ms, t.fence_lead_ms),
                    t.controller(),
                ),
            );
        }
        let heal_at = FAULTS_FROM_MS + f.duration_ms;
        let mut sim = Sim {
            seed,
            now: 0,
            t,
            f,
            c,
            ids: ids.clone(),
            hosts,
            vservers,
            raft: Raft::new(ids.clone(), log.clone(), t.election_ms),
            truth: state,
            truth_applied: log.len(),
            net: Net::new(t.delay_ms),
            events: BTreeMap::new(),
            seq: 0,
            stop_ids: 0,
            seen_gen: BTreeMap::new(),
            busy: BTreeSet::new(),
            admin_wanted: BTreeMap::new(),
            heal_at,
            end_at: heal_at + f.recovery_bound_ms + f.settle_ms,
            recovered_since: None,
            trace: VecDeque::new(),
            failure: None,
            stats: Stats {
                runs: 1,
                ..Stats::default()
            },
            nodes,
            rng,
        };
        for id in ids {
            let at = sim.rng.gen_range(0..sim.t.heartbeat_ms);
            sim.at(at, Ev::AgentTick { node: id, epoch: 0 });
        }
        sim.at(0, Ev::RaftTick);
        sim.at(FAULTS_FROM_MS, Ev::Fault(Fault::Next));
        sim.at(heal_at, Ev::Fault(Fault::HealAll));
        let desc: Vec<String> = sim
            .nodes
            .values()
            .map(|n| {
                format!(
                    "n{}{} {:+}ppm",
                    n.id,
                    if n.witness { "(witness)" } else { "" },
                    n.clock.ppm
                )
            })
            .collect();
        sim.log(format!("cluster: {}", desc.join(", ")));
        for v in sim.vservers.clone() {
            let g = sim.truth.vservers[&v].group.clone();
            sim.log(format!("{v}: group {g:?}"));
        }
        sim
    }

    /// Runs to the end; the first violated invariant stops the run.
    pub fn run(mut self) -> Result<Stats, Box<Failure>> {
        while let Some(((at, _), ev)) = self.events.pop_first() {
            if at > self.end_at {
                break;
            }
            self.now = at;
            self.handle(ev);
            self.check();
            if let Some(f) = self.take_failure() {
                return Err(Box::new(f));
            }
        }
        Ok(self.stats)
    }

    // ---- plumbing ----

    fn at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert((at, self.seq), ev);
    }

    fn log(&mut self, line: String) {
        if self.trace.len() >= TRACE_KEEP {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("{:>6} {line}", self.now));
    }

    fn violated(&mut self, (invariant, detail): (&'static str, String)) {
        self.log(format!("VIOLATION {invariant}: {detail}"));
        if let Some(f) = &mut self.failure {
            if !f.all.contains(&invariant) {
                f.all.push(invariant);
            }
            return;
        }
        self.failure = Some(Failure {
            seed: self.seed,
            invariant,
            all: vec![invariant],
            at_ms: self.now,
            detail,
            trace: Vec::new(),
        });
    }

    fn take_failure(&mut self) -> Option<Failure> {
        let mut f = self.failure.take()?;
        let skip = self.trace.len().saturating_sub(TRACE_SHOW);
        f.trace = self.trace.iter().skip(skip).cloned().collect();
        Some(f)
    }

    fn fault_count(&mut self, kind: &'static str) {
        *self.stats.faults.entry(kind).or_default() += 1;
    }

    fn alive(&self) -> BTreeSet<NodeId> {
        self.nodes
            .values()
            .filter(|n| n.machine_up && n.agent == Agent::Up)
            .map(|n| n.id)
            .collect()
    }

    fn mono(&self, id: NodeId) -> u64 {
        self.nodes[&id].clock.at(self.now)
    }

    fn send(&mut self, msg: Msg) {
        let (from, to) = msg.ends();
        if let Some(d) = self.net.send(&mut self.rng, from, to) {
            self.at(self.now + d, Ev::Deliver(msg));
        }
    }

    fn commit_delay(&mut self) -> u64 {
        let (a, b) = self.t.delay_ms;
        self.rng.gen_range(2 * a..=2 * b)
    }

    // ---- invariants ----

    fn check(&mut self) {
        if let Err(e) = checks::global(&self.nodes, &self.vservers) {
            self.violated(e);
            return;
        }
        if self.now < self.heal_at || !self.f.check_recovery {
            return;
        }
        match checks::recovered(&self.nodes, &self.vservers) {
            Ok(()) => {
                if self.recovered_since.is_none() {
                    self.recovered_since = Some(self.now);
                    self.stats.max_recovery_ms = self.now - self.heal_at;
                }
            }
            Err(why) => {
                if self.recovered_since.take().is_some() {
                    self.log(format!("not recovered any more: {why}"));
                }
                if self.now >= self.heal_at + self.f.recovery_bound_ms {
                    let leader = self.raft.leader;
                    let placements: Vec<String> = self
                        .truth
                        .vservers
                        .iter()
                        .map(|(n, v)| {
                            format!(
                                "{n}@{:?}",
                                v.placement.as_ref().map(|p| (p.node, p.generation))
                            )
                        })
                        .collect();
                    self.violated((
                        checks::RECOVERS_AFTER_HEAL,
                        format!(
                            "{} ms after healing: {why} (leader {leader:?} ready {}, placements {})",
                            self.now - self.heal_at,
                            self.raft.ready,
                            placements.join(" ")
                        ),
                    ));
                }
            }
        }
    }

    // ---- events ----

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::AgentTick { node, epoch } => self.agent_tick(node, epoch),
            Ev::Guard { node, boot } => self.guard(node, boot),
            Ev::StopDone { node, vserver, id } => self.stop_done(node, &vserver, id),
            Ev::Deliver(msg) => self.deliver(msg),
            Ev::RaftTick => self.raft_tick(),
            Ev::Fault(f) => self.fault(f),
        }
    }

    fn agent_tick(&mut self, id: NodeId, epoch: u64) {
        let n = &self.nodes[&id];
        if !n.machine_up || n.agent != Agent::Up || n.agent_epoch != epoch {
            return;
        }
        let mono = n.clock.at(self.now);
        let busy = n.renewing.is_some_and(|(_, give_up)| self.now < give_up);
        if let (Some(to), false) = (n.known_leader, busy) {
            let give_up = self.now + (self.t.lease_ms / 2).max(self.t.heartbeat_ms);
            self.nodes.get_mut(&id).expect("node").renewing = Some((mono, give_up));
            let n = &self.nodes[&id];
            let reports = n.reports(self.c.reports_placed_here);
            let acked = n.order_ack;
            self.send(Msg::Renew {
                from: id,
                to,
                sent_at: mono,
                reports,
                acked,
            });
        }
        self.run_plan(id);
        if self.nodes[&id].ctl_leader {
            self.leader_step(id, Event::Tick);
        }
        let n = &self.nodes[&id];
        let next = n.clock.when(mono + self.t.heartbeat_ms, self.now);
        self.at(next, Ev::AgentTick { node: id, epoch });
    }

    fn run_plan(&mut self, id: NodeId) {
        let ttl = self.t.order_ttl_ms;
        let ignore = self.f.ignore_lease;
        let n = self.nodes.get_mut(&id).expect("node");
        let mono = n.clock.at(self.now);
        let lease = if ignore {
            let mut l = NodeLease::new(u64::MAX / 4, 0);
            l.renewed(mono, 0);
            l
        } else {
            n.lease
        };
        let orders = std::mem::take(&mut n.orders);
        let p = node_plan::plan(id, mono, &lease, &n.state, &n.local(), orders, ttl);
        n.orders = p.waiting;
        for a in p.actions {
            self.execute(id, a);
        }
    }

    fn execute(&mut self, id: NodeId, a: Action) {
        match a {
            Action::Start {
                vserver,
                generation,
            }
            | Action::Restart {
                vserver,
                generation,
            } => {
                let restart = self
                    .nodes
                    .get(&id)
                    .and_then(|n| n.copies.get(&vserver))
                    .is_some_and(|c| c.procs && c.generation == generation);
                let seen = self
                    .seen_gen
                    .get(&(id, vserver.clone()))
                    .copied()
                    .unwrap_or(0);
                if let Err(e) = checks::generation_grows(id, &vserver, generation, seen) {
                    self.violated(e);
                }
                if let Err(e) = checks::fence_before_start(&self.nodes, id, &vserver) {
                    self.violated(e);
                }
                let c = self
                    .nodes
                    .get_mut(&id)
                    .expect("node")
                    .copies
                    .entry(vserver.clone())
                    .or_default();
                if c.generation != generation {
                    c.restarts = 0;
                } else if restart {
                    c.restarts += 1;
                }
                c.generation = generation;
                c.procs = true;
                c.ip = true;
                c.failed = false;
                c.stopping = None;
                self.stats.starts += 1;
                let what = if restart { "restarts" } else { "starts" };
                self.log(format!("n{id} {what} {vserver} gen {generation}"));
            }
            Action::Adopt {
                vserver,
                generation,
            } => {
                let seen = self
                    .seen_gen
                    .get(&(id, vserver.clone()))
                    .copied()
                    .unwrap_or(0);
                if let Err(e) = checks::generation_grows(id, &vserver, generation, seen) {
                    self.violated(e);
                }
                if let Some(c) = self
                    .nodes
                    .get_mut(&id)
                    .and_then(|n| n.copies.get_mut(&vserver))
                {
                    c.generation = generation;
                    c.restarts = 0;
                }
                self.log(format!("n{id} adopts {vserver} at gen {generation}"));
            }
            Action::Stop { vserver, why } => {
                if why == StopWhy::SelfFence {
                    self.stats.self_fences += 1;
                }
                self.stop(id, &vserver, why.is_hard(), why.as_str());
            }
        }
    }

    /// Begins stopping a copy: processes gone, then the IP removed.
    fn stop(&mut self, id: NodeId, vserver: &str, hard: bool, why: &str) {
        let dur = if hard {
            self.rng.gen_range(1..=self.t.kill_ms)
        } else {
            self.rng.gen_range(self.t.kill_ms..=self.t.graceful_ms)
        };
        let due = self.now + dur;
        let Some(c) = self
            .nodes
            .get_mut(&id)
            .and_then(|n| n.copies.get_mut(vserver))
        else {
            return;
        };
        if !(c.procs || c.ip) || c.stopping.is_some_and(|(d, _)| d <= due) {
            return;
        }
        self.stop_ids += 1;
        let sid = self.stop_ids;
        c.stopping = Some((due, sid));
        self.at(
            due,
            Ev::StopDone {
                node: id,
                vserver: vserver.to_string(),
                id: sid,
            },
        );
        self.log(format!(
            "n{id} stopping {vserver} ({why}), gone in {dur} ms"
        ));
    }

    fn stop_done(&mut self, id: NodeId, vserver: &str, sid: u64) {
        let Some(c) = self
            .nodes
            .get_mut(&id)
            .and_then(|n| n.copies.get_mut(vserver))
        else {
            return;
        };
        if c.stopping.map(|(_, s)| s) != Some(sid) {
            return;
        }
        c.procs = false;
        c.ip = false;
        c.failed = false;
        c.stopping = None;
        self.log(format!("n{id} stopped {vserver}"));
    }

    fn guard(&mut self, id: NodeId, boot: u64) {
        let n = &self.nodes[&id];
        if !n.machine_up || n.boot != boot || self.f.ignore_lease {
            return;
        }
        let Some(kill_at) = n.guard_kill_at else {
            return;
        };
        if n.clock.at(self.now) < kill_at {
            return;
        }
        let victims: Vec<String> = n
            .copies
            .iter()
            .filter(|(_, c)| c.procs || c.ip)
            .map(|(v, _)| v.clone())
            .collect();
        self.nodes.get_mut(&id).expect("node").guard_kill_at = None;
        for v in victims {
            self.stats.guard_kills += 1;
            self.stop(id, &v, true, "guard: lease deadline");
        }
    }

    /// The agent's lease deadline changed: tell the guard.
    fn arm_guard(&mut self, id: NodeId) {
        let n = self.nodes.get_mut(&id).expect("node");
        let mono = n.clock.at(self.now);
        let kill_at = mono + n.lease.remaining_ms(mono);
        n.guard_kill_at = Some(kill_at);
        let when = n.clock.when(kill_at, self.now);
        let boot = n.boot;
        self.at(when, Ev::Guard { node: id, boot });
    }

    fn deliver(&mut self, msg: Msg) {
        let (from, to) = msg.ends();
        let n = &self.nodes[&to];
        if !n.machine_up || !self.net.connected(from, to) {
            return;
        }
        match n.agent {
            Agent::Down => {}
            Agent::Paused => self.nodes.get_mut(&to).expect("node").held.push(msg),
            Agent::Up => self.receive(msg),
        }
    }

    fn receive(&mut self, msg: Msg) {
        match msg {
            Msg::Renew {
                from,
                to,
                sent_at,
                reports,
                acked,
            } => self.renewal(to, from, sent_at, reports, acked),
            Msg::Grant {
                to,
                sent_at,
                granted_ms,
                term,
                orders,
                ..
            } => {
                let n = self.nodes.get_mut(&to).expect("node");
                let mono = n.clock.at(self.now);
                // The answer to the renewal in flight, before it was given
                // up; anything else is discarded (the RPC timed out).
                let current = n
                    .renewing
                    .is_some_and(|(sent, give_up)| sent == sent_at && self.now <= give_up);
                if !current {
                    return;
                }
                n.renewing = None;
                if granted_ms == 0 {
                    return;
                }
                n.lease.renewed(sent_at, granted_ms);
                for (seq, action, vserver, generation) in orders {
                    if (term, seq) <= n.order_ack {
                        continue;
                    }
                    n.order_ack = (term, seq);
                    n.orders.push(Order {
                        action,
                        vserver,
                        generation,
                        received_ms: mono,
                    });
                }
                self.arm_guard(to);
                self.run_plan(to);
            }
            Msg::Append {
                from,
                to,
                term,
                upto,
            } => {
                let n = self.nodes.get_mut(&to).expect("node");
                if term >= n.known_term {
                    n.known_term = term;
                    n.known_leader = Some(from);
                }
                if n.leader_term.is_some_and(|lt| lt < term) {
                    self.step_down(to, "heard a newer leader");
                }
                self.apply(to, upto);
            }
        }
    }

    fn apply(&mut self, id: NodeId, upto: usize) {
        let n = self.nodes.get_mut(&id).expect("node");
        for (v, g) in n.apply_log(&self.raft.log, upto) {
            let e = self.seen_gen.entry((id, v)).or_default();
            *e = (*e).max(g);
        }
    }

    /// The leader `l` receives `from`'s renewal: grant it only as the
    /// confirmed leader of the current term with a quorum.
    fn renewal(
        &mut self,
        l: NodeId,
        from: NodeId,
        sent_at: u64,
        reports: Vec<VserverReport>,
        acked: (u64, u64),
    ) {
        let alive = self.alive();
        let n = &self.nodes[&l];
        let confirmed = n.ctl_leader
            && n.leader_term == Some(self.raft.term)
            && self.raft.leader == Some(l)
            && self.raft.has_quorum(l, &alive, &self.net);
        if !confirmed {
            self.send(Msg::Grant {
                from: l,
                to: from,
                sent_at,
                granted_ms: 0,
                term: 0,
                orders: Vec::new(),
            });
            return;
        }
        let now = Now {
            mono_ms: n.clock.at(self.now),
            unix_ms: UNIX0 + self.now,
        };
        let n = self.nodes.get_mut(&l).expect("node");
        n.ctl
            .observe(&n.state, now, Event::LeaseRenewed { node: from });
        for r in reports {
            n.ctl.observe(&n.state, now, Event::Report(r));
        }
        let cmds = n.ctl.take_commands();
        let term = self.raft.term;
        if self.c.purge_stale_orders {
            let state = &n.state;
            let current = |v: &str| {
                state
                    .vservers
                    .get(v)
                    .and_then(|v| v.placement.as_ref())
                    .map_or(0, |p| p.generation)
            };
            if let Some(q) = n.outbox.get_mut(&from) {
                q.retain(|o| o.3 >= current(&o.2));
            }
        }
        let orders = if self.c.orders_until_acked {
            let q = n.outbox.entry(from).or_default();
            q.retain(|o| (term, o.0) > acked);
            q.clone()
        } else {
            n.outbox.remove(&from).unwrap_or_default()
        };
        for c in cmds {
            self.command(l, c);
        }
        self.send(Msg::Grant {
            from: l,
            to: from,
            sent_at,
            granted_ms: self.t.lease_ms,
            term,
            orders,
        });
    }

    fn leader_step(&mut self, l: NodeId, ev: Event) {
        let now = Now {
            mono_ms: self.mono(l),
            unix_ms: UNIX0 + self.now,
        };
        let n = self.nodes.get_mut(&l).expect("node");
        n.ctl.step(&n.state, now, ev);
        for c in n.ctl.take_commands() {
            self.command(l, c);
        }
    }

    fn command(&mut self, l: NodeId, c: Cmd) {
        let order = match &c {
            Cmd::Propose(p) => {
                let term = self.nodes[&l].leader_term.unwrap_or(0);
                let cmd = Command::SetPlacement {
                    vserver: p.vserver.clone(),
                    node: p.to,
                    generation: p.generation,
                    expect_generation: p.expect_generation,
                    reason: p.reason.as_str().to_string(),
                };
                let at = self.now + self.commit_delay();
                let ok = self.raft.propose(l, term, cmd, at);
                self.log(format!(
                    "n{l} leader: {c}{}",
                    if ok { "" } else { " [not leader: dropped]" }
                ));
                return;
            }
            Cmd::Start {
                vserver,
                node,
                generation,
            } => (OrderAction::Start, vserver, *node, *generation),
            Cmd::Stop {
                vserver,
                node,
                generation,
            } => (OrderAction::Stop, vserver, *node, *generation),
            Cmd::Restart {
                vserver,
                node,
                generation,
            } => (OrderAction::Restart, vserver, *node, *generation),
            Cmd::Fence {
                vserver,
                generation,
                ..
            } if self.c.purge_stale_orders => {
                self.log(format!("n{l} leader: {c}"));
                let n = self.nodes.get_mut(&l).expect("node");
                for q in n.outbox.values_mut() {
                    q.retain(|o| &o.2 != vserver || o.3 > *generation || o.1 == OrderAction::Stop);
                }
                return;
            }
            Cmd::Fence { .. } | Cmd::Alert(_) => {
                self.log(format!("n{l} leader: {c}"));
                return;
            }
            Cmd::Sync { .. } => return,
        };
        let (action, vserver, node, generation) = order;
        let vserver = vserver.clone();
        self.log(format!("n{l} leader: {c}"));
        let n = self.nodes.get_mut(&l).expect("node");
        if self.c.purge_stale_orders && action == OrderAction::Stop {
            // A Stop supersedes the Start/Restart still queued before it.
            if let Some(q) = n.outbox.get_mut(&node) {
                q.retain(|o| o.2 != vserver || o.1 == OrderAction::Stop);
            }
        }
        n.order_seq += 1;
        let entry = (n.order_seq, action, vserver, generation);
        n.outbox.entry(node).or_default().push(entry);
    }

    fn step_down(&mut self, id: NodeId, why: &str) {
        let n = self.nodes.get_mut(&id).expect("node");
        let Some(term) = n.leader_term.take() else {
            return;
        };
        if term == self.raft.term {
            self.raft.leader_gone(id);
        }
        n.quorum_lost_since = None;
        n.outbox.clear();
        let was = n.ctl_leader;
        n.ctl_leader = false;
        if was {
            self.leader_step(id, Event::LostLeadership);
        }
        self.log(format!("n{id} steps down ({why})"));
    }

    fn raft_tick(&mut self) {
        let alive = self.alive();
        let delay = self.commit_delay();
        let events = self
            .raft
            .tick(self.now, &alive, &self.net, &mut self.rng, delay);
        for e in events {
            match e {
                RaftEvent::Elected {
                    leader,
                    term,
                    voters,
                    kept,
                    dropped,
                } => {
                    self.stats.elections += 1;
                    for v in &voters {
                        let n = self.nodes.get_mut(v).expect("node");
                        n.known_term = n.known_term.max(term);
                        n.known_leader = Some(leader);
                    }
                    if self.nodes[&leader].leader_term.is_some() {
                        self.step_down(leader, "re-elected at a newer term");
                    }
                    self.nodes.get_mut(&leader).expect("node").leader_term = Some(term);
                    self.log(format!(
                        "raft: n{leader} elected for term {term} by {voters:?}; old entries kept {kept} dropped {dropped}"
                    ));
                }
                RaftEvent::Ready { leader } => {
                    let len = self.raft.log.len();
                    self.apply(leader, len);
                    let n = self.nodes.get_mut(&leader).expect("node");
                    n.ctl_leader = true;
                    n.order_seq = 0;
                    n.outbox.clear();
                    self.log(format!("raft: n{leader} ready (BecameLeader)"));
                    self.leader_step(leader, Event::BecameLeader);
                }
                RaftEvent::Committed => {
                    if let Some(l) = self.raft.leader.filter(|l| alive.contains(l)) {
                        let len = self.raft.log.len();
                        self.apply(l, len);
                    }
                }
            }
        }
        self.advance_truth();
        // Stale leaders learn of newer terms; check_quorum steps down a
        // leader that has not reached a majority for an election timeout.
        for id in self.ids.clone() {
            if !alive.contains(&id) {
                continue;
            }
            let Some(lt) = self.nodes[&id].leader_term else {
                continue;
            };
            let newer = alive
                .iter()
                .filter(|m| self.net.connected(id, **m))
                .map(|m| self.nodes[m].known_term)
                .max()
                .unwrap_or(0);
            if newer > lt {
                let n = self.nodes.get_mut(&id).expect("node");
                n.known_term = n.known_term.max(newer);
                self.step_down(id, "a newer term exists");
                continue;
            }
            if self.raft.has_quorum(id, &alive, &self.net) {
                self.nodes.get_mut(&id).expect("node").quorum_lost_since = None;
            } else {
                let since = *self
                    .nodes
                    .get_mut(&id)
                    .expect("node")
                    .quorum_lost_since
                    .get_or_insert(self.now);
                if self.now >= since + self.t.election_ms {
                    self.step_down(id, "check_quorum");
                }
            }
        }
        if self.now.is_multiple_of(self.t.append_ms) {
            if let Some(l) = self.raft.leader.filter(|l| alive.contains(l)) {
                let upto = self.raft.log.len();
                let term = self.raft.term;
                for m in self.ids.clone() {
                    if m != l {
                        self.send(Msg::Append {
                            from: l,
                            to: m,
                            term,
                            upto,
                        });
                    }
                }
            }
        }
        if self.now.is_multiple_of(OPERATOR_EVERY_MS) {
            self.operator();
        }
        self.at(self.now + RAFT_TICK_MS, Ev::RaftTick);
    }

    /// The operator's admin wishes, proposed through the ready leader until
    /// the committed state shows them.
    fn operator(&mut self) {
        let Some(l) = self.raft.leader.filter(|_| self.raft.ready) else {
            return;
        };
        let wanted: Vec<(NodeId, AdminState)> = self
            .admin_wanted
            .iter()
            .filter(|(id, a)| self.truth.admin(**id) != Some(**a))
            .map(|(id, a)| (*id, *a))
            .collect();
        for (id, admin) in wanted {
            let at = self.now + self.commit_delay();
            let term = self.raft.term;
            if self
                .raft
                .propose(l, term, Command::SetNodeAdmin { id, admin }, at)
            {
                self.log(format!("operator: node {id} {}", admin.as_str()));
            }
        }
    }

    fn advance_truth(&mut self) {
        while self.truth_applied < self.raft.log.len() {
            let cmd = self.raft.log[self.truth_applied].clone();
            self.truth_applied += 1;
            let ok = self.truth.apply(&cmd).is_ok();
            if let Command::SetPlacement {
                vserver,
                node,
                generation,
                reason,
                ..
            } = &cmd
            {
                if ok {
                    *self.stats.moves.entry(reason.clone()).or_default() += 1;
                }
                self.log(format!(
                    "raft: committed {vserver} -> n{node} gen {generation} ({reason}){}",
                    if ok {
                        ""
                    } else {
                        " [refused: compare-and-set]"
                    }
                ));
            }
        }
    }

    // ---- faults ----

    fn fault(&mut self, f: Fault) {
        if let Some(n) = f.frees() {
            self.busy.remove(&n);
        }
        match f {
            Fault::Next => {
                if self.now >= self.heal_at {
                    return;
                }
                let busy = self.busy.clone();
                let view = faults::View {
                    nodes: &self.ids,
                    hosts: &self.hosts,
                    vservers: &self.vservers,
                    leader: self.raft.leader,
                    busy: &busy,
                    partitioned: self.net.partitioned(),
                    lease_ms: self.t.lease_ms,
                };
                let picked = faults::pick(&mut self.rng, &view);
                for (delay, f) in picked {
                    if let Some(n) = f.occupies() {
                        self.busy.insert(n);
                    }
                    self.at(self.now + delay, Ev::Fault(f));
                }
                let next = self.rng.gen_range(200..=1500);
                self.at(self.now + next, Ev::Fault(Fault::Next));
            }
            Fault::CrashAgent(id) => self.crash_agent(id),
            Fault::RestartAgent(id) => self.restart_agent(id),
            Fault::Pause(id) => {
                let n = self.nodes.get_mut(&id).expect("node");
                if n.machine_up && n.agent == Agent::Up {
                    n.agent = Agent::Paused;
                    n.agent_epoch += 1;
                    self.fault_count("pause");
                    self.log(format!("FAULT n{id} agent paused (SIGSTOP)"));
                }
            }
            Fault::Resume(id) => self.resume(id),
            Fault::KillNode(id) => {
                let n = self.nodes.get_mut(&id).expect("node");
                if n.machine_up {
                    n.machine_up = false;
                    n.agent = Agent::Down;
                    n.copies.clear();
                    n.held.clear();
                    n.leader_term = None;
                    n.ctl_leader = false;
                    self.raft.leader_gone(id);
                    self.fault_count("node death");
                    self.log(format!("FAULT n{id} node dies (agent, guard and vservers)"));
                }
            }
            Fault::BootNode(id) => self.boot(id),
            Fault::Partition(side) => {
                self.net.partition(side);
                self.fault_count("partition");
                let d = self.net.describe();
                self.log(format!("FAULT partition {d}"));
            }
            Fault::HealPartition => {
                if self.net.partitioned() {
                    self.net.heal();
                    self.log("partition healed".into());
                }
            }
            Fault::Lossy {
                loss_permille,
                spike_permille,
                spike_ms,
            } => {
                self.net.loss_permille = loss_permille;
                self.net.spike_permille = spike_permille;
                self.net.spike_ms = spike_ms;
                self.fault_count("lossy network");
                self.log(format!(
                    "FAULT network: loss {loss_permille}‰, delay spikes {spike_permille}‰ up to {spike_ms} ms"
                ));
            }
            Fault::NetNormal => {
                self.net.loss_permille = 0;
                self.net.spike_permille = 0;
            }
            Fault::VserverFails(id, v) => {
                let n = self.nodes.get_mut(&id).expect("node");
                if let Some(c) = n.copies.get_mut(&v).filter(|c| c.procs && !c.failed) {
                    c.failed = true;
                    self.fault_count("vserver failure");
                    self.log(format!("FAULT {v} fails its health check on n{id}"));
                }
            }
            Fault::Drain(id) => {
                self.admin_wanted.insert(id, AdminState::Draining);
                self.fault_count("drain");
                self.log(format!("FAULT operator drains n{id}"));
            }
            Fault::Undrain(id) => {
                self.admin_wanted.insert(id, AdminState::Active);
            }
            Fault::HealAll => {
                self.log("HEAL: every fault ends now".into());
                self.net.heal();
                self.net.loss_permille = 0;
                self.net.spike_permille = 0;
                for id in self.ids.clone() {
                    self.resume(id);
                    self.restart_agent(id);
                    self.boot(id);
                    self.admin_wanted.insert(id, AdminState::Active);
                }
                self.busy.clear();
            }
        }
    }

    fn crash_agent(&mut self, id: NodeId) {
        let n = self.nodes.get_mut(&id).expect("node");
        if !n.machine_up || n.agent == Agent::Down {
            return;
        }
        n.agent = Agent::Down;
        n.agent_epoch += 1;
        n.held.clear();
        n.leader_term = None;
        n.ctl_leader = false;
        n.guard_kill_at = None;
        self.raft.leader_gone(id);
        self.fault_count("agent crash");
        self.log(format!(
            "FAULT n{id} agent crashes; the guard kills its vservers"
        ));
        if self.f.ignore_lease {
            return;
        }
        let victims: Vec<String> = self.nodes[&id]
            .copies
            .iter()
            .filter(|(_, c)| c.procs || c.ip)
            .map(|(v, _)| v.clone())
            .collect();
        for v in victims {
            self.stop(id, &v, true, "guard: agent died");
        }
    }

    fn restart_agent(&mut self, id: NodeId) {
        let cfg = self.t.controller();
        let n = self.nodes.get_mut(&id).expect("node");
        if !n.machine_up || n.agent != Agent::Down {
            return;
        }
        n.fresh_agent(cfg);
        let epoch = n.agent_epoch;
        self.log(format!("n{id} agent restarts"));
        self.at(self.now, Ev::AgentTick { node: id, epoch });
    }

    fn resume(&mut self, id: NodeId) {
        let n = self.nodes.get_mut(&id).expect("node");
        if !n.machine_up || n.agent != Agent::Paused {
            return;
        }
        n.agent = Agent::Up;
        n.agent_epoch += 1;
        let epoch = n.agent_epoch;
        let held = std::mem::take(&mut n.held);
        self.log(format!(
            "n{id} agent resumes (SIGCONT), {} messages waiting",
            held.len()
        ));
        for m in held {
            self.receive(m);
        }
        self.at(self.now, Ev::AgentTick { node: id, epoch });
    }

    fn boot(&mut self, id: NodeId) {
        let cfg = self.t.controller();
        let offset = self.rng.gen_range(1_000_000..1_000_000_000);
        let n = self.nodes.get_mut(&id).expect("node");
        if n.machine_up {
            return;
        }
        n.machine_up = true;
        n.boot += 1;
        // A new boot: a new monotonic clock, same crystal.
        n.clock.offset = offset;
        n.copies.clear();
        n.fresh_agent(cfg);
        let epoch = n.agent_epoch;
        self.log(format!("n{id} boots"));
        self.at(self.now, Ev::AgentTick { node: id, epoch });
    }
}
