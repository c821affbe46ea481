//! Unit tests: feed events, assert the emitted commands (openraft style).

use super::*;
use crate::model::{
    Failback, FailoverGroup, Limits, NodeRecord, Placement, ReplicaStatus, VserverSpec,
};
use std::net::Ipv4Addr;

const LEASE: u64 = 1000;
const MARGIN: u64 = 200;

fn cfg() -> ControllerConfig {
    ControllerConfig {
        lease_ms: LEASE,
        drift_margin_ms: MARGIN,
        max_restarts: 2,
        proposal_retry_ms: LEASE,
    }
}

fn node(id: NodeId, role: Role) -> NodeRecord {
    NodeRecord {
        id,
        addr: format!("127.0.0.{id}:7700"),
        role,
        iface: String::new(),
        admin: AdminState::Active,
    }
}

fn spec(name: &str, max_rpo_ms: u64) -> VserverSpec {
    VserverSpec {
        name: name.into(),
        tree: format!("/vservers/{name}"),
        ip: Ipv4Addr::new(10, 0, 0, 5),
        prefix: 24,
        dev: String::new(),
        hostname: name.into(),
        capabilities: vec![],
        limits: Limits::default(),
        start_command: vec![],
        stop_command: vec![],
        health: None,
        max_rpo_ms,
    }
}

/// Nodes 1, 2 (voters), 3 (witness); vserver "web" with group [1, 2].
fn cluster(failback: Failback) -> ClusterState {
    let mut s = ClusterState::default();
    for n in [
        node(1, Role::Voter),
        node(2, Role::Voter),
        node(3, Role::Witness),
    ] {
        s.nodes.insert(n.id, n);
    }
    s.vservers.insert(
        "web".into(),
        Vserver {
            spec: spec("web", 5000),
            group: Some(FailoverGroup {
                nodes: vec![1, 2],
                failback,
                failback_stable_ms: 3000,
            }),
            placement: None,
            replicas: BTreeMap::new(),
            desired: None,
        },
    );
    s
}

fn place(s: &mut ClusterState, vs: &str, node: NodeId, generation: u64) {
    s.vservers.get_mut(vs).unwrap().placement = Some(Placement {
        node,
        generation,
        desired: Desired::Running,
        observed: "unknown".into(),
    });
}

fn replica(s: &mut ClusterState, vs: &str, node: NodeId, src: u64) {
    s.vservers.get_mut(vs).unwrap().replicas.insert(
        node,
        ReplicaStatus {
            node,
            snapshot_source_unix_ms: src,
            digest: String::new(),
        },
    );
}

fn leader(s: &ClusterState, at: u64) -> Controller {
    let mut c = Controller::new(cfg());
    c.step(s, Now::at(at), Event::BecameLeader);
    c.take_commands();
    c
}

fn renew(c: &mut Controller, s: &ClusterState, at: u64, nodes: &[NodeId]) -> Vec<Cmd> {
    for &n in nodes {
        c.step(s, Now::at(at), Event::LeaseRenewed { node: n });
    }
    c.take_commands()
}

fn tick(c: &mut Controller, s: &ClusterState, at: u64) -> Vec<Cmd> {
    c.step(s, Now::at(at), Event::Tick);
    c.take_commands()
}

