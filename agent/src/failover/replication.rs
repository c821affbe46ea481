//! Replication wiring (issue 5, item 7): the node holding a vserver streams
//! its tree to every other runnable node of the vserver's failover group
//! with sync/, one round at a time, over the agents' own gRPC channel
//! (`Peer.Replicate` carries sync/'s byte stream). After a failover the new
//! holder does the same, so the direction reverses by itself.
//!
//! Receivers keep replicas in `VSERVER_ROOT/.replicas` (a sync/ store); a
//! node runs a vserver from its replica when it has one, otherwise from
//! `VSERVER_ROOT/NAME`. A node never receives a vserver it holds or runs,
//! and cancels a round in progress before it starts one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use vsha_proto::v1 as pb;
use vsha_sync::{PushOptions, SenderState, Store};

use crate::model::{NodeId, Role};
use crate::peer_client::PeerClients;
use crate::raft_loop::RaftHandle;

use super::clock::unix_ms;
use super::node::NodeRuntime;

const CHUNK: usize = 256 * 1024;
/// A round that moves no byte for this long is abandoned.
const IDLE: Duration = Duration::from_secs(30);

/// sync/'s side of a round → gRPC chunks, until either end closes.
fn spawn_reader<R, T>(
    mut rd: R,
    tx: mpsc::Sender<T>,
    wrap: impl Fn(pb::ReplicateChunk) -> T + Send + 'static,
) where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let c = pb::ReplicateChunk {
                        data: buf[..n].to_vec().into(),
                        ..Default::default()
                    };
                    if tx.send(wrap(c)).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
}

pub fn replica_dir(vserver_root: &Path) -> PathBuf {
    vserver_root.join(".replicas")
}

/// Where a round's result goes.
type RoundOutcome = oneshot::Sender<Result<(), String>>;

/// A final delta the leader ordered, until a round of it gets through.
struct FinalSync {
    name: String,
    generation: u64,
    to: NodeId,
    /// The newest order (term, seq) for it; a round answers this one.
    order: (u64, u64),
    tries: u32,
    outcome: Option<oneshot::Receiver<Result<(), String>>>,
}

/// A receive in progress, cancellable.
struct Receiving {
    cancel: Option<oneshot::Sender<()>>,
    done: tokio::sync::watch::Receiver<bool>,
}

pub struct Replication {
    me: NodeId,
    metrics: Arc<crate::metrics::Metrics>,
    raft: RaftHandle,
    peers: PeerClients,
    node: Arc<NodeRuntime>,
    store: Arc<Store>,
    interval: Duration,
    senders: Mutex<BTreeMap<(String, NodeId), SenderState>>,
    in_flight: Mutex<BTreeSet<(String, NodeId)>>,
    receiving: Mutex<BTreeMap<String, Receiving>>,
    /// Told when any round ends (a waiting final delta may go).
    round_done: tokio::sync::Notify,
}

impl Replication {
    pub fn new(
        me: NodeId,
        raft: RaftHandle,
        peers: PeerClients,
        node: Arc<NodeRuntime>,
        store: Arc<Store>,
        interval: Duration,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Replication {
            me,
            metrics,
            raft,
            peers,
            node,
            store,
            interval,
            senders: Mutex::new(BTreeMap::new()),
            in_flight: Mutex::new(BTreeSet::new()),
            receiving: Mutex::new(BTreeMap::new()),
            round_done: tokio::sync::Notify::new(),
        }
    }

