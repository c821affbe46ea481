//! Wires one agent together: raft thread, transport, heartbeats and the
//! gRPC server. The listener and the shutdown signal come from the caller,
//! so tests run agents on 127.0.0.x:0 and stop them at will.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use vsha_proto::v1::cluster_server::ClusterServer;
use vsha_proto::v1::peer_server::PeerServer;
use vsha_proto::v1::JoinRequest;

use crate::api::cluster::ClusterApi;
use crate::api::peer::PeerApi;
use crate::config::AgentConfig;
use crate::failover::events::EventLog;
use crate::failover::host::Host;
use crate::failover::leader::LeaderRuntime;
use crate::failover::node::NodeRuntime;
use crate::failover::replication::{replica_dir, Replication};
use crate::liveness::Liveness;
use crate::metrics::{Metrics, NodeLabel, ReplicaLabel, StateLabel};
use crate::peer_client::{PeerClients, MAX_MESSAGE};
use crate::raft_loop;
use crate::raft_node::{CoreConfig, RaftCore, RaftError};
use crate::submit::Submitter;
use crate::tls::Security;
use crate::transport;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Raft(#[from] RaftError),
    #[error("data dir {0} holds no cluster state: start with --initial-cluster to create a cluster, or --join HOST:PORT after `vsha node add`")]
    NoClusterState(String),
    #[error("joining through {addr}: {reason}")]
    Join { addr: String, reason: String },
    #[error("could not start the raft thread: {0}")]
    Thread(std::io::Error),
    #[error("gRPC server: {0}")]
    Server(String),
    #[error("raft thread stopped: {0}")]
    RaftStopped(String),
}

/// Runs one agent. `security` comes from [`Security::load`] on
/// `cfg.tls` (vshad loads it first so bad TLS files fail like a bad config).
pub async fn run(
    cfg: AgentConfig,
    security: Security,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let core_cfg = CoreConfig {
        id: cfg.node_id,
        election_tick: cfg.election_ticks,
        heartbeat_tick: cfg.heartbeat_ticks,
        snapshot_interval: cfg.snapshot_interval,
        max_voters: cfg.max_voters,
    };
    let raft_dir = cfg.data_dir.join("raft");
    let core = RaftCore::open(core_cfg, &raft_dir, cfg.initial_cluster.as_deref())?;
    let peers = PeerClients::new(security.clone());
    let mut join_members = Vec::new();
    if core.is_fresh() {
        let Some(addr) = cfg.join.clone() else {
            return Err(AgentError::NoClusterState(
                cfg.data_dir.display().to_string(),
            ));
        };
        join_members = join(&peers, &addr, cfg.node_id, &cfg.advertise).await?;
    } else if cfg.join.is_some() {
        tracing::info!("this node already holds cluster state; --join is ignored");
    }
    let spawned = raft_loop::spawn(core, cfg.tick).map_err(AgentError::Thread)?;
    let raft = spawned.handle.clone();
    for (id, addr) in join_members {
        raft.learn_address(id, &addr);
    }
    let liveness = Liveness::default();
    let fo = &cfg.failover;
    let events = Arc::new(EventLog::new(fo.notify_command.clone()));
    let metrics = Arc::new(Metrics::new());
    let leader = Arc::new(LeaderRuntime::new(
        raft.clone(),
        liveness.clone(),
        fo.clone(),
        events,
        Arc::clone(&metrics),
    ));
    let run_dir = cfg.data_dir.join("run");
    let probe_wait = Duration::from_millis((fo.lease_ms / 5).clamp(50, 500));
    let host = Host::new(
        run_dir,
        fo.vserver_root.clone(),
        fo.cgroup_parent.clone(),
        probe_wait,
    );
    let guard_exe = std::env::current_exe().map_err(AgentError::Thread)?;
    let node = Arc::new(NodeRuntime::new(
        cfg.node_id,
        cfg.advertise.clone(),
        raft.clone(),
        peers.clone(),
        Arc::clone(&leader),
        fo.clone(),
        host,
        guard_exe,
    ));
    node.start().map_err(AgentError::Thread)?;
    let store_dir = replica_dir(&fo.vserver_root);
    std::fs::create_dir_all(&store_dir).map_err(AgentError::Thread)?;
    let store = vsha_sync::Store::open(&store_dir, 2)
        .map_err(|e| AgentError::Server(format!("replica store {}: {e}", store_dir.display())))?;
    let replication = Arc::new(Replication::new(
        cfg.node_id,
        raft.clone(),
        peers.clone(),
        Arc::clone(&node),
        Arc::new(store),
        fo.replication_interval,
        Arc::clone(&metrics),
    ));
    node.set_replication(&replication);
    let me = transport::Me {
        id: cfg.node_id,
        addr: cfg.advertise.clone(),
    };
    let transport_task = tokio::spawn(transport::run(
        raft.clone(),
        peers.clone(),
        me,
        spawned.outgoing,
    ));
    let mut tasks = vec![
        tokio::spawn(Arc::clone(&node).renew_loop()),
        tokio::spawn(Arc::clone(&node).reconcile_loop()),
        tokio::spawn(Arc::clone(&leader).run(cfg.heartbeat_interval / 2)),
        tokio::spawn(Arc::clone(&replication).run()),
    ];
    if let Some(addr) = cfg.metrics_listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| AgentError::Server(format!("metrics_listen {addr}: {e}")))?;
        let refresh = metrics_refresh(raft.clone(), liveness.clone(), Arc::clone(&leader));
        tasks.push(tokio::spawn(crate::metrics::serve(
            listener,
            Arc::clone(&metrics),
            Arc::new(refresh),
        )));
        tracing::info!(%addr, "metrics on GET /metrics");
    }
    let cluster = ClusterApi {
        raft: raft.clone(),
        submitter: Submitter::new(raft.clone(), peers.clone()),
        liveness,
        liveness_timeout: cfg.liveness_timeout,
        leader: Arc::clone(&leader),
        security: security.clone(),
    };
    let peer = PeerApi {
        raft: raft.clone(),
        leader,
        replication,
    };
    tracing::info!(node = cfg.node_id, listen = %cfg.listen, advertise = %cfg.advertise, tls = security.is_tls(), "vshad serving");
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = security.server_config() {
        builder = builder
            .tls_config(tls)
            .map_err(|e| AgentError::Server(format!("TLS: {e}")))?;
    } else {
        tracing::warn!(
            "plaintext gRPC (--insecure): any host that reaches {} can control this cluster",
            cfg.listen
        );
    }
    let peer_service = PeerServer::new(peer)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let node_only = security.is_tls();
    let server = builder
        .add_service(
            ClusterServer::new(cluster)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(tonic::service::interceptor::InterceptedService::new(
            peer_service,
            move |req: tonic::Request<()>| {
                if node_only {
                    crate::api::peer::require_node_certificate(&req)?;
                }
                Ok(req)
            },
        ))
        .serve_with_incoming_shutdown(incoming(listener), shutdown);
    crate::sd_notify::notify("READY=1");
    let watchdog = crate::sd_notify::watchdog_interval().map(|every| {
        let node = Arc::clone(&node);
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                if node.alive_within(every * 2) {
                    crate::sd_notify::notify("WATCHDOG=1");
                } else {
                    tracing::error!("the node runtime is stuck; not feeding the systemd watchdog");
                }
            }
        })
    });
    let mut done = spawned.done;
    let (result, raft_ended) = tokio::select! {
        r = server => (r.map_err(|e| AgentError::Server(e.to_string())), false),
        r = &mut done => (match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AgentError::RaftStopped(e)),
            Err(_) => Err(AgentError::RaftStopped("raft thread vanished".into())),
        }, true),
    };
    crate::sd_notify::notify("STOPPING=1");
    for t in tasks.iter().chain(watchdog.as_ref()) {
        t.abort();
    }
    transport_task.abort();
    raft.shutdown();
    if !raft_ended {
        // Wait for the raft thread so its last fsync is done before we exit.
        let _ = tokio::time::timeout(Duration::from_secs(5), done).await;
    }
    tracing::info!(node = cfg.node_id, "vshad stopped");
    result
}

