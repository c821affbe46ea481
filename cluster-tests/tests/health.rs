//! Health checks restart a vserver in place (same generation, same node);
//! disable/enable; enabling while another machine holds the IP is refused
//! with a `takeover_refused` event until the IP is free.

mod common;

use common::{root_and_busybox, settled};
use vsha_cluster_tests::status::{generation, runs_on, vserver};
use vsha_cluster_tests::Cluster;

#[test]
fn health_restart_disable_enable_and_refused_takeover() {
    if !root_and_busybox() {
        return;
    }
    let mut c = Cluster::new(3)
        .config("replication_interval_ms = 1000")
        .config("max_restarts = 1000")
        .tag("hl")
        .start();
    let tree1 = c.demo_tree(1, "web");
    let ip = c.add_demo(
        3,
        "web",
        1,
        &[2],
        &[
            "--health-cmd",
            "/bin/busybox test ! -e /fail",
            "--health-interval",
            "300",
            "--health-fall",
            "2",
            "--health-rise",
            "1",
        ],
        &[],
    );
    let g1 = settled(&c, "web", &ip, 1, 2, 0);

    // A failing check restarts it in place; fixed, it runs on.
    let seq = c.last_event_seq();
    std::fs::write(tree1.join("fail"), "").unwrap();
    let ev = c.wait_event("health_failed", seq);
    assert!(
        ev["message"].as_str().unwrap().contains("exited with 1"),
        "{ev}"
    );
    c.wait_event("restarted", seq);
    std::fs::remove_file(tree1.join("fail")).unwrap();
    let s = c.wait_for("web healthy again on node 1", |s| {
        runs_on(s, "web", 1, 0)
            && vserver(s, "web")["runtime"]["restarts"]
                .as_u64()
                .unwrap_or(0)
                >= 1
    });
    assert_eq!(
        generation(&s, "web"),
        g1,
        "a restart in place keeps the generation"
    );
    let mark = c.checker.mark();
    c.wait_answer(&ip, mark, "node 1 answering after the restart", |a| {
        a.node == Some(1)
    });

    // Disabled, then a foreign machine takes the IP: enable is refused.
    c.ok(1, &["vserver", "disable", "web"]);
    c.wait_for("web stopped", |s| {
        vserver(s, "web")["runtime"]["state"] == "stopped"
    });
    assert!(!c.agents[0].runs("web"));
    let seq = c.last_event_seq();
    let cidr = format!("{ip}/24");
    c.net.foreign().ip(&["addr", "add", &cidr, "dev", "eth0"]);
    c.ok(1, &["vserver", "enable", "web"]);
    let ev = c.wait_event("takeover_refused", seq);
    assert!(ev["message"].as_str().unwrap().contains(&ip), "{ev}");
    assert!(!c.agents[0].runs("web"));
    c.net.foreign().ip(&["addr", "del", &cidr, "dev", "eth0"]);
    // A refused retry is never retried again (see takeover_blocked.rs):
    // disable/enable starts it whichever way the race went.
    c.ok(1, &["vserver", "disable", "web"]);
    c.wait_for("web stopped", |s| {
        vserver(s, "web")["runtime"]["state"] == "stopped"
    });
    c.ok(1, &["vserver", "enable", "web"]);
    let s = c.wait_for("web running after the conflict is gone", |s| {
        vserver(s, "web")["runtime"]["state"] == "running"
    });
    assert_eq!(generation(&s, "web"), g1);
    c.finish();
}

/// TCP health checks: a port the service listens on keeps the vserver
/// healthy; a port nobody listens on fails it (and the leader restarts it).
#[test]
fn tcp_health_checks_connect_to_the_vserver_ip() {
    if !root_and_busybox() {
        return;
    }
    let mut c = Cluster::new(3)
        .config("replication_interval_ms = 1000")
        .config("max_restarts = 1000")
        .tag("ht")
        .start();
    c.demo_tree(1, "good");
    c.demo_tree(1, "bad");
    let tcp = ["--health-interval", "300", "--health-fall", "2"];
    let good = c.add_demo(
        3,
        "good",
        1,
        &[2],
        &[&["--health-tcp", "80"][..], &tcp].concat(),
        &[],
    );
    let seq = c.last_event_seq();
    c.add_demo(
        3,
        "bad",
        1,
        &[2],
        &[&["--health-tcp", "81"][..], &tcp].concat(),
        &[],
    );
    let ev = c.wait_event("health_failed", seq);
    assert_eq!(ev["vserver"], "bad", "{ev}");
    assert!(
        ev["message"].as_str().unwrap_or("").contains(":81"),
        "the reason names the port: {ev}"
    );
    c.wait_event("restarted", seq);
    settled(&c, "good", &good, 1, 2, 0);
    let s = c.status().expect("status");
    assert_eq!(vserver(&s, "good")["runtime"]["restarts"], 0, "{s:#}");
    assert!(runs_on(&s, "good", 1, 0));
    c.finish();
}
