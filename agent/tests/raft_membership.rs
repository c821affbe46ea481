//! Membership on real cores and disk, in process, on a perfect network:
//! nodes are added as learners, those that want a vote are promoted only
//! while fewer than `max_voters` voters exist, `--learner` nodes never are,
//! and removing a voter (the leader included) frees a slot for a learner.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use vsha_agent::command::Command;
use vsha_agent::model::{AdminState, NodeRecord, Role};
use vsha_agent::raft_node::{CoreConfig, ProposeRefused, RaftCore};
use vsha_agent::state::ClusterState;

mod common;
use common::NodeHost;

fn record(id: u64, role: Role) -> NodeRecord {
    NodeRecord {
        id,
        addr: format!("mem-{id}"),
        role,
        iface: String::new(),
        admin: AdminState::Active,
    }
}

struct Net {
    dir: Arc<tempfile::TempDir>,
    nodes: BTreeMap<u64, NodeHost>,
}

impl Net {
    fn open(&mut self, id: u64, initial: Option<Vec<NodeRecord>>) {
        let dir = self.dir.path().join(format!("n{id}"));
        self.nodes.insert(
            id,
            NodeHost::new(move || {
                let mut cfg = CoreConfig::new(id);
                cfg.max_voters = 3;
                cfg.snapshot_interval = 8;
                RaftCore::open(cfg, &dir, initial.as_deref()).expect("open core")
            }),
        );
    }

    /// One round: every node ticks and drains; every message is delivered.
    fn round(&mut self) {
        let mut mail = Vec::new();
        for host in self.nodes.values() {
            mail.extend(host.run(|c| {
                let core = c.as_mut().unwrap();
                core.tick();
                core.leader_duties();
                let mut out = Vec::new();
                loop {
                    let p = core.process_ready().expect("ready");
                    if p.messages.is_empty() && p.applied.is_empty() {
                        break;
                    }
                    for m in p.messages {
                        if m.snapshot {
                            core.report_snapshot(m.to, true);
                        }
                        out.push(m);
                    }
                }
                out
            }));
        }
        for m in mail {
            if let Some(host) = self.nodes.get(&m.to) {
                host.run(move |c| c.as_mut().unwrap().step(&m.bytes).expect("step"));
            }
        }
    }

    fn until(&mut self, what: &str, mut f: impl FnMut(&mut Net) -> bool) {
        for _ in 0..3000 {
            self.round();
            if f(self) {
                return;
            }
        }
        panic!("never reached: {what}");
    }

    fn leader(&self) -> Option<u64> {
        self.nodes
            .iter()
            .find(|(_, h)| h.run(|c| c.as_ref().unwrap().is_leader()))
            .map(|(id, _)| *id)
    }

    fn state(&self, id: u64) -> ClusterState {
        self.nodes[&id].run(|c| c.as_ref().unwrap().read_state(|s| s.clone()))
    }

    fn membership(&self, id: u64) -> (BTreeSet<u64>, BTreeSet<u64>) {
        self.nodes[&id].run(|c| c.as_ref().unwrap().membership())
    }

    /// Proposes on whoever leads until the proposal is accepted.
    fn propose(&mut self, cmd: Command) {
        for _ in 0..3000 {
            if let Some(l) = self.leader() {
                let c = cmd.clone();
                let r = self.nodes[&l].run(move |core| core.as_mut().unwrap().propose(None, c));
                match r {
                    Ok(()) => return,
                    Err(ProposeRefused::State(e)) => panic!("refused: {e}"),
                    Err(_) => {}
                }
            }
            self.round();
        }
        panic!("proposal never accepted: {cmd:?}");
    }
}

#[test]
fn learners_promoted_up_to_max_voters_and_witnesses_vote() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut net = Net {
        dir,
        nodes: BTreeMap::new(),
    };
    let initial: Vec<NodeRecord> = (1..=3).map(|i| record(i, Role::Voter)).collect();
    for id in 1..=3 {
        net.open(id, Some(initial.clone()));
    }
    net.until("a bootstrapped leader", |n| {
        n.leader()
            .is_some_and(|l| !n.state(l).cluster_id.is_empty())
    });

    net.propose(Command::AddNode(record(4, Role::Voter)));
    net.propose(Command::AddNode(record(5, Role::Learner)));
    net.propose(Command::AddNode(record(6, Role::Witness)));
    for id in 4..=6 {
        net.open(id, None);
    }
    net.until("nodes 4-6 hold the state", |n| {
        (4..=6).all(|id| n.state(id).nodes.len() == 6)
    });
    for _ in 0..100 {
        net.round();
    }
    // Three voters already: everybody else stays a learner.
    let (voters, learners) = net.membership(1);
    assert_eq!(voters, BTreeSet::from([1, 2, 3]));
    assert_eq!(learners, BTreeSet::from([4, 5, 6]));

    // Remove the current leader: leadership moves, the removal goes through,
    // and a learner that wants a vote takes the free slot.
    let old_leader = net.leader().unwrap();
    net.propose(Command::RemoveNode { id: old_leader });
    let survivor = (1..=3).find(|i| *i != old_leader).unwrap();
    net.until("a learner promoted into the freed slot", |n| {
        let (v, _) = n.membership(survivor);
        v.len() == 3 && !v.contains(&old_leader)
    });
    let (voters, learners) = net.membership(survivor);
    let promoted: Vec<u64> = voters.iter().copied().filter(|v| *v >= 4).collect();
    assert_eq!(
        promoted.len(),
        1,
        "exactly one learner promoted: {voters:?}"
    );
    assert!(promoted[0] == 4 || promoted[0] == 6, "{promoted:?}");
    assert!(learners.contains(&5), "a --learner node is never promoted");
    assert!(!net.state(survivor).nodes.contains_key(&old_leader));

    // The removed node can no longer be proposed to; everyone else agrees.
    let states: Vec<ClusterState> = (1..=6)
        .filter(|i| *i != old_leader)
        .map(|i| net.state(i))
        .collect();
    for w in states.windows(2) {
        assert_eq!(w[0], w[1]);
    }
}
