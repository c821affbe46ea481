//! The `Cluster` service: the operator's API, served by every agent.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tonic::{Request, Response, Status};
use vsha_proto::v1 as pb;
use vsha_proto::v1::cluster_client::ClusterClient;
use vsha_proto::v1::cluster_server::Cluster;

use super::convert;
use super::{state_status, status};
use crate::command::Command;
use crate::controller::Event as CtlEvent;
use crate::failover::leader::LeaderRuntime;
use crate::liveness::Liveness;
use crate::model::Desired;
use crate::model::{AdminState, NodeRecord};
use crate::peer_client::{endpoint, MAX_MESSAGE};
use crate::raft_loop::RaftHandle;
use crate::submit::Submitter;
use crate::tls::Security;
use crate::validate;

/// How long a linearizable read waits for the leader's confirmation.
const READ_WAIT: Duration = Duration::from_secs(3);

pub struct ClusterApi {
    pub raft: RaftHandle,
    pub submitter: Submitter,
    pub liveness: Liveness,
    /// A node not heard from for longer is shown as unreachable.
    pub liveness_timeout: Duration,
    pub leader: Arc<LeaderRuntime>,
    /// How this agent reaches the leader when it forwards a request.
    pub security: Security,
}

/// Where a request that only the leader can serve goes.
enum Route {
    Here,
    Leader(ClusterClient<tonic::transport::Channel>),
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
        let mut infos: Vec<pb::VserverInfo> = self
            .raft
            .read_state(|s| s.vservers.values().map(convert::vserver_info).collect());
        if self.leader.is_leading() {
            let mut rt = self.leader.runtime_view();
            for i in &mut infos {
                let name = i.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
                i.runtime = rt.remove(&name);
            }
        }
        infos
    }

    /// Requests only the leader's controller can serve are forwarded.
    async fn route(&self) -> Result<Route, Status> {
        let view = self.raft.view();
        if view.is_leader {
            if !self.leader.is_leading() {
                return Err(Status::unavailable(
                    "this node was just elected leader and has not taken over yet; retry in a moment",
                ));
            }
            return Ok(Route::Here);
        }
        Ok(Route::Leader(self.leader_client("").await?))
    }

    /// A client of the leader (this agent is not it). `hint` ends the
    /// errors (what the operator can do instead).
    async fn leader_client(
        &self,
        hint: &str,
    ) -> Result<ClusterClient<tonic::transport::Channel>, Status> {
        let view = self.raft.view();
        if view.leader_id == 0 {
            return Err(Status::unavailable(format!(
                "no quorum: no leader is elected; a majority of voters must be up and reachable{hint}"
            )));
        }
        let addr = self.raft.address_of(view.leader_id).ok_or_else(|| {
            Status::unavailable(format!(
                "leader is node {} but its address is not known yet; retry{hint}",
                view.leader_id
            ))
        })?;
        let channel = endpoint(&self.security, &addr)
            .map_err(|e| Status::internal(format!("leader {e}")))?
            .connect()
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "leader node {} at {addr} does not answer ({e}){hint}",
                    view.leader_id
                ))
            })?;
        Ok(ClusterClient::new(channel).max_decoding_message_size(MAX_MESSAGE))
    }

    fn vserver_info(&self, name: &str) -> Result<pb::VserverInfo, Status> {
        let mut info = self
            .raft
            .read_state(|s| s.vserver(name).map(convert::vserver_info))
            .map_err(state_status)?;
        if self.leader.is_leading() {
            info.runtime = self.leader.runtime_view().remove(name);
        }
        Ok(info)
    }

    /// A node id that must name a member able to run vservers.
    fn target_node(&self, id: u64, field: &str) -> Result<u64, Status> {
        let id = validate::node_id(id).map_err(|e| state_status(rename(e, field)))?;
        self.raft.read_state(|s| match s.nodes.get(&id) {
            None => Err(Status::not_found(format!(
                "{field}: node {id} is not a member"
            ))),
            Some(n) if n.role == crate::model::Role::Witness => Err(Status::failed_precondition(
                format!("{field}: node {id} is a witness and runs no vservers"),
            )),
            Some(_) => Ok(id),
        })
    }

    async fn set_desired(
        &self,
        req: Request<pb::VserverActionRequest>,
        desired: Desired,
    ) -> Result<Response<pb::VserverInfo>, Status> {
        let name = validate::vserver_name(&req.into_inner().name).map_err(state_status)?;
        self.submit_and_catch_up(Command::SetDesired {
            vserver: name.clone(),
            desired,
        })
        .await?;
        self.vserver_info(&name).map(Response::new)
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
        let mut client = self
            .leader_client("; `vsha status --stale` shows this agent's local view")
            .await?;
        let mut req = Request::new(pb::StatusRequest { stale: false });
        req.set_timeout(READ_WAIT + Duration::from_secs(1));
        crate::peer_client::within(READ_WAIT + Duration::from_secs(2), client.status(req))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| {
                Status::unavailable(format!(
                    "leader node {} at {}: {}",
                    view.leader_id,
                    self.raft.address_of(view.leader_id).unwrap_or_default(),
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
        req: Request<pb::VserverActionRequest>,
    ) -> Result<Response<pb::VserverInfo>, Status> {
        self.set_desired(req, Desired::Running).await
    }

    async fn stop_vserver(
        &self,
        req: Request<pb::VserverActionRequest>,
    ) -> Result<Response<pb::VserverInfo>, Status> {
        self.set_desired(req, Desired::Stopped).await
    }

    async fn migrate(
        &self,
        req: Request<pb::MigrateRequest>,
    ) -> Result<Response<pb::VserverInfo>, Status> {
        if let Route::Leader(mut c) = self.route().await? {
            return c.migrate(req).await;
        }
        let r = req.into_inner();
        let name = validate::vserver_name(&r.name).map_err(state_status)?;
        let to = self.target_node(r.to, "to")?;
        let vs = self
            .raft
            .read_state(|s| s.vserver(&name).cloned())
            .map_err(state_status)?;
        let Some(p) = vs.placement else {
            return Err(Status::failed_precondition(format!(
                "name: {name:?} is not placed anywhere yet; nothing to migrate"
            )));
        };
        if p.node == to {
            return Err(Status::failed_precondition(format!(
                "to: {name:?} already runs on node {to}"
            )));
        }
        self.leader.order(CtlEvent::Migrate {
            vserver: name.clone(),
            to,
        });
        self.vserver_info(&name).map(Response::new)
    }

    async fn failover(
        &self,
        req: Request<pb::FailoverRequest>,
    ) -> Result<Response<pb::VserverInfo>, Status> {
        if let Route::Leader(mut c) = self.route().await? {
            return c.failover(req).await;
        }
        let r = req.into_inner();
        let name = validate::vserver_name(&r.name).map_err(state_status)?;
        let to = self.target_node(r.to, "to")?;
        self.raft
            .read_state(|s| s.vserver(&name).map(|_| ()))
            .map_err(state_status)?;
        self.leader.order(CtlEvent::ForceFailover {
            vserver: name.clone(),
            to,
            accept_data_loss: r.accept_data_loss,
        });
        self.vserver_info(&name).map(Response::new)
    }

    type EventsStream = EventStream;

    async fn events(
        &self,
        req: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let follow = req.get_ref().follow;
        if let Route::Leader(mut c) = self.route().await? {
            let upstream = c.events(req).await?.into_inner();
            return Ok(Response::new(Box::pin(upstream)));
        }
        use futures::StreamExt;
        // Subscribe before reading the ring so nothing falls in between.
        let rx = self.leader.events.subscribe();
        let recent = self.leader.events.recent();
        let last = recent.last().map_or(0, |e| e.seq);
        let head = futures::stream::iter(recent.into_iter().map(Ok));
        if !follow {
            return Ok(Response::new(Box::pin(head)));
        }
        let tail = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |r| {
            futures::future::ready(match r {
                Ok(ev) if ev.seq > last => Some(Ok(ev)),
                Ok(_) => None,
                Err(e) => Some(Err(Status::data_loss(format!(
                    "event stream fell behind: {e}; reconnect"
                )))),
            })
        });
        Ok(Response::new(Box::pin(head.chain(tail))))
    }

    async fn simulate(
        &self,
        req: Request<pb::SimulateRequest>,
    ) -> Result<Response<pb::SimulateResponse>, Status> {
        if let Route::Leader(mut c) = self.route().await? {
            return c.simulate(req).await;
        }
        let id = validate::node_id(req.into_inner().node_down)
            .map_err(|e| state_status(rename(e, "node_down")))?;
        self.raft
            .read_state(|s| s.node(id).map(|_| ()))
            .map_err(|e| state_status(rename(e, "node_down")))?;
        Ok(Response::new(self.leader.simulate_node_down(id)))
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