fn proposals(cmds: &[Cmd]) -> Vec<&PlacementChange> {
    cmds.iter()
        .filter_map(|c| match c {
            Cmd::Propose(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn alerts(cmds: &[Cmd]) -> Vec<&Alert> {
    cmds.iter()
        .filter_map(|c| match c {
            Cmd::Alert(a) => Some(a),
            _ => None,
        })
        .collect()
}

fn report(vs: &str, node: NodeId, generation: u64, state: Observed, restarts: u32) -> Event {
    Event::Report(VserverReport {
        vserver: vs.into(),
        node,
        generation,
        state,
        restarts,
    })
}

/// `web` placed on node 1 at generation 3 and reported running there, at
/// 1000 ms, nodes 1 and 2 renewed; no command pending.
fn web_running_on_1_gen_3() -> (ClusterState, Controller) {
    let mut s = cluster(Failback::Never);
    place(&mut s, "web", 1, 3);
    let mut c = leader(&s, 0);
    renew(&mut c, &s, 1000, &[1, 2]);
    c.step(&s, Now::at(1000), report("web", 1, 3, Observed::Running, 0));
    c.take_commands();
    (s, c)
}

/// `web` failed on node 1 at generation 3, after `restarts` restarts.
fn failed_on_1_gen_3(reason: &str, restarts: u32) -> Event {
    let state = Observed::Failed {
        reason: reason.into(),
    };
    report("web", 1, 3, state, restarts)
}

#[test]
fn unplaced_goes_to_first_eligible_after_leader_grace() {
    let s = cluster(Failback::Never);
    let mut c = leader(&s, 0);
    // Within the first lease a new leader proposes nothing.
    assert!(renew(&mut c, &s, 100, &[1, 2, 3]).is_empty());
    assert!(tick(&mut c, &s, 999).is_empty());
    renew(&mut c, &s, 900, &[1, 2, 3]);
    let cmds = tick(&mut c, &s, 1000);
    assert_eq!(
        cmds,
        vec![Cmd::Propose(PlacementChange {
            vserver: "web".into(),
            from: None,
            to: 1,
            generation: 1,
            expect_generation: 0,
            reason: MoveReason::Place,
        })]
    );
    // Not proposed again while in flight.
    assert!(tick(&mut c, &s, 1100).is_empty());
}

#[test]
fn placement_skips_dead_draining_and_never_picks_witness() {
    let mut s = cluster(Failback::Never);
    s.vservers
        .get_mut("web")
        .unwrap()
        .group
        .as_mut()
        .unwrap()
        .nodes = vec![1, 2];
    s.nodes.get_mut(&2).unwrap().admin = AdminState::Maintenance;
    let mut c = leader(&s, 0);
    // Node 1 silent, 2 in maintenance: decided as soon as 2 renews.
    let cmds = renew(&mut c, &s, 1000, &[2, 3]);
    assert!(proposals(&cmds).is_empty());
    let a = alerts(&cmds);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].kind, AlertKind::NoEligibleNode);
    assert!(
        a[0].message.contains("node 1 has no live lease"),
        "{}",
        a[0].message
    );
    assert!(
        a[0].message.contains("node 2 is maintenance"),
        "{}",
        a[0].message
    );
    // Raised once per generation, not on every tick.
    assert!(tick(&mut c, &s, 1100).is_empty());
}

#[test]
fn failover_waits_for_lease_plus_margin() {
    let mut s = cluster(Failback::Never);
    place(&mut s, "web", 1, 4);
    replica(&mut s, "web", 2, 1500);
    let mut c = leader(&s, 0);
    renew(&mut c, &s, 1000, &[1, 2]);
    tick(&mut c, &s, 1000);
    // Node 1 goes silent after its renewal at 1000; node 2 keeps renewing.
    renew(&mut c, &s, 1900, &[2]);
    assert!(
        proposals(&tick(&mut c, &s, 2000)).is_empty(),
        "lease still runs"
    );
    renew(&mut c, &s, 2100, &[2]);
    assert!(
        proposals(&tick(&mut c, &s, 2199)).is_empty(),
        "inside the margin"
    );
    let cmds = tick(&mut c, &s, 2200);
    assert_eq!(
        cmds,
        vec![
            Cmd::Fence {
                vserver: "web".into(),
                node: 1,
                generation: 4
            },
            Cmd::Propose(PlacementChange {
                vserver: "web".into(),
                from: Some(1),
                to: 2,
                generation: 5,
                expect_generation: 4,
                reason: MoveReason::Failover,
            }),
        ]
    );
}

#[test]
fn new_leader_waits_a_full_lease_even_for_a_silent_holder() {
    let mut s = cluster(Failback::Never);
    place(&mut s, "web", 1, 1);
    replica(&mut s, "web", 2, 10_000);
    let mut c = leader(&s, 10_000);
    renew(&mut c, &s, 10_000, &[2]);
    // Node 1 was never heard by this leader: assumed renewed at 10 000.
    renew(&mut c, &s, 11_000, &[2]);
    assert!(proposals(&tick(&mut c, &s, 11_199)).is_empty());
    let cmds = tick(&mut c, &s, 11_200);
    assert_eq!(proposals(&cmds).len(), 1);
    assert_eq!(proposals(&cmds)[0].to, 2);
}

#[test]
fn replica_older_than_max_rpo_blocks_failover_with_alert() {
    let mut s = cluster(Failback::Never);
    place(&mut s, "web", 1, 2);
    replica(&mut s, "web", 2, 0); // 5000 ms old at 5000: not younger than max_rpo
    let mut c = leader(&s, 0);
    let cmds = renew(&mut c, &s, 5000, &[2]);
    assert!(proposals(&cmds).is_empty());
    let a = alerts(&cmds);
    assert_eq!(a.len(), 1);
    assert!(
        a[0].message.contains("older than max_rpo"),
        "{}",
        a[0].message
    );
    // A fresher replica arrives: now it fails over.
    c.step(
        &s,
        Now::at(5100),
        Event::Replica {
            vserver: "web".into(),
            node: 2,
            source_unix_ms: 4000,
        },
    );
    let cmds = c.take_commands();
    assert_eq!(proposals(&cmds).len(), 1);
}

#[test]
fn max_rpo_zero_means_no_limit_but_needs_a_replica() {
    let mut s = cluster(Failback::Never);
    s.vservers.get_mut("web").unwrap().spec.max_rpo_ms = 0;
    place(&mut s, "web", 1, 2);
    let mut c = leader(&s, 0);
    let cmds = renew(&mut c, &s, 100_000, &[2]);
    assert!(proposals(&cmds).is_empty());
    assert!(alerts(&cmds)[0].message.contains("no complete replica"));
    replica(&mut s, "web", 2, 1);
    let cmds = tick(&mut c, &s, 100_001);
    assert_eq!(proposals(&cmds).len(), 1);
}

#[test]
fn forced_failover_skips_rpo_but_never_the_lease() {
    let mut s = cluster(Failback::Never);
    place(&mut s, "web", 1, 2);
    replica(&mut s, "web", 2, 0);
    let mut c = leader(&s, 0);
    renew(&mut c, &s, 1000, &[1, 2]);
    // Holder alive: refused outright.
    c.step(
        &s,
        Now::at(1000),
        Event::ForceFailover {
            vserver: "web".into(),
            to: 2,
            accept_data_loss: true,
        },
    );
    let cmds = c.take_commands();
    assert!(proposals(&cmds).is_empty());
    assert_eq!(alerts(&cmds)[0].kind, AlertKind::TakeoverRefused);
    // Holder silent since 1000; the order is given while the margin runs.
    renew(&mut c, &s, 2100, &[2]);
    c.step(
        &s,
        Now::at(2100),
        Event::ForceFailover {
            vserver: "web".into(),
            to: 2,
            accept_data_loss: true,
        },
    );
    assert!(
        proposals(&c.take_commands()).is_empty(),
        "lease + margin not over"
    );
    let cmds = tick(&mut c, &s, 2200);
    let p = proposals(&cmds);
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].to, p[0].reason), (2, MoveReason::Forced));
}

