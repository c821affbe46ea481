//! `vsha node drain`: everything the node holds migrates off, each
//! vserver's counter continuous; the drained node gets nothing new until
//! it is active again.

mod common;

use common::{handover, root_and_busybox, settled};
use vsha_cluster_tests::status::runs_on;
use vsha_cluster_tests::Cluster;

#[test]
fn drain_moves_everything_off_without_loss() {
    if !root_and_busybox() {
        return;
    }
    let mut c = Cluster::new(3)
        .config("replication_interval_ms = 3000")
        .tag("dr")
        .start();
    c.demo_tree(1, "web");
    c.demo_tree(1, "db");
    let web = c.add_demo(1, "web", 1, &[2], &[], &[]);
    let db = c.add_demo(1, "db", 1, &[3], &[], &[]);
    let gw = settled(&c, "web", &web, 1, 2, 0);
    let gd = settled(&c, "db", &db, 1, 3, 0);

    let mark = c.checker.mark();
    c.ok(2, &["node", "drain", "1"]);
    for (ip, to) in [(&web, 2), (&db, 3)] {
        let (before, first) = handover(&c, ip, mark, to);
        let last = before.expect("answers before").counter.expect("counter");
        let next = first.counter.expect("counter");
        assert!(
            next > last && next <= last + 2,
            "drain of {ip}: last acknowledged {last}, then {next}"
        );
    }
    c.wait_for("web on 2, db on 3", |s| {
        runs_on(s, "web", 2, gw) && runs_on(s, "db", 3, gd)
    });
    assert!(!c.agents[0].runs("web") && !c.agents[0].runs("db"));
    let s = c.status().expect("status");
    let node1 = s["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["id"] == 1).cloned())
        .expect("node 1");
    assert_eq!(node1["admin"], "draining", "{node1}");
    c.ok(2, &["node", "admin", "1", "active"]);
    c.finish();
}
