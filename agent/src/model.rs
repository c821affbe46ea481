//! The cluster's data model as the agent's core sees it: plain Rust types,
//! serde for the Raft log and snapshots, no prost and no raft-rs types.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

pub type NodeId = u64;

/// The role the operator asked for. Raft membership (voter or learner) follows
/// from it: a `Voter` or `Witness` starts as a learner and is promoted once it
/// has caught up and a voter slot is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Voter,
    Learner,
    /// A voter that never runs vservers (the third vote of a failover pair).
    Witness,
}

impl Role {
    pub fn wants_vote(self) -> bool {
        matches!(self, Role::Voter | Role::Witness)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Voter => "voter",
            Role::Learner => "learner",
            Role::Witness => "witness",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    #[default]
    Active,
    Draining,
    Maintenance,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Active => "active",
            AdminState::Draining => "draining",
            AdminState::Maintenance => "maintenance",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    /// The node's Peer/Cluster gRPC address, HOST:PORT.
    pub addr: String,
    pub role: Role,
    /// The interface that carries vserver IPs (IPROOTDEV); empty = per vserver.
    #[serde(default)]
    pub iface: String,
    #[serde(default)]
    pub admin: AdminState,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// 0 = unlimited.
    pub nproc: u64,
    pub memory_bytes: u64,
    pub cpu_weight: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub tcp_port: u16,
    pub command: Vec<String>,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VserverSpec {
    pub name: String,
    pub tree: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub dev: String,
    pub hostname: String,
    pub capabilities: Vec<String>,
    pub limits: Limits,
    pub start_command: Vec<String>,
    pub stop_command: Vec<String>,
    pub health: Option<HealthCheck>,
    pub max_rpo_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Failback {
    #[default]
    Never,
    Auto,
    Manual,
}

impl Failback {
    pub fn as_str(self) -> &'static str {
        match self {
            Failback::Never => "never",
            Failback::Auto => "auto",
            Failback::Manual => "manual",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverGroup {
    /// Ordered: the first is the preferred node.
    pub nodes: Vec<NodeId>,
    pub failback: Failback,
    pub failback_stable_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub node: NodeId,
    /// The fencing token: strictly grows on every move of this vserver.
    pub generation: u64,
    pub desired: Desired,
    /// What the holding node last reported ("unknown" until it does).
    pub observed: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub node: NodeId,
    pub snapshot_source_unix_ms: u64,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vserver {
    pub spec: VserverSpec,
    pub group: Option<FailoverGroup>,
    pub placement: Option<Placement>,
    pub replicas: BTreeMap<NodeId, ReplicaStatus>,
    /// The operator's wish before the vserver is placed (`None` = running);
    /// once placed, `placement.desired` is authoritative.
    #[serde(default)]
    pub desired: Option<Desired>,
}

impl Vserver {
    pub fn desired(&self) -> Desired {
        match &self.placement {
            Some(p) => p.desired,
            None => self.desired.unwrap_or(Desired::Running),
        }
    }
}
