//! The invariant checker can fail: two machines holding one vserver IP
//! (made by hand, no agents) are reported from the client's ARP probes
//! alone; handovers done the way agents do them are not.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vsha_cluster_tests::check::Shared;
use vsha_cluster_tests::net::{vserver_ip, Net};
use vsha_cluster_tests::{is_root, Checker};

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + vsha_cluster_tests::PATIENCE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn arp_probes_report_two_nodes_holding_one_ip() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let net = Net::new(&format!("v{}ck", std::process::id()), 2);
    let ip = vserver_ip(0);
    let cidr = format!("{ip}/24");
    let shared = Arc::new(Mutex::new(Shared::default()));
    shared
        .lock()
        .expect("shared")
        .watched
        .push(("web".into(), ip.clone()));
    // The client only: no node address or cgroup sampling, so whatever
    // it reports comes from the ARP probes.
    let checker = Checker::start(net.client.path(), Vec::new(), Vec::new(), shared);
    let answered_by = |node: u64, since: usize| {
        checker
            .arp_samples(&ip)
            .iter()
            .skip(since)
            .any(|a| a.nodes == [node])
    };

    // One holder at a time, handed over as the agents do it: the old
    // holder removes the IP, the new one adds it after its own probe
    // (at least 100 ms).
    net.node(1).ip(&["addr", "add", &cidr, "dev", "eth0"]);
    wait("node 1 answering ARP", || answered_by(1, 0));
    let mut holder = 1;
    for _ in 0..10 {
        let next = 3 - holder;
        net.node(holder).ip(&["addr", "del", &cidr, "dev", "eth0"]);
        std::thread::sleep(Duration::from_millis(100));
        net.node(next).ip(&["addr", "add", &cidr, "dev", "eth0"]);
        let since = checker.arp_samples(&ip).len();
        wait(&format!("node {next} answering ARP"), || {
            answered_by(next, since)
        });
        holder = next;
    }
    assert!(
        checker.violations().is_empty(),
        "handovers reported: {:?}\n{}",
        checker.violations(),
        checker.report()
    );

    // Split brain: both hold it.
    net.node(3 - holder)
        .ip(&["addr", "add", &cidr, "dev", "eth0"]);
    wait("the checker to report it", || {
        !checker.violations().is_empty()
    });
    let v = checker.violations();
    assert!(
        v[0].contains(&ip) && v[0].contains("ARP") && v[0].contains("[1, 2]"),
        "{v:?}"
    );
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| checker.check()));
    assert!(caught.is_err(), "check() passed a split brain");
    eprintln!("{}", checker.report());
}
