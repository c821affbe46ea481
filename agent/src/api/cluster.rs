//! The `Cluster` service: the operator's API, served by every agent.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tonic::{Request, Response, Status};
use vsha_proto::v1 as pb;
use vsha_proto::v1::cluster_client::ClusterClient;
use vsha_proto::v1::cluster_server::Cluster;

use super::convert;
use super::{state_status, status};
use crate::command::Command;
use crate::liveness::Liveness;
use crate::model::{AdminState, NodeRecord};
use crate::peer_client::{endpoint, MAX_MESSAGE};
use crate::raft_loop::RaftHandle;
use crate::submit::Submitter;
use crate::validate;

/// How long a linearizable read waits for the leader's confirmation.
const READ_WAIT: Duration = Duration::from_secs(3);

pub struct ClusterApi {
    pub raft: RaftHandle,
    pub submitter: Submitter,
    pub liveness: Liveness,
    /// A node not heard from for longer is shown as unreachable.
    pub liveness_timeout: Duration,
}

fn later(what: &str, issue: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not implemented yet (it arrives with {issue})"
    ))
}

impl ClusterApi {
    async fn barrier(&self, stale: bool) -> Result<(), Status> {
        if stale {
            return Ok(());
        }
        self.raft.read_barrier(READ_WAIT).await.map_err(status)
    }

    fn node_infos(&self) -> Vec<pb::NodeInfo> {
        let view = self.raft.view();
        self.raft.read_state(|s| {
            s.nodes
                .values()
                .map(|n| convert::node_info(n, &view, &self.liveness, self.liveness_timeout))
                .collect()
        })
    }

    fn vserver_infos(&self) -> Vec<pb::VserverInfo> {
        self.raft
            .read_state(|s| s.vservers.values().map(convert::vserver_info).collect())
    }

    fn local_status(&self, stale: bool) -> pb::StatusResponse {
        let view = self.raft.view();
        pb::StatusResponse {
            cluster_id: self.raft.read_state(|s| s.cluster_id.clone()),
            leader_id: view.leader_id,
            leader_addr: self.raft.address_of(view.leader_id).unwrap_or_default(),
            term: view.term,
            commit_index: view.commit,
            served_by: view.id,
            stale,
            nodes: self.node_infos(),
            vservers: self.vserver_infos(),
        }
    }

