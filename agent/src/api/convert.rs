//! Wire types <-> core types. Incoming messages are validated here, so the
//! core only ever sees well-formed values.

use std::time::Duration;

use vsha_proto::v1 as pb;

use crate::liveness::Liveness;
use crate::model::{
    AdminState, Desired, Failback, FailoverGroup, HealthCheck, Limits, NodeRecord, Role, Vserver,
    VserverSpec,
};
use crate::raft_loop::View;
use crate::state::StateError;
use crate::validate;

pub fn role_to_pb(r: Role) -> pb::NodeRole {
    match r {
        Role::Voter => pb::NodeRole::Voter,
        Role::Learner => pb::NodeRole::Learner,
        Role::Witness => pb::NodeRole::Witness,
    }
}

pub fn role_from_pb(r: i32) -> Result<Role, StateError> {
    match pb::NodeRole::try_from(r) {
        Ok(pb::NodeRole::Voter) | Ok(pb::NodeRole::Unspecified) => Ok(Role::Voter),
        Ok(pb::NodeRole::Learner) => Ok(Role::Learner),
        Ok(pb::NodeRole::Witness) => Ok(Role::Witness),
        Err(_) => Err(StateError::invalid(
            "role",
            format!("{r} is not a node role"),
        )),
    }
}

pub fn admin_to_pb(a: AdminState) -> pb::AdminState {
    match a {
        AdminState::Active => pb::AdminState::Active,
        AdminState::Draining => pb::AdminState::Draining,
        AdminState::Maintenance => pb::AdminState::Maintenance,
    }
}

pub fn admin_from_pb(a: i32) -> Result<AdminState, StateError> {
    match pb::AdminState::try_from(a) {
        Ok(pb::AdminState::Active) => Ok(AdminState::Active),
        Ok(pb::AdminState::Draining) => Ok(AdminState::Draining),
        Ok(pb::AdminState::Maintenance) => Ok(AdminState::Maintenance),
        _ => Err(StateError::invalid(
            "admin",
            "must be active, draining or maintenance",
        )),
    }
}

/// A node as the answering agent sees it. Liveness is the leader's view:
/// elsewhere it is unknown (-1, not reachable) except for the node itself.
pub fn node_info(
    n: &NodeRecord,
    view: &View,
    liveness: &Liveness,
    liveness_timeout: Duration,
) -> pb::NodeInfo {
    let membership = if view.voters.contains(&n.id) {
        "voter"
    } else if view.learners.contains(&n.id) {
        "learner"
    } else {
        "none"
    };
    let (reachable, age_ms, applied, ipv4root) = if n.id == view.id {
        // The answering node is alive by definition.
        (
            true,
            0,
            view.applied,
            vsha_kernel::patched::probe().to_string(),
        )
    } else if view.is_leader {
        match liveness.get(n.id) {
            Some(h) => {
                let age = h.at.elapsed();
                (
                    age <= liveness_timeout,
                    age.as_millis() as i64,
                    h.applied,
                    h.ipv4root,
                )
            }
            None => (false, -1, 0, String::new()),
        }
    } else {
        (false, -1, 0, String::new())
    };
    pb::NodeInfo {
        id: n.id,
        addr: n.addr.clone(),
        role: role_to_pb(n.role) as i32,
        membership: membership.into(),
        admin: admin_to_pb(n.admin) as i32,
        iface: n.iface.clone(),
        reachable,
        last_heartbeat_ms: age_ms,
        applied_index: applied,
        is_leader: n.id == view.leader_id,
        ipv4root,
    }
}

pub fn group_to_pb(g: &FailoverGroup) -> pb::FailoverGroup {
    pb::FailoverGroup {
        nodes: g.nodes.clone(),
        failback: match g.failback {
            Failback::Never => pb::Failback::Never,
            Failback::Auto => pb::Failback::Auto,
            Failback::Manual => pb::Failback::Manual,
        } as i32,
        failback_stable_ms: g.failback_stable_ms,
    }
}

