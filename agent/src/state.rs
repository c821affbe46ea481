//! The replicated state machine. `apply` is deterministic: the same commands
//! in the same order give the same state on every node, and a refused
//! command changes nothing.

use crate::command::Command;
use crate::model::{AdminState, NodeId, NodeRecord, Vserver};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Why a command was refused. Every variant names the request field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum StateError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{field}: {reason}")]
    NotFound { field: String, reason: String },
    #[error("{field}: {reason}")]
    AlreadyExists { field: String, reason: String },
    #[error("{field}: {reason}")]
    Precondition { field: String, reason: String },
}

impl StateError {
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        StateError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
    pub fn not_found(field: &str, reason: impl Into<String>) -> Self {
        StateError::NotFound {
            field: field.into(),
            reason: reason.into(),
        }
    }
    pub fn exists(field: &str, reason: impl Into<String>) -> Self {
        StateError::AlreadyExists {
            field: field.into(),
            reason: reason.into(),
        }
    }
    pub fn precondition(field: &str, reason: impl Into<String>) -> Self {
        StateError::Precondition {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Empty until the first leader's Bootstrap command is applied.
    pub cluster_id: String,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub vservers: BTreeMap<String, Vserver>,
}

impl ClusterState {
    /// Whether `cmd` would be accepted now. `apply` calls this first, so a
    /// command that passes here and is applied later may still be refused if
    /// the state changed in between; it then changes nothing.
    pub fn check(&self, cmd: &Command) -> Result<(), StateError> {
        match cmd {
            Command::Bootstrap { .. } => Ok(()),
            Command::AddNode(rec) => {
                if self.nodes.contains_key(&rec.id) {
                    return Err(StateError::exists(
                        "id",
                        format!("node {} is already a member", rec.id),
                    ));
                }
                if let Some(other) = self.nodes.values().find(|n| n.addr == rec.addr) {
                    return Err(StateError::exists(
                        "addr",
                        format!("{} is already the address of node {}", rec.addr, other.id),
                    ));
                }
                Ok(())
            }
            Command::PromoteNode { id } => {
                let node = self.node(*id)?;
                if !node.role.wants_vote() {
                    return Err(StateError::precondition(
                        "id",
                        format!("node {id} was added as a learner and is never promoted"),
                    ));
                }
                Ok(())
            }
            Command::RemoveNode { id } => {
                self.node(*id)?;
                if let Some(vs) = self
                    .vservers
                    .values()
                    .find(|v| v.placement.as_ref().is_some_and(|p| p.node == *id))
                {
                    return Err(StateError::precondition(
                        "id",
                        format!(
                            "node {id} holds vserver {:?}; migrate or remove it first",
                            vs.spec.name
                        ),
                    ));
                }
                if let Some(vs) = self.vservers.values().find(|v| {
                    v.group
                        .as_ref()
                        .is_some_and(|g| g.nodes.iter().any(|n| n == id))
                }) {
                    return Err(StateError::precondition(
                        "id",
                        format!(
                            "node {id} is in the failover group of vserver {:?}; change or remove that pair first",
                            vs.spec.name
                        ),
                    ));
                }
                Ok(())
            }
            Command::SetNodeAdmin { id, .. } => self.node(*id).map(|_| ()),
            Command::AddVserver(spec) => {
                if self.vservers.contains_key(&spec.name) {
                    return Err(StateError::exists(
                        "name",
                        format!("vserver {:?} already exists", spec.name),
                    ));
                }
                if let Some(other) = self.vservers.values().find(|v| v.spec.ip == spec.ip) {
                    return Err(StateError::exists(
                        "ip",
                        format!(
                            "{} is already the IP of vserver {:?}",
                            spec.ip, other.spec.name
                        ),
                    ));
                }
                Ok(())
            }
            Command::RemoveVserver { name } => {
                let vs = self.vserver(name)?;
                if vs
                    .placement
                    .as_ref()
                    .is_some_and(|p| p.desired == crate::model::Desired::Running)
                {
                    return Err(StateError::precondition(
                        "name",
                        format!("vserver {name:?} is running; stop it first"),
                    ));
                }
                Ok(())
            }
            Command::SetPair { vserver, group } => {
                self.vserver(vserver)?;
                if group.nodes.is_empty() {
                    return Err(StateError::invalid(
                        "nodes",
                        "a pair needs at least one node",
                    ));
                }
                for (i, id) in group.nodes.iter().enumerate() {
                    if group.nodes[..i].contains(id) {
                        return Err(StateError::invalid(
                            "nodes",
                            format!("node {id} is listed twice"),
                        ));
                    }
                    let node = self.nodes.get(id).ok_or_else(|| {
                        StateError::not_found("nodes", format!("node {id} is not a member"))
                    })?;
                    if node.role == crate::model::Role::Witness {
                        return Err(StateError::precondition(
                            "nodes",
                            format!("node {id} is a witness and runs no vservers"),
                        ));
                    }
                }
                Ok(())
            }
            Command::RemovePair { vserver } => {
                let vs = self.vserver(vserver)?;
                if vs.group.is_none() {
                    return Err(StateError::not_found(
                        "vserver",
                        format!("vserver {vserver:?} has no failover pair"),
                    ));
                }
                Ok(())
            }
            Command::SetPlacement {
                vserver,
                node,
                generation,
                expect_generation,
                ..
            } => {
                let vs = self.vserver(vserver)?;
                let rec = self.nodes.get(node).ok_or_else(|| {
                    StateError::not_found("node", format!("node {node} is not a member"))
                })?;
                if rec.role == crate::model::Role::Witness {
                    return Err(StateError::precondition(
                        "node",
                        format!("node {node} is a witness and runs no vservers"),
                    ));
                }
                let current = vs.placement.as_ref().map_or(0, |p| p.generation);
                if *expect_generation != current {
                    return Err(StateError::precondition(
                        "expect_generation",
                        format!(
                            "vserver {vserver:?} is at generation {current}, not {expect_generation}: another move won"
                        ),
                    ));
                }
                if *generation <= current {
                    return Err(StateError::invalid(
                        "generation",
                        format!("{generation} does not grow past the current {current}"),
                    ));
                }
                Ok(())
            }
            Command::SetDesired { vserver, .. } => self.vserver(vserver).map(|_| ()),
            Command::RecordReplica { vserver, node, .. } => {
                self.vserver(vserver)?;
                self.node(*node).map(|_| ())
            }
        }
    }

    /// Applies `cmd`, or refuses it and leaves the state untouched.
    pub fn apply(&mut self, cmd: &Command) -> Result<(), StateError> {
        self.check(cmd)?;
        match cmd {
            Command::Bootstrap {
                cluster_id,
                members,
            } => {
                // First bootstrap wins; a second one (a racing leader) is a no-op.
                if self.cluster_id.is_empty() {
                    self.cluster_id = cluster_id.clone();
                    for m in members {
                        self.nodes.entry(m.id).or_insert_with(|| m.clone());
                    }
                }
            }
            Command::AddNode(rec) => {
                self.nodes.insert(rec.id, rec.clone());
            }
            Command::PromoteNode { .. } => {}
            Command::RemoveNode { id } => {
                self.nodes.remove(id);
                for vs in self.vservers.values_mut() {
                    vs.replicas.remove(id);
                }
            }
            Command::SetNodeAdmin { id, admin } => {
                if let Some(n) = self.nodes.get_mut(id) {
                    n.admin = *admin;
                }
            }
            Command::AddVserver(spec) => {
                self.vservers.insert(
                    spec.name.clone(),
                    Vserver {
                        spec: spec.clone(),
                        group: None,
                        placement: None,
                        replicas: BTreeMap::new(),
                        desired: None,
                    },
                );
            }
            Command::RemoveVserver { name } => {
                self.vservers.remove(name);
            }
            Command::SetPair { vserver, group } => {
                if let Some(vs) = self.vservers.get_mut(vserver) {
                    vs.group = Some(group.clone());
                }
            }
            Command::RemovePair { vserver } => {
                if let Some(vs) = self.vservers.get_mut(vserver) {
                    vs.group = None;
                }
            }
            Command::SetPlacement {
                vserver,
                node,
                generation,
                ..
            } => {
                if let Some(vs) = self.vservers.get_mut(vserver) {
                    let desired = vs.desired();
                    // The new holder runs the live tree: what it held as a
                    // replica is no replica any more.
                    vs.replicas.remove(node);
                    vs.placement = Some(crate::model::Placement {
                        node: *node,
                        generation: *generation,
                        desired,
                        observed: "unknown".to_string(),
                    });
                }
            }
            Command::SetDesired { vserver, desired } => {
                if let Some(vs) = self.vservers.get_mut(vserver) {
                    vs.desired = Some(*desired);
                    if let Some(p) = vs.placement.as_mut() {
                        p.desired = *desired;
                    }
                }
            }
            Command::RecordReplica {
                vserver,
                node,
                snapshot_source_unix_ms,
                digest,
            } => {
                if let Some(vs) = self.vservers.get_mut(vserver) {
                    let newer = vs
                        .replicas
                        .get(node)
                        .is_none_or(|r| r.snapshot_source_unix_ms <= *snapshot_source_unix_ms);
                    if newer {
                        vs.replicas.insert(
                            *node,
                            crate::model::ReplicaStatus {
                                node: *node,
                                snapshot_source_unix_ms: *snapshot_source_unix_ms,
                                digest: digest.clone(),
                            },
                        );
                    }
                }
            }
        }
        Ok(())
    }

    pub fn node(&self, id: NodeId) -> Result<&NodeRecord, StateError> {
        self.nodes
            .get(&id)
            .ok_or_else(|| StateError::not_found("id", format!("node {id} is not a member")))
    }

    pub fn vserver(&self, name: &str) -> Result<&Vserver, StateError> {
        self.vservers
            .get(name)
            .ok_or_else(|| StateError::not_found("name", format!("no vserver named {name:?}")))
    }

    pub fn admin(&self, id: NodeId) -> Option<AdminState> {
        self.nodes.get(&id).map(|n| n.admin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use std::net::Ipv4Addr;

    fn node(id: u64, role: Role) -> NodeRecord {
        NodeRecord {
            id,
            addr: format!("127.0.0.{id}:7700"),
            role,
            iface: String::new(),
            admin: AdminState::Active,
        }
    }

    fn spec(name: &str, ip: [u8; 4]) -> VserverSpec {
        VserverSpec {
            name: name.into(),
            tree: format!("/var/lib/vsha/vservers/{name}"),
            ip: Ipv4Addr::from(ip),
            prefix: 24,
            dev: String::new(),
            hostname: name.into(),
            capabilities: vec![],
            limits: Limits::default(),
            start_command: vec![],
            stop_command: vec![],
            health: None,
            max_rpo_ms: 0,
        }
    }

    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(&Command::Bootstrap {
            cluster_id: "c1".into(),
            members: vec![
                node(1, Role::Voter),
                node(2, Role::Voter),
                node(3, Role::Witness),
            ],
        })
        .unwrap();
        s
    }

    /// Applies `cmd`, expects a refusal naming `field`, and checks nothing changed.
    fn refused(s: &mut ClusterState, cmd: Command, field: &str) -> StateError {
        let before = s.clone();
        let err = s.apply(&cmd).expect_err("command should be refused");
        let named = match &err {
            StateError::Invalid { field, .. }
            | StateError::NotFound { field, .. }
            | StateError::AlreadyExists { field, .. }
            | StateError::Precondition { field, .. } => field.clone(),
        };
        assert_eq!(named, field, "{err}");
        assert_eq!(*s, before, "a refused command changed the state");
        err
    }

    #[test]
    fn bootstrap_only_once() {
        let mut s = cluster();
        s.apply(&Command::Bootstrap {
            cluster_id: "other".into(),
            members: vec![node(9, Role::Voter)],
        })
        .unwrap();
        assert_eq!(s.cluster_id, "c1");
        assert!(!s.nodes.contains_key(&9));
    }

    #[test]
    fn duplicate_vserver_name_and_ip_refused() {
        let mut s = cluster();
        s.apply(&Command::AddVserver(spec("web", [10, 0, 0, 5])))
            .unwrap();
        let e = refused(
            &mut s,
            Command::AddVserver(spec("web", [10, 0, 0, 6])),
            "name",
        );
        assert!(matches!(e, StateError::AlreadyExists { .. }));
        refused(&mut s, Command::AddVserver(spec("db", [10, 0, 0, 5])), "ip");
    }

    #[test]
    fn unknown_things_are_not_found() {
        let mut s = cluster();
        let e = refused(&mut s, Command::RemoveNode { id: 7 }, "id");
        assert!(matches!(e, StateError::NotFound { .. }));
        refused(&mut s, Command::RemoveVserver { name: "x".into() }, "name");
        refused(
            &mut s,
            Command::SetNodeAdmin {
                id: 7,
                admin: AdminState::Draining,
            },
            "id",
        );
    }

    #[test]
    fn pair_rules() {
        let mut s = cluster();
        s.apply(&Command::AddVserver(spec("web", [10, 0, 0, 5])))
            .unwrap();
        let group = |nodes: Vec<u64>| FailoverGroup {
            nodes,
            failback: Failback::Never,
            failback_stable_ms: 0,
        };
        refused(
            &mut s,
            Command::SetPair {
                vserver: "web".into(),
                group: group(vec![1, 3]),
            },
            "nodes",
        );
        refused(
            &mut s,
            Command::SetPair {
                vserver: "web".into(),
                group: group(vec![1, 1]),
            },
            "nodes",
        );
        refused(
            &mut s,
            Command::SetPair {
                vserver: "web".into(),
                group: group(vec![1, 8]),
            },
            "nodes",
        );
        refused(
            &mut s,
            Command::SetPair {
                vserver: "nope".into(),
                group: group(vec![1, 2]),
            },
            "name",
        );
        s.apply(&Command::SetPair {
            vserver: "web".into(),
            group: group(vec![2, 1]),
        })
        .unwrap();
        assert_eq!(s.vservers["web"].group.as_ref().unwrap().nodes, vec![2, 1]);
        // A node in a group cannot leave the cluster.
        refused(&mut s, Command::RemoveNode { id: 2 }, "id");
        s.apply(&Command::RemovePair {
            vserver: "web".into(),
        })
        .unwrap();
        s.apply(&Command::RemoveNode { id: 2 }).unwrap();
        assert!(!s.nodes.contains_key(&2));
    }

    #[test]
    fn add_node_refuses_duplicate_id_and_addr() {
        let mut s = cluster();
        refused(&mut s, Command::AddNode(node(2, Role::Voter)), "id");
        let mut n = node(4, Role::Voter);
        n.addr = "127.0.0.1:7700".into();
        refused(&mut s, Command::AddNode(n), "addr");
        s.apply(&Command::AddNode(node(4, Role::Learner))).unwrap();
        refused(&mut s, Command::PromoteNode { id: 4 }, "id");
    }

    #[test]
    fn placement_is_a_compare_and_set_on_the_generation() {
        let mut s = cluster();
        s.apply(&Command::AddVserver(spec("web", [10, 0, 0, 5])))
            .unwrap();
        let place = |node, generation, expect_generation| Command::SetPlacement {
            vserver: "web".into(),
            node,
            generation,
            expect_generation,
            reason: "test".into(),
        };
        s.apply(&Command::RecordReplica {
            vserver: "web".into(),
            node: 1,
            snapshot_source_unix_ms: 5,
            digest: "d".into(),
        })
        .unwrap();
        s.apply(&place(1, 1, 0)).unwrap();
        assert!(
            s.vservers["web"].replicas.is_empty(),
            "the new holder's replica record is dropped"
        );
        // Two moves racing from generation 1: the first wins, the second is
        // refused and changes nothing.
        s.apply(&place(2, 2, 1)).unwrap();
        let e = refused(&mut s, place(1, 2, 1), "expect_generation");
        assert!(e.to_string().contains("another move won"), "{e}");
        refused(&mut s, place(1, 2, 2), "generation");
        refused(&mut s, place(9, 3, 2), "node");
        refused(&mut s, place(3, 3, 2), "node"); // a witness
        let p = s.vservers["web"].placement.clone().unwrap();
        assert_eq!((p.node, p.generation), (2, 2));
        // Desired follows the operator and survives moves.
        s.apply(&Command::SetDesired {
            vserver: "web".into(),
            desired: Desired::Stopped,
        })
        .unwrap();
        s.apply(&place(1, 3, 2)).unwrap();
        assert_eq!(
            s.vservers["web"].placement.as_ref().unwrap().desired,
            Desired::Stopped
        );
    }

    #[test]
    fn replica_records_never_go_back_in_time() {
        let mut s = cluster();
        s.apply(&Command::AddVserver(spec("web", [10, 0, 0, 5])))
            .unwrap();
        let rec = |t: u64| Command::RecordReplica {
            vserver: "web".into(),
            node: 2,
            snapshot_source_unix_ms: t,
            digest: format!("d{t}"),
        };
        s.apply(&rec(200)).unwrap();
        s.apply(&rec(100)).unwrap();
        assert_eq!(s.vservers["web"].replicas[&2].digest, "d200");
        refused(
            &mut s,
            Command::RecordReplica {
                vserver: "web".into(),
                node: 9,
                snapshot_source_unix_ms: 1,
                digest: String::new(),
            },
            "id",
        );
    }
}
