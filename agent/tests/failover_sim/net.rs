//! The simulated network: partitions as sides, loss and delay.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::Rng;
use vsha_agent::model::NodeId;

#[derive(Debug, Clone)]
pub struct Net {
    /// node -> side; two nodes talk only when on the same side.
    side: BTreeMap<NodeId, u8>,
    /// Loss probability, per mille.
    pub loss_permille: u32,
    pub delay_ms: (u64, u64),
    /// Occasional long delay (per mille of messages, up to this many ms).
    pub spike_permille: u32,
    pub spike_ms: u64,
}

impl Net {
    pub fn new(delay_ms: (u64, u64)) -> Self {
        Net {
            side: BTreeMap::new(),
            loss_permille: 0,
            delay_ms,
            spike_permille: 0,
            spike_ms: 0,
        }
    }

    pub fn connected(&self, a: NodeId, b: NodeId) -> bool {
        a == b || self.side.get(&a).copied().unwrap_or(0) == self.side.get(&b).copied().unwrap_or(0)
    }

    pub fn partition(&mut self, side: BTreeMap<NodeId, u8>) {
        self.side = side;
    }

    pub fn heal(&mut self) {
        self.side.clear();
    }

    pub fn partitioned(&self) -> bool {
        self.side.values().any(|&s| s != 0)
    }

    pub fn describe(&self) -> String {
        let mut sides: BTreeMap<u8, Vec<NodeId>> = BTreeMap::new();
        for (n, s) in &self.side {
            sides.entry(*s).or_default().push(*n);
        }
        format!("{:?}", sides.values().collect::<Vec<_>>())
    }

    /// The delivery delay of one message, or `None` if it is lost.
    pub fn send(&self, rng: &mut StdRng, from: NodeId, to: NodeId) -> Option<u64> {
        if from == to {
            return Some(0);
        }
        if self.loss_permille > 0 && rng.gen_range(0..1000) < self.loss_permille {
            return None;
        }
        let mut d = rng.gen_range(self.delay_ms.0..=self.delay_ms.1);
        if self.spike_permille > 0 && rng.gen_range(0..1000) < self.spike_permille {
            d += rng.gen_range(0..=self.spike_ms);
        }
        Some(d)
    }
}
