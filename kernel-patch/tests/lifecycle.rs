//! The lifecycle against the recording kernel: which calls happen, in which
//! order, without root.

use std::net::Ipv4Addr;

use vsha_kernel::config::VserverSpec;
use vsha_kernel::hooks::Phase;
use vsha_kernel::local::{start_with, stop_with, Paths};
use vsha_kernel::syscall::{Call, RecordingSyscall};

fn setup() -> (tempfile::TempDir, Paths, VserverSpec) {
    let d = tempfile::tempdir().unwrap();
    let paths = Paths {
        config_dir: d.path().join("etc"),
        run_dir: d.path().join("run"),
        cgroup_parent: "vsha".into(),
    };
    let mut spec = VserverSpec::new("web", "/vservers/web");
    spec.ip = Some("10.0.0.5/24".into());
    spec.dev = Some("eth0".into());
    spec.hostname = Some("web".into());
    spec.start = vec!["/sbin/init".into()];
    spec.limits.nproc = Some(100);
    (d, paths, spec)
}

#[test]
fn start_attaches_ipv4root_before_the_first_process_and_announces_after() {
    let (_d, paths, spec) = setup();
    let sys = RecordingSyscall::new();
    let st = start_with(&sys, &paths, &spec).unwrap();
    let calls = sys.calls();
    let vip = Ipv4Addr::new(10, 0, 0, 5);
    let names: Vec<String> = calls
        .iter()
        .map(|c| {
            format!("{c:?}")
                .split([' ', '{', '('])
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        [
            "RunHook",
            "CreateCgroup",
            "SetIpv4root",
            "ProbeAddress",
            "PromoteSecondaries",
            "AddAddress",
            "SpawnContext",
            "Announce",
            "RunHook"
        ],
        "{calls:?}"
    );
    assert!(calls.contains(&Call::SetIpv4root {
        ip: vip,
        allow_ipv6: false
    }));
    assert!(matches!(&calls[1], Call::CreateCgroup { limits, .. } if limits.nproc == Some(100)));
    assert!(
        matches!(&calls[6], Call::SpawnContext { hostname: Some(h), caps, .. } if h == "web" && *caps == vsha_kernel::capabilities::CapMask::secure().0)
    );
    assert_eq!(
        calls[0],
        Call::RunHook {
            phase: Phase::PreStart,
            name: "web".into()
        }
    );

    let sys2 = RecordingSyscall::new();
    stop_with(&sys2, &paths, &spec, &st).unwrap();
    assert_eq!(
        sys2.calls(),
        vec![
            Call::RunHook {
                phase: Phase::PreStop,
                name: "web".into()
            },
            Call::Terminate {
                init_pid: Some(st.init_pid),
                signal_init: true
            },
            Call::DelAddress {
                dev: "eth0".into(),
                ip: vip,
                prefix: 24
            },
            Call::RemoveCgroup,
            Call::RunHook {
                phase: Phase::PostStop,
                name: "web".into()
            },
        ]
    );
}

#[test]
fn stop_command_replaces_the_signal() {
    let (_d, paths, mut spec) = setup();
    spec.stop = vec!["/sbin/halt".into()];
    let st = start_with(&RecordingSyscall::new(), &paths, &spec).unwrap();
    let sys = RecordingSyscall::new();
    stop_with(&sys, &paths, &spec, &st).unwrap();
    let c = sys.calls();
    assert_eq!(
        c[1],
        Call::ExecIn {
            init_pid: st.init_pid,
            command: vec!["/sbin/halt".into()]
        }
    );
    assert_eq!(
        c[2],
        Call::Terminate {
            init_pid: Some(st.init_pid),
            signal_init: false
        }
    );
}

#[test]
fn failing_pre_start_touches_nothing() {
    let (_d, paths, spec) = setup();
    let sys = RecordingSyscall {
        fail_on: Some(Box::new(|c| {
            matches!(
                c,
                Call::RunHook {
                    phase: Phase::PreStart,
                    ..
                }
            )
        })),
        ..Default::default()
    };
    assert!(start_with(&sys, &paths, &spec).is_err());
    assert_eq!(sys.calls().len(), 1);
}

#[test]
fn failed_spawn_undoes_address_and_cgroup() {
    let (_d, paths, spec) = setup();
    let sys = RecordingSyscall {
        fail_on: Some(Box::new(|c| matches!(c, Call::SpawnContext { .. }))),
        ..Default::default()
    };
    let e = start_with(&sys, &paths, &spec).unwrap_err();
    assert!(e.to_string().contains("SpawnContext"), "{e}");
    let c = sys.calls();
    let tail: Vec<&Call> = c
        .iter()
        .skip_while(|c| !matches!(c, Call::SpawnContext { .. }))
        .collect();
    assert!(matches!(tail[1], Call::DelAddress { .. }), "{c:?}");
    assert!(c.contains(&Call::RemoveCgroup), "{c:?}");
}

#[test]
fn no_ip_means_no_bpf_and_no_alias() {
    let (_d, paths, mut spec) = setup();
    spec.ip = None;
    spec.dev = None;
    let sys = RecordingSyscall::new();
    start_with(&sys, &paths, &spec).unwrap();
    assert!(!sys.calls().iter().any(|c| matches!(
        c,
        Call::SetIpv4root { .. } | Call::AddAddress { .. } | Call::Announce { .. }
    )));
}

#[test]
fn netns_mode_wires_a_veth_after_the_spawn_and_skips_bpf() {
    let (_d, paths, mut spec) = setup();
    spec.network = vsha_kernel::config::NetworkModeKind::Netns;
    let sys = RecordingSyscall::new();
    let st = start_with(&sys, &paths, &spec).unwrap();
    let c = sys.calls();
    let host_if = vsha_kernel::net::host_veth_name("web");
    let spawn = c
        .iter()
        .position(|x| matches!(x, Call::SpawnContext { .. }))
        .unwrap();
    assert_eq!(
        c[spawn + 1],
        Call::WireNetns {
            host_if: host_if.clone(),
            ip: Ipv4Addr::new(10, 0, 0, 5),
            uplink: Some("eth0".into())
        }
    );
    assert!(
        !c.iter()
            .any(|x| matches!(x, Call::SetIpv4root { .. } | Call::AddAddress { .. })),
        "{c:?}"
    );
    let sys2 = RecordingSyscall::new();
    stop_with(&sys2, &paths, &spec, &st).unwrap();
    assert!(sys2.calls().contains(&Call::DeleteLink { dev: host_if }));
}

/// On a kernel with the vserver patch, the context pins itself with the
/// kernel's set_ipv4root (no IPv4 BPF programs); IPv6 stays refused by BPF.
#[test]
fn a_patched_kernel_pins_the_context_with_set_ipv4root_instead_of_bpf() {
    let (_d, paths, spec) = setup();
    let sys = RecordingSyscall {
        mechanism: vsha_kernel::patched::Ipv4rootMechanism::KernelCall { nr: 600 },
        ..Default::default()
    };
    start_with(&sys, &paths, &spec).unwrap();
    let calls = sys.calls();
    let vip = Ipv4Addr::new(10, 0, 0, 5);
    assert!(
        !calls.iter().any(|c| matches!(c, Call::SetIpv4root { .. })),
        "no cgroup-BPF ipv4root on a patched kernel: {calls:?}"
    );
    let deny = calls.iter().position(|c| *c == Call::DenyIpv6);
    let spawn = calls
        .iter()
        .position(|c| matches!(c, Call::SpawnContext { .. }));
    assert!(deny.is_some() && deny < spawn, "{calls:?}");
    assert!(
        calls.iter().any(|c| matches!(c,
            Call::SpawnContext { ipv4root_call: Some((600, ip)), .. } if *ip == vip)),
        "the context's first process must call set_ipv4root({vip}): {calls:?}"
    );

    // And on a stock kernel the child makes no such call.
    let (_d2, paths2, spec2) = setup();
    let stock = RecordingSyscall::new();
    start_with(&stock, &paths2, &spec2).unwrap();
    assert!(stock.calls().iter().any(|c| matches!(
        c,
        Call::SpawnContext {
            ipv4root_call: None,
            ..
        }
    )));
}
