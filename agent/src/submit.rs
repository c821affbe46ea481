//! Getting a command applied from any agent: proposed locally when this
//! node leads, otherwise forwarded to the leader over `Peer.Propose`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::command::Command;
use crate::peer_client::PeerClients;
use crate::raft_loop::RaftHandle;
use crate::state::StateError;

/// Why a command was not applied. Crosses the wire (JSON) when forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum SubmitError {
    #[error(transparent)]
    Refused(StateError),
    #[error("node is no longer the leader; the leader is node {leader_id} at {leader_addr}")]
    NotLeader { leader_id: u64, leader_addr: String },
    #[error("no quorum: {}", no_quorum_hint(*leader_id, leader_addr))]
    NoQuorum { leader_id: u64, leader_addr: String },
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Timeout(String),
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error("could not reach the leader: {0}")]
    Transport(String),
    #[error("no quorum: the last known leader, node {leader_id} at {leader_addr}, does not answer ({detail}) and no other leader was elected; a majority of voters must be up and reachable (see `vsha status --stale`)")]
    LeaderUnreachable {
        leader_id: u64,
        leader_addr: String,
        detail: String,
    },
}

fn no_quorum_hint(leader_id: u64, leader_addr: &str) -> String {
    if leader_id == 0 {
        "no leader is elected; a majority of voters must be up and reachable (see `vsha status --stale`)".into()
    } else {
        format!(
            "the leader (node {leader_id} at {leader_addr}) could not confirm its leadership with a majority in time"
        )
    }
}

/// How long a caller waits for its command to be applied.
pub const APPLY_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Submitter {
    raft: RaftHandle,
    peers: PeerClients,
}

impl Submitter {
    pub fn new(raft: RaftHandle, peers: PeerClients) -> Self {
        Submitter { raft, peers }
    }

    pub async fn submit(&self, cmd: Command) -> Result<(), SubmitError> {
        let deadline = tokio::time::Instant::now() + APPLY_WAIT;
        let mut last = SubmitError::NoQuorum {
            leader_id: 0,
            leader_addr: String::new(),
        };
        while tokio::time::Instant::now() < deadline {
            let view = self.raft.view();
            let result = if view.is_leader {
                self.raft.propose_local(cmd.clone(), APPLY_WAIT).await
            } else if view.leader_id != 0 {
                match self.raft.address_of(view.leader_id) {
                    Some(addr) => {
                        match self.peers.propose(&addr, view.id, &cmd, APPLY_WAIT).await {
                            // The leader was not reached, so nothing was proposed:
                            // wait for the election that will follow.
                            Err(SubmitError::Transport(detail)) => {
                                Err(SubmitError::LeaderUnreachable {
                                    leader_id: view.leader_id,
                                    leader_addr: addr,
                                    detail,
                                })
                            }
                            other => other,
                        }
                    }
                    None => Err(SubmitError::NoQuorum {
                        leader_id: view.leader_id,
                        leader_addr: "(address unknown)".into(),
                    }),
                }
            } else {
                Err(SubmitError::NoQuorum {
                    leader_id: 0,
                    leader_addr: String::new(),
                })
            };
            match result {
                // Not put into the log (leadership moving, an election, a
                // membership change in flight): safe to try again shortly.
                Err(
                    e @ (SubmitError::NotLeader { .. }
                    | SubmitError::NoQuorum { .. }
                    | SubmitError::LeaderUnreachable { .. }
                    | SubmitError::Busy(_)),
                ) => {
                    last = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
        Err(last)
    }
}
