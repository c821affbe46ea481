//! Deterministic in-process simulation of 3 and 5 Raft nodes on real disk
//! storage, driven from one seed: messages are dropped, delayed (so
//! reordered), duplicated; the network is partitioned and healed; nodes
//! crash and restart from disk. Invariants: every node's state machine at a
//! given applied index is identical to every other's at that index (no
//! divergence, nothing committed is ever rolled back), every acknowledged
//! write survives, and after healing all nodes converge.
//!
//! A failure names its seed; rerun one with `VSHA_SIM_SEED=N`. More seeds:
//! `VSHA_SIM_SEEDS=200`.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vsha_agent::command::{Command, ProposalId};
use vsha_agent::model::{AdminState, Limits, NodeRecord, Role, VserverSpec};
use vsha_agent::raft_node::{CoreConfig, RaftCore};

mod common;
use common::NodeHost;

struct InFlight {
    deliver_at: u64,
    from: u64,
    to: u64,
    bytes: Vec<u8>,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    dir: tempfile::TempDir,
    members: Vec<NodeRecord>,
    nodes: BTreeMap<u64, NodeHost>,
    /// Step at which a crashed node comes back.
    down_until: HashMap<u64, u64>,
    net: Vec<InFlight>,
    /// Partition: node -> side; messages cross only within one side.
    side: HashMap<u64, u8>,
    step: u64,
    /// applied index -> digest of the state at that index (first seen).
    history: HashMap<u64, String>,
    /// Names whose AddVserver was applied with success somewhere.
    acknowledged: Vec<String>,
    next_name: u64,
    incarnation: u64,
    /// Per node, the applied index when its state was last digested.
    last_applied: HashMap<u64, u64>,
    stats: Stats,
}

/// What a run exercised, so a schedule that tests nothing is noticed.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    snapshots_delivered: u64,
    restarts: u64,
    partitions: u64,
    acknowledged: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.snapshots_delivered += o.snapshots_delivered;
        self.restarts += o.restarts;
        self.partitions += o.partitions;
        self.acknowledged += o.acknowledged;
    }
}

