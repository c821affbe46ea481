//! Seeded property test of the failover controller over random event
//! sequences: crashes, recoveries, partitions, leader changes, late-applied
//! proposals, health failures, admin changes, forced failovers.
//!
//! Invariants, checked at every step:
//! - `no_early_reassignment`: a vserver is proposed onto another node by a
//!   failover only if its holder's lease plus the drift margin has run out
//!   (measured from the last renewal any leader ever received), by a planned
//!   move only once the holder has reported it stopped at that generation;
//! - `generation_grows`: a proposal carries current generation + 1 and
//!   expects the current one;
//! - `single_copy`: a node starts a vserver only while no other node runs it
//!   (nodes self-fence when their own lease ends);
//! - `followers_silent`: a follower's controller emits nothing;
//! - `runs_after_heal` (liveness): once every fault heals, every vserver with
//!   a group runs on its holder.
//!
//! A failure names the seed; rerun one with `CONTROLLER_SEED=N`; run more
//! with `CONTROLLER_SEEDS=N` (default 300).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use vsha_agent::controller::{
    Cmd, Controller, ControllerConfig, Event, MoveReason, Now, Observed, PlacementChange, SyncKind,
    VserverReport,
};
use vsha_agent::model::{
    AdminState, Desired, Failback, FailoverGroup, Limits, NodeId, NodeRecord, Placement,
    ReplicaStatus, Role, Vserver, VserverSpec,
};
use vsha_agent::state::ClusterState;

const LEASE: u64 = 1000;