#[test]
fn forced_failover_without_data_loss_respects_rpo() {
    let mut s = cluster(Failback::Never);
    place(&mut s, "web", 1, 2);
    replica(&mut s, "web", 2, 0);
    let mut c = leader(&s, 0);
    renew(&mut c, &s, 9000, &[2]);
    c.step(
        &s,
        Now::at(9000),
        Event::ForceFailover {
            vserver: "web".into(),
            to: 2,
            accept_data_loss: false,
        },
    );
    let cmds = c.take_commands();
    assert!(proposals(&cmds).is_empty());
    assert!(alerts(&cmds)
        .iter()
        .any(|a| a.kind == AlertKind::TakeoverRefused && a.message.contains("max_rpo")));
}

#[test]
fn follower_emits_nothing() {
    let mut s = cluster(Failback::Auto);
    place(&mut s, "web", 1, 2);
    let mut c = Controller::new(cfg());
    for t in [0, 5000, 50_000] {
        c.step(&s, Now::at(t), Event::LeaseRenewed { node: 2 });
        c.step(
            &s,
            Now::at(t),
            report("web", 1, 2, Observed::Failed { reason: "x".into() }, 9),
        );
        c.step(
            &s,
            Now::at(t),
            Event::ForceFailover {
                vserver: "web".into(),
                to: 2,
                accept_data_loss: true,
            },
        );
        c.step(&s, Now::at(t), Event::Tick);
    }
    assert!(c.take_commands().is_empty());
    // A deposed leader stops deciding at once.
    let mut c = leader(&s, 0);
    c.step(&s, Now::at(10), Event::LostLeadership);
    assert!(tick(&mut c, &s, 60_000).is_empty());
}

