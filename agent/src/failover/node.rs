//! The node's half of failover: renews the lease with the leader (its
//! heartbeat also carries what the node runs and the events it saw), keeps
//! the guard's deadline current, and runs [`node_plan::plan`] against the
//! applied state, carrying out its actions through [`Host`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use vsha_kernel::config::VserverSpec as KernelSpec;
use vsha_proto::v1 as pb;

use crate::config::FailoverSettings;
use crate::model::NodeId;
use crate::peer_client::PeerClients;
use crate::raft_loop::RaftHandle;

use super::clock::mono_ms;
use super::events::EventLog;
use super::guard::{GuardHandle, GuardMsg};
use super::health::{self, Tracker, Transition};
use super::host::{Host, HostError};
use super::leader::LeaderRuntime;
use super::lease::NodeLease;
use super::node_plan::{self, Action, LocalState, LocalVserver, Order, OrderAction, StopWhy};

/// Orders wait this long for the applied state to reach their generation.
const ORDER_TTL_MS: u64 = 10_000;
/// Events kept for the leader while it cannot be reached.
const MAX_PENDING_EVENTS: usize = 500;

/// A final delta the leader ordered: send `vserver` (stopped here at
/// `generation`) to `to`, answering order `order` (term, seq).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalSyncOrder {
    pub vserver: String,
    pub generation: u64,
    pub to: NodeId,
    pub order: (u64, u64),
}

struct Shared {
    lease: NodeLease,
    local: BTreeMap<String, LocalVserver>,
    /// The spec each local vserver was started with (to stop it even after
    /// it left the replicated state).
    specs: BTreeMap<String, KernelSpec>,
    orders: Vec<Order>,
    events: Vec<pb::Event>,
    replicas: BTreeMap<(String, NodeId), pb::ReplicaReport>,
    /// Final syncs the leader asked for.
    final_syncs: Vec<FinalSyncOrder>,
    /// Health checks of running vservers that have one.
    health: BTreeMap<String, HealthState>,
    /// The newest order received, (term, seq): acknowledged with every
    /// renewal; the leader resends until then.
    orders_seen: (u64, u64),
}

struct HealthState {
    tracker: Tracker,
    next_due_ms: u64,
    in_flight: bool,
    /// Healthy and running since (monotonic ms): restarts are forgotten
    /// after [`STABLE_RESET_MS`] of this.
    stable_since_ms: u64,
}

/// A vserver healthy this long has its restart count cleared.
const STABLE_RESET_MS: u64 = 300_000;

/// What survives an agent restart (for the `detach` policy, and so a
/// restarted agent reports its vservers at the right generation).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    generations: BTreeMap<String, u64>,
}

pub struct NodeRuntime {
    me: NodeId,
    advertise: String,
    raft: RaftHandle,
    peers: PeerClients,
    leader: Arc<LeaderRuntime>,
    settings: FailoverSettings,
    /// The renewal interval (`settings.renew_ms`).
    heartbeat: Duration,
    pub host: Host,
    shared: Mutex<Shared>,
    guard: Mutex<Option<GuardHandle>>,
    guard_exe: PathBuf,
    wake: Notify,
    /// Told when the leader orders a final delta (replication waits on it).
    final_sync_wake: Notify,
    /// When the reconcile loop last went round (monotonic ms): the systemd
    /// watchdog is fed only while it does.
    last_round_ms: std::sync::atomic::AtomicU64,
    /// Set once replication exists (it holds this runtime too).
    replication: std::sync::OnceLock<std::sync::Weak<super::replication::Replication>>,
}

