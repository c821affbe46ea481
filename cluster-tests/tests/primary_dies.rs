//! The primary node dies (every process killed, cable out): the vserver
//! answers on the same IP from the standby, with the counter of its last
//! replicated snapshot; the old node comes back and does not run it; with
//! `--failback auto` it moves back once the primary has been stable.

mod common;

use common::{handover, replicated_counter, root_and_busybox, settled};
use vsha_cluster_tests::status::{has_replica, runs_on};
use vsha_cluster_tests::Cluster;

#[test]
fn primary_node_dies_standby_answers_old_node_returns_failback_auto() {
    if !root_and_busybox() {
        return;
    }
    let mut c = Cluster::new(3)
        .config("replication_interval_ms = 500")
        .tag("pd")
        .start();
    c.demo_tree(1, "web");
    let ip = c.add_demo(
        1,
        "web",
        1,
        &[2],
        &[],
        &["--failback", "auto", "--failback-after", "3"],
    );
    let g1 = settled(&c, "web", &ip, 1, 2, 0);
    // Requests counted on node 1 have reached node 2's replica.
    replicated_counter(&c, 2, "web", 5);

    // The primary node dies.
    let mark = c.checker.mark();
    c.kill_node(1);
    let at_death = c.replica_counter(2, "web").unwrap_or(0);
    let (before, first) = handover(&c, &ip, mark, 2);
    let last1 = before.and_then(|b| b.counter).unwrap_or(0);
    let first2 = first.counter.expect("a counter");
    // Node 2 continues from its snapshot: not older than what it held when
    // node 1 died, never newer than what node 1 answered.
    assert!(
        first2 > at_death && first2 <= last1 + 2,
        "node 2 answered counter {first2}; its replica held {at_death} when node 1 died; node 1 last answered {last1}"
    );
    let s = c.wait_for("web on node 2", |s| runs_on(s, "web", 2, g1));
    let g2 = vsha_cluster_tests::status::generation(&s, "web");
    assert!(!c.agents[0].runs("web"));
    c.check();

    // The old node boots again: it does not run web, it receives the tree.
    let mark = c.checker.mark();
    c.revive_node(1);
    c.wait_for("node 1 back with a replica", |s| has_replica(s, "web", 1));
    // Until failback, node 2 keeps answering and node 1 runs nothing.
    let s = c.status().expect("status");
    if runs_on(&s, "web", 2, g1) {
        assert!(!c.agents[0].runs("web"), "node 1 runs web after its return");
    }

    // --failback auto after 3 s of a stable lease: back to node 1, no loss.
    let (before, first) = handover(&c, &ip, mark, 1);
    let last2 = before.and_then(|b| b.counter).unwrap_or(0);
    let back = first.counter.expect("a counter");
    assert!(
        back > last2 && back <= last2 + 2,
        "failback lost writes: node 2 last answered {last2}, node 1 then {back}"
    );
    c.wait_for("web back on node 1", |s| runs_on(s, "web", 1, g2));
    assert!(!c.agents[1].runs("web"));
    c.finish();
}
