//! Nemesis: a seeded random schedule of faults (agent SIGKILL, SIGSTOP,
//! node death, cable out, partition, agent restart), one node at a time,
//! for VSHA_NEMESIS_SECS (default 60); the checker watches the invariant
//! throughout, and after the faults stop every vserver must run and answer
//! again. The seed is printed; VSHA_NEMESIS_SEED replays a schedule.

mod common;

use std::time::Duration;

use common::root_and_busybox;
use vsha_cluster_tests::status::vserver;
use vsha_cluster_tests::{nemesis, Cluster};

#[test]
fn nemesis_keeps_the_invariant_and_recovers() {
    if !root_and_busybox() {
        return;
    }
    let secs: u64 = std::env::var("VSHA_NEMESIS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("VSHA_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("nemesis seed {seed} for {secs} s (VSHA_NEMESIS_SEED={seed} replays it)");
    let mut c = Cluster::new(3)
        .config("replication_interval_ms = 500")
        .config("max_restarts = 1000")
        .tag("nm")
        .start();
    c.demo_tree(1, "web");
    c.demo_tree(2, "db");
    let web = c.add_demo(1, "web", 1, &[2, 3], &[], &[]);
    let db = c.add_demo(1, "db", 2, &[3, 1], &[], &[]);
    for ip in [&web, &db] {
        let mark = c.checker.mark();
        c.wait_answer(ip, mark, "a first answer", |_| true);
    }

    let log = nemesis::run(&mut c, seed, Duration::from_secs(secs), &[1, 2, 3]);

    // Full recovery: every node a member again, both vservers running and
    // answering, with a replica on one other node.
    c.wait_for("every vserver running with a replica", |s| {
        ["web", "db"].iter().all(|n| {
            let v = vserver(s, n);
            v["runtime"]["state"] == "running"
                && v["runtime"]["replicas"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|x| x["lag_ms"].is_u64()))
        })
    });
    for ip in [&web, &db] {
        let mark = c.checker.mark();
        c.wait_answer(ip, mark, "an answer after the faults", |_| true);
    }
    eprintln!("nemesis schedule (seed {seed}):\n{}", log.join("\n"));
    let v = c.checker.violations();
    assert!(v.is_empty(), "seed {seed}: {v:?}");
    c.finish();
}
