//! The leader's node dies while a failover is under way: five nodes; the
//! node holding the vserver dies, and before the leader has moved it, the
//! leader's node dies too. The new leader waits one full lease and then
//! finishes the failover to the standby; neither dead node runs it.

mod common;

use common::{demo_running, handover, replicated_counter, root_and_busybox};
use vsha_cluster_tests::status::runs_on;
use vsha_cluster_tests::Cluster;

#[test]
fn leader_node_dies_during_a_failover() {
    if !root_and_busybox() {
        return;
    }
    // The default profile: a 3 s lease leaves time to kill the leader
    // while it waits for the holder's lease to run out.
    let mut c = Cluster::new(5)
        .config("profile = \"default\"")
        .config("replication_interval_ms = 500")
        .tag("ld")
        .start();
    let leader = c.status().expect("status")["leader"]
        .as_u64()
        .expect("leader");
    let others: Vec<u64> = (1..=5).filter(|&n| n != leader).collect();
    let (p, s) = (others[0], others[1]);
    let (ip, g1) = demo_running(&mut c, "web", p, s);
    replicated_counter(&c, s, "web", 3);

    let mark = c.checker.mark();
    c.kill_node(p);
    // The leader notices (missed renewals), then dies before moving it.
    c.wait_for("the leader waiting for the holder's lease", |st| {
        let v = vsha_cluster_tests::status::vserver(st, "web");
        v["placement"]["generation"] == g1 && st["leader"] == leader && {
            let t = v.to_string();
            t.contains("lease") || t.contains("detecting")
        }
    });
    c.kill_node(leader);
    let (_, first) = handover(&c, &ip, mark, s);
    assert!(first.counter.unwrap_or(0) > 3);
    let st = c.wait_for("web on the standby", |st| runs_on(st, "web", s, g1));
    assert_ne!(st["leader"], leader);
    assert!(!c.agents[p as usize - 1].runs("web"));
    assert!(!c.agents[leader as usize - 1].runs("web"));
    c.revive_node(p);
    c.revive_node(leader);
    c.wait_for("all five back, web on the standby", |st| {
        runs_on(st, "web", s, g1) && vsha_cluster_tests::status::has_replica(st, "web", p)
    });
    assert!(!c.agents[p as usize - 1].runs("web"));
    c.finish();
}
