//! The liveness view: every agent heartbeats the leader over `Peer` on its
//! own schedule; the leader records when it last heard from each node. This
//! is separate from raft's internal heartbeats so it keeps working the same
//! way whatever raft's tick settings are, and so a node reports its own
//! applied index.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vsha_proto::v1::HeartbeatRequest;

use crate::model::NodeId;
use crate::peer_client::PeerClients;
use crate::raft_loop::RaftHandle;

#[derive(Debug, Clone, Copy)]
pub struct Heard {
    pub at: Instant,
    pub applied: u64,
}

#[derive(Clone, Default)]
pub struct Liveness {
    heard: Arc<Mutex<HashMap<NodeId, Heard>>>,
}

impl Liveness {
    pub fn record(&self, node: NodeId, applied: u64) {
        self.heard.lock().unwrap_or_else(|e| e.into_inner()).insert(
            node,
            Heard {
                at: Instant::now(),
                applied,
            },
        );
    }

    pub fn get(&self, node: NodeId) -> Option<Heard> {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&node)
            .copied()
    }
}

/// Sends this node's heartbeat to the leader every `interval` until the
/// task is dropped.
pub async fn heartbeat_loop(
    raft: RaftHandle,
    peers: PeerClients,
    liveness: Liveness,
    my_addr: String,
    interval: Duration,
) {
    let mut seq = 0u64;
    // One heartbeat in flight at a time, and never blocking this loop: the
    // leader's own record must not wait on a dead peer's timeout.
    let mut in_flight: Option<tokio::task::JoinHandle<()>> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let view = raft.view();
        if view.is_leader {
            liveness.record(view.id, view.applied);
            continue;
        }
        if view.leader_id == 0 {
            continue;
        }
        let Some(addr) = raft.address_of(view.leader_id) else {
            continue;
        };
        let Ok(mut client) = peers.client(&addr) else {
            continue;
        };
        if in_flight.as_ref().is_some_and(|h| !h.is_finished()) {
            continue;
        }
        seq += 1;
        let mut req = tonic::Request::new(HeartbeatRequest {
            node_id: view.id,
            addr: my_addr.clone(),
            applied_index: view.applied,
            seq,
        });
        req.set_timeout(interval * 2);
        let leader = view.leader_id;
        in_flight = Some(tokio::spawn(async move {
            if let Err(e) = crate::peer_client::within(interval * 2, client.heartbeat(req)).await {
                tracing::debug!(leader, error = %e.message(), "heartbeat not delivered");
            }
        }));
    }
}
