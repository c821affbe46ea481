//! The `Peer` service: what agents say to each other.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status, Streaming};
use vsha_proto::v1 as pb;
use vsha_proto::v1::peer_server::Peer;

use crate::command::Command;
use crate::failover::leader::LeaderRuntime;
use crate::failover::replication::Replication;
use crate::raft_loop::RaftHandle;
use crate::submit::APPLY_WAIT;

/// A snapshot larger than this is refused rather than buffered.
const MAX_SNAPSHOT: u64 = 1024 * 1024 * 1024;

/// Agents' own calls (raft messages, snapshots, leases, replication) need
/// a node certificate: an operator's client certificate may use the
/// `Cluster` service only. Runs before the request body is decoded.
pub fn require_node_certificate(req: &Request<()>) -> Result<(), Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated("Peer calls need a node certificate; none was presented")
    })?;
    match certs.first() {
        Some(c) if crate::tls::der_is_node_certificate(c) => Ok(()),
        _ => Err(Status::permission_denied(
            "Peer calls need a node certificate (`vsha cert node NAME`); a client certificate may use the Cluster service only",
        )),
    }
}

pub struct PeerApi {
    pub raft: RaftHandle,
    pub leader: Arc<LeaderRuntime>,
    pub replication: Arc<Replication>,
}

#[tonic::async_trait]
impl Peer for PeerApi {
    async fn raft(&self, req: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
        let b = req.into_inner();
        self.raft.learn_address(b.from, &b.from_addr);
        for m in b.msgs {
            self.raft.step(m.to_vec());
        }
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::SnapshotAck>, Status> {
        let mut stream = req.into_inner();
        let mut buf: Vec<u8> = Vec::new();
        let mut total: Option<u64> = None;
        while let Some(chunk) = stream.message().await? {
            let t = *total.get_or_insert(chunk.total_len);
            if t != chunk.total_len {
                return Err(Status::invalid_argument(
                    "total_len: changed in the middle of a snapshot",
                ));
            }
            if t > MAX_SNAPSHOT {
                return Err(Status::invalid_argument(format!(
                    "total_len: {t} bytes is over the {MAX_SNAPSHOT}-byte limit"
                )));
            }
            if buf.len() as u64 + chunk.data.len() as u64 > t {
                return Err(Status::invalid_argument(
                    "data: more bytes than total_len announced",
                ));
            }
            if buf.is_empty() {
                buf.reserve(t as usize);
                self.raft.learn_address(chunk.from, &chunk.from_addr);
            }
            buf.extend_from_slice(&chunk.data);
        }
        if total != Some(buf.len() as u64) {
            return Err(Status::invalid_argument(format!(
                "data: snapshot ended after {} of {} bytes",
                buf.len(),
                total.unwrap_or(0)
            )));
        }
        self.raft.step(buf);
        Ok(Response::new(pb::SnapshotAck {}))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        Ok(Response::new(
            self.leader.on_heartbeat(req.into_inner()).await,
        ))
    }

    async fn propose(
        &self,
        req: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        let cmd: Command = serde_json::from_slice(&req.into_inner().command)
            .map_err(|e| Status::invalid_argument(format!("command: unreadable: {e}")))?;
        let verdict = self.raft.propose_local(cmd, APPLY_WAIT).await;
        let result = serde_json::to_vec(&verdict).unwrap_or_default();
        Ok(Response::new(pb::ProposeResponse {
            result: result.into(),
        }))
    }

    type ReplicateStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::ReplicateChunk, Status>> + Send>>;

    async fn replicate(
        &self,
        req: Request<Streaming<pb::ReplicateChunk>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let rx = self.replication.accept(req.into_inner()).await?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let j = req.into_inner();
        // Current state, so a node added a moment ago is seen.
        self.raft
            .read_barrier(Duration::from_secs(3))
            .await
            .map_err(super::status)?;
        let (cluster_id, known, members) = self.raft.read_state(|s| {
            (
                s.cluster_id.clone(),
                s.nodes.get(&j.node_id).cloned(),
                s.nodes.values().cloned().collect::<Vec<_>>(),
            )
        });
        let Some(me) = known else {
            return Err(Status::failed_precondition(format!(
                "node_id: node {} is not a member of cluster {cluster_id}; run `vsha node add {} {}` against the cluster first",
                j.node_id, j.node_id, j.addr
            )));
        };
        if me.addr != j.addr {
            return Err(Status::failed_precondition(format!(
                "addr: node {} was added with address {} but starts with {}",
                j.node_id, me.addr, j.addr
            )));
        }
        let view = self.raft.view();
        Ok(Response::new(pb::JoinResponse {
            cluster_id,
            leader_id: view.leader_id,
            members: members
                .iter()
                .map(|n| pb::NodeInfo {
                    id: n.id,
                    addr: n.addr.clone(),
                    role: super::convert::role_to_pb(n.role) as i32,
                    ..Default::default()
                })
                .collect(),
        }))
    }
}
