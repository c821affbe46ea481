//! The liveness view: every agent renews its lease with the leader over
//! `Peer.Heartbeat` (see failover/node.rs); the leader records when it last
//! heard from each node and the node's applied index, for `vsha status`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::model::NodeId;

#[derive(Debug, Clone)]
pub struct Heard {
    pub at: Instant,
    pub applied: u64,
    /// The node's ipv4root mechanism, as it reports it.
    pub ipv4root: String,
}

#[derive(Clone, Default)]
pub struct Liveness {
    heard: Arc<Mutex<HashMap<NodeId, Heard>>>,
}

impl Liveness {
    pub fn record(&self, node: NodeId, applied: u64, ipv4root: &str) {
        self.heard.lock().unwrap_or_else(|e| e.into_inner()).insert(
            node,
            Heard {
                at: Instant::now(),
                applied,
                ipv4root: ipv4root.to_string(),
            },
        );
    }

    pub fn get(&self, node: NodeId) -> Option<Heard> {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&node)
            .cloned()
    }
}
