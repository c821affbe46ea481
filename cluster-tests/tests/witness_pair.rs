//! A two-node failover pair (1, 2) with a witness (3): the holder's agent
//! is SIGKILLed (its guard kills the vserver at once), then the new
//! holder's agent is stopped (SIGSTOP) beyond its lease (its guard fences
//! on the lease deadline); the vserver goes back and forth, the witness
//! never runs it, and a resumed agent never runs its old copy.

mod common;

use common::{demo_running, handover, root_and_busybox, settled};
use serde_json::Value;
use vsha_cluster_tests::status::{generation, runs_on};
use vsha_cluster_tests::Cluster;

#[test]
fn two_node_pair_with_witness_survives_agent_kill_and_stop() {
    if !root_and_busybox() {
        return;
    }
    let mut c = Cluster::new(3)
        .witness(3)
        .config("replication_interval_ms = 300")
        .tag("wp")
        .start();
    let (ip, g1) = demo_running(&mut c, "web", 1, 2);

    let sim: Value =
        serde_json::from_str(&c.ok(2, &["simulate", "node-down", "1", "--json"])).unwrap();
    assert_eq!(sim["moves"][0]["to"], 2, "{sim:#}");

    // 1. SIGKILL of the holder's agent.
    let mark = c.checker.mark();
    c.kill_agent(1);
    // The guard kills the vserver and withdraws the IP at once.
    c.wait_until("node 1's guard fencing web", |c| {
        !c.net.node(1).has_addr(&ip) && !c.agents[0].runs("web")
    });
    handover(&c, &ip, mark, 2);
    let s = c.wait_for("web on node 2", |s| runs_on(s, "web", 2, g1));
    let g2 = generation(&s, "web");
    assert!(!c.agents[0].runs("web"));

    // The old node comes back as the standby.
    c.restart(1);
    settled(&c, "web", &ip, 2, 1, g1);
    assert!(!c.agents[0].runs("web"));

    // 2. SIGSTOP of the new holder's agent beyond its lease.
    let mark = c.checker.mark();
    c.stop_agent(2);
    handover(&c, &ip, mark, 1);
    let s = c.wait_for("web on node 1 again", |s| runs_on(s, "web", 1, g2));
    let g3 = generation(&s, "web");
    assert!(!c.agents[1].runs("web"), "the stopped agent's vserver runs");
    c.cont_agent(2);
    // Resumed, node 2 learns it lost web and never runs it again.
    let mark = c.checker.mark();
    c.wait_for("node 2 back with a replica", |s| {
        runs_on(s, "web", 1, g2) && vsha_cluster_tests::status::has_replica(s, "web", 2)
    });
    c.wait_answer(&ip, mark, "node 1 answering", |a| a.node == Some(1));
    let s = c.status().expect("status");
    assert_eq!(generation(&s, "web"), g3);
    assert!(!c.agents[1].runs("web"));
    assert!(!c.agents[2].runs("web"), "the witness ran the vserver");
    let witness = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == 3)
        .unwrap();
    assert_eq!(witness["role"], "witness");
    let kinds: Vec<String> = c
        .events()
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or("").to_string())
        .collect();
    for kind in ["node_lost", "failover_done", "started"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
    c.finish();
}
