//! The lease and fencing protocol with real processes (issue 5): three
//! `vshad` in a network namespace of the test's own running a real vserver
//! context whose tree they replicate. A watcher fails the test if two nodes
//! ever run the vserver at once. Needs root.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use vsha_cluster_tests::status::{generation, has_replica, runs_on, vserver};
use vsha_cluster_tests::{is_root, Cluster};

const VS: &str = "web";

fn root_and_busybox() -> bool {
    if !is_root() {
        eprintln!("skipped: needs root");
        return false;
    }
    assert!(
        std::path::Path::new("/bin/busybox").exists(),
        "/bin/busybox missing: run scripts/setup (busybox-static)"
    );
    true
}

fn add_web(c: &Cluster, via: u64, extra: &[&str]) {
    let mut args = vec![
        "vserver",
        "add",
        VS,
        "--ip",
        "10.77.0.50/24",
        "--dev",
        "vs0",
        "--start",
        "/bin/busybox sleep 100000",
    ];
    args.extend_from_slice(extra);
    c.ok(via, &args);
    c.ok(
        via,
        &["pair", "add", VS, "--primary", "1", "--standby", "2"],
    );
}

/// A two-node pair (1, 2) with a witness (3): the holder's agent is
/// SIGKILLed, then the new holder's agent is stopped beyond its lease.
#[test]
fn failover_after_agent_death_and_after_a_stopped_agent() {
    if !root_and_busybox() {
        return;
    }
    let mut c = Cluster::new(3)
        .witness(3)
        .config("replication_interval_ms = 300")
        .tag("a")
        .start();
    c.build_tree(1, VS, &[("counter", "41\n")]);
    let watcher = c.watch(VS);
    add_web(&c, 1, &[]);

    // Placed on the primary, started, its IP up, replicated to the standby.
    let s = c.wait_for("web running on node 1 with a replica on node 2", |s| {
        runs_on(s, VS, 1, 0) && has_replica(s, VS, 2)
    });
    let g1 = generation(&s, VS);
    assert!(c.agents[0].runs(VS));
    assert!(c.ns.has_addr("10.77.0.50"));
    assert_eq!(
        std::fs::read_to_string(c.replica(2, VS).join("counter")).unwrap(),
        "41\n"
    );

    // What-if: node 1 down moves web to node 2.
    let sim: Value =
        serde_json::from_str(&c.ok(2, &["simulate", "node-down", "1", "--json"])).unwrap();
    assert_eq!(sim["moves"][0]["to"], 2, "{sim:#}");

    // 1. The holder's agent is SIGKILLed: its guard kills the vserver at
    // once, and the survivors restart it on node 2 after the lease.
    c.agent(1).kill9();
    let s = c.wait_for("web running on node 2", |s| runs_on(s, VS, 2, g1));
    let g2 = generation(&s, VS);
    assert!(c.agents[1].runs(VS));
    assert!(
        !c.agents[0].runs(VS),
        "node 1 still runs web after its agent died"
    );
    assert!(c.ns.has_addr("10.77.0.50"), "the IP moved with the vserver");
    watcher.check();

    // The old node comes back and does not run it; it becomes the standby
    // and gets the tree from node 2 (the direction reversed).
    c.restart(1);
    c.wait_for("node 1 back with a fresh replica", |s| {
        runs_on(s, VS, 2, g1) && has_replica(s, VS, 1)
    });
    assert!(!c.agents[0].runs(VS));
    watcher.check();

    // 2. The holder's agent is stopped (SIGSTOP) beyond its lease: its
    // guard fences the vserver; the cluster moves it back to node 1.
    c.agents[1].signal(Signal::SIGSTOP);
    let s = c.wait_for("web running on node 1 again", |s| runs_on(s, VS, 1, g2));
    assert!(
        !c.agents[1].runs(VS),
        "the stopped agent's vserver still runs"
    );
    let g3 = generation(&s, VS);
    c.agents[1].signal(Signal::SIGCONT);
    // Resumed, node 2 learns it lost the vserver and never runs it again.
    std::thread::sleep(Duration::from_secs(2));
    let s = c.wait_for("web still on node 1", |s| runs_on(s, VS, 1, g2));
    assert_eq!(generation(&s, VS), g3);
    assert!(!c.agents[1].runs(VS));
    assert!(!c.agents[2].runs(VS), "the witness ran the vserver");
    let witness = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == 3)
        .unwrap();
    assert_eq!(witness["role"], "witness");
    watcher.check();

    // The events tell the story.
    let kinds: Vec<String> = c
        .events()
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or("").to_string())
        .collect();
    for kind in ["node_lost", "failover_done", "started"] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "no {kind} event in {kinds:?}"
        );
    }
}