#[test]
fn holder_gets_start_and_standby_gets_stream_once_per_generation() {
    let mut s = cluster(Failback::Never);
    place(&mut s, "web", 2, 7);
    let mut c = leader(&s, 0);
    let cmds = renew(&mut c, &s, 0, &[1, 2, 3]);
    assert_eq!(
        cmds,
        vec![
            Cmd::Start {
                vserver: "web".into(),
                node: 2,
                generation: 7
            },
            Cmd::Sync {
                vserver: "web".into(),
                from: 2,
                to: 1,
                generation: 7,
                kind: SyncKind::Stream
            },
        ]
    );
    assert!(tick(&mut c, &s, 10).is_empty());
}

/// A Restart the node could not finish (its lease lapsed during the stop,
/// so the count did not rise) and a plain Start that brought the vserver
/// back: its next failure at the same count is restarted again, not left.
#[test]
fn a_failure_after_an_unfinished_restart_is_restarted_again() {
    let (s, mut c) = web_running_on_1_gen_3();
    let failed = || failed_on_1_gen_3("health", 0);
    let restart = Cmd::Restart {
        vserver: "web".into(),
        node: 1,
        generation: 3,
    };
    c.step(&s, Now::at(1100), failed());
    assert_eq!(c.take_commands(), vec![restart.clone()]);
    // Still failed, no run in between: no second Restart.
    c.step(&s, Now::at(1150), failed());
    assert!(c.take_commands().is_empty());
    // It runs again, same count (the restart was not counted)...
    c.step(&s, Now::at(1200), report("web", 1, 3, Observed::Running, 0));
    c.take_commands();
    // ...and fails again: restarted.
    c.step(&s, Now::at(1300), failed());
    assert_eq!(c.take_commands(), vec![restart]);
}

#[test]
fn health_restarts_in_place_then_moves() {
    let (mut s, mut c) = web_running_on_1_gen_3();
    let failed = |n| failed_on_1_gen_3("oom", n);
    c.step(&s, Now::at(1100), failed(0));
    let restart = Cmd::Restart {
        vserver: "web".into(),
        node: 1,
        generation: 3,
    };
    assert_eq!(c.take_commands(), vec![restart.clone()]);
    assert!(tick(&mut c, &s, 1150).is_empty(), "one restart per failure");
    c.step(&s, Now::at(1200), failed(1));
    assert_eq!(c.take_commands(), vec![restart]);
    c.step(&s, Now::at(1300), failed(2));
    let stop = Cmd::Stop {
        vserver: "web".into(),
        node: 1,
        generation: 3,
    };
    assert_eq!(c.take_commands(), vec![stop]);
    c.step(&s, Now::at(1400), report("web", 1, 3, Observed::Stopped, 2));
    let cmds = c.take_commands();
    assert_eq!(
        cmds,
        vec![
            Cmd::Sync {
                vserver: "web".into(),
                from: 1,
                to: 2,
                generation: 3,
                kind: SyncKind::Final
            },
            Cmd::Propose(PlacementChange {
                vserver: "web".into(),
                from: Some(1),
                to: 2,
                generation: 4,
                expect_generation: 3,
                reason: MoveReason::Health,
            }),
        ]
    );
    // Applied: the new holder is started, the old one streams to... itself
    // no more: streams now go from 2 to 1.
    place(&mut s, "web", 2, 4);
    let cmds = tick(&mut c, &s, 1500);
    assert_eq!(
        cmds,
        vec![
            Cmd::Start {
                vserver: "web".into(),
                node: 2,
                generation: 4
            },
            Cmd::Sync {
                vserver: "web".into(),
                from: 2,
                to: 1,
                generation: 4,
                kind: SyncKind::Stream
            },
        ]
    );
}

