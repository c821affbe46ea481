//! IP alias (rtnetlink), gratuitous ARP and the ARP probe, between two
//! network namespaces the test creates.

mod common;

use std::time::Duration;

use common::*;
use vsha_kernel::net::{self, AddrChange};

fn mac_of(ns: &Netns, dev: &str) -> String {
    sh_ok(&format!(
        "ip netns exec {} cat /sys/class/net/{dev}/address",
        ns.name
    ))
    .trim()
    .to_string()
}

#[test]
fn alias_and_gratuitous_arp_update_the_peer_neighbour_entry() {
    if !need_root() {
        return;
    }
    let t = tag();
    let pair = Pair::new(&t);
    pair.host.enter();
    let vip = pair.ip(5);
    // the peer knows the IP at an old MAC (as after a failover)
    sh_ok(&format!(
        "ip -n {} neigh replace {vip} lladdr 02:00:00:00:00:01 dev vb nud stale",
        pair.peer.name
    ));

    net::set_promote_secondaries("va").unwrap();
    let ps = sh_ok(&format!(
        "ip netns exec {} cat /proc/sys/net/ipv4/conf/va/promote_secondaries",
        pair.host.name
    ));
    assert_eq!(ps.trim(), "1");
    assert_eq!(
        net::add_address("va", vip, 24, None).unwrap(),
        AddrChange::Done
    );
    assert_eq!(
        net::add_address("va", vip, 24, None).unwrap(),
        AddrChange::AlreadyThere,
        "EEXIST means ours"
    );
    let shown = sh_ok(&format!("ip -n {} -4 addr show dev va", pair.host.name));
    assert!(
        shown.contains(&format!("inet {vip}/24")) && shown.contains("secondary"),
        "{shown}"
    );
    let listed = net::list_addresses().unwrap();
    assert!(
        listed
            .iter()
            .any(|a| a.addr == vip && a.prefix == 24 && a.secondary),
        "{listed:?}"
    );

    let mine = mac_of(&pair.host, "va");
    assert_eq!(net::hwaddr("va").unwrap().to_string(), mine);
    net::gratuitous_arp("va", vip, 4, Duration::from_millis(600)).unwrap();
    let entry = wait_for("the peer's neighbour entry to change", 30, || {
        let e = sh_ok(&format!("ip -n {} neigh show {vip} dev vb", pair.peer.name));
        e.contains(&mine).then_some(e)
    });
    assert!(!entry.contains("02:00:00:00:00:01"), "{entry}");

    assert_eq!(net::del_address("va", vip, 24).unwrap(), AddrChange::Done);
    assert_eq!(
        net::del_address("va", vip, 24).unwrap(),
        AddrChange::AlreadyThere
    );
    let shown = sh_ok(&format!("ip -n {} -4 addr show dev va", pair.host.name));
    assert!(!shown.contains(&format!("{vip}/")), "{shown}");
    assert!(
        shown.contains(&format!("{}/24", pair.ip(1))),
        "primary untouched: {shown}"
    );
}

#[test]
fn arp_probe_detects_an_address_in_use() {
    if !need_root() {
        return;
    }
    let t = tag();
    let pair = Pair::new(&t);
    pair.host.enter();
    let holder = net::arp_probe("va", pair.ip(2), 3, Duration::from_secs(5)).unwrap();
    assert_eq!(
        holder.map(|m| m.to_string()),
        Some(mac_of(&pair.peer, "vb"))
    );
    let free = net::arp_probe("va", pair.ip(99), 2, Duration::from_secs(1)).unwrap();
    assert_eq!(free, None);
}

/// Two machines holding one address: `arp_who_has` reports both (not only
/// the first), an address held once reports its holder, a free one nobody.
#[test]
fn arp_who_has_reports_every_holder_of_an_address() {
    if !need_root() {
        return;
    }
    let t = tag();
    // A switch (bridge) and three machines on it: the prober and two
    // holders of 10.78.0.50.
    let switch = Netns::new(&format!("vsh{t}s"));
    sh_ok(&format!(
        "ip -n {0} link add br0 type bridge && ip -n {0} link set br0 type bridge forward_delay 0 && ip -n {0} link set br0 up",
        switch.name
    ));
    let mut machines = Vec::new();
    for (i, last) in [(0, 1), (1, 2), (2, 3)] {
        let m = Netns::new(&format!("vsh{t}{i}"));
        sh_ok(&format!(
            "ip -n {s} link add p{i} type veth peer name eth0 netns {m} && ip -n {s} link set p{i} master br0 && ip -n {s} link set p{i} up && ip -n {m} addr add 10.78.0.{last}/24 dev eth0 && ip -n {m} link set eth0 up",
            s = switch.name,
            m = m.name
        ));
        machines.push(m);
    }
    for m in &machines[1..] {
        sh_ok(&format!("ip -n {} addr add 10.78.0.50/24 dev eth0", m.name));
    }
    let (a, b) = (mac_of(&machines[1], "eth0"), mac_of(&machines[2], "eth0"));
    machines[0].enter();
    let ip = |last| std::net::Ipv4Addr::new(10, 78, 0, last);
    // Both senders: an RFC 5227 probe (0.0.0.0) and our own address.
    for sender in [std::net::Ipv4Addr::UNSPECIFIED, ip(1)] {
        // The bridge may still be settling: ask until both answer.
        let got = wait_for("both holders to answer", 30, || {
            let r = net::arp_who_has(
                "eth0",
                &[ip(50), ip(2), ip(99)],
                sender,
                Duration::from_millis(300),
            )
            .unwrap();
            (r[0].len() == 2).then_some(r)
        });
        let mut both: Vec<String> = got[0].iter().map(|m| m.to_string()).collect();
        both.sort();
        let mut want = vec![a.clone(), b.clone()];
        want.sort();
        assert_eq!(both, want, "{sender}");
        assert_eq!(
            got[1].iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            vec![a.clone()],
            "{sender}"
        );
        assert!(got[2].is_empty(), "{sender}: {:?}", got[2]);
    }
}