    /// A current status comes from the leader: it alone has the liveness view.
    async fn status_from_leader(&self) -> Result<pb::StatusResponse, Status> {
        let view = self.raft.view();
        if view.is_leader {
            self.barrier(false).await?;
            return Ok(self.local_status(false));
        }
        if view.leader_id == 0 {
            return Err(Status::unavailable(
                "no quorum: no leader is elected; a majority of voters must be up and reachable. `vsha status --stale` shows this agent's local view",
            ));
        }
        let addr = self.raft.address_of(view.leader_id).ok_or_else(|| {
            Status::unavailable(format!(
                "leader is node {} but its address is not known yet; retry, or use --stale",
                view.leader_id
            ))
        })?;
        let channel = endpoint(&addr)
            .map_err(|e| Status::internal(format!("leader address {addr:?}: {e}")))?
            .connect()
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "leader node {} at {addr} does not answer ({e}); `vsha status --stale` shows this agent's local view",
                    view.leader_id
                ))
            })?;
        let mut client = ClusterClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        let mut req = Request::new(pb::StatusRequest { stale: false });
        req.set_timeout(READ_WAIT + Duration::from_secs(1));
        crate::peer_client::within(READ_WAIT + Duration::from_secs(2), client.status(req))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| {
                Status::unavailable(format!(
                    "leader node {} at {addr}: {}",
                    view.leader_id,
                    s.message()
                ))
            })
    }

    async fn submit(&self, cmd: Command) -> Result<(), Status> {
        self.submitter.submit(cmd).await.map_err(status)
    }

    /// Submits, then waits until this agent has applied it too, so what the
    /// caller reads back here includes its own write.
    async fn submit_and_catch_up(&self, cmd: Command) -> Result<(), Status> {
        self.submit(cmd).await?;
        // The leader applied it before answering; a follower may lag.
        if self.raft.view().is_leader {
            return Ok(());
        }
        self.barrier(false).await
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl Cluster for ClusterApi {
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        if req.into_inner().stale {
            return Ok(Response::new(self.local_status(true)));
        }
        self.status_from_leader().await.map(Response::new)
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.barrier(req.into_inner().stale).await?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: self.node_infos(),
        }))
    }

    async fn add_node(
        &self,
        req: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let r = req.into_inner();
        let rec = NodeRecord {
            id: validate::node_id(r.id).map_err(state_status)?,
            addr: validate::addr("addr", &r.addr).map_err(state_status)?,
            role: convert::role_from_pb(r.role).map_err(state_status)?,
            iface: validate::dev(&r.iface).map_err(|_| {
                Status::invalid_argument(format!(
                    "invalid iface: {:?} is not an interface name",
                    r.iface
                ))
            })?,
            admin: AdminState::Active,
        };
        self.submit(Command::AddNode(rec.clone())).await?;
        let view = self.raft.view();
        Ok(Response::new(convert::node_info(
            &rec,
            &view,
            &self.liveness,
            self.liveness_timeout,
        )))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let id = validate::node_id(req.into_inner().id).map_err(state_status)?;
        self.submit(Command::RemoveNode { id }).await?;
        Ok(Response::new(pb::RemoveNodeResponse {}))
    }

    async fn set_node_admin(
        &self,
        req: Request<pb::SetNodeAdminRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let r = req.into_inner();
        let id = validate::node_id(r.id).map_err(state_status)?;
        let admin = convert::admin_from_pb(r.admin).map_err(state_status)?;
        self.submit_and_catch_up(Command::SetNodeAdmin { id, admin })
            .await?;
        let view = self.raft.view();
        let rec = self
            .raft
            .read_state(|s| s.node(id).cloned())
            .map_err(state_status)?;
        Ok(Response::new(convert::node_info(
            &rec,
            &view,
            &self.liveness,
            self.liveness_timeout,
        )))
    }

    async fn list_vservers(
        &self,
        req: Request<pb::ListVserversRequest>,
    ) -> Result<Response<pb::ListVserversResponse>, Status> {
        self.barrier(req.into_inner().stale).await?;
        Ok(Response::new(pb::ListVserversResponse {
            vservers: self.vserver_infos(),
        }))
    }

    async fn add_vserver(
        &self,
        req: Request<pb::AddVserverRequest>,
    ) -> Result<Response<pb::VserverInfo>, Status> {
        let spec = convert::spec_from_pb(req.into_inner().spec).map_err(state_status)?;
        let name = spec.name.clone();
        self.submit_and_catch_up(Command::AddVserver(spec.clone()))
            .await?;
        // Applied by the cluster; this agent may still be catching up.
        let info = self
            .raft
            .read_state(|s| s.vserver(&name).map(convert::vserver_info));
        Ok(Response::new(info.unwrap_or_else(|_| pb::VserverInfo {
            spec: Some(convert::spec_to_pb(&spec)),
            ..Default::default()
        })))
    }

    async fn remove_vserver(
        &self,
        req: Request<pb::RemoveVserverRequest>,
    ) -> Result<Response<pb::RemoveVserverResponse>, Status> {
        let name = validate::vserver_name(&req.into_inner().name).map_err(state_status)?;
        self.submit(Command::RemoveVserver { name }).await?;
        Ok(Response::new(pb::RemoveVserverResponse {}))
    }

    async fn list_pairs(
        &self,
        req: Request<pb::ListPairsRequest>,
    ) -> Result<Response<pb::ListPairsResponse>, Status> {
        self.barrier(req.into_inner().stale).await?;
        let pairs = self.raft.read_state(|s| {
            s.vservers
                .values()
                .filter_map(|v| {
                    v.group.as_ref().map(|g| pb::PairInfo {
                        vserver: v.spec.name.clone(),
                        group: Some(convert::group_to_pb(g)),
                    })
                })
                .collect()
        });
        Ok(Response::new(pb::ListPairsResponse { pairs }))
    }

    async fn set_pair(
        &self,
        req: Request<pb::SetPairRequest>,
    ) -> Result<Response<pb::PairInfo>, Status> {
        let r = req.into_inner();
        let vserver =
            validate::vserver_name(&r.vserver).map_err(|e| state_status(rename(e, "vserver")))?;
        let group = convert::group_from_pb(r.group).map_err(state_status)?;
        self.submit(Command::SetPair {
            vserver: vserver.clone(),
            group: group.clone(),
        })
        .await?;
        Ok(Response::new(pb::PairInfo {
            vserver,
            group: Some(convert::group_to_pb(&group)),
        }))
    }

    async fn remove_pair(
        &self,
        req: Request<pb::RemovePairRequest>,
    ) -> Result<Response<pb::RemovePairResponse>, Status> {
        let vserver = validate::vserver_name(&req.into_inner().vserver)
            .map_err(|e| state_status(rename(e, "vserver")))?;
        self.submit(Command::RemovePair { vserver }).await?;
        Ok(Response::new(pb::RemovePairResponse {}))
    }

    async fn start_vserver(
        &self,
        _req: Request<pb::VserverActionRequest>,
    ) -> Result<Response<pb::VserverInfo>, Status> {
        Err(later(
            "starting a clustered vserver",
            "the failover work, issue 5",
        ))
    }

    async fn stop_vserver(
        &self,
        _req: Request<pb::VserverActionRequest>,
    ) -> Result<Response<pb::VserverInfo>, Status> {
        Err(later(
            "stopping a clustered vserver",
            "the failover work, issue 5",
        ))
    }

    async fn migrate(
        &self,
        _req: Request<pb::MigrateRequest>,
    ) -> Result<Response<pb::VserverInfo>, Status> {
        Err(later("planned migration", "the failover work, issue 5"))
    }

    async fn failover(
        &self,
        _req: Request<pb::FailoverRequest>,
    ) -> Result<Response<pb::VserverInfo>, Status> {
        Err(later("forced failover", "the failover work, issue 5"))
    }

    type EventsStream = EventStream;

    async fn events(
        &self,
        _req: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        Err(later("the event stream", "the failover work, issue 5"))
    }
}

/// Validation helpers name the field as `name`; some requests call it otherwise.
fn rename(e: crate::state::StateError, field: &str) -> crate::state::StateError {
    match e {
        crate::state::StateError::Invalid { reason, .. } => {
            crate::state::StateError::invalid(field, reason)
        }
        other => other,
    }
}