#[test]
fn drain_moves_off_and_maintenance_keeps() {
    let mut s = cluster(Failback::Never);
    place(&mut s, "web", 1, 1);
    s.nodes.get_mut(&1).unwrap().admin = AdminState::Maintenance;
    let mut c = leader(&s, 0);
    renew(&mut c, &s, 1000, &[1, 2]);
    c.step(&s, Now::at(1000), report("web", 1, 1, Observed::Running, 0));
    assert!(c
        .take_commands()
        .iter()
        .all(|c| !matches!(c, Cmd::Stop { .. } | Cmd::Propose(_))));
    s.nodes.get_mut(&1).unwrap().admin = AdminState::Draining;
    let cmds = tick(&mut c, &s, 1100);
    assert_eq!(
        cmds,
        vec![Cmd::Stop {
            vserver: "web".into(),
            node: 1,
            generation: 1
        }]
    );
    // Nothing more until the holder says it stopped.
    assert!(tick(&mut c, &s, 1200).is_empty());
    c.step(&s, Now::at(1300), report("web", 1, 1, Observed::Stopped, 0));
    let p = c.take_commands();
    assert_eq!(proposals(&p)[0].reason, MoveReason::Drain);
    assert_eq!(proposals(&p)[0].to, 2);
}

#[test]
fn failback_policies() {
    for (policy, moves) in [
        (Failback::Never, false),
        (Failback::Manual, false),
        (Failback::Auto, true),
    ] {
        let mut s = cluster(policy);
        place(&mut s, "web", 2, 5);
        let mut c = leader(&s, 0);
        renew(&mut c, &s, 0, &[2]);
        c.step(&s, Now::at(0), report("web", 2, 5, Observed::Running, 0));
        c.take_commands();
        // The preferred node 1 comes back at 1000 and renews every 500 ms.
        let mut stops = Vec::new();
        for t in (1000..=6000).step_by(500) {
            let cmds = renew(&mut c, &s, t, &[1, 2]);
            if cmds.iter().any(|c| matches!(c, Cmd::Stop { .. })) {
                stops.push(t);
            }
        }
        if moves {
            // Stable for failback_stable_ms (3000) since 1000.
            assert_eq!(stops, vec![4000], "{policy:?}");
        } else {
            assert!(stops.is_empty(), "{policy:?}");
        }
    }
}

#[test]
fn stray_copy_is_stopped_with_current_generation() {
    let mut s = cluster(Failback::Never);
    place(&mut s, "web", 2, 6);
    let mut c = leader(&s, 0);
    renew(&mut c, &s, 0, &[1, 2]);
    c.step(&s, Now::at(10), report("web", 2, 6, Observed::Running, 0));
    c.take_commands();
    c.step(&s, Now::at(20), report("web", 1, 5, Observed::Running, 0));
    assert_eq!(
        c.take_commands(),
        vec![Cmd::Stop {
            vserver: "web".into(),
            node: 1,
            generation: 6
        }]
    );
}