#[derive(Default, Clone)]
struct NodeSim {
    up: bool,
    /// Renewals and commands to and from this node are lost.
    cut: bool,
    /// The node's own lease: last renewal the leader acknowledged.
    lease_from: Option<u64>,
    /// vserver → generation it runs at.
    running: BTreeMap<String, u64>,
    restarts: BTreeMap<(String, u64), u32>,
    failed: BTreeSet<String>,
    /// Clock drift: the node's own lease ends this much later in real time
    /// (always below the controller's drift margin).
    late: u64,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    now: u64,
    cfg: ControllerConfig,
    state: ClusterState,
    leader: Controller,
    follower: Controller,
    nodes: BTreeMap<NodeId, NodeSim>,
    /// Last renewal any leader received from each node (ground truth).
    renewed: BTreeMap<NodeId, u64>,
    log: Vec<PlacementChange>,
    streams: BTreeSet<(String, NodeId, NodeId, u64)>,
    trace: Vec<String>,
    /// What happened, to show the histories are not trivial.
    stats: BTreeMap<String, u64>,
    /// (vserver, node, generation) the node told the leader it stopped.
    acked_stop: BTreeSet<(String, NodeId, u64)>,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let cfg = ControllerConfig {
            lease_ms: LEASE,
            drift_margin_ms: rng.gen_range(50..=400),
            max_restarts: rng.gen_range(0..=3),
            proposal_retry_ms: rng.gen_range(200..=2000),
        };
        let n = rng.gen_range(2..=5u64);
        let witness = if n >= 3 && rng.gen_bool(0.5) {
            Some(n)
        } else {
            None
        };
        let mut state = ClusterState::default();
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            state.nodes.insert(
                id,
                NodeRecord {
                    id,
                    addr: format!("127.0.0.{id}:7700"),
                    role: if Some(id) == witness {
                        Role::Witness
                    } else {
                        Role::Voter
                    },
                    iface: String::new(),
                    admin: AdminState::Active,
                },
            );
            let late = rng.gen_range(0..cfg.drift_margin_ms);
            nodes.insert(
                id,
                NodeSim {
                    up: true,
                    late,
                    ..NodeSim::default()
                },
            );
        }
        let hosts: Vec<NodeId> = (1..=n).filter(|&i| Some(i) != witness).collect();
        for v in 0..rng.gen_range(1..=3u8) {
            let name = format!("vs{v}");
            let mut g = hosts.clone();
            g.shuffle(&mut rng);
            g.truncate(rng.gen_range(1..=hosts.len()));
            let failback = *[Failback::Never, Failback::Auto, Failback::Manual]
                .choose(&mut rng)
                .unwrap_or(&Failback::Never);
            let placement = rng.gen_bool(0.5).then(|| Placement {
                node: g[0],
                generation: rng.gen_range(1..=5),
                desired: Desired::Running,
                observed: "unknown".into(),
            });
            state.vservers.insert(
                name.clone(),
                Vserver {
                    spec: VserverSpec {
                        name: name.clone(),
                        tree: format!("/vservers/{name}"),
                        ip: Ipv4Addr::new(10, 0, 0, 10 + v),
                        prefix: 24,
                        dev: String::new(),
                        hostname: name.clone(),
                        capabilities: vec![],
                        limits: Limits::default(),
                        start_command: vec![],
                        stop_command: vec![],
                        health: None,
                        max_rpo_ms: if rng.gen_bool(0.5) {
                            0
                        } else {
                            rng.gen_range(500..=5000)
                        },
                    },
                    group: Some(FailoverGroup {
                        nodes: g,
                        failback,
                        failback_stable_ms: rng.gen_range(0..=4000),
                    }),
                    placement,
                    replicas: BTreeMap::new(),
                    desired: None,
                },
            );
        }
        let mut sim = Sim {
            seed,
            rng,
            now: 0,
            cfg,
            state,
            leader: Controller::new(cfg),
            follower: Controller::new(cfg),
            nodes,
            renewed: BTreeMap::new(),
            log: Vec::new(),
            streams: BTreeSet::new(),
            trace: Vec::new(),
            stats: BTreeMap::new(),
            acked_stop: BTreeSet::new(),
        };
        sim.feed(Event::BecameLeader);
        sim
    }

    fn fail(&self, what: String) -> ! {
        let tail: Vec<&String> = self.trace.iter().rev().take(40).rev().collect();
        panic!(
            "seed {}: {what}\nlast events:\n  {}\nrerun with CONTROLLER_SEED={}",
            self.seed,
            tail.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  "),
            self.seed
        );
    }

    fn reachable(&self, n: NodeId) -> bool {
        self.nodes.get(&n).is_some_and(|s| s.up && !s.cut)
    }

    /// Nodes stop everything once their own lease ends (self-fencing).
    fn self_fence(&mut self) {
        for s in self.nodes.values_mut() {
            let valid = s.lease_from.is_some_and(|t| self.now < t + LEASE + s.late);
            if !valid {
                s.running.clear();
            }
        }
    }

    fn feed(&mut self, ev: Event) {
        self.trace.push(format!("{:>6} {ev:?}", self.now));
        if let Event::Report(r) = &ev {
            if r.state == Observed::Stopped {
                self.acked_stop
                    .insert((r.vserver.clone(), r.node, r.generation));
            }
        }
        let now = Now::at(self.now);
        // The follower hears everything but leadership.
        if ev != Event::BecameLeader {
            self.follower.step(&self.state, now, ev.clone());
            let quiet = self.follower.take_commands();
            if !quiet.is_empty() {
                self.fail(format!("followers_silent: follower emitted {quiet:?}"));
            }
        }
        self.leader.step(&self.state, now, ev);
        let cmds = self.leader.take_commands();
        for c in cmds {
            self.trace.push(format!("{:>6}   -> {c}", self.now));
            let kind = match &c {
                Cmd::Propose(p) => format!("propose {}", p.reason.as_str()),
                Cmd::Alert(a) => format!("alert {}", a.kind.as_str()),
                other => other
                    .to_string()
                    .split(' ')
                    .next()
                    .unwrap_or("")
                    .to_string(),
            };
            *self.stats.entry(kind).or_insert(0) += 1;
            self.execute(c);
        }
    }

    fn execute(&mut self, c: Cmd) {
        match c {
            Cmd::Propose(p) => {
                let current = self.state.vservers[&p.vserver]
                    .placement
                    .as_ref()
                    .map(|x| (x.node, x.generation));
                let cur_gen = current.map_or(0, |x| x.1);
                if p.expect_generation != cur_gen || p.generation != cur_gen + 1 {
                    self.fail(format!(
                        "generation_grows: {p:?} while the current generation is {cur_gen}"
                    ));
                }
                if let Some((holder, _)) = current {
                    if holder != p.to {
                        let expired = self.renewed.get(&holder).is_none_or(|&t| {
                            self.now >= t + self.cfg.lease_ms + self.cfg.drift_margin_ms
                        });
                        // A failover needs the lease surely over; a planned
                        // move needs the holder's own word that it stopped.
                        let stopped = !self.nodes[&holder].running.contains_key(&p.vserver)
                            && self
                                .acked_stop
                                .contains(&(p.vserver.clone(), holder, cur_gen));
                        let ok = match p.reason {
                            MoveReason::Failover | MoveReason::Forced => expired,
                            MoveReason::Drain
                            | MoveReason::Failback
                            | MoveReason::Health
                            | MoveReason::Migrate => stopped,
                            MoveReason::Place | MoveReason::Replace => false,
                        };
                        if !ok {
                            self.fail(format!(
                                "no_early_reassignment: {p:?} at {} but node {holder} renewed at {:?} (stop acknowledged: {stopped})",
                                self.now,
                                self.renewed.get(&holder)
                            ));
                        }
                    }
                }
                self.log.push(p);
            }
            Cmd::Start {
                vserver,
                node,
                generation,
            } => {
                if !self.reachable(node) {
                    return;
                }
                let p = self.state.vservers[&vserver].placement.clone();
                let current = p.is_some_and(|p| p.node == node && p.generation == generation);
                let lease_ok = self.nodes[&node]
                    .lease_from
                    .is_some_and(|t| self.now < t + LEASE + self.nodes[&node].late);
                if !current || !lease_ok {
                    return;
                }
                for (other, s) in &self.nodes {
                    if *other != node && s.running.contains_key(&vserver) {
                        self.fail(format!(
                            "single_copy: start {vserver} on {node} gen {generation} while node {other} runs it at gen {}",
                            s.running[&vserver]
                        ));
                    }
                }
                self.acked_stop.remove(&(vserver.clone(), node, generation));
                if let Some(s) = self.nodes.get_mut(&node) {
                    s.running.insert(vserver.clone(), generation);
                    s.failed.remove(&vserver);
                }
            }
            Cmd::Stop {
                vserver,
                node,
                generation,
            } => {
                if !self.reachable(node) {
                    return;
                }
                let ran = self
                    .nodes
                    .get_mut(&node)
                    .and_then(|s| s.running.remove(&vserver));
                let restarts = self.nodes[&node]
                    .restarts
                    .get(&(vserver.clone(), generation))
                    .copied()
                    .unwrap_or(0);
                self.feed(Event::Report(VserverReport {
                    vserver,
                    node,
                    generation: ran.unwrap_or(generation),
                    state: Observed::Stopped,
                    restarts,
                }));
            }
            Cmd::Restart {
                vserver,
                node,
                generation,
            } => {
                if !self.reachable(node) {
                    return;
                }
                if let Some(s) = self.nodes.get_mut(&node) {
                    if s.running.get(&vserver) == Some(&generation) {
                        *s.restarts.entry((vserver.clone(), generation)).or_insert(0) += 1;
                        s.failed.remove(&vserver);
                    }
                }
            }
            Cmd::Sync {
                vserver,
                from,
                to,
                generation,
                kind,
            } => {
                if kind == SyncKind::Stream {
                    self.streams.insert((vserver, from, to, generation));
                } else if self.reachable(from) && self.reachable(to) {
                    self.set_replica(&vserver, to, self.now);
                }
            }
            Cmd::Fence { .. } | Cmd::Alert(_) => {}
        }
    }

    fn set_replica(&mut self, vs: &str, node: NodeId, src: u64) {
        if let Some(v) = self.state.vservers.get_mut(vs) {
            v.replicas.insert(
                node,
                ReplicaStatus {
                    node,
                    snapshot_source_unix_ms: src,
                    digest: String::new(),
                },
            );
        }
    }

    fn renew(&mut self, n: NodeId) {
        if !self.reachable(n) {
            return;
        }
        self.renewed.insert(n, self.now);
        if let Some(s) = self.nodes.get_mut(&n) {
            s.lease_from = Some(self.now);
        }
        self.feed(Event::LeaseRenewed { node: n });
    }

    /// Raft commits one proposal (maybe one an old leader made).
    fn apply_one(&mut self) {
        if self.log.is_empty() {
            return;
        }
        let p = self.log.remove(0);
        self.trace.push(format!("{:>6} apply {p:?}", self.now));
        let Some(v) = self.state.vservers.get_mut(&p.vserver) else {
            return;
        };
        let cur = v.placement.as_ref().map_or(0, |x| x.generation);
        if cur != p.expect_generation {
            return;
        }
        v.placement = Some(Placement {
            node: p.to,
            generation: p.generation,
            desired: Desired::Running,
            observed: "unknown".into(),
        });
    }

    fn report_all(&mut self, prob: f64) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for n in ids {
            if !self.reachable(n) || !self.rng.gen_bool(prob) {
                continue;
            }
            let names: Vec<String> = self.state.vservers.keys().cloned().collect();
            for vs in names {
                let placed = self.state.vservers[&vs].placement.clone();
                let s = &self.nodes[&n];
                let running = s.running.get(&vs).copied();
                let failed = s.failed.contains(&vs);
                let ev = match (running, placed) {
                    (Some(g), _) => Some((
                        g,
                        if failed {
                            Observed::Failed {
                                reason: "check".into(),
                            }
                        } else {
                            Observed::Running
                        },
                    )),
                    (None, Some(p)) if p.node == n => Some((p.generation, Observed::Stopped)),
                    _ => None,
                };
                if let Some((generation, state)) = ev {
                    let restarts = s
                        .restarts
                        .get(&(vs.clone(), generation))
                        .copied()
                        .unwrap_or(0);
                    self.feed(Event::Report(VserverReport {
                        vserver: vs,
                        node: n,
                        generation,
                        state,
                        restarts,
                    }));
                }
            }
        }
    }

    fn replicate(&mut self) {
        let streams: Vec<_> = self.streams.iter().cloned().collect();
        for (vs, from, to, generation) in streams {
            let live = self.nodes[&from].running.get(&vs) == Some(&generation);
            if live && self.reachable(from) && self.reachable(to) {
                self.set_replica(&vs, to, self.now.saturating_sub(50));
            }
        }
    }

    fn random_step(&mut self) {
        self.now += self.rng.gen_range(0..=300);
        self.self_fence();
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for &n in &ids {
            if self.rng.gen_bool(0.6) {
                self.renew(n);
            }
        }
        let n = *ids.choose(&mut self.rng).unwrap_or(&1);
        match self.rng.gen_range(0..100) {
            0..=4 => {
                self.trace.push(format!("{:>6} crash {n}", self.now));
                if let Some(s) = self.nodes.get_mut(&n) {
                    s.up = false;
                    s.running.clear();
                    s.lease_from = None;
                }
            }
            5..=9 => {
                self.trace.push(format!("{:>6} recover {n}", self.now));
                if let Some(s) = self.nodes.get_mut(&n) {
                    s.up = true;
                }
            }
            10..=13 => {
                self.trace.push(format!("{:>6} cut {n}", self.now));
                if let Some(s) = self.nodes.get_mut(&n) {
                    s.cut = true;
                }
            }
            14..=19 => {
                self.trace.push(format!("{:>6} heal {n}", self.now));
                if let Some(s) = self.nodes.get_mut(&n) {
                    s.cut = false;
                }
            }
            20..=22 => {
                // Raft: the new leader's first entry commits or discards
                // every earlier proposal before the controller hears of
                // its leadership.
                self.trace.push(format!("{:>6} new leader", self.now));
                let pending = std::mem::take(&mut self.log);
                for p in pending {
                    if self.rng.gen_bool(0.5) {
                        self.log.push(p);
                        self.apply_one();
                    } else {
                        self.trace.push(format!("{:>6} dropped {p:?}", self.now));
                    }
                }
                self.leader = Controller::new(self.cfg);
                self.feed(Event::BecameLeader);
            }
            23..=40 => self.apply_one(),
            41..=45 => {
                // A health failure on some node running something.
                let runs: Vec<(NodeId, String)> = self
                    .nodes
                    .iter()
                    .flat_map(|(id, s)| s.running.keys().map(move |v| (*id, v.clone())))
                    .collect();
                if let Some((id, vs)) = runs.choose(&mut self.rng).cloned() {
                    self.trace
                        .push(format!("{:>6} {vs} fails on {id}", self.now));
                    if let Some(s) = self.nodes.get_mut(&id) {
                        s.failed.insert(vs);
                    }
                }
            }
            46..=49 => {
                let admin = *[
                    AdminState::Active,
                    AdminState::Active,
                    AdminState::Draining,
                    AdminState::Maintenance,
                ]
                .choose(&mut self.rng)
                .unwrap_or(&AdminState::Active);
                self.trace
                    .push(format!("{:>6} admin {n} {admin:?}", self.now));
                if let Some(r) = self.state.nodes.get_mut(&n) {
                    r.admin = admin;
                }
            }
            50..=51 => {
                let names: Vec<String> = self.state.vservers.keys().cloned().collect();
                if let Some(vs) = names.choose(&mut self.rng).cloned() {
                    let loss = self.rng.gen_bool(0.5);
                    self.feed(Event::ForceFailover {
                        vserver: vs,
                        to: n,
                        accept_data_loss: loss,
                    });
                }
            }
            _ => {}
        }
        self.replicate();
        self.report_all(0.4);
        self.feed(Event::Tick);
    }

    fn heal_and_settle(&mut self) {
        self.trace.push(format!("{:>6} heal everything", self.now));
        for s in self.nodes.values_mut() {
            s.up = true;
            s.cut = false;
            s.failed.clear();
        }
        for r in self.state.nodes.values_mut() {
            r.admin = AdminState::Active;
        }
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for _ in 0..200 {
            self.now += 100;
            self.self_fence();
            for &n in &ids {
                self.renew(n);
            }
            while !self.log.is_empty() {
                self.apply_one();
            }
            self.replicate();
            self.report_all(1.0);
            self.feed(Event::Tick);
        }
        for (name, v) in &self.state.vservers {
            let Some(p) = &v.placement else {
                self.fail(format!("runs_after_heal: {name} is still unplaced"));
            };
            let runs = self.nodes[&p.node].running.get(name) == Some(&p.generation);
            if !runs {
                self.fail(format!(
                    "runs_after_heal: {name} placed on {} gen {} does not run there",
                    p.node, p.generation
                ));
            }
        }
    }
}

fn run_seed(seed: u64) -> BTreeMap<String, u64> {
    let mut sim = Sim::new(seed);
    for _ in 0..400 {
        sim.random_step();
    }
    sim.heal_and_settle();
    sim.stats
}

#[test]
fn controller_invariants_hold_over_random_histories() {
    if let Some(seed) = std::env::var("CONTROLLER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        eprintln!("{:?}", run_seed(seed));
        return;
    }
    let seeds: u64 = std::env::var("CONTROLLER_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut total: BTreeMap<String, u64> = BTreeMap::new();
    for seed in 0..seeds {
        for (k, v) in run_seed(seed) {
            *total.entry(k).or_insert(0) += v;
        }
    }
    eprintln!("commands over {seeds} seeds: {total:?}");
    // The histories must exercise every kind of move.
    for kind in [
        "propose failover",
        "propose drain",
        "propose health",
        "propose place",
    ] {
        assert!(
            total.get(kind).is_some_and(|&n| n > 0),
            "no {kind} in {total:?}"
        );
    }
}
