//! Shared by the scenario tests.
#![allow(dead_code)]

use vsha_cluster_tests::status::{has_replica, runs_on};
use vsha_cluster_tests::{is_root, Cluster, Sample};

/// Root and busybox, or the test says why it is skipped.
pub fn root_and_busybox() -> bool {
    if !is_root() {
        eprintln!("skipped: needs root");
        return false;
    }
    assert!(
        std::path::Path::new("/bin/busybox").exists(),
        "/bin/busybox missing: run scripts/setup (busybox-static)"
    );
    true
}

/// Waits until `name` runs on `node` (generation above `above`), node
/// `standby` holds a replica with data in it, and the client gets answers
/// from `node`. Returns the generation.
pub fn settled(c: &Cluster, name: &str, ip: &str, node: u64, standby: u64, above: u64) -> u64 {
    let s = c.wait_for(
        &format!("{name} on node {node}, replica on {standby}"),
        |s| runs_on(s, name, node, above) && has_replica(s, name, standby),
    );
    let mark = c.checker.mark();
    c.wait_answer(ip, mark, &format!("an answer from node {node}"), |a| {
        a.node == Some(node)
    });
    vsha_cluster_tests::status::generation(&s, name)
}

/// Vserver `name` with the demo service, its tree made on `primary`,
/// paired `primary` then `standby`, settled (see [`settled`]). Returns its
/// IP and generation.
pub fn demo_running(c: &mut Cluster, name: &str, primary: u64, standby: u64) -> (String, u64) {
    c.demo_tree(primary, name);
    let ip = c.add_demo(primary, name, primary, &[standby], &[], &[]);
    let g = settled(c, name, &ip, primary, standby, 0);
    (ip, g)
}

/// Waits until node `node`'s replica of `name` holds a counter of at
/// least `min`.
pub fn replicated_counter(c: &Cluster, node: u64, name: &str, min: u64) -> u64 {
    let mut got = 0;
    c.wait_until(&format!("node {node}'s replica counter >= {min}"), |c| {
        got = c.replica_counter(node, name).unwrap_or(0);
        got >= min
    });
    got
}

/// The first answer from `to` after `mark`, and the last answer from
/// another node before it.
pub fn handover(c: &Cluster, ip: &str, mark: usize, to: u64) -> (Option<Sample>, Sample) {
    // The checker counts complete answers only, each with its counter;
    // asserted here all the same (a counter-less answer once made drain
    // flake: see DEMO_CGI).
    let first = c.wait_answer(ip, mark, &format!("an answer from node {to}"), |a| {
        a.node == Some(to) && a.counter.is_some()
    });
    let before = c
        .checker
        .answers(ip, 0)
        .into_iter()
        .rev()
        .find(|a| a.ms < first.ms && a.node != Some(to) && a.counter.is_some());
    (before, first)
}
