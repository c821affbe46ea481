//! The named invariants over what physically exists on the nodes.

use std::collections::BTreeMap;

use vsha_agent::model::NodeId;

use super::node::Node;

pub const NEVER_TWO_RUNNING: &str = "never_two_running";
pub const FENCE_BEFORE_RESTART_ELSEWHERE: &str = "fence_before_restart_elsewhere";
pub const ONE_OWNER_PER_IP: &str = "one_owner_per_ip";
pub const RECOVERS_AFTER_HEAL: &str = "recovers_after_heal";
pub const GENERATIONS_GROW: &str = "generations_grow";

/// Checked after every event: at most one node runs each vserver, at most
/// one node holds each vserver's IP.
pub fn global(
    nodes: &BTreeMap<NodeId, Node>,
    vservers: &[String],
) -> Result<(), (&'static str, String)> {
    for v in vservers {
        let runners: Vec<String> = nodes
            .values()
            .filter(|n| n.runs(v))
            .map(|n| format!("node {} gen {}", n.id, n.copies[v].generation))
            .collect();
        if runners.len() > 1 {
            return Err((
                NEVER_TWO_RUNNING,
                format!("{v} runs on {}", runners.join(", ")),
            ));
        }
        let owners: Vec<NodeId> = nodes
            .values()
            .filter(|n| n.holds_ip(v))
            .map(|n| n.id)
            .collect();
        if owners.len() > 1 {
            return Err((
                ONE_OWNER_PER_IP,
                format!("the IP of {v} is up on nodes {owners:?}"),
            ));
        }
    }
    Ok(())
}

/// Checked when `me` starts a copy of `vserver`: no other node's processes
/// of it remain.
pub fn fence_before_start(
    nodes: &BTreeMap<NodeId, Node>,
    me: NodeId,
    vserver: &str,
) -> Result<(), (&'static str, String)> {
    let others: Vec<NodeId> = nodes
        .values()
        .filter(|n| n.id != me && n.runs(vserver))
        .map(|n| n.id)
        .collect();
    if others.is_empty() {
        Ok(())
    } else {
        Err((
            FENCE_BEFORE_RESTART_ELSEWHERE,
            format!("node {me} starts {vserver} while nodes {others:?} still run it"),
        ))
    }
}

/// Checked when a node starts, restarts or adopts at `generation`.
pub fn generation_grows(
    me: NodeId,
    vserver: &str,
    generation: u64,
    seen: u64,
) -> Result<(), (&'static str, String)> {
    if generation < seen {
        Err((
            GENERATIONS_GROW,
            format!("node {me} starts {vserver} at generation {generation} after applying {seen}"),
        ))
    } else {
        Ok(())
    }
}

/// After healing: every vserver runs, healthy, on exactly one node.
pub fn recovered(nodes: &BTreeMap<NodeId, Node>, vservers: &[String]) -> Result<(), String> {
    let mut bad = Vec::new();
    for v in vservers {
        let healthy = nodes
            .values()
            .filter(|n| n.runs(v) && !n.copies[v].failed)
            .count();
        let any = nodes.values().filter(|n| n.runs(v)).count();
        if healthy != 1 || any != 1 {
            bad.push(format!("{v}: {healthy} healthy of {any} running"));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("; "))
    }
}
