//! A standby whose replica is older than the vserver's max_rpo is refused:
//! after the primary dies nothing moves and an alert says why; an operator's
//! `vsha failover --accept-data-loss` then starts the old snapshot.

mod common;

use common::{root_and_busybox, settled};
use vsha_cluster_tests::status::{runs_on, vserver};
use vsha_cluster_tests::Cluster;

#[test]
fn stale_replica_is_refused_until_data_loss_is_accepted() {
    if !root_and_busybox() {
        return;
    }
    // One round every 20 s: between rounds the replica is seconds old.
    let mut c = Cluster::new(3)
        .config("replication_interval_ms = 20000")
        .tag("sr")
        .start();
    c.demo_tree(1, "web");
    let ip = c.add_demo(1, "web", 1, &[2], &["--max-rpo", "1"], &[]);
    let g1 = settled(&c, "web", &ip, 1, 2, 0);
    // Kill while the replica is 3–10 s old: the next round is far away.
    c.wait_for("a replica 3-10 s old", |s| {
        vserver(s, "web")["runtime"]["replicas"]
            .as_array()
            .and_then(|r| r.iter().find(|x| x["node"] == 2))
            .and_then(|x| x["lag_ms"].as_u64())
            .is_some_and(|l| (3000..10_000).contains(&l))
    });
    let seq = c.last_event_seq();
    c.kill_node(1);
    let snapshot = c.replica_counter(2, "web").expect("replica counter");
    let ev = c.wait_event("alert", seq);
    eprintln!("alert: {ev}");
    assert!(
        ev["message"].as_str().unwrap_or("").contains("max_rpo"),
        "{ev}"
    );
    assert!(!c.agents[1].runs("web"), "node 2 started a stale replica");
    let s = c.status().expect("status");
    assert!(!runs_on(&s, "web", 2, g1), "{s:#}");

    // The operator accepts the loss.
    let mark = c.checker.mark();
    c.ok(2, &["failover", "web", "--to", "2", "--accept-data-loss"]);
    let first = c.wait_answer(&ip, mark, "node 2 answering", |a| a.node == Some(2));
    assert_eq!(
        first.counter,
        Some(snapshot + 1),
        "node 2 did not continue from its snapshot ({snapshot})"
    );
    c.wait_for("web on node 2", |s| runs_on(s, "web", 2, g1));
    c.finish();
}
