//! Drawing the next fault (and when it ends) from the seed.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use vsha_agent::model::NodeId;

#[derive(Debug, Clone)]
pub enum Fault {
    /// Start another fault (only during the fault phase).
    Next,
    CrashAgent(NodeId),
    RestartAgent(NodeId),
    Pause(NodeId),
    Resume(NodeId),
    KillNode(NodeId),
    BootNode(NodeId),
    Partition(BTreeMap<NodeId, u8>),
    HealPartition,
    Lossy {
        loss_permille: u32,
        spike_permille: u32,
        spike_ms: u64,
    },
    NetNormal,
    /// The health check of `vserver` starts failing on `node`.
    VserverFails(NodeId, String),
    /// The operator drains a node / makes it active again.
    Drain(NodeId),
    Undrain(NodeId),
    /// End of the fault phase: everything heals.
    HealAll,
}

impl Fault {
    /// Which node the fault occupies until its end event, if any.
    pub fn occupies(&self) -> Option<NodeId> {
        match self {
            Fault::CrashAgent(n) | Fault::Pause(n) | Fault::KillNode(n) => Some(*n),
            _ => None,
        }
    }

    pub fn frees(&self) -> Option<NodeId> {
        match self {
            Fault::RestartAgent(n) | Fault::Resume(n) | Fault::BootNode(n) => Some(*n),
            _ => None,
        }
    }
}

/// What the fault picker may look at.
pub struct View<'a> {
    pub nodes: &'a [NodeId],
    pub hosts: &'a [NodeId],
    pub vservers: &'a [String],
    pub leader: Option<NodeId>,
    /// Nodes under a node fault right now.
    pub busy: &'a BTreeSet<NodeId>,
    pub partitioned: bool,
    pub lease_ms: u64,
}

/// The next fault as (delay from now, fault) pairs: the fault and its end.
pub fn pick(rng: &mut StdRng, v: &View<'_>) -> Vec<(u64, Fault)> {
    let free: Vec<NodeId> = v
        .nodes
        .iter()
        .copied()
        .filter(|n| !v.busy.contains(n))
        .collect();
    // At most two nodes down at once: enough to break a majority sometimes.
    let node_fault_ok = v.busy.len() < 2 && !free.is_empty();
    let target = |rng: &mut StdRng| -> Option<NodeId> {
        if let Some(l) = v.leader.filter(|l| free.contains(l)) {
            if rng.gen_bool(0.4) {
                return Some(l);
            }
        }
        free.choose(rng).copied()
    };
    let lease = v.lease_ms;
    match rng.gen_range(0..100) {
        0..=14 if node_fault_ok => {
            let Some(n) = target(rng) else { return vec![] };
            vec![
                (0, Fault::CrashAgent(n)),
                (rng.gen_range(100..=3000), Fault::RestartAgent(n)),
            ]
        }
        15..=32 if node_fault_ok => {
            let Some(n) = target(rng) else { return vec![] };
            let len = if rng.gen_bool(0.7) {
                rng.gen_range(lease + 1..=4 * lease)
            } else {
                rng.gen_range(50..=lease)
            };
            vec![(0, Fault::Pause(n)), (len, Fault::Resume(n))]
        }
        33..=45 if node_fault_ok => {
            let Some(n) = target(rng) else { return vec![] };
            vec![
                (0, Fault::KillNode(n)),
                (rng.gen_range(300..=6000), Fault::BootNode(n)),
            ]
        }
        46..=65 if !v.partitioned => {
            let mut side = BTreeMap::new();
            match rng.gen_range(0..3) {
                0 => {
                    // The leader alone.
                    let l = v.leader.unwrap_or(v.nodes[0]);
                    side.insert(l, 1);
                }
                1 => {
                    // A random minority.
                    let mut ns = v.nodes.to_vec();
                    ns.shuffle(rng);
                    let k = rng.gen_range(1..=(ns.len() - 1) / 2);
                    for n in &ns[..k] {
                        side.insert(*n, 1);
                    }
                }
                _ => {
                    // Any split, in up to three parts.
                    for n in v.nodes {
                        side.insert(*n, rng.gen_range(0..3));
                    }
                }
            }
            vec![
                (0, Fault::Partition(side)),
                (rng.gen_range(200..=5000), Fault::HealPartition),
            ]
        }
        66..=79 => vec![
            (
                0,
                Fault::Lossy {
                    loss_permille: rng.gen_range(0..=400),
                    spike_permille: rng.gen_range(0..=150),
                    spike_ms: rng.gen_range(50..=2 * lease),
                },
            ),
            (rng.gen_range(300..=4000), Fault::NetNormal),
        ],
        80..=91 => {
            let (Some(n), Some(vs)) = (v.hosts.choose(rng), v.vservers.choose(rng)) else {
                return vec![];
            };
            vec![(0, Fault::VserverFails(*n, vs.clone()))]
        }
        92..=99 => {
            let Some(n) = v.hosts.choose(rng) else {
                return vec![];
            };
            vec![
                (0, Fault::Drain(*n)),
                (rng.gen_range(500..=6000), Fault::Undrain(*n)),
            ]
        }
        _ => vec![],
    }
}