#[test]
fn generations_grow_and_stale_in_flight_is_dropped() {
    let mut s = cluster(Failback::Never);
    place(&mut s, "web", 1, 9);
    replica(&mut s, "web", 2, 0);
    s.vservers.get_mut("web").unwrap().spec.max_rpo_ms = 0;
    let mut c = leader(&s, 0);
    renew(&mut c, &s, 1100, &[2]);
    let p = tick(&mut c, &s, 1200);
    assert_eq!(proposals(&p)[0].generation, 10);
    assert_eq!(proposals(&p)[0].expect_generation, 9);
    // Not applied within the retry period: proposed again, same CAS.
    assert!(proposals(&tick(&mut c, &s, 1300)).is_empty());
    renew(&mut c, &s, 2100, &[2]);
    let p = tick(&mut c, &s, 2200);
    assert_eq!(proposals(&p)[0].generation, 10);
}

#[test]
fn cmd_display_is_stable() {
    let p = Cmd::Propose(PlacementChange {
        vserver: "web".into(),
        from: Some(1),
        to: 2,
        generation: 5,
        expect_generation: 4,
        reason: MoveReason::Failover,
    });
    assert_eq!(p.to_string(), "propose web -> 2 gen 5 (from 1, failover)");
}

#[test]
fn observe_records_without_deciding() {
    let mut s = cluster(Failback::Never);
    place(&mut s, "web", 1, 2);
    replica(&mut s, "web", 2, 0);
    s.vservers.get_mut("web").unwrap().spec.max_rpo_ms = 0;
    let mut c = Controller::new(cfg());
    c.observe(&s, Now::at(0), Event::BecameLeader);
    c.observe(&s, Now::at(5000), Event::LeaseRenewed { node: 2 });
    assert!(c.take_commands().is_empty());
    let cmds = tick(&mut c, &s, 5000);
    assert_eq!(proposals(&cmds).len(), 1);
}

#[test]
fn stopped_vserver_is_neither_started_nor_moved() {
    let mut s = cluster(Failback::Never);
    place(&mut s, "web", 1, 2);
    s.vservers
        .get_mut("web")
        .unwrap()
        .placement
        .as_mut()
        .unwrap()
        .desired = Desired::Stopped;
    replica(&mut s, "web", 2, 0);
    let mut c = leader(&s, 0);
    assert!(renew(&mut c, &s, 1000, &[1, 2]).is_empty());
    c.step(&s, Now::at(1100), report("web", 1, 2, Observed::Running, 0));
    assert_eq!(
        c.take_commands(),
        vec![Cmd::Stop {
            vserver: "web".into(),
            node: 1,
            generation: 2
        }]
    );
    // Holder gone: still nothing moves.
    assert!(tick(&mut c, &s, 60_000).is_empty());
}

#[test]
fn no_panic_on_odd_input() {
    // Unknown vservers and nodes, time going backwards, empty groups.
    let mut s = cluster(Failback::Auto);
    s.vservers
        .get_mut("web")
        .unwrap()
        .group
        .as_mut()
        .unwrap()
        .nodes
        .clear();
    place(&mut s, "web", 42, u64::MAX);
    let mut c = leader(&s, u64::MAX - 10);
    for (t, ev) in [
        (u64::MAX, Event::LeaseRenewed { node: 42 }),
        (0, Event::LeaseRenewed { node: 7 }),
        (
            5,
            Event::ForceFailover {
                vserver: "nope".into(),
                to: 9,
                accept_data_loss: true,
            },
        ),
        (
            u64::MAX,
            Event::Replica {
                vserver: "nope".into(),
                node: 1,
                source_unix_ms: u64::MAX,
            },
        ),
        (3, report("nope", 9, 0, Observed::Stopped, u32::MAX)),
        (u64::MAX, Event::Tick),
        (0, Event::Tick),
    ] {
        c.step(&s, Now::at(t), ev);
    }
    c.take_commands();
}