    /// Sends rounds until dropped.
    pub async fn run(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut finals: Vec<FinalSync> = Vec::new();
        loop {
            let on_tick = tokio::select! {
                _ = ticker.tick() => true,
                _ = self.node.final_sync_ordered() => false,
                _ = self.round_done.notified() => false,
            };
            self.drive_final_syncs(&mut finals, on_tick);
            if !on_tick {
                continue;
            }
            for (name, generation) in self.node.running_here() {
                let standbys = self.raft.read_state(|s| {
                    let Some(vs) = s.vservers.get(&name) else {
                        return Vec::new();
                    };
                    let holder = vs.placement.as_ref().map(|p| (p.node, p.generation));
                    if holder != Some((self.me, generation)) {
                        return Vec::new();
                    }
                    vs.group
                        .as_ref()
                        .map(|g| {
                            g.nodes
                                .iter()
                                .copied()
                                .filter(|n| *n != self.me)
                                .filter(|n| s.nodes.get(n).is_some_and(|r| r.role != Role::Witness))
                                .collect()
                        })
                        .unwrap_or_default()
                });
                for to in standbys {
                    self.spawn_round(name.clone(), generation, to, None);
                }
            }
        }
    }

    /// Final deltas are sent until one gets through or the move is over:
    /// one that finds a round to the same standby running waits for it
    /// (that round may have missed the last writes), and a failed one is
    /// tried again on the next tick. A dropped one stalled migrations until
    /// the leader gave up on them.
    fn drive_final_syncs(self: &Arc<Self>, finals: &mut Vec<FinalSync>, on_tick: bool) {
        for o in self.node.take_final_syncs() {
            let same = |f: &&mut FinalSync| {
                f.name == o.vserver && f.generation == o.generation && f.to == o.to
            };
            match finals.iter_mut().find(same) {
                Some(f) => f.order = f.order.max(o.order),
                None => {
                    tracing::info!(vserver = %o.vserver, to = o.to, generation = o.generation, "final delta ordered");
                    finals.push(FinalSync {
                        name: o.vserver,
                        generation: o.generation,
                        to: o.to,
                        order: o.order,
                        tries: 0,
                        outcome: None,
                    });
                }
            }
        }
        finals.retain_mut(|f| {
            if let Some(rx) = f.outcome.as_mut() {
                match rx.try_recv() {
                    Err(oneshot::error::TryRecvError::Empty) => return true,
                    Ok(Ok(())) => {
                        tracing::info!(vserver = %f.name, to = f.to, tries = f.tries, "final delta sent");
                        return false;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(vserver = %f.name, to = f.to, tries = f.tries, error = %e, "final delta failed; trying again");
                        f.outcome = None;
                    }
                    Err(oneshot::error::TryRecvError::Closed) => f.outcome = None,
                }
            }
            if f.tries > 0 && !on_tick {
                return true;
            }
            if !self.final_sync_wanted(f) {
                tracing::info!(vserver = %f.name, to = f.to, generation = f.generation, "final delta no longer wanted (the move is over)");
                return false;
            }
            let (tx, rx) = oneshot::channel();
            if self.spawn_round(f.name.clone(), f.generation, f.to, Some((f.order, tx))) {
                f.tries += 1;
                f.outcome = Some(rx);
            }
            true
        });
    }

    /// The vserver is still placed here at the move's generation and does
    /// not run (a committed or aborted move changes the generation).
    fn final_sync_wanted(&self, f: &FinalSync) -> bool {
        let placed = self.raft.read_state(|s| {
            s.vservers
                .get(&f.name)
                .and_then(|v| v.placement.as_ref())
                .map(|p| (p.node, p.generation))
        });
        placed == Some((self.me, f.generation)) && !self.node.runs(&f.name)
    }