impl NodeRuntime {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: NodeId,
        advertise: String,
        raft: RaftHandle,
        peers: PeerClients,
        leader: Arc<LeaderRuntime>,
        settings: FailoverSettings,
        host: Host,
        guard_exe: PathBuf,
    ) -> Self {
        let heartbeat = Duration::from_millis(settings.renew_ms);
        let lease = NodeLease::new(settings.lease_ms, settings.fence_lead_ms);
        NodeRuntime {
            me,
            advertise,
            raft,
            peers,
            leader,
            settings,
            heartbeat,
            host,
            shared: Mutex::new(Shared {
                lease,
                local: BTreeMap::new(),
                specs: BTreeMap::new(),
                orders: Vec::new(),
                events: Vec::new(),
                replicas: BTreeMap::new(),
                final_syncs: Vec::new(),
                health: BTreeMap::new(),
                orders_seen: (0, 0),
            }),
            guard: Mutex::new(None),
            guard_exe,
            wake: Notify::new(),
            final_sync_wake: Notify::new(),
            last_round_ms: std::sync::atomic::AtomicU64::new(mono_ms()),
            replication: std::sync::OnceLock::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist_path(&self) -> PathBuf {
        self.host.paths.run_dir.join("node-vservers.json")
    }

    /// Starts the guard and takes over vservers a previous incarnation
    /// left running (only possible with the `detach` policy).
    pub fn start(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.host.paths.run_dir)?;
        self.ensure_guard();
        let persisted: Persisted = std::fs::read(self.persist_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let specs = self.raft.read_state(|s| {
            s.vservers
                .values()
                .map(|v| {
                    (
                        v.spec.name.clone(),
                        self.host.kernel_spec(&v.spec, s.nodes.get(&self.me)),
                    )
                })
                .collect::<Vec<_>>()
        });
        let held: BTreeMap<String, (u64, String)> = std::fs::read(self.held_replicas_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let replica_root = super::replication::replica_dir(&self.host.vserver_root);
        let mut sh = self.lock();
        for (name, (source_unix_ms, digest)) in held {
            if replica_root.join(&name).exists() {
                sh.replicas.insert(
                    (name.clone(), self.me),
                    pb::ReplicaReport {
                        vserver: name,
                        node: self.me,
                        source_unix_ms,
                        digest,
                        ..Default::default()
                    },
                );
            }
        }
        for (name, k) in specs {
            if self.host.running(&name) {
                let generation = persisted.generations.get(&name).copied().unwrap_or(0);
                // Left by a previous agent (detach policy): the cluster may
                // have moved it meanwhile, so it is stopped, not adopted.
                tracing::warn!(vserver = %name, generation, "found running from a previous agent; stopping it");
                sh.local.insert(
                    name.clone(),
                    LocalVserver {
                        generation,
                        state: LocalState::Running,
                        restarts: 0,
                    },
                );
                sh.specs.insert(name, k);
            }
        }
        drop(sh);
        // The new guard kills them at once: no lease is held yet, and
        // nothing may run without one; the plan then records them stopped.
        self.guard_hold_all();
        Ok(())
    }

    fn ensure_guard(&self) -> bool {
        let mut g = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = g.as_mut() {
            if h.alive() {
                return true;
            }
            tracing::error!("the guard process died; restarting it");
        }
        match GuardHandle::spawn(&self.guard_exe) {
            Ok(mut h) => {
                if self.settings.detach_on_agent_death {
                    let _ = h.send(&GuardMsg::Detach);
                }
                *g = Some(h);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, exe = %self.guard_exe.display(), "cannot start the guard; this node runs no vservers");
                *g = None;
                false
            }
        }
    }

    fn guard_send(&self, msg: &GuardMsg) -> bool {
        let mut g = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_mut().map(|h| h.send(msg)) {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                tracing::error!(error = %e, "guard pipe broken");
                false
            }
            None => false,
        }
    }

    fn guard_hold_all(&self) {
        let (deadline, held) = {
            let sh = self.lock();
            let d = sh.lease.fence_at_ms().unwrap_or(0);
            let held: Vec<(String, KernelSpec)> = sh
                .specs
                .iter()
                .filter(|(n, _)| sh.local.get(*n).is_some_and(|l| l.may_have_processes()))
                .map(|(n, k)| (n.clone(), k.clone()))
                .collect();
            (d, held)
        };
        self.guard_send(&GuardMsg::Deadline(deadline));
        for (name, k) in held {
            if let Ok(h) = self.host.held(&k) {
                self.guard_send(&GuardMsg::Hold(name, h));
            }
        }
    }

    fn event(&self, kind: &str, vserver: &str, message: impl Into<String>) {
        self.push_event(EventLog::event(kind, vserver, self.me, message));
    }

    /// Queues an event for the leader's log (sent with the next renewal).
    fn push_event(&self, ev: pb::Event) {
        tracing::info!(kind = %ev.kind, vserver = %ev.vserver, message = %ev.message, "node event");
        let mut sh = self.lock();
        if sh.events.len() >= MAX_PENDING_EVENTS {
            sh.events.remove(0);
        }
        sh.events.push(ev);
    }

    /// The reconcile loop went round within `d` (a hung node runtime stops
    /// feeding the systemd watchdog, which then restarts the agent; the
    /// guard fences what it ran).
    pub fn alive_within(&self, d: Duration) -> bool {
        let last = self
            .last_round_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        mono_ms().saturating_sub(last) <= d.as_millis() as u64
    }

    pub fn set_replication(&self, r: &Arc<super::replication::Replication>) {
        let _ = self.replication.set(Arc::downgrade(r));
    }

    /// Processes of `name` may run here.
    pub fn runs(&self, name: &str) -> bool {
        self.lock()
            .local
            .get(name)
            .is_some_and(|l| l.may_have_processes())
    }

    fn held_replicas_path(&self) -> PathBuf {
        self.host.paths.run_dir.join("replicas.json")
    }

    /// A round of `name` completed here: this node holds the holder's tree
    /// as of `source_unix_ms`. Reported with every renewal (so any leader
    /// learns it from the node that has the data) and kept across restarts.
    pub fn replica_received(&self, name: &str, source_unix_ms: u64, digest: String) {
        let held = {
            let mut sh = self.lock();
            let key = (name.to_string(), self.me);
            let newer = sh
                .replicas
                .get(&key)
                .is_none_or(|r| r.source_unix_ms <= source_unix_ms);
            if newer {
                sh.replicas.insert(
                    key,
                    pb::ReplicaReport {
                        vserver: name.to_string(),
                        node: self.me,
                        source_unix_ms,
                        digest,
                        ..Default::default()
                    },
                );
            }
            Self::held_replicas(&sh, self.me)
        };
        self.persist_held(&held);
    }

    fn held_replicas(sh: &Shared, me: NodeId) -> BTreeMap<String, (u64, String)> {
        sh.replicas
            .values()
            .filter(|r| r.node == me)
            .map(|r| (r.vserver.clone(), (r.source_unix_ms, r.digest.clone())))
            .collect()
    }

    fn persist_held(&self, held: &BTreeMap<String, (u64, String)>) {
        if let Ok(b) = serde_json::to_vec(held) {
            let p = self.held_replicas_path();
            let tmp = p.with_extension("tmp");
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(&tmp, &p);
            }
        }
    }

    /// This node runs `name` now: its replica stops being one.
    fn forget_held_replica(&self, name: &str) {
        let held = {
            let mut sh = self.lock();
            sh.replicas.remove(&(name.to_string(), self.me));
            Self::held_replicas(&sh, self.me)
        };
        self.persist_held(&held);
    }

    fn ran_from_replica_path(&self, name: &str) -> PathBuf {
        self.host
            .paths
            .run_dir
            .join(format!("ran-from-replica.{name}"))
    }

    /// This node ran `name` from its replica, so the replica no longer
    /// matches sync/'s manifest: the store must forget it before it
    /// receives `name` again. Kept on disk across agent restarts.
    pub fn replica_must_be_forgotten(&self, name: &str) -> bool {
        self.ran_from_replica_path(name).exists()
    }

    pub fn replica_forgotten(&self, name: &str) {
        let _ = std::fs::remove_file(self.ran_from_replica_path(name));
    }

    pub fn record_replica(&self, r: pb::ReplicaReport) {
        let mut sh = self.lock();
        sh.replicas.insert((r.vserver.clone(), r.node), r);
    }

    pub fn take_final_syncs(&self) -> Vec<FinalSyncOrder> {
        std::mem::take(&mut self.lock().final_syncs)
    }

    /// Resolves once a final delta has been ordered since the last call.
    pub async fn final_sync_ordered(&self) {
        self.final_sync_wake.notified().await
    }

    /// The vservers this node runs as holder right now, with generation.
    pub fn running_here(&self) -> Vec<(String, u64)> {
        self.lock()
            .local
            .iter()
            .filter(|(_, l)| l.state == LocalState::Running)
            .map(|(n, l)| (n.clone(), l.generation))
            .collect()
    }

    pub fn lease_ms_left(&self) -> u64 {
        self.lock().lease.remaining_ms(mono_ms())
    }

    /// What the node runs, and `stopped` for what its applied state places
    /// here that it does not run (so the leader orders a lost start again).
    fn reports(&self, sh: &Shared) -> Vec<pb::VserverReport> {
        // Placed here at a generation this node does not run (nothing
        // local, or a copy stopped at an older one).
        let not_here: BTreeMap<String, u64> = self.raft.read_state(|s| {
            s.vservers
                .iter()
                .filter_map(|(n, v)| v.placement.as_ref().map(|p| (n, p)))
                .filter(|(n, p)| {
                    p.node == self.me
                        && sh.local.get(*n).is_none_or(|l| {
                            l.state == LocalState::Stopped && l.generation < p.generation
                        })
                })
                .map(|(n, p)| (n.clone(), p.generation))
                .collect()
        });
        let local = sh
            .local
            .iter()
            .filter(|(name, _)| !not_here.contains_key(*name))
            .map(|(name, l)| {
                let (state, reason) = match &l.state {
                    LocalState::Running => ("running", String::new()),
                    LocalState::Stopped => ("stopped", String::new()),
                    LocalState::Failed { reason } => ("failed", reason.clone()),
                };
                pb::VserverReport {
                    vserver: name.clone(),
                    generation: l.generation,
                    state: state.into(),
                    reason,
                    restarts: l.restarts,
                }
            });
        let placed = not_here
            .iter()
            .map(|(vserver, &generation)| pb::VserverReport {
                vserver: vserver.clone(),
                generation,
                state: "stopped".into(),
                reason: String::new(),
                restarts: 0,
            });
        local.chain(placed).collect()
    }

    /// Renews the lease every heartbeat interval until dropped.
    pub async fn renew_loop(self: Arc<Self>) {
        let mut seq = 0u64;
        let mut in_flight: Option<tokio::task::JoinHandle<()>> = None;
        let mut ticker = tokio::time::interval(self.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if in_flight.as_ref().is_some_and(|h| !h.is_finished()) {
                continue;
            }
            let view = self.raft.view();
            if view.leader_id == 0 {
                continue;
            }
            seq += 1;
            let (reports, replicas, events, acked) = {
                let mut sh = self.lock();
                let reports = self.reports(&sh);
                let replicas: Vec<pb::ReplicaReport> = sh.replicas.values().cloned().collect();
                (
                    reports,
                    replicas,
                    std::mem::take(&mut sh.events),
                    sh.orders_seen,
                )
            };
            let req = pb::HeartbeatRequest {
                node_id: self.me,
                addr: self.advertise.clone(),
                applied_index: view.applied,
                seq,
                reports,
                replicas,
                events,
                acked_term: acked.0,
                acked_seq: acked.1,
                ipv4root: vsha_kernel::patched::probe().to_string(),
            };
            let me = Arc::clone(&self);
            let leader_addr = self.raft.address_of(view.leader_id);
            in_flight = Some(tokio::spawn(async move {
                let sent = mono_ms();
                let events = req.events.clone();
                let resp = if view.is_leader {
                    Some(me.leader.on_heartbeat(req).await)
                } else {
                    me.send_heartbeat(leader_addr, req).await
                };
                match resp {
                    Some(r) if r.lease_granted => me.renewed(sent, r),
                    _ => {
                        // Keep the events for the next leader that answers.
                        let mut sh = me.lock();
                        let mut back = events;
                        back.append(&mut sh.events);
                        back.truncate(MAX_PENDING_EVENTS);
                        sh.events = back;
                    }
                }
            }));
        }
    }

    async fn send_heartbeat(
        &self,
        addr: Option<String>,
        req: pb::HeartbeatRequest,
    ) -> Option<pb::HeartbeatResponse> {
        let addr = addr?;
        let mut client = self.peers.client(&addr).ok()?;
        // An answer later than this is useless for a lease anyway.
        let wait = Duration::from_millis(self.settings.lease_ms / 2).max(self.heartbeat);
        let mut r = tonic::Request::new(req);
        r.set_timeout(wait);
        match crate::peer_client::within(wait, client.heartbeat(r)).await {
            Ok(resp) => Some(resp.into_inner()),
            Err(e) => {
                tracing::debug!(error = %e.message(), "lease renewal not delivered");
                None
            }
        }
    }

    fn renewed(&self, sent: u64, r: pb::HeartbeatResponse) {
        let now = mono_ms();
        let deadline = {
            let mut sh = self.lock();
            let had = sh.lease.may_run(now);
            sh.lease.renewed(sent, r.lease_ms);
            for o in r.orders {
                // Resent until acknowledged: take each one once.
                if (o.term, o.seq) <= sh.orders_seen {
                    continue;
                }
                sh.orders_seen = (o.term, o.seq);
                if let Some(to) = o.action.strip_prefix("final-sync:") {
                    if let Ok(to) = to.parse() {
                        sh.final_syncs.push(FinalSyncOrder {
                            vserver: o.vserver,
                            generation: o.generation,
                            to,
                            order: (o.term, o.seq),
                        });
                        self.final_sync_wake.notify_one();
                    }
                    continue;
                }
                let action = match o.action.as_str() {
                    "start" => OrderAction::Start,
                    "stop" => OrderAction::Stop,
                    "restart" => OrderAction::Restart,
                    other => {
                        tracing::warn!(action = other, "unknown order from the leader");
                        continue;
                    }
                };
                sh.orders.push(Order {
                    action,
                    vserver: o.vserver,
                    generation: o.generation,
                    received_ms: now,
                });
            }
            if !had {
                tracing::info!(lease_ms = sh.lease.lease_ms(), "lease granted");
            }
            sh.lease.fence_at_ms().unwrap_or(0)
        };
        self.guard_send(&GuardMsg::Deadline(deadline));
        self.wake.notify_one();
    }

    /// Plans and acts until dropped.
    pub async fn reconcile_loop(self: Arc<Self>) {
        let poll =
            (self.heartbeat / 2).clamp(Duration::from_millis(20), Duration::from_millis(100));
        let mut last_health = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
            self.last_round_ms
                .store(mono_ms(), std::sync::atomic::Ordering::Relaxed);
            if !self.ensure_guard() {
                // Without a guard nothing may run: the lease is dropped so
                // the plan stops everything.
                self.lock().lease.drop_lease();
            }
            if last_health.elapsed() >= self.heartbeat {
                last_health = tokio::time::Instant::now();
                self.check_health().await;
            }
            self.run_health_checks();
            let plan = {
                let mut sh = self.lock();
                let orders = std::mem::take(&mut sh.orders);
                let now = mono_ms();
                let p = self.raft.read_state(|s| {
                    node_plan::plan(self.me, now, &sh.lease, s, &sh.local, orders, ORDER_TTL_MS)
                });
                sh.orders = p.waiting.clone();
                p
            };
            for action in plan.actions {
                if let Action::Start { vserver, .. } | Action::Restart { vserver, .. } = &action {
                    // Never run a tree a round is still being written into.
                    let repl = self.replication.get().and_then(|w| w.upgrade());
                    if let Some(r) = repl {
                        r.stop_receiving(vserver).await;
                    }
                }
                let me = Arc::clone(&self);
                let r = tokio::task::spawn_blocking(move || me.act(action)).await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "vserver action panicked");
                }
            }
        }
    }

    /// Marks vservers whose init died as failed (the leader decides about
    /// restarts and moves).
    async fn check_health(self: &Arc<Self>) {
        if !self.lock().lease.may_run(mono_ms()) {
            // Without a lease the guard may have killed them: that is the
            // self-fence the plan records, not a health failure.
            return;
        }
        let names: Vec<String> = self
            .lock()
            .local
            .iter()
            .filter(|(_, l)| l.state == LocalState::Running)
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let me = Arc::clone(self);
            let n = name.clone();
            let up = tokio::task::spawn_blocking(move || me.host.running(&n))
                .await
                .unwrap_or(false);
            if !up {
                let reason = "its init exited".to_string();
                {
                    let mut sh = self.lock();
                    if let Some(l) = sh.local.get_mut(&name) {
                        l.state = LocalState::Failed {
                            reason: reason.clone(),
                        };
                    }
                }
                self.event("health_failed", &name, reason);
            }
        }
    }

    /// Starts the checks that are due, each on a thread of its own (a hung
    /// check must not stall the node); results come back through
    /// [`Self::health_result`].
    fn run_health_checks(self: &Arc<Self>) {
        let now = mono_ms();
        let due: Vec<(String, crate::model::HealthCheck, KernelSpec)> = {
            let mut sh = self.lock();
            if !sh.lease.may_run(now) {
                return;
            }
            // Failed ones too: a failure that clears itself shows as
            // recovered (unless the leader restarted or moved it first).
            let running: Vec<String> = sh
                .local
                .iter()
                .filter(|(_, l)| l.may_have_processes())
                .map(|(n, _)| n.clone())
                .collect();
            sh.health.retain(|n, _| running.contains(n));
            let mut due = Vec::new();
            for name in running {
                let check = self
                    .raft
                    .read_state(|s| s.vservers.get(&name).and_then(|v| v.spec.health.clone()));
                let (Some(check), Some(k)) = (check, sh.specs.get(&name).cloned()) else {
                    continue;
                };
                if check.tcp_port == 0 && check.command.is_empty() {
                    continue;
                }
                let h = sh
                    .health
                    .entry(name.clone())
                    .or_insert_with(|| HealthState {
                        tracker: Tracker::new(&check),
                        next_due_ms: now + health::interval_ms(&check),
                        in_flight: false,
                        stable_since_ms: now,
                    });
                if h.in_flight || now < h.next_due_ms {
                    continue;
                }
                h.in_flight = true;
                h.next_due_ms = now + health::interval_ms(&check);
                due.push((name, check, k));
            }
            due
        };
        for (name, check, k) in due {
            let me = Arc::clone(self);
            std::thread::spawn(move || {
                let timeout = Duration::from_millis(health::timeout_ms(&check));
                let r = me.probe(&k, &check, timeout);
                me.health_result(&name, r);
            });
        }
    }

    fn probe(
        self: &Arc<Self>,
        k: &KernelSpec,
        check: &crate::model::HealthCheck,
        timeout: Duration,
    ) -> Result<(), String> {
        if check.tcp_port != 0 {
            let Some((ip, _)) = k.ipv4() else {
                return Err("a TCP check needs the vserver's IP".into());
            };
            let addr = std::net::SocketAddr::from((ip, check.tcp_port));
            std::net::TcpStream::connect_timeout(&addr, timeout)
                .map_err(|e| format!("tcp {addr}: {e}"))?;
        }
        if !check.command.is_empty() {
            let (tx, rx) = std::sync::mpsc::channel();
            let (paths, k2, cmd) = (self.host.paths.clone(), k.clone(), check.command.clone());
            std::thread::spawn(move || {
                let opts = vsha_kernel::local::ExecOptions {
                    stdio: vsha_kernel::context::Stdio::Log(paths.log_file(&k2.name)),
                    ..Default::default()
                };
                let _ = tx.send(vsha_kernel::local::exec_spec(&paths, &k2, &cmd, &opts));
            });
            match rx.recv_timeout(timeout) {
                Ok(Ok(0)) => {}
                Ok(Ok(code)) => {
                    return Err(format!("command {:?} exited with {code}", check.command))
                }
                Ok(Err(e)) => return Err(format!("command {:?}: {e}", check.command)),
                Err(_) => {
                    return Err(format!(
                        "command {:?} gave no answer within {} ms",
                        check.command,
                        timeout.as_millis()
                    ))
                }
            }
        }
        Ok(())
    }

    fn health_result(&self, name: &str, r: Result<(), String>) {
        let now = mono_ms();
        let mut ev = None;
        {
            let mut sh = self.lock();
            let sh = &mut *sh;
            let Some(h) = sh.health.get_mut(name) else {
                return;
            };
            h.in_flight = false;
            let t = h.tracker.observe(r);
            if !h.tracker.healthy() {
                h.stable_since_ms = now;
            }
            let stable_for = now.saturating_sub(h.stable_since_ms);
            if let Some(l) = sh.local.get_mut(name) {
                match t {
                    Some(Transition::BecameUnhealthy { reason })
                        if l.state == LocalState::Running =>
                    {
                        l.state = LocalState::Failed {
                            reason: reason.clone(),
                        };
                        ev = Some(("health_failed", reason));
                    }
                    Some(Transition::BecameHealthy)
                        if matches!(l.state, LocalState::Failed { .. }) =>
                    {
                        l.state = LocalState::Running;
                        ev = Some(("health_recovered", "health checks pass again".into()));
                    }
                    _ => {}
                }
                if l.state == LocalState::Running && l.restarts > 0 && stable_for >= STABLE_RESET_MS
                {
                    l.restarts = 0;
                    ev = Some((
                        "health_stable",
                        "healthy for 5 minutes: restart count cleared".into(),
                    ));
                }
            }
        }
        if let Some((kind, msg)) = ev {
            self.event(kind, name, msg);
        }
    }

    fn spec_for(&self, name: &str) -> Option<KernelSpec> {
        let from_state = self.raft.read_state(|s| {
            s.vservers
                .get(name)
                .map(|v| self.host.kernel_spec(&v.spec, s.nodes.get(&self.me)))
        });
        from_state.or_else(|| self.lock().specs.get(name).cloned())
    }

    fn act(&self, action: Action) {
        match action {
            Action::Adopt {
                vserver,
                generation,
            } => {
                let mut sh = self.lock();
                if let Some(l) = sh.local.get_mut(&vserver) {
                    l.generation = generation;
                }
                drop(sh);
                self.persist();
            }
            Action::Start {
                vserver,
                generation,
            } => self.do_start(&vserver, generation, false),
            Action::Restart {
                vserver,
                generation,
            } => {
                self.do_stop(&vserver, StopWhy::Ordered, false);
                self.do_start(&vserver, generation, true);
            }
            Action::Stop { vserver, why } => self.do_stop(&vserver, why, true),
        }
    }

    fn do_start(&self, name: &str, generation: u64, restart: bool) {
        let Some(k) = self.spec_for(name) else {
            return;
        };
        // The lease may have lapsed while this action waited.
        if !self.lock().lease.may_run(mono_ms()) {
            return;
        }
        let held = match self.host.held(&k) {
            Ok(h) => h,
            Err(e) => {
                self.failed(name, generation, e.to_string(), restart);
                return;
            }
        };
        if !self.guard_send(&GuardMsg::Hold(name.to_string(), held)) {
            self.failed(name, generation, "the guard is not running".into(), restart);
            return;
        }
        self.forget_held_replica(name);
        let replicas = super::replication::replica_dir(&self.host.vserver_root);
        if k.tree.starts_with(&replicas)
            || std::fs::canonicalize(&replicas).is_ok_and(|r| k.tree.starts_with(r))
        {
            if let Err(e) = std::fs::write(self.ran_from_replica_path(name), b"") {
                // Without the mark a later round could trust a stale
                // manifest: refuse to run it.
                self.failed(
                    name,
                    generation,
                    format!("cannot mark the replica in use: {e}"),
                    restart,
                );
                self.guard_send(&GuardMsg::Release(name.to_string()));
                return;
            }
        }
        match self.host.start(&k) {
            Ok(t) => {
                let mut sh = self.lock();
                let prev = sh.local.get(name).cloned();
                let restarts = match prev {
                    Some(p) if p.generation == generation => p.restarts + u32::from(restart),
                    _ => 0,
                };
                sh.local.insert(
                    name.to_string(),
                    LocalVserver {
                        generation,
                        state: LocalState::Running,
                        restarts,
                    },
                );
                sh.specs.insert(name.to_string(), k);
                sh.health.remove(name);
                drop(sh);
                self.persist();
                let mut ev = EventLog::event(
                    if restart { "restarted" } else { "started" },
                    name,
                    self.me,
                    format!("{name} runs on node {} at generation {generation}", self.me),
                );
                ev.phases = vec![
                    pb::Phase {
                        name: "arp probe".into(),
                        ms: t.probe.as_millis() as u64,
                    },
                    pb::Phase {
                        name: "start".into(),
                        ms: t.start.as_millis() as u64,
                    },
                ];
                self.push_event(ev);
            }
            Err(e) => {
                self.guard_send(&GuardMsg::Release(name.to_string()));
                let kind = if matches!(e, HostError::IpInUse { .. }) {
                    "takeover_refused"
                } else {
                    "start_failed"
                };
                self.event(kind, name, e.to_string());
                self.failed(name, generation, e.to_string(), restart);
            }
        }
    }

    /// Records a failed start. A failed restart counts as a restart, so
    /// the leader (which answers each restart count once) orders another
    /// one, up to `max_restarts`, then moves the vserver.
    fn failed(&self, name: &str, generation: u64, reason: String, restart: bool) {
        let mut sh = self.lock();
        let restarts = sh
            .local
            .get(name)
            .filter(|l| l.generation == generation)
            .map_or(0, |l| l.restarts)
            + u32::from(restart);
        sh.local.insert(
            name.to_string(),
            LocalVserver {
                generation,
                state: LocalState::Failed { reason },
                restarts,
            },
        );
    }

    fn do_stop(&self, name: &str, why: StopWhy, record: bool) {
        let Some(k) = self
            .lock()
            .specs
            .get(name)
            .cloned()
            .or_else(|| self.spec_for(name))
        else {
            return;
        };
        let r = self.host.stop(&k, why.is_hard());
        if let Err(e) = &r {
            tracing::error!(vserver = name, error = %e, "stop failed");
            if why == StopWhy::SelfFence {
                // The guard fences on its own at the deadline.
                return;
            }
        }
        self.guard_send(&GuardMsg::Release(name.to_string()));
        {
            let mut sh = self.lock();
            if let Some(l) = sh.local.get_mut(name) {
                l.state = LocalState::Stopped;
            }
        }
        self.persist();
        if record {
            let kind = if why == StopWhy::SelfFence {
                "self_fenced"
            } else {
                "stopped"
            };
            self.event(
                kind,
                name,
                format!("{name} stopped on node {}: {}", self.me, why.as_str()),
            );
        }
    }

    fn persist(&self) {
        let p = Persisted {
            generations: self
                .lock()
                .local
                .iter()
                .map(|(n, l)| (n.clone(), l.generation))
                .collect(),
        };
        if let Ok(b) = serde_json::to_vec(&p) {
            let tmp = self.persist_path().with_extension("tmp");
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(&tmp, self.persist_path());
            }
        }
    }
}
