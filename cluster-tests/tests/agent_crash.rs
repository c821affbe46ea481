//! An agent crashes (SIGKILL) while its node runs two vservers: its guard
//! kills both at once and withdraws their IPs; each restarts on its own
//! standby; the restarted agent runs neither. Then an agent restart
//! (kill and start at once) of a standby changes nothing.

mod common;

use common::{handover, root_and_busybox, settled};
use vsha_cluster_tests::status::runs_on;
use vsha_cluster_tests::Cluster;

#[test]
fn agent_crash_with_vservers_running() {
    if !root_and_busybox() {
        return;
    }
    let mut c = Cluster::new(3)
        .config("replication_interval_ms = 500")
        .tag("ac")
        .start();
    c.demo_tree(1, "web");
    c.demo_tree(1, "db");
    let web = c.add_demo(1, "web", 1, &[2], &[], &[]);
    let db = c.add_demo(1, "db", 1, &[3], &[], &[]);
    let gw = settled(&c, "web", &web, 1, 2, 0);
    let gd = settled(&c, "db", &db, 1, 3, 0);

    let mark = c.checker.mark();
    c.kill_agent(1);
    // The guard: nothing of node 1's vservers survives its agent.
    c.wait_until("node 1's guard fencing both", |c| {
        !c.agents[0].runs("web")
            && !c.agents[0].runs("db")
            && !c.net.node(1).has_addr(&web)
            && !c.net.node(1).has_addr(&db)
    });
    handover(&c, &web, mark, 2);
    handover(&c, &db, mark, 3);
    c.wait_for("web on 2, db on 3", |s| {
        runs_on(s, "web", 2, gw) && runs_on(s, "db", 3, gd)
    });

    c.restart(1);
    settled(&c, "web", &web, 2, 1, gw);
    settled(&c, "db", &db, 3, 1, gd);
    assert!(!c.agents[0].runs("web") && !c.agents[0].runs("db"));

    // An agent restart of a standby: nothing moves.
    let s = c.status().expect("status");
    let (g2, g3) = (
        vsha_cluster_tests::status::generation(&s, "web"),
        vsha_cluster_tests::status::generation(&s, "db"),
    );
    c.kill_agent(1);
    c.restart(1);
    let mark = c.checker.mark();
    c.wait_for("node 1 back", |s| {
        s["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().filter(|n| n["id"] == 1).count() == 1)
            && vsha_cluster_tests::status::has_replica(s, "web", 1)
    });
    c.wait_answer(&web, mark, "web answering from node 2", |a| {
        a.node == Some(2)
    });
    let s = c.status().expect("status");
    assert_eq!(vsha_cluster_tests::status::generation(&s, "web"), g2);
    assert_eq!(vsha_cluster_tests::status::generation(&s, "db"), g3);
    c.finish();
}
