//! An IP answered by another machine blocks the takeover: after the primary
//! dies, a foreign machine on the LAN holds the vserver's IP; the standby
//! ARP-probes, refuses with a `takeover_refused` event naming the IP and
//! the MAC, and starts only once the other machine let the IP go.

mod common;

use common::{demo_running, replicated_counter, root_and_busybox};
use vsha_cluster_tests::status::runs_on;
use vsha_cluster_tests::Cluster;

#[test]
fn ip_answered_elsewhere_blocks_takeover_with_an_event() {
    if !root_and_busybox() {
        return;
    }
    let mut c = Cluster::new(3)
        .config("replication_interval_ms = 500")
        .config("max_restarts = 1000")
        .tag("tb")
        .start();
    let (ip, g1) = demo_running(&mut c, "web", 1, 2);
    replicated_counter(&c, 2, "web", 2);

    let seq = c.last_event_seq();
    c.kill_node(1);
    let cidr = format!("{ip}/24");
    c.net.foreign().ip(&["addr", "add", &cidr, "dev", "eth0"]);
    let ev = c.wait_event("takeover_refused", seq);
    let msg = ev["message"].as_str().unwrap_or("").to_lowercase();
    assert!(msg.contains(&ip), "{ev}");
    assert!(msg.contains("02:77:00:00:00:c9"), "the foreign MAC: {ev}");
    assert!(!c.agents[1].runs("web"));
    assert!(!c.net.node(2).has_addr(&ip));

    // The other machine lets go. Whether the standby's retry came before
    // or after that is a race (and a retry that was refused too is never
    // retried again: see the ignored test below), so the operator's
    // disable/enable starts it.
    let mark = c.checker.mark();
    c.net.foreign().ip(&["addr", "del", &cidr, "dev", "eth0"]);
    c.ok(2, &["vserver", "disable", "web"]);
    c.wait_for("web stopped", |s| {
        vsha_cluster_tests::status::vserver(s, "web")["runtime"]["state"] == "stopped"
    });
    c.ok(2, &["vserver", "enable", "web"]);
    c.wait_answer(&ip, mark, "node 2 answering", |a| a.node == Some(2));
    c.wait_for("web on node 2", |s| runs_on(s, "web", 2, g1));
    c.finish();
}

/// The takeover is refused at the start and again at the controller's
/// first restart; once the IP is free, the standby must start it.
#[test]
fn takeover_refused_twice_is_retried_once_the_ip_is_free() {
    if !root_and_busybox() {
        return;
    }
    let mut c = Cluster::new(3)
        .config("replication_interval_ms = 500")
        .config("max_restarts = 1000")
        .tag("tr")
        .start();
    let (ip, g1) = demo_running(&mut c, "web", 1, 2);
    replicated_counter(&c, 2, "web", 2);

    let seq = c.last_event_seq();
    c.kill_node(1);
    let cidr = format!("{ip}/24");
    c.net.foreign().ip(&["addr", "add", &cidr, "dev", "eth0"]);
    let first = c.wait_event("takeover_refused", seq);
    let leader = c.status().and_then(|s| s["leader"].as_u64()).unwrap_or(0);
    let again = vsha_cluster_tests::EventMark {
        leader,
        seq: first["seq"].as_u64().unwrap_or(0),
    };
    c.wait_event("takeover_refused", again);
    let mark = c.checker.mark();
    c.net.foreign().ip(&["addr", "del", &cidr, "dev", "eth0"]);
    c.wait_answer(&ip, mark, "node 2 answering", |a| a.node == Some(2));
    c.wait_for("web on node 2", |s| runs_on(s, "web", 2, g1));
    c.finish();
}