fn spec(name: &str, n: u64) -> VserverSpec {
    VserverSpec {
        name: name.into(),
        tree: format!("/srv/{name}"),
        ip: Ipv4Addr::from(0x0a00_0000u32 + n as u32 + 1),
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

fn sim_dir() -> tempfile::TempDir {
    // tmpfs makes fsync free, so thousands of simulated steps stay quick.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

impl Sim {
    fn new(seed: u64, n: u64) -> Sim {
        let members: Vec<NodeRecord> = (1..=n)
            .map(|id| NodeRecord {
                id,
                addr: format!("sim-{id}"),
                role: Role::Voter,
                iface: String::new(),
                admin: AdminState::Active,
            })
            .collect();
        let mut sim = Sim {
            seed,
            rng: StdRng::seed_from_u64(seed),
            dir: sim_dir(),
            members,
            nodes: BTreeMap::new(),
            down_until: HashMap::new(),
            net: Vec::new(),
            side: HashMap::new(),
            step: 0,
            history: HashMap::new(),
            acknowledged: Vec::new(),
            next_name: 0,
            incarnation: seed,
            last_applied: HashMap::new(),
            stats: Stats::default(),
        };
        for id in 1..=n {
            let open = sim.opener(id);
            sim.nodes.insert(id, NodeHost::new(open));
        }
        sim
    }

    fn opener(&self, id: u64) -> impl FnOnce() -> RaftCore + Send + 'static {
        let mut cfg = CoreConfig::new(id);
        cfg.snapshot_interval = 16;
        let dir = self.dir.path().join(format!("n{id}"));
        let members = self.members.clone();
        let seed = self.seed;
        move || {
            RaftCore::open(cfg, &dir, Some(&members))
                .unwrap_or_else(|e| panic!("seed {seed}: open node {id}: {e}"))
        }
    }

    fn digest(core: &RaftCore) -> String {
        core.read_state(|s| serde_json::to_string(s).unwrap())
    }

    fn leader(&self) -> Option<u64> {
        self.nodes
            .iter()
            .filter_map(|(id, h)| {
                h.run(|c| c.as_ref().filter(|c| c.is_leader()).map(|c| c.term()))
                    .map(|term| (term, *id))
            })
            .max()
            .map(|(_, id)| id)
    }

    fn connected(&self, a: u64, b: u64) -> bool {
        self.side.get(&a).copied().unwrap_or(0) == self.side.get(&b).copied().unwrap_or(0)
    }

    /// One simulated tick: deliver due messages, tick and drain every node.
    fn tick(&mut self, faults: bool) {
        self.step += 1;
        let now = self.step;
        // Restarts.
        let back: Vec<u64> = self
            .down_until
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in back {
            self.down_until.remove(&id);
            let open = self.opener(id);
            self.nodes[&id].run(move |c| *c = Some(open()));
        }
        // Delivery, in the (shuffled-by-delay) order messages became due.
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.net.len() {
            if self.net[i].deliver_at <= now {
                due.push(self.net.swap_remove(i));
            } else {
                i += 1;
            }
        }
        for m in due {
            if !self.connected(m.from, m.to) {
                continue;
            }
            let bytes = m.bytes;
            self.nodes[&m.to].run(move |c| {
                if let Some(core) = c {
                    core.step(&bytes).expect("well-formed message");
                }
            });
        }
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            let up = self.nodes[&id].run(|c| match c {
                Some(core) => {
                    core.tick();
                    core.leader_duties();
                    true
                }
                None => false,
            });
            if up {
                self.drain(id);
            }
        }
        if faults {
            self.inject_faults();
        }
    }

    fn drain(&mut self, id: u64) {
        loop {
            let seed = self.seed;
            let last = self.last_applied.get(&id).copied();
            let (progress, applied, digest) = self.nodes[&id].run(move |c| {
                let core = c.as_mut().expect("node is up");
                let progress = core
                    .process_ready()
                    .unwrap_or_else(|e| panic!("seed {seed}: node {id}: {e}"));
                let applied = core.applied_index();
                let digest = if last != Some(applied) {
                    Self::digest(core)
                } else {
                    String::new()
                };
                (progress, applied, digest)
            });
            let moved = self.last_applied.insert(id, applied) != Some(applied);
            let idle = progress.messages.is_empty() && progress.applied.is_empty();
            for a in &progress.applied {
                if let (Some(pid), Ok(())) = (a.id, &a.result) {
                    if pid.proposer == id && pid.incarnation == self.incarnation {
                        self.acknowledged.push(format!("vs{}", pid.seq));
                    }
                }
            }
            // Every node passing through an index must hold the same state there.
            match self.history.get(&applied).filter(|_| moved) {
                Some(seen) if *seen != digest => panic!(
                    "seed {}: node {id} diverged at applied index {applied}\n  seen: {seen}\n  node: {digest}",
                    self.seed
                ),
                Some(_) => {}
                None if moved => {
                    self.history.insert(applied, digest);
                }
                None => {}
            }
            for m in progress.messages {
                let (drop_p, dup_p) = (0.05, 0.03);
                if m.snapshot {
                    // The real transport reports every snapshot's fate; so does the sim.
                    let delivered = !self.rng.gen_bool(drop_p) && self.connected(id, m.to);
                    let to = m.to;
                    self.nodes[&id].run(move |c| {
                        if let Some(core) = c {
                            core.report_snapshot(to, delivered);
                        }
                    });
                    if delivered {
                        self.stats.snapshots_delivered += 1;
                        self.net.push(InFlight {
                            deliver_at: self.step + 1,
                            from: id,
                            to: m.to,
                            bytes: m.bytes,
                        });
                    }
                    continue;
                }
                if self.rng.gen_bool(drop_p) {
                    continue;
                }
                let copies = if self.rng.gen_bool(dup_p) { 2 } else { 1 };
                for _ in 0..copies {
                    let delay = self.rng.gen_range(0..3);
                    self.net.push(InFlight {
                        deliver_at: self.step + 1 + delay,
                        from: id,
                        to: m.to,
                        bytes: m.bytes.clone(),
                    });
                }
            }
            if idle {
                break;
            }
        }
    }

    fn inject_faults(&mut self) {
        let n = self.members.len() as u64;
        let r: f64 = self.rng.gen();
        if r < 0.004 {
            // Partition into a random split.
            self.side.clear();
            self.stats.partitions += 1;
            for id in 1..=n {
                self.side.insert(id, self.rng.gen_range(0..2));
            }
        } else if r < 0.010 {
            self.side.clear();
        } else if r < 0.014 {
            // Crash one node, unless a majority is already down.
            let down = self.down_until.len() as u64;
            if down < (n - 1) / 2 {
                let id = self.rng.gen_range(1..=n);
                if self.nodes[&id].up() {
                    self.nodes[&id].run(|c| *c = None);
                    self.stats.restarts += 1;
                    let back = self.step + self.rng.gen_range(5..60);
                    self.down_until.insert(id, back);
                }
            }
        }
        // Client proposals through whoever is leader now.
        if self.rng.gen_bool(0.15) {
            if let Some(l) = self.leader() {
                let seq = self.next_name;
                self.next_name += 1;
                let name = format!("vs{seq}");
                let id = ProposalId {
                    proposer: l,
                    incarnation: self.incarnation,
                    seq,
                };
                self.nodes[&l].run(move |c| {
                    if let Some(core) = c {
                        let _ = core.propose(Some(id), Command::AddVserver(spec(&name, seq)));
                    }
                });
            }
        }
    }

    fn heal(&mut self) {
        self.side.clear();
        let down: Vec<u64> = self.down_until.keys().copied().collect();
        for id in down {
            self.down_until.insert(id, self.step);
        }
    }

    fn converged(&self) -> bool {
        let marks: Vec<Option<(u64, u64)>> = self
            .nodes
            .values()
            .map(|h| h.run(|c| c.as_ref().map(|c| (c.applied_index(), c.commit_index()))))
            .collect();
        if marks.iter().any(|m| m.is_none()) || self.leader().is_none() {
            return false;
        }
        marks.windows(2).all(|w| w[0] == w[1])
    }
}

fn run(seed: u64, n: u64, steps: u64) -> Stats {
    let mut sim = Sim::new(seed, n);
    for _ in 0..steps {
        sim.tick(true);
    }
    sim.heal();
    let mut settled = 0;
    for _ in 0..3000 {
        sim.tick(false);
        if sim.converged() {
            settled += 1;
            if settled > 30 {
                break;
            }
        } else {
            settled = 0;
        }
    }
    if !sim.converged() {
        for (id, h) in &sim.nodes {
            let line = h.run(|c| {
                c.as_ref().map(|c| {
                    format!(
                        "leader={} is_leader={} term={} commit={} applied={} snap={}",
                        c.leader_id(),
                        c.is_leader(),
                        c.term(),
                        c.commit_index(),
                        c.applied_index(),
                        c.snapshot_index()
                    )
                })
            });
            eprintln!("node {id}: {}", line.unwrap_or_else(|| "down".into()));
        }
        panic!("seed {seed}: cluster of {n} did not converge after healing");
    }
    let digests: Vec<String> = sim
        .nodes
        .values()
        .map(|h| h.run(|c| Sim::digest(c.as_ref().expect("up after healing"))))
        .collect();
    assert!(
        digests.windows(2).all(|w| w[0] == w[1]),
        "seed {seed}: final states differ"
    );
    let state = sim.nodes[&1].run(|c| c.as_ref().expect("up").read_state(|s| s.clone()));
    assert!(
        !state.cluster_id.is_empty(),
        "seed {seed}: never bootstrapped"
    );
    for name in &sim.acknowledged {
        assert!(
            state.vservers.contains_key(name),
            "seed {seed}: acknowledged write {name} was lost"
        );
    }
    assert!(
        !sim.acknowledged.is_empty(),
        "seed {seed}: no write was acknowledged at all; the schedule is too hostile to test anything"
    );
    sim.stats.acknowledged = sim.acknowledged.len() as u64;
    sim.stats
}

fn run_all(n: u64, seeds: Vec<u64>) {
    let mut total = Stats::default();
    let many = seeds.len() > 1;
    for seed in seeds {
        total += run(seed, n, 1200);
    }
    eprintln!("{n} nodes: {total:?}");
    if many {
        assert!(total.restarts > 0, "no node was ever restarted: {total:?}");
        assert!(total.partitions > 0, "no partition happened: {total:?}");
        assert!(
            total.snapshots_delivered > 0,
            "no lagging node ever caught up by snapshot: {total:?}"
        );
    }
}

fn seeds(default: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("VSHA_SIM_SEED") {
        return vec![s.parse().expect("VSHA_SIM_SEED must be a number")];
    }
    let count = std::env::var("VSHA_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    (1..=count).collect()
}

#[test]
fn three_nodes_under_faults_agree() {
    run_all(3, seeds(16));
}

#[test]
fn five_nodes_under_faults_agree() {
    run_all(5, seeds(8).into_iter().map(|s| 1000 + s).collect());
}
