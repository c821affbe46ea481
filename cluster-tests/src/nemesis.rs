//! A seeded random schedule of faults: one node at a time (so a majority
//! always remains) suffers a fault for a while, then recovers; the checker
//! watches the invariant throughout.

use std::time::{Duration, Instant};

use crate::Cluster;

/// splitmix64: small, seeded, good enough to pick faults.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL of the agent, restarted after the hold.
    KillAgent,
    /// SIGSTOP, SIGCONT after the hold.
    StopAgent,
    /// Every process killed and the cable out; rebooted after the hold.
    KillNode,
    /// Cable out, in again after the hold.
    Unplug,
    /// Drop rules between the node and every other node.
    Partition,
    /// SIGKILL and an immediate restart.
    RestartAgent,
}

const FAULTS: [Fault; 6] = [
    Fault::KillAgent,
    Fault::StopAgent,
    Fault::KillNode,
    Fault::Unplug,
    Fault::Partition,
    Fault::RestartAgent,
];

pub fn inject(c: &mut Cluster, node: u64, f: Fault) {
    match f {
        Fault::KillAgent | Fault::RestartAgent => c.kill_agent(node),
        Fault::StopAgent => c.stop_agent(node),
        Fault::KillNode => c.kill_node(node),
        Fault::Unplug => c.unplug(node),
        Fault::Partition => c.partition(&[node]),
    }
    if f == Fault::RestartAgent {
        c.restart(node);
    }
}

pub fn recover(c: &mut Cluster, node: u64, f: Fault) {
    match f {
        Fault::KillAgent => c.restart(node),
        Fault::StopAgent => c.cont_agent(node),
        Fault::KillNode => c.revive_node(node),
        Fault::Unplug => c.plug(node),
        Fault::Partition => c.heal(),
        Fault::RestartAgent => {}
    }
}

/// Runs faults on `nodes` for `length`, seeded; returns the log of what
/// was done (ms since start, node, fault, hold ms). Every fault is
/// recovered before it returns.
pub fn run(c: &mut Cluster, seed: u64, length: Duration, nodes: &[u64]) -> Vec<String> {
    let mut rng = Rng::new(seed);
    let t0 = Instant::now();
    let mut log = Vec::new();
    while t0.elapsed() < length {
        let node = nodes[rng.range(0, nodes.len() as u64 - 1) as usize];
        let f = FAULTS[rng.range(0, FAULTS.len() as u64 - 1) as usize];
        let hold = rng.range(300, 5000);
        let rest = rng.range(500, 4000);
        let line = format!(
            "{:>6} ms: node {node} {f:?} for {hold} ms",
            t0.elapsed().as_millis()
        );
        eprintln!("nemesis: {line}");
        log.push(line);
        inject(c, node, f);
        std::thread::sleep(Duration::from_millis(hold));
        recover(c, node, f);
        std::thread::sleep(Duration::from_millis(rest));
    }
    log
}