    /// Starts a round unless one to the same standby runs; true if started.
    /// `final_order`: the final-sync order the round answers, and where its
    /// outcome goes.
    fn spawn_round(
        self: &Arc<Self>,
        name: String,
        generation: u64,
        to: NodeId,
        final_order: Option<((u64, u64), RoundOutcome)>,
    ) -> bool {
        let key = (name.clone(), to);
        if !self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone())
        {
            return false;
        }
        let me = Arc::clone(self);
        let (order, report) = match final_order {
            Some((o, tx)) => (Some(o), Some(tx)),
            None => (None, None),
        };
        tokio::spawn(async move {
            let r = me.round(&name, generation, to, order).await;
            if let Err(e) = &r {
                tracing::debug!(vserver = %name, to, error = %e, "replication round failed");
            }
            me.in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            if let Some(tx) = report {
                let _ = tx.send(r);
            }
            me.round_done.notify_one();
        });
        true
    }

    async fn round(
        &self,
        name: &str,
        generation: u64,
        to: NodeId,
        final_order: Option<(u64, u64)>,
    ) -> Result<(), String> {
        let addr = self
            .raft
            .address_of(to)
            .ok_or_else(|| format!("address of node {to} unknown"))?;
        let mut client = self.peers.client(&addr).map_err(|e| e.to_string())?;
        let src = self
            .raft
            .read_state(|s| s.vservers.get(name).map(|v| self.node.host.tree(&v.spec)))
            .ok_or_else(|| format!("{name} is no longer in the cluster"))?;
        let (ours, theirs) = tokio::io::duplex(CHUNK * 2);
        let (rd, mut wr) = tokio::io::split(theirs);
        let (tx, rx) = mpsc::channel::<pb::ReplicateChunk>(8);
        let started = unix_ms();
        let first = pb::ReplicateChunk {
            vserver: name.to_string(),
            generation,
            data: Default::default(),
            source_unix_ms: started,
        };
        tx.send(first).await.map_err(|e| e.to_string())?;
        spawn_reader(rd, tx, |c| c);
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut inbound = client
            .replicate(outbound)
            .await
            .map_err(|e| e.message().to_string())?
            .into_inner();
        // gRPC → sync/
        tokio::spawn(async move {
            while let Ok(Some(Ok(c))) = tokio::time::timeout(IDLE, inbound.next()).await {
                if wr.write_all(&c.data).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        let key = (name.to_string(), to);
        let state = self
            .senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key)
            .unwrap_or_default();
        let (r, state) = vsha_sync::send(
            ours,
            src,
            name.to_string(),
            None,
            PushOptions {
                // fanotify (root): rounds rescan only the directories that
                // changed; sync/ falls back to a full scan when it cannot.
                journal: true,
                ..PushOptions::default()
            },
            state,
        )
        .await;
        let source = started;
        self.senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, state);
        let stats = r.map_err(|e| e.to_string())?;
        self.metrics.replicated_bytes.inc_by(stats.bytes_sent);
        self.metrics
            .sync_round_seconds
            .observe(stats.round_duration.as_secs_f64());
        self.metrics
            .journal_fallbacks
            .inc_by(stats.journal_fallbacks);
        tracing::debug!(
            vserver = name,
            to,
            bytes = stats.bytes_sent,
            files = stats.files_changed,
            ms = stats.round_duration.as_millis() as u64,
            "replicated"
        );
        self.node.record_replica(pb::ReplicaReport {
            vserver: name.to_string(),
            node: to,
            source_unix_ms: source,
            digest: format!("seq {}", stats.seq),
            final_order_term: final_order.map_or(0, |o| o.0),
            final_order_seq: final_order.map_or(0, |o| o.1),
        });
        Ok(())
    }

    /// The receiving side of `Peer.Replicate`.
    pub async fn accept(
        self: &Arc<Self>,
        mut inbound: tonic::Streaming<pb::ReplicateChunk>,
    ) -> Result<mpsc::Receiver<Result<pb::ReplicateChunk, Status>>, Status> {
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream ended before its first message"))?;
        let name = crate::validate::vserver_name(&first.vserver)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.may_receive(&name, first.generation)?;
        let first_source = first.source_unix_ms;
        if self.node.replica_must_be_forgotten(&name) {
            let store = Arc::clone(&self.store);
            let n = name.clone();
            tokio::task::spawn_blocking(move || store.forget(&n))
                .await
                .map_err(|e| Status::internal(format!("forgetting the replica: {e}")))?
                .map_err(|e| {
                    Status::internal(format!(
                        "vserver: forgetting the replica {name} ran from: {e}"
                    ))
                })?;
            self.node.replica_forgotten(&name);
        }
        let (ours, theirs) = tokio::io::duplex(CHUNK * 2);
        let (rd, mut wr) = tokio::io::split(theirs);
        let (cancel_tx, mut cancel_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        {
            let mut r = self.receiving.lock().unwrap_or_else(|e| e.into_inner());
            if r.contains_key(&name) {
                return Err(Status::already_exists(format!(
                    "vserver: a round for {name} is already being received"
                )));
            }
            r.insert(
                name.clone(),
                Receiving {
                    cancel: Some(cancel_tx),
                    done: done_rx,
                },
            );
        }
        // gRPC → sync/, until the end, idleness or a cancel.
        tokio::spawn(async move {
            if !first.data.is_empty() && wr.write_all(&first.data).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    _ = &mut cancel_rx => break,
                    m = tokio::time::timeout(IDLE, inbound.message()) => match m {
                        Ok(Ok(Some(c))) => {
                            if wr.write_all(&c.data).await.is_err() {
                                break;
                            }
                        }
                        _ => break,
                    }
                }
            }
            let _ = wr.shutdown().await;
        });
        let (out_tx, out_rx) = mpsc::channel(8);
        spawn_reader(rd, out_tx.clone(), Ok);
        let me = Arc::clone(self);
        let store = Arc::clone(&self.store);
        tokio::spawn(async move {
            let r = vsha_sync::receive(store, ours, None).await;
            match &r {
                Ok(rec) => {
                    tracing::debug!(vserver = %rec.name, seq = rec.seq, new = rec.new_version, "replica received");
                    me.node
                        .replica_received(&name, first_source, format!("seq {}", rec.seq));
                }
                Err(e) => {
                    tracing::info!(vserver = %name, error = %e, "replication round refused or cut; the previous replica stays")
                }
            }
            me.receiving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
            let _ = done_tx.send(true);
            drop(out_tx);
        });
        Ok(out_rx)
    }

    fn may_receive(&self, name: &str, generation: u64) -> Result<(), Status> {
        if self.node.runs(name) {
            return Err(Status::failed_precondition(format!(
                "vserver: {name} runs on node {}; it never receives a tree it runs",
                self.me
            )));
        }
        self.raft.read_state(|s| {
            let vs = s
                .vservers
                .get(name)
                .ok_or_else(|| Status::not_found(format!("vserver: no vserver named {name:?}")))?;
            let in_group = vs
                .group
                .as_ref()
                .is_some_and(|g| g.nodes.contains(&self.me));
            if !in_group {
                return Err(Status::failed_precondition(format!(
                    "vserver: node {} is not in the failover group of {name}",
                    self.me
                )));
            }
            match &vs.placement {
                Some(p) if p.node == self.me => Err(Status::failed_precondition(format!(
                    "vserver: {name} is placed on node {} (generation {})",
                    self.me, p.generation
                ))),
                Some(p) if p.generation != generation => Err(Status::failed_precondition(format!(
                    "generation: the sender is at {generation}, the placement at {}",
                    p.generation
                ))),
                None => Err(Status::failed_precondition(format!(
                    "vserver: {name} is not placed"
                ))),
                Some(_) => Ok(()),
            }
        })
    }

    /// Cuts a round in progress for `name` and waits for the store to
    /// finish with it (the previous replica stays current).
    pub async fn stop_receiving(&self, name: &str) {
        let done = {
            let mut r = self.receiving.lock().unwrap_or_else(|e| e.into_inner());
            match r.get_mut(name) {
                Some(rec) => {
                    if let Some(c) = rec.cancel.take() {
                        let _ = c.send(());
                    }
                    Some(rec.done.clone())
                }
                None => None,
            }
        };
        if let Some(mut d) = done {
            let _ = tokio::time::timeout(Duration::from_secs(10), d.wait_for(|v| *v)).await;
        }
    }

    pub fn is_receiving(&self, name: &str) -> bool {
        self.receiving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
    }
}