/// Accepted connections with Nagle off: replies are small and latency-bound
/// (with Nagle, delayed ACKs add ~40 ms to every multi-segment answer).
fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

/// Asks a member whether we were added and who the members are. Retries
/// while the cluster is unreachable; gives up at once when refused.
async fn join(
    peers: &PeerClients,
    addr: &str,
    id: u64,
    my_addr: &str,
) -> Result<Vec<(u64, String)>, AgentError> {
    let err = |reason: String| AgentError::Join {
        addr: addr.to_string(),
        reason,
    };
    let mut last = String::new();
    for attempt in 0..30 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut client = peers.client(addr).map_err(|e| err(e.to_string()))?;
        let mut req = tonic::Request::new(JoinRequest {
            node_id: id,
            addr: my_addr.to_string(),
        });
        req.set_timeout(Duration::from_secs(5));
        match crate::peer_client::within(Duration::from_secs(6), client.join(req)).await {
            Ok(resp) => {
                let r = resp.into_inner();
                tracing::info!(cluster = %r.cluster_id, leader = r.leader_id, "joined; waiting for the leader to send the state");
                return Ok(r.members.into_iter().map(|m| (m.id, m.addr)).collect());
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                return Err(err(s.message().to_string()))
            }
            Err(s) => {
                last = s.message().to_string();
                tracing::warn!(%addr, error = %last, "join attempt failed; retrying");
            }
        }
    }
    Err(err(format!("no answer after 30 attempts: {last}")))
}

/// Reads the gauges' current values at scrape time.
fn metrics_refresh(
    raft: crate::raft_loop::RaftHandle,
    liveness: Liveness,
    leader: Arc<LeaderRuntime>,
) -> crate::metrics::Refresh {
    Box::new(move |m: &Metrics| {
        let view = raft.view();
        m.raft_term.set(view.term as i64);
        m.raft_leader.set(view.leader_id as i64);
        m.raft_commit_index.set(view.commit as i64);
        m.raft_applied_index.set(view.applied as i64);
        m.lease_age_seconds.clear();
        m.vservers.clear();
        m.replica_lag_seconds.clear();
        if !leader.is_leading() {
            return;
        }
        let nodes: Vec<u64> = raft.read_state(|s| s.nodes.keys().copied().collect());
        for n in nodes {
            if let Some(h) = liveness.get(n) {
                m.lease_age_seconds
                    .get_or_create(&NodeLabel {
                        node: n.to_string(),
                    })
                    .set(h.at.elapsed().as_secs_f64());
            }
        }
        for (name, rt) in leader.runtime_view() {
            let state = rt
                .observed
                .split(':')
                .next()
                .unwrap_or("unknown")
                .to_string();
            m.vservers.get_or_create(&StateLabel { state }).inc();
            for l in rt.lag.iter().filter(|l| l.known) {
                m.replica_lag_seconds
                    .get_or_create(&ReplicaLabel {
                        vserver: name.clone(),
                        standby: l.node.to_string(),
                    })
                    .set(l.lag_ms as f64 / 1000.0);
            }
        }
    })
}
