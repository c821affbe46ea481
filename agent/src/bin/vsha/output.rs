//! What the CLI prints: human tables, and the documented JSON schema
//! (docs/cli.md). JSON field names are a stable contract.

use serde::Serialize;
use vsha_proto::v1 as pb;

#[derive(Serialize)]
pub struct StatusJson {
    pub cluster_id: String,
    /// Node id of the leader; 0 when none is known.
    pub leader: u64,
    pub leader_addr: String,
    pub term: u64,
    pub commit_index: u64,
    pub served_by: u64,
    pub stale: bool,
    pub nodes: Vec<NodeJson>,
    pub vservers: Vec<VserverJson>,
}

#[derive(Serialize)]
pub struct NodeJson {
    pub id: u64,
    pub addr: String,
    pub role: &'static str,
    pub membership: String,
    pub admin: &'static str,
    pub reachable: bool,
    /// null when the answering agent does not know (it is not the leader).
    pub last_heartbeat_ms: Option<u64>,
    pub applied_index: u64,
    pub is_leader: bool,
    /// "cgroup-bpf" or "kernel set_ipv4root (syscall N)"; null when the
    /// answering agent does not know.
    pub ipv4root: Option<String>,
}

#[derive(Serialize)]
pub struct PlacementJson {
    pub node: u64,
    pub generation: u64,
    pub desired: String,
    pub observed: String,
}

#[derive(Serialize)]
pub struct PairJson {
    pub nodes: Vec<u64>,
    pub failback: &'static str,
    pub failback_stable_ms: u64,
}

#[derive(Serialize)]
pub struct VserverJson {
    pub name: String,
    pub ip: String,
    pub prefix: u32,
    pub dev: String,
    pub tree: String,
    pub hostname: String,
    pub placement: Option<PlacementJson>,
    pub pair: Option<PairJson>,
    /// The leader's live view; null when no leader answered.
    pub runtime: Option<RuntimeJson>,
}

#[derive(Serialize)]
pub struct RuntimeJson {
    /// "running", "stopped", "failed: REASON" or "unknown".
    pub state: String,
    pub restarts: u32,
    /// What is under way ("" when nothing).
    pub phase: String,
    /// Milliseconds left in the phase when known, else null.
    pub phase_ms_left: Option<u64>,
    pub replicas: Vec<ReplicaLagJson>,
    /// The last alert about this vserver ("" when none).
    pub alert: String,
}

#[derive(Serialize)]
pub struct ReplicaLagJson {
    pub node: u64,
    /// Age of the newest complete replica; null when there is none.
    pub lag_ms: Option<u64>,
}

#[derive(Serialize)]
pub struct EventJson {
    pub seq: u64,
    pub unix_ms: u64,
    pub kind: String,
    pub vserver: String,
    pub node: u64,
    pub message: String,
    pub phases: Vec<PhaseJson>,
}

#[derive(Serialize)]
pub struct PhaseJson {
    pub name: String,
    pub ms: u64,
}

pub fn event_json(e: &pb::Event) -> EventJson {
    EventJson {
        seq: e.seq,
        unix_ms: e.unix_ms,
        kind: e.kind.clone(),
        vserver: e.vserver.clone(),
        node: e.node,
        message: e.message.clone(),
        phases: e
            .phases
            .iter()
            .map(|p| PhaseJson {
                name: p.name.clone(),
                ms: p.ms,
            })
            .collect(),
    }
}

pub fn event_human(e: &pb::Event) -> String {
    let secs = e.unix_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let mut line = format!(
        "{h:02}:{m:02}:{s:02}.{:03} {:<16} {}",
        e.unix_ms % 1000,
        e.kind,
        e.message
    );
    if !e.phases.is_empty() {
        let p: Vec<String> = e
            .phases
            .iter()
            .map(|p| format!("{} {} ms", p.name, p.ms))
            .collect();
        line.push_str(&format!(" [{}]", p.join(", ")));
    }
    line
}

pub fn role(r: i32) -> &'static str {
    match pb::NodeRole::try_from(r) {
        Ok(pb::NodeRole::Learner) => "learner",
        Ok(pb::NodeRole::Witness) => "witness",
        _ => "voter",
    }
}

pub fn admin(a: i32) -> &'static str {
    match pb::AdminState::try_from(a) {
        Ok(pb::AdminState::Draining) => "draining",
        Ok(pb::AdminState::Maintenance) => "maintenance",
        _ => "active",
    }
}

pub fn failback(f: i32) -> &'static str {
    match pb::Failback::try_from(f) {
        Ok(pb::Failback::Auto) => "auto",
        Ok(pb::Failback::Manual) => "manual",
        _ => "never",
    }
}

pub fn node_json(n: &pb::NodeInfo) -> NodeJson {
    NodeJson {
        id: n.id,
        addr: n.addr.clone(),
        role: role(n.role),
        membership: n.membership.clone(),
        admin: admin(n.admin),
        reachable: n.reachable,
        last_heartbeat_ms: u64::try_from(n.last_heartbeat_ms).ok(),
        applied_index: n.applied_index,
        is_leader: n.is_leader,
        ipv4root: (!n.ipv4root.is_empty()).then(|| n.ipv4root.clone()),
    }
}

