//! A standby whose vserver root is full (a 1 MiB tmpfs cannot hold the
//! tree): it never gets a complete replica, so when the primary dies
//! nothing half-copied is started there; the vserver comes back when the
//! primary returns, with its counter intact.

mod common;

use common::root_and_busybox;
use vsha_cluster_tests::status::{has_replica, runs_on};
use vsha_cluster_tests::Cluster;

#[test]
fn full_standby_is_never_started_from_a_partial_copy() {
    if !root_and_busybox() {
        return;
    }
    let mut c = Cluster::new(3)
        .config("replication_interval_ms = 500")
        .small_root(2, "1m")
        .tag("fs")
        .start();
    c.demo_tree(1, "web");
    let ip = c.add_demo(1, "web", 1, &[2], &[], &[]);
    let s = c.wait_for("web on node 1", |s| runs_on(s, "web", 1, 0));
    let g1 = vsha_cluster_tests::status::generation(&s, "web");
    let mark = c.checker.mark();
    c.wait_answer(&ip, mark, "node 1 answering", |a| a.node == Some(1));
    // Rounds run (and fail) for a while.
    let seq = c.last_event_seq();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let s = c.status().expect("status");
    assert!(
        !has_replica(&s, "web", 2),
        "a replica on a full disk: {s:#}"
    );

    c.kill_node(1);
    // Read once node 1 is dead: answers kept coming while it was killed.
    let last1 = c
        .checker
        .last_answer(&ip)
        .and_then(|a| a.counter)
        .unwrap_or(0);
    let ev = c.wait_event("alert", seq);
    eprintln!("alert: {ev}");
    assert!(
        ev["message"]
            .as_str()
            .unwrap_or("")
            .contains("no complete replica"),
        "{ev}"
    );
    assert!(!c.agents[1].runs("web"), "node 2 started a partial tree");

    let mark = c.checker.mark();
    c.revive_node(1);
    let back = c.wait_answer(&ip, mark, "node 1 answering again", |a| {
        a.node == Some(1) && a.counter.is_some()
    });
    let n = back.counter.expect("counter");
    assert!(n > last1 && n <= last1 + 2, "counter {last1} -> {n}");
    c.wait_for("web on node 1", |s| {
        runs_on(s, "web", 1, g1.saturating_sub(1))
    });
    assert!(!c.agents[1].runs("web"));
    c.finish();
}

/// A migration to a standby that cannot take the final delta (its root is
/// full) is abandoned after the final-sync timeout: the vserver starts
/// again on its node, with an alert saying why; nothing is lost.
#[test]
fn migration_to_a_full_standby_is_abandoned_and_the_vserver_restarts() {
    if !root_and_busybox() {
        return;
    }
    let mut c = Cluster::new(3)
        .config("replication_interval_ms = 500")
        .small_root(2, "1m")
        .tag("fm")
        .start();
    c.demo_tree(1, "web");
    let ip = c.add_demo(1, "web", 1, &[2], &[], &[]);
    let s = c.wait_for("web on node 1", |s| runs_on(s, "web", 1, 0));
    let g1 = vsha_cluster_tests::status::generation(&s, "web");
    let mark = c.checker.mark();
    let before = c.wait_answer(&ip, mark, "node 1 answering", |a| {
        a.node == Some(1) && a.counter.is_some()
    });
    let seq = c.last_event_seq();
    // `vsha migrate` waits for the outcome and reports the refusal.
    let out = c.vsha(1, &["migrate", "web", "--to", "2", "--timeout", "120"]);
    assert!(!out.status.success(), "the migration cannot succeed");
    let ev = c.wait_event("alert", seq);
    assert!(
        ev["message"]
            .as_str()
            .unwrap_or("")
            .contains("move aborted"),
        "{ev}"
    );
    let s = c.wait_for("web running on node 1 again", |s| runs_on(s, "web", 1, g1));
    assert!(vsha_cluster_tests::status::generation(&s, "web") > g1);
    assert!(!c.agents[1].runs("web"));
    let mark = c.checker.mark();
    let after = c.wait_answer(&ip, mark, "node 1 answering again", |a| {
        a.node == Some(1) && a.counter.is_some()
    });
    assert!(after.counter > before.counter, "the counter went back");
    c.finish();
}