#[test]
fn exhausted_generation_is_never_reused() {
    let mut s = cluster(Failback::Never);
    place(&mut s, "web", 1, u64::MAX);
    replica(&mut s, "web", 2, 0);
    s.vservers.get_mut("web").unwrap().spec.max_rpo_ms = 0;
    let mut c = leader(&s, 0);
    let cmds = renew(&mut c, &s, 5000, &[2]);
    assert!(proposals(&cmds).is_empty());
    assert!(alerts(&cmds)[0].message.contains("exhausted"));
}

#[test]
fn migrate_stops_first_then_final_sync_then_proposes_to_the_named_node() {
    let mut s = cluster(Failback::Never);
    place(&mut s, "web", 1, 1);
    let mut c = leader(&s, 0);
    renew(&mut c, &s, 1000, &[1, 2]);
    c.step(&s, Now::at(1000), report("web", 1, 1, Observed::Running, 0));
    c.take_commands();
    c.step(
        &s,
        Now::at(1100),
        Event::Migrate {
            vserver: "web".into(),
            to: 2,
        },
    );
    assert_eq!(
        c.take_commands(),
        vec![Cmd::Stop {
            vserver: "web".into(),
            node: 1,
            generation: 1
        }]
    );
    assert!(tick(&mut c, &s, 1200).is_empty(), "waits for the stop");
    c.step(&s, Now::at(1300), report("web", 1, 1, Observed::Stopped, 0));
    let cmds = c.take_commands();
    assert_eq!(
        cmds[0],
        Cmd::Sync {
            vserver: "web".into(),
            from: 1,
            to: 2,
            generation: 1,
            kind: SyncKind::Final
        }
    );
    let p = proposals(&cmds);
    assert_eq!(
        (p[0].to, p[0].reason, p[0].generation),
        (2, MoveReason::Migrate, 2)
    );
}

#[test]
fn migrate_to_a_node_that_cannot_host_alerts_and_keeps_running() {
    let mut s = cluster(Failback::Never);
    place(&mut s, "web", 1, 1);
    let mut c = leader(&s, 0);
    renew(&mut c, &s, 1000, &[1]);
    c.step(&s, Now::at(1000), report("web", 1, 1, Observed::Running, 0));
    c.take_commands();
    c.step(
        &s,
        Now::at(1100),
        Event::Migrate {
            vserver: "web".into(),
            to: 2,
        },
    );
    let cmds = c.take_commands();
    assert!(
        cmds.iter().all(|c| !matches!(c, Cmd::Stop { .. })),
        "{cmds:?}"
    );
    assert_eq!(alerts(&cmds)[0].kind, AlertKind::NoEligibleNode);
}

#[test]
fn a_replica_reported_before_a_node_held_the_vserver_never_qualifies_it_later() {
    let mut s = cluster(Failback::Never);
    s.vservers.get_mut("web").unwrap().spec.max_rpo_ms = 0;
    let mut c = leader(&s, 0);
    // Node 1 reported a replica while node 2 held web...
    place(&mut s, "web", 2, 1);
    c.step(
        &s,
        Now::at(100),
        Event::Replica {
            vserver: "web".into(),
            node: 1,
            source_unix_ms: 90,
        },
    );
    // ...then held it itself (generation 2) and lost it to node 2 (3).
    place(&mut s, "web", 1, 2);
    renew(&mut c, &s, 1000, &[1, 2]);
    tick(&mut c, &s, 1000);
    place(&mut s, "web", 2, 3);
    renew(&mut c, &s, 2000, &[1, 2]);
    tick(&mut c, &s, 2000);
    // Node 2 dies; node 1 has no replica taken since it ran web.
    let t = 2000 + LEASE + MARGIN + 10;
    let mut cmds = renew(&mut c, &s, t, &[1]);
    cmds.extend(tick(&mut c, &s, t));
    assert!(proposals(&cmds).is_empty(), "{cmds:?}");
    assert!(
        alerts(&cmds)[0]
            .message
            .contains("node 1 has no complete replica"),
        "{cmds:?}"
    );
}