/// Health restarts in place, a migration without loss, drain, disable and
/// enable, and a takeover refused while another machine answers the IP.
#[test]
fn health_restart_migration_drain_and_refused_takeover() {
    if !root_and_busybox() {
        return;
    }
    // Rounds are rare here, so the final delta of a migration is what
    // carries the last write; restarts never run out.
    let c = Cluster::new(3)
        .config("replication_interval_ms = 4000")
        .config("max_restarts = 1000")
        .tag("b")
        .start();
    let tree1 = c.build_tree(1, VS, &[("counter", "41\n")]);
    let watcher = c.watch(VS);
    add_web(
        &c,
        3,
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
    );
    let s = c.wait_for("web on node 1 with a replica on node 2", |s| {
        runs_on(s, VS, 1, 0) && has_replica(s, VS, 2)
    });
    let g1 = generation(&s, VS);

    // Health: a failing check restarts it in place; fixed, it runs on.
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
        runs_on(s, VS, 1, 0) && vserver(s, VS)["runtime"]["restarts"].as_u64().unwrap_or(0) >= 1
    });
    assert_eq!(
        generation(&s, VS),
        g1,
        "a restart in place keeps the generation"
    );

    // Planned migration: the last write before it arrives on node 2.
    std::fs::write(tree1.join("counter"), "42\n").unwrap();
    let out = c.ok(1, &["migrate", VS, "--to", "2"]);
    assert!(out.contains("migrated to node 2"), "{out}");
    let s = c.wait_for("web on node 2", |s| runs_on(s, VS, 2, g1));
    let g2 = generation(&s, VS);
    assert_eq!(
        std::fs::read_to_string(c.replica(2, VS).join("counter")).unwrap(),
        "42\n",
        "the migration lost a write"
    );
    assert!(c.agents[1].runs(VS) && !c.agents[0].runs(VS));

    // Drain node 2: everything goes back to node 1.
    c.ok(1, &["node", "drain", "2"]);
    let s = c.wait_for("web back on node 1", |s| runs_on(s, VS, 1, g2));
    let g3 = generation(&s, VS);
    c.ok(1, &["node", "admin", "2", "active"]);

    // Disable, then an address conflict: the takeover is refused with an
    // event; once the other owner is gone, it starts.
    c.ok(1, &["vserver", "disable", VS]);
    c.wait_for("web stopped", |s| {
        vserver(s, VS)["runtime"]["state"] == "stopped"
    });
    assert!(!c.agents[0].runs(VS));
    let seq = c.last_event_seq();
    c.ns.exec(&["ip", "addr", "add", "10.77.0.50/24", "dev", "vs0p"]);
    c.ok(1, &["vserver", "enable", VS]);
    let ev = c.wait_event("takeover_refused", seq);
    assert!(
        ev["message"].as_str().unwrap().contains("10.77.0.50"),
        "{ev}"
    );
    assert!(!c.agents[0].runs(VS));
    c.ns.exec(&["ip", "addr", "del", "10.77.0.50/24", "dev", "vs0p"]);
    let s = c.wait_for("web running after the conflict is gone", |s| {
        vserver(s, VS)["runtime"]["state"] == "running"
    });
    assert_eq!(generation(&s, VS), g3);
    watcher.check();
}