pub fn vserver_json(v: &pb::VserverInfo) -> VserverJson {
    let spec = v.spec.clone().unwrap_or_default();
    VserverJson {
        name: spec.name,
        ip: spec.ip,
        prefix: spec.prefix,
        dev: spec.dev,
        tree: spec.tree,
        hostname: spec.hostname,
        placement: v.placement.as_ref().map(|p| PlacementJson {
            node: p.node,
            generation: p.generation,
            desired: p.desired.clone(),
            observed: p.observed.clone(),
        }),
        pair: v.group.as_ref().map(|g| PairJson {
            nodes: g.nodes.clone(),
            failback: failback(g.failback),
            failback_stable_ms: g.failback_stable_ms,
        }),
        runtime: v.runtime.as_ref().map(|r| RuntimeJson {
            state: r.observed.clone(),
            restarts: r.restarts,
            phase: r.phase.clone(),
            phase_ms_left: (r.phase_ms_left > 0).then_some(r.phase_ms_left),
            replicas: r
                .lag
                .iter()
                .map(|l| ReplicaLagJson {
                    node: l.node,
                    lag_ms: l.known.then_some(l.lag_ms),
                })
                .collect(),
            alert: r.alert.clone(),
        }),
    }
}

pub fn status_json(s: &pb::StatusResponse) -> StatusJson {
    StatusJson {
        cluster_id: s.cluster_id.clone(),
        leader: s.leader_id,
        leader_addr: s.leader_addr.clone(),
        term: s.term,
        commit_index: s.commit_index,
        served_by: s.served_by,
        stale: s.stale,
        nodes: s.nodes.iter().map(node_json).collect(),
        vservers: s.vservers.iter().map(vserver_json).collect(),
    }
}

/// Left-aligned columns, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.clone()));
        out.push('\n');
    }
    out
}

/// `from_leader`: the answer carries the leader's liveness view, so a node
/// never heard from is unreachable rather than unknown.
pub fn nodes_table(nodes: &[NodeJson], from_leader: bool) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                format!("{}{}", n.id, if n.is_leader { "*" } else { "" }),
                n.addr.clone(),
                n.role.to_string(),
                n.membership.clone(),
                n.admin.to_string(),
                if n.last_heartbeat_ms.is_none() && !n.reachable && !from_leader {
                    "?".into()
                } else if n.reachable {
                    "yes".into()
                } else {
                    "NO".into()
                },
                n.last_heartbeat_ms
                    .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into()),
                n.applied_index.to_string(),
                n.ipv4root.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "NODE",
            "ADDR",
            "ROLE",
            "RAFT",
            "ADMIN",
            "REACHABLE",
            "HEARD",
            "APPLIED",
            "IPV4ROOT",
        ],
        &rows,
    )
}

pub fn vservers_table(vs: &[VserverJson]) -> String {
    let rows: Vec<Vec<String>> = vs
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                format!("{}/{}", v.ip, v.prefix),
                if v.dev.is_empty() {
                    "-".into()
                } else {
                    v.dev.clone()
                },
                v.placement
                    .as_ref()
                    .map(|p| format!("node {} gen {} ({})", p.node, p.generation, p.desired))
                    .unwrap_or_else(|| "unplaced".into()),
                v.runtime
                    .as_ref()
                    .map(|r| {
                        let mut st = r.state.clone();
                        if r.restarts > 0 {
                            st.push_str(&format!(" ({} restarts)", r.restarts));
                        }
                        if !r.phase.is_empty() {
                            st.push_str(&format!("; {}", r.phase));
                            if let Some(ms) = r.phase_ms_left {
                                st.push_str(&format!(" ({:.1} s left)", ms as f64 / 1000.0));
                            }
                        }
                        st
                    })
                    .unwrap_or_else(|| "-".into()),
                v.runtime
                    .as_ref()
                    .map(|r| {
                        let lags: Vec<String> = r
                            .replicas
                            .iter()
                            .map(|l| match l.lag_ms {
                                Some(ms) => format!("{}: {:.1} s", l.node, ms as f64 / 1000.0),
                                None => format!("{}: none", l.node),
                            })
                            .collect();
                        if lags.is_empty() {
                            "-".into()
                        } else {
                            lags.join(", ")
                        }
                    })
                    .unwrap_or_else(|| "-".into()),
                v.pair
                    .as_ref()
                    .map(|p| {
                        let nodes: Vec<String> = p.nodes.iter().map(|n| n.to_string()).collect();
                        format!("{} (failback {})", nodes.join(" > "), p.failback)
                    })
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "VSERVER",
            "IP",
            "DEV",
            "PLACEMENT",
            "STATE",
            "REPLICA LAG",
            "PAIR",
        ],
        &rows,
    );
    for v in vs {
        if let Some(r) = v.runtime.as_ref().filter(|r| !r.alert.is_empty()) {
            out.push_str(&format!("alert {}: {}\n", v.name, r.alert));
        }
    }
    out
}

pub fn status_human(s: &StatusJson) -> String {
    let mut out = String::new();
    let leader = if s.leader == 0 {
        "none (no quorum?)".to_string()
    } else {
        format!("node {} at {}", s.leader, s.leader_addr)
    };
    out.push_str(&format!(
        "cluster {}  leader {}  term {}  commit {}{}\n\n",
        if s.cluster_id.is_empty() {
            "(bootstrapping)"
        } else {
            &s.cluster_id
        },
        leader,
        s.term,
        s.commit_index,
        if s.stale {
            format!(
                "  (stale: local view of node {}; liveness unknown)",
                s.served_by
            )
        } else {
            String::new()
        }
    ));
    out.push_str(&nodes_table(&s.nodes, !s.stale));
    out.push('\n');
    if s.vservers.is_empty() {
        out.push_str("no vservers (add one: vsha vserver add NAME --ip IPV4[/PREFIX])\n");
    } else {
        out.push_str(&vservers_table(&s.vservers));
    }
    out
}