pub fn group_from_pb(g: Option<pb::FailoverGroup>) -> Result<FailoverGroup, StateError> {
    let g = g.ok_or_else(|| StateError::invalid("group", "missing"))?;
    let failback = match pb::Failback::try_from(g.failback) {
        Ok(pb::Failback::Never) | Ok(pb::Failback::Unspecified) => Failback::Never,
        Ok(pb::Failback::Auto) => Failback::Auto,
        Ok(pb::Failback::Manual) => Failback::Manual,
        Err(_) => {
            return Err(StateError::invalid(
                "failback",
                "must be never, auto or manual",
            ))
        }
    };
    Ok(FailoverGroup {
        nodes: g.nodes,
        failback,
        failback_stable_ms: g.failback_stable_ms,
    })
}

pub fn spec_to_pb(s: &VserverSpec) -> pb::VserverSpec {
    pb::VserverSpec {
        name: s.name.clone(),
        tree: s.tree.clone(),
        ip: s.ip.to_string(),
        prefix: s.prefix as u32,
        dev: s.dev.clone(),
        hostname: s.hostname.clone(),
        capabilities: s.capabilities.clone(),
        limits: Some(pb::Limits {
            nproc: s.limits.nproc,
            memory_bytes: s.limits.memory_bytes,
            cpu_weight: s.limits.cpu_weight,
        }),
        start_command: s.start_command.clone(),
        stop_command: s.stop_command.clone(),
        health: s.health.as_ref().map(|h| pb::HealthCheck {
            tcp_port: h.tcp_port as u32,
            command: h.command.clone(),
            interval_ms: h.interval_ms,
            timeout_ms: h.timeout_ms,
            rise: h.rise,
            fall: h.fall,
        }),
        max_rpo_ms: s.max_rpo_ms,
    }
}

pub fn spec_from_pb(s: Option<pb::VserverSpec>) -> Result<VserverSpec, StateError> {
    let s = s.ok_or_else(|| StateError::invalid("spec", "missing"))?;
    let name = validate::vserver_name(&s.name)?;
    let ip = validate::ipv4(&s.ip)?;
    let prefix = if s.prefix == 0 {
        24
    } else {
        validate::prefix(s.prefix)?
    };
    // Empty: VSERVER_ROOT/NAME on each node (see docs/config.md).
    let tree = if s.tree.is_empty() {
        String::new()
    } else {
        validate::tree(&s.tree)?
    };
    let hostname = if s.hostname.is_empty() {
        name.clone()
    } else {
        validate::hostname(&s.hostname)?
    };
    let health = match s.health {
        None => None,
        Some(h) => Some(HealthCheck {
            tcp_port: u16::try_from(h.tcp_port).map_err(|_| {
                StateError::invalid("health.tcp_port", format!("{} is not a port", h.tcp_port))
            })?,
            command: h.command,
            interval_ms: h.interval_ms,
            timeout_ms: h.timeout_ms,
            rise: h.rise,
            fall: h.fall,
        }),
    };
    let limits = s.limits.unwrap_or_default();
    Ok(VserverSpec {
        name,
        tree,
        ip,
        prefix,
        dev: validate::dev(&s.dev)?,
        hostname,
        capabilities: s.capabilities,
        limits: Limits {
            nproc: limits.nproc,
            memory_bytes: limits.memory_bytes,
            cpu_weight: limits.cpu_weight,
        },
        start_command: s.start_command,
        stop_command: s.stop_command,
        health,
        max_rpo_ms: s.max_rpo_ms,
    })
}

pub fn vserver_info(v: &Vserver) -> pb::VserverInfo {
    pb::VserverInfo {
        runtime: None,
        spec: Some(spec_to_pb(&v.spec)),
        group: v.group.as_ref().map(group_to_pb),
        placement: v.placement.as_ref().map(|p| pb::Placement {
            node: p.node,
            generation: p.generation,
            desired: match p.desired {
                Desired::Running => "running",
                Desired::Stopped => "stopped",
            }
            .into(),
            observed: p.observed.clone(),
        }),
        replicas: v
            .replicas
            .values()
            .map(|r| pb::ReplicaStatus {
                node: r.node,
                snapshot_source_unix_ms: r.snapshot_source_unix_ms,
                digest: r.digest.clone(),
            })
            .collect(),
    }
}
