//! The primary ends up in a minority partition (drop rules between it and
//! the other nodes; the client still reaches every node): it fences itself
//! (vserver killed, IP withdrawn) before the majority starts the copy. The
//! checker sees the IP held by one node at a time and the client's answers
//! never interleave.

mod common;

use common::{demo_running, handover, replicated_counter, root_and_busybox};
use vsha_cluster_tests::status::runs_on;
use vsha_cluster_tests::Cluster;

#[test]
fn primary_in_minority_fences_before_majority_starts() {
    if !root_and_busybox() {
        return;
    }
    let mut c = Cluster::new(3)
        .config("replication_interval_ms = 500")
        .tag("mp")
        .start();
    let (ip, g1) = demo_running(&mut c, "web", 1, 2);
    replicated_counter(&c, 2, "web", 3);

    let mark = c.checker.mark();
    c.partition(&[1]);
    let (before, first) = handover(&c, &ip, mark, 2);
    let last1 = before.expect("node 1 answered before the partition");
    // Node 1 stopped answering before node 2 started.
    assert!(last1.ms < first.ms);
    let s = c.wait_for("web on node 2", |s| runs_on(s, "web", 2, g1));
    let g2 = vsha_cluster_tests::status::generation(&s, "web");
    assert!(!c.agents[0].runs("web"), "node 1 did not fence itself");
    assert!(!c.net.node(1).has_addr(&ip), "node 1 kept the IP");
    c.check();

    // Healed: node 1 rejoins and never runs web again at that generation.
    c.heal();
    let mark = c.checker.mark();
    c.wait_for("node 1 back with a replica", |s| {
        runs_on(s, "web", 2, g1) && vsha_cluster_tests::status::has_replica(s, "web", 1)
    });
    c.wait_answer(&ip, mark, "node 2 answering after the heal", |a| {
        a.node == Some(2)
    });
    let s = c.status().expect("status");
    assert_eq!(vsha_cluster_tests::status::generation(&s, "web"), g2);
    assert!(!c.agents[0].runs("web"));
    assert!(c
        .checker
        .answers(&ip, mark)
        .iter()
        .all(|a| a.node == Some(2)));
    c.finish();
}
