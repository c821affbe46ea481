//! A started vserver, for real (as root), inside network namespaces the test
//! creates: isolation, ipv4root, capability ceiling, limits, stop, enter,
//! hooks.

mod common;

use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::time::Duration;

use common::*;
use vsha_kernel::config::VserverSpec;
use vsha_kernel::context::Stdio;
use vsha_kernel::local::{self, ExecOptions, RunState};
use vsha_kernel::syscall::LinuxSyscall;

/// Runs inside the vserver (the test binary copied into the tree): performs
/// the probes listed in VSHA_PROBE and prints `PROBE name result` lines.
#[test]
fn probe_helper() {
    let Ok(what) = std::env::var("VSHA_PROBE") else {
        return;
    };
    let arg = |k: &str| std::env::var(k).unwrap_or_default();
    for w in what.split(',') {
        let r = match w {
            "bind_any" => match TcpListener::bind("0.0.0.0:8080") {
                Ok(l) => format!("ok {}", l.local_addr().unwrap()),
                Err(e) => format!("err {}", e.raw_os_error().unwrap_or(0)),
            },
            "udp_bind_any" => match UdpSocket::bind("0.0.0.0:5353") {
                Ok(l) => format!("ok {}", l.local_addr().unwrap()),
                Err(e) => format!("err {}", e.raw_os_error().unwrap_or(0)),
            },
            "bind_other" => match TcpListener::bind(format!("{}:8081", arg("OTHER"))) {
                Ok(l) => format!("ok {}", l.local_addr().unwrap()),
                Err(e) => format!("err {}", e.raw_os_error().unwrap_or(0)),
            },
            "bind_lo" => match TcpListener::bind("127.0.0.1:8082") {
                Ok(l) => format!("ok {}", l.local_addr().unwrap()),
                Err(e) => format!("err {}", e.raw_os_error().unwrap_or(0)),
            },
            "bind6" => match TcpListener::bind("[::]:8084") {
                Ok(l) => format!("ok {}", l.local_addr().unwrap()),
                Err(e) => format!("err {}", e.raw_os_error().unwrap_or(0)),
            },
            "connect" => match std::net::TcpStream::connect_timeout(
                &arg("PEER").parse().unwrap(),
                Duration::from_secs(20),
            ) {
                Ok(s) => format!("ok {}", s.local_addr().unwrap()),
                Err(e) => format!("err {}", e.raw_os_error().unwrap_or(0)),
            },
            "bpf" => match vsha_kernel::bpf::can_load() {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("err {}", e.raw_os_error().unwrap_or(0)),
            },
            "raw" => match vsha_kernel::net::raw_socket() {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("err {}", e.raw_os_error().unwrap_or(0)),
            },
            "caps" => {
                let c = vsha_kernel::capabilities::parse_status(
                    &std::fs::read_to_string("/proc/self/status").unwrap(),
                );
                format!(
                    "eff={:x} bnd={:x} amb={:x} nnp={}",
                    c.eff, c.bnd, c.amb, c.no_new_privs
                )
            }
            _ => "unknown".to_string(),
        };
        println!("PROBE {w} {r}");
    }
}

/// Copies the test binary and the libraries it needs into the tree.
fn install_probe(tree: &Path) {
    let exe = std::env::current_exe().unwrap();
    std::fs::copy(&exe, tree.join("probe")).unwrap();
    let ldd = sh_ok(&format!("ldd {}", exe.display()));
    for l in ldd.lines() {
        let p = l.split_whitespace().find(|w| w.starts_with('/'));
        if let Some(p) = p {
            let dst = tree.join(p.trim_start_matches('/'));
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(p, &dst).unwrap();
        }
    }
}

fn probes(
    paths: &local::Paths,
    name: &str,
    list: &str,
    extra: &[(&str, String)],
) -> std::collections::HashMap<String, String> {
    let log = paths.run_dir.join(format!("probe-{list}.out"));
    let mut env = vec![format!("VSHA_PROBE={list}")];
    for (k, v) in extra {
        env.push(format!("{k}={v}"));
    }
    let cmd: Vec<String> = [
        "/probe",
        "--exact",
        "probe_helper",
        "--nocapture",
        "--test-threads",
        "1",
        "-q",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let code = local::exec(
        paths,
        name,
        &cmd,
        &ExecOptions {
            stdio: Stdio::Log(log.clone()),
            env,
            ..Default::default()
        },
    )
    .unwrap();
    let out = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, 0, "probe run failed: {out}");
    out.lines()
        .filter_map(|l| l.strip_prefix("PROBE "))
        .filter_map(|l| {
            l.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect()
}

/// Runs a shell command in the vserver; returns (exit code, output).
fn vsh(paths: &local::Paths, name: &str, script: &str) -> (i32, String) {
    let log = paths.run_dir.join(format!("sh-{}.out", tag()));
    let cmd = vec!["/bin/sh".to_string(), "-c".to_string(), script.to_string()];
    let code = local::exec(
        paths,
        name,
        &cmd,
        &ExecOptions {
            stdio: Stdio::Log(log.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    (code, std::fs::read_to_string(&log).unwrap_or_default())
}

fn sys(garp: u32) -> LinuxSyscall {
    let mut s = LinuxSyscall::probe().unwrap();
    s.garp_count = garp;
    s.garp_interval = Duration::from_millis(600);
    s
}

fn write_spec(env: &Env, spec: &VserverSpec) {
    std::fs::write(
        env.paths.config_dir.join(format!("{}.toml", spec.name)),
        spec.to_toml().unwrap(),
    )
    .unwrap();
}

fn start(env: &Env, spec: &VserverSpec, garp: u32) -> RunState {
    write_spec(env, spec);
    local::start_with(&sys(garp), &env.paths, spec).expect("start")
}

/// A fresh root test's pieces: a namespace pair with its host side
/// entered, an environment, and a spec for vserver `vs<tag>` on its own
/// tree at `pair.ip(host)`.
struct Fixture {
    pair: Pair,
    env: Env,
    name: String,
    tree: std::path::PathBuf,
    spec: VserverSpec,
}

fn fixture(host: u8) -> Fixture {
    let t = tag();
    let pair = Pair::new(&t);
    let env = Env::new(&t);
    pair.host.enter();
    let name = format!("vs{t}");
    let tree = env.tree(&name);
    let mut spec = VserverSpec::new(&name, &tree);
    spec.ip = Some(format!("{}/24", pair.ip(host)));
    Fixture {
        pair,
        env,
        name,
        tree,
        spec,
    }
}

fn no_process_in(env: &Env) -> bool {
    let prefix = format!("0::/{}/", env.paths.cgroup_parent);
    vsha_kernel::proc::all(Path::new("/proc"))
        .iter()
        .all(|p| !format!("0::{}", p.cgroup).starts_with(&prefix))
}

#[test]
fn vserver_isolation_ipv4root_and_caps() {
    if !need_root() {
        return;
    }
    let Fixture {
        pair,
        env,
        name,
        tree,
        mut spec,
    } = fixture(5);
    install_probe(&tree);
    // a setuid-root copy of busybox for the regain test
    std::fs::create_dir_all(tree.join("suid")).unwrap();
    std::fs::copy(tree.join("bin/busybox"), tree.join("suid/busybox")).unwrap();
    sh_ok(&format!(
        "chmod 4755 {}",
        tree.join("suid/busybox").display()
    ));
    let vip = pair.ip(5);
    spec.dev = Some("va".into());
    spec.hostname = Some("isolated".into());
    spec.domainname = Some("example.org".into());
    spec.start = idle_init();
    let st = start(&env, &spec, 1);
    assert!(local::running(&env.paths, &name).unwrap());

    // the alias is on va (oracle: ip)
    let addrs = sh_ok(&format!("ip -n {} -4 addr show dev va", pair.host.name));
    assert!(addrs.contains(&format!("{vip}/24")), "{addrs}");

    // host processes are invisible; the init is pid 1; hostname
    let (code, out) = vsh(
        &env.paths,
        &name,
        "hostname; ls /proc | grep -c '^[0-9]'; cat /proc/1/cmdline | tr '\\0' ' '; echo; cat /proc/sys/kernel/domainname",
    );
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "isolated");
    let nprocs: usize = lines[1].trim().parse().unwrap();
    assert!(
        nprocs <= 6,
        "only the context's processes are visible, saw {nprocs}: {out}"
    );
    assert!(
        lines[2].contains("trap"),
        "pid 1 is the vserver init: {out}"
    );
    assert_eq!(lines[3], "example.org");
    let host_pid = std::process::id();
    let (_, seen) = vsh(
        &env.paths,
        &name,
        &format!("test -e /proc/{host_pid}/status && echo visible || echo invisible"),
    );
    // (a low host pid could collide with a context pid; ours is large)
    assert!(host_pid < 10 || seen.contains("invisible"), "{seen}");

    // ipv4root: binds and source addresses
    let (tx, rx) = std::sync::mpsc::channel();
    let peer_thread = {
        let p = pair.peer.path();
        let peer_ip = pair.ip(2);
        std::thread::spawn(move || {
            vsha_kernel::net::enter_netns(&p).unwrap();
            let l = TcpListener::bind((peer_ip, 9000)).unwrap();
            let u = UdpSocket::bind((peer_ip, 9001)).unwrap();
            tx.send(()).unwrap();
            let (mut s, from) = l.accept().unwrap();
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
            u.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut buf = [0u8; 512];
            let udp_from = u.recv_from(&mut buf).map(|(_, a)| a.ip());
            (from.ip(), udp_from.ok())
        })
    };
    rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let r = probes(
        &env.paths,
        &name,
        "bind_any,udp_bind_any,bind_other,bind_lo,bind6,connect,bpf,raw,caps",
        &[
            ("OTHER", pair.ip(1).to_string()),
            ("PEER", format!("{}:9000", pair.ip(2))),
        ],
    );
    assert_eq!(r["bind_any"], format!("ok {vip}:8080"), "{r:?}");
    assert_eq!(r["udp_bind_any"], format!("ok {vip}:5353"), "{r:?}");
    assert_eq!(r["bind_other"], format!("err {}", libc::EPERM), "{r:?}");
    assert_eq!(r["bind_lo"], "ok 127.0.0.1:8082", "{r:?}");
    assert_eq!(r["bind6"], format!("err {}", libc::EPERM), "{r:?}");
    assert!(r["connect"].starts_with(&format!("ok {vip}:")), "{r:?}");
    assert_eq!(r["bpf"], format!("err {}", libc::EPERM), "{r:?}");
    assert_eq!(r["raw"], format!("err {}", libc::EPERM), "{r:?}");
    let ceiling = vsha_kernel::capabilities::CapMask::secure().0;
    assert_eq!(
        r["caps"],
        format!("eff={ceiling:x} bnd={ceiling:x} amb=0 nnp=true"),
        "{r:?}"
    );

    // unbound UDP send (busybox tftp sends with sendto on an unbound socket)
    let _ = vsh(
        &env.paths,
        &name,
        &format!("timeout 5 tftp -g -r x -l /tmp/x {} 9001", pair.ip(2)),
    );

    // privileged operations fail
    let (c, o) = vsh(&env.paths, &name, "mount -t tmpfs none /tmp");
    assert_ne!(c, 0, "mount: {o}");
    let (c, o) = vsh(&env.paths, &name, "hostname evil");
    assert_ne!(c, 0, "sethostname: {o}");
    let (_, o) = vsh(&env.paths, &name, "hostname");
    assert_eq!(o.trim(), "isolated");
    let (c, o) = vsh(&env.paths, &name, "echo 1 > /proc/sys/vm/swappiness");
    assert_ne!(c, 0, "write /proc/sys: {o}");
    let (c, o) = vsh(&env.paths, &name, "echo junk > /tmp/m.ko; insmod /tmp/m.ko");
    assert_ne!(c, 0, "insmod: {o}");
    // EPERM (no CAP_SYS_MODULE); on kernels without module support ENOSYS
    assert!(
        o.contains("not permitted") || !Path::new("/proc/modules").exists(),
        "insmod must fail with EPERM: {o}"
    );
    let (c, o) = vsh(&env.paths, &name, "ping -c 1 -W 1 127.0.0.1");
    assert_ne!(c, 0, "ping needs a raw socket: {o}");
    // setuid-root binary run by an unprivileged user gains nothing
    let log = env.paths.run_dir.join("suid.out");
    let code = local::exec(
        &env.paths,
        &name,
        &[
            "/suid/busybox".into(),
            "sh".into(),
            "-c".into(),
            "grep -E 'Cap(Eff|Bnd)|^Uid' /proc/self/status; /suid/busybox hostname evil2".into(),
        ],
        &ExecOptions {
            user: Some((65534, 65534)),
            stdio: Stdio::Log(log.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let o = std::fs::read_to_string(&log).unwrap();
    assert_ne!(
        code, 0,
        "hostname through a setuid-root binary must fail: {o}"
    );
    assert!(o.contains("CapEff:\t0000000000000000"), "{o}");
    assert!(o.contains(&format!("CapBnd:\t{ceiling:016x}")), "{o}");

    // the peer saw the vserver IP as source, TCP and unbound UDP
    let (tcp_from, udp_from) = peer_thread.join().unwrap();
    assert_eq!(tcp_from, vip, "TCP source");
    assert_eq!(
        udp_from,
        Some(std::net::IpAddr::V4(vip)),
        "unbound UDP source"
    );

    // stop: nothing left
    local::stop_with(&sys(1), &env.paths, &spec, &st).unwrap();
    assert!(!st.cgroup.v2.exists(), "cgroup removed");
    assert!(no_process_in(&env));
    let addrs = sh_ok(&format!("ip -n {} -4 addr show dev va", pair.host.name));
    assert!(
        !addrs.contains(&format!("{vip}/24")),
        "alias removed: {addrs}"
    );
}

/// A service run directly as the context's init (httpd, sleep) has no
/// SIGTERM handler, and the kernel shields a pid namespace's init from such
/// signals: stop must not wait the whole grace period for it, yet the rest
/// of the context still gets its SIGTERM first.
#[test]
fn stop_of_an_init_without_sigterm_handler_does_not_wait_the_grace_period() {
    if !need_root() {
        return;
    }
    let Fixture {
        pair: _pair,
        env,
        name,
        tree,
        mut spec,
    } = fixture(7);
    spec.start = vec!["/bin/sleep".into(), "100000".into()];
    spec.stop_timeout = 600;
    let st = start(&env, &spec, 1);
    let (c, o) = vsh(
        &env.paths,
        &name,
        "(setsid sh -c 'trap \"echo got-term > /term-marker; exit 0\" TERM; while :; do sleep 1 & wait; done' > /dev/null 2>&1 &); echo started",
    );
    assert_eq!(c, 0, "{o}");
    wait_for("the trapping child", 30, || {
        vsha_kernel::proc::all(Path::new("/proc"))
            .into_iter()
            .find(|p| p.command.contains("trap") && p.cgroup.ends_with(&format!("/{name}")))
    });
    let began = std::time::Instant::now();
    local::stop_with(&sys(1), &env.paths, &spec, &st).unwrap();
    let took = began.elapsed();
    // the grace period is 600 s; anything near it means it was waited
    assert!(took < Duration::from_secs(300), "stop took {took:?}");
    assert_eq!(
        std::fs::read_to_string(tree.join("term-marker"))
            .ok()
            .as_deref(),
        Some("got-term\n"),
        "the other process of the context had its SIGTERM before the kill"
    );
    assert!(!st.cgroup.v2.exists(), "v2 cgroup removed");
    assert!(no_process_in(&env), "nothing of the context survives");
}

#[test]
fn pids_limit_stops_a_fork_bomb_and_stop_leaves_nothing() {
    if !need_root() {
        return;
    }
    let Fixture {
        pair: _pair,
        env,
        name,
        tree: _,
        mut spec,
    } = fixture(6);
    spec.hostname = Some("bombed".into());
    spec.limits.nproc = Some(20);
    spec.limits.memory = Some(48 << 20);
    spec.limits.cpu_weight = Some(50);
    spec.start = idle_init();
    spec.stop_timeout = 3;
    let st = start(&env, &spec, 1);
    // the limit sits on v2 or on the v1 pids hierarchy, as probed
    let pids_max = if env.layout.v2_controllers.iter().any(|c| c == "pids") {
        st.cgroup.v2.join("pids.max")
    } else {
        st.cgroup.v1["pids"].join("pids.max")
    };
    assert_eq!(std::fs::read_to_string(&pids_max).unwrap().trim(), "20");
    let v2 = |c: &str| env.layout.v2_controllers.iter().any(|x| x == c);
    let mem = if v2("memory") {
        std::fs::read_to_string(st.cgroup.v2.join("memory.max")).unwrap()
    } else {
        std::fs::read_to_string(st.cgroup.v1["memory"].join("memory.limit_in_bytes")).unwrap()
    };
    assert_eq!(mem.trim(), (48u64 << 20).to_string());
    if !v2("cpu") {
        let shares = std::fs::read_to_string(st.cgroup.v1["cpu"].join("cpu.shares")).unwrap();
        assert_eq!(shares.trim(), "512");
    }
    // the memory limit holds: a 100 MB buffer gets the process OOM-killed
    let (c, o) = vsh(
        &env.paths,
        &name,
        "dd if=/dev/zero of=/dev/null bs=100M count=1",
    );
    assert_ne!(c, 0, "dd with a 100M buffer under a 48M limit: {o}");
    // freeze / thaw of the whole context
    st.cgroup.freeze(true).unwrap();
    wait_for("frozen 1", 30, || {
        std::fs::read_to_string(st.cgroup.v2.join("cgroup.events"))
            .ok()?
            .contains("frozen 1")
            .then_some(())
    });
    st.cgroup.freeze(false).unwrap();
    wait_for("frozen 0", 30, || {
        std::fs::read_to_string(st.cgroup.v2.join("cgroup.events"))
            .ok()?
            .contains("frozen 0")
            .then_some(())
    });

    // a double-forked daemon that must not survive stop
    let (c, o) = vsh(
        &env.paths,
        &name,
        "(setsid sleep 1000 > /dev/null 2>&1 &) ; echo started",
    );
    assert_eq!(c, 0, "{o}");
    let daemon = wait_for("the daemon", 30, || {
        vsha_kernel::proc::all(Path::new("/proc"))
            .into_iter()
            .find(|p| p.command == "sleep 1000" && p.cgroup.ends_with(&format!("/{name}")))
    });

    // enter sees the vserver's processes and hostname
    let (c, o) = vsh(&env.paths, &name, "hostname; ps -o pid,args");
    assert_eq!(c, 0, "{o}");
    assert!(o.starts_with("bombed"), "{o}");
    assert!(o.contains("sleep 1000"), "enter sees the daemon: {o}");
    assert!(o.contains("trap"), "enter sees the init: {o}");
    // status / list / ps rows
    let s = local::status(&env.paths, &name).unwrap();
    assert!(s.running && s.processes >= 3, "{s:?}");
    let rows = local::list(&env.paths).unwrap();
    assert!(
        rows.iter().any(|r| r.name == name && r.processes >= 3),
        "{rows:?}"
    );
    let ps = local::ps(&env.paths, true).unwrap();
    assert!(
        ps.iter().any(|r| r.vserver == name && r.pid == daemon.pid),
        "ps maps the daemon to its vserver"
    );

    // fork bomb (last: afterwards not even enter can fork): a loop of background sleeps; the limit stops it
    let (_, o) = vsh(
        &env.paths,
        &name,
        "i=0; while [ $i -lt 60 ]; do sleep 300 & i=$((i+1)); done; echo looped",
    );
    assert!(
        o.contains("can't fork") || o.contains("Resource temporarily unavailable"),
        "fork must fail: {o}"
    );
    let n = st.cgroup.procs().unwrap().len();
    assert!(n <= 20, "{n} processes despite pids.max 20");

    local::stop_with(&sys(1), &env.paths, &spec, &st).unwrap();
    assert!(!st.cgroup.v2.exists(), "v2 cgroup removed");
    assert!(
        st.cgroup.v1.values().all(|d| !d.exists()),
        "v1 cgroups removed"
    );
    assert!(
        !Path::new(&format!("/proc/{}", daemon.pid)).exists(),
        "daemon killed"
    );
    assert!(no_process_in(&env), "nothing survives stop");
    assert!(!local::running(&env.paths, &name).unwrap());
}

#[test]
fn hooks_run_in_order_and_failing_pre_start_aborts() {
    if !need_root() {
        return;
    }
    let Fixture {
        pair: _pair,
        env,
        name,
        tree: _,
        mut spec,
    } = fixture(7);
    spec.start = idle_init();
    let record = env.dir.path().join("hook.log");
    let hook = vsha_kernel::hooks::script_path(&env.paths.config_dir, &name);
    std::fs::write(
        &hook,
        format!("#!/bin/sh\necho \"$1 $2\" >> {}\n", record.display()),
    )
    .unwrap();
    sh_ok(&format!("chmod 755 {}", hook.display()));
    let st = start(&env, &spec, 1);
    local::stop_with(&sys(1), &env.paths, &spec, &st).unwrap();
    let got = std::fs::read_to_string(&record).unwrap();
    assert_eq!(
        got,
        format!("pre-start {name}\npost-start {name}\npre-stop {name}\npost-stop {name}\n")
    );

    // a failing pre-start aborts the start and shows the script's output
    std::fs::write(&hook, "#!/bin/sh\necho \"no mounts for $2\"\nexit 3\n").unwrap();
    let e = local::start_with(&sys(1), &env.paths, &spec).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("pre-start") && msg.contains(&format!("no mounts for {name}")),
        "{msg}"
    );
    assert!(
        !env.v2_parent().join(&name).exists(),
        "no cgroup after an aborted start"
    );
    assert!(!local::running(&env.paths, &name).unwrap());
}

#[test]
fn ipv4root_programs_are_attached_before_the_first_process() {
    if !need_root() {
        return;
    }
    let t = tag();
    let env = Env::new(&t);
    let s = sys(1);
    use vsha_kernel::syscall::Syscall;
    let cg = s
        .create_cgroup(&env.paths.cgroup_parent, "bpfq", &Default::default())
        .unwrap();
    s.set_ipv4root(&cg, std::net::Ipv4Addr::new(10, 77, 1, 200), false)
        .unwrap();
    let fd = cg.open_v2().unwrap();
    use std::os::fd::AsRawFd;
    use vsha_kernel::bpf::{query_count, AttachType::*};
    for at in [
        Inet4Bind,
        Inet4Connect,
        Udp4Sendmsg,
        Inet6Bind,
        Inet6Connect,
        Udp6Sendmsg,
    ] {
        assert_eq!(query_count(fd.as_raw_fd(), at).unwrap(), 1, "{at:?}");
    }
    assert!(cg.procs().unwrap().is_empty());
    // a refused program shows the verifier's reason
    let bad = [vsha_kernel::bpf::Insn {
        code: 0x95,
        regs: 0,
        off: 0,
        imm: 0,
    }]; // exit without r0
    let e = vsha_kernel::bpf::load(&bad, Inet4Bind)
        .unwrap_err()
        .to_string();
    assert!(e.contains("verifier log") && e.contains("R0"), "{e}");
    drop(fd);
    cg.remove().unwrap();
    assert!(!cg.v2.exists());
}

#[test]
fn ctx_exec_isolates_without_a_tree() {
    if !need_root() {
        return;
    }
    let t = tag();
    let pair = Pair::new(&t);
    let env = Env::new(&t);
    pair.host.enter();
    let out = env.dir.path().join("ctx.out");
    let opts = local::CtxExecOptions {
        hostname: Some("ctxhost".into()),
        ip: Some(pair.ip(1)),
        secure: true,
        caps: vec![],
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "hostname; ls /proc | grep -c '^[0-9]'; grep CapBnd /proc/self/status; hostname x 2>/dev/null && echo CHANGED; true".into(),
        ],
        cgroup_parent: Some(env.paths.cgroup_parent.clone()),
        stdio: Stdio::Log(out.clone()),
        ..Default::default()
    };
    let code = local::ctx_exec(&opts).unwrap();
    let o = std::fs::read_to_string(&out).unwrap();
    assert_eq!(code, 0, "{o}");
    let l: Vec<&str> = o.lines().collect();
    assert_eq!(l[0], "ctxhost");
    let n: usize = l[1].trim().parse().unwrap();
    assert!(n <= 4, "own /proc shows only the context: {o}");
    assert!(
        l[2].ends_with(&format!(
            "{:016x}",
            vsha_kernel::capabilities::CapMask::secure().0
        )),
        "{o}"
    );
    assert!(!o.contains("CHANGED"));
    // the throw-away context's cgroup is gone
    let left: Vec<_> = std::fs::read_dir(env.v2_parent())
        .map(|r| r.flatten().filter(|e| e.path().is_dir()).count())
        .into_iter()
        .collect();
    assert!(left.iter().all(|n| *n == 0), "{left:?}");
}

#[test]
fn netns_mode_routed_veth_reaches_the_vserver() {
    if !need_root() {
        return;
    }
    let t = tag();
    let pair = Pair::new(&t);
    let env = Env::new(&t);
    pair.host.enter();
    let name = format!("vs{t}");
    let tree = env.tree(&name);
    let vip = pair.ip(8);
    let mut spec = VserverSpec::new(&name, &tree);
    spec.ip = Some(format!("{vip}/24"));
    spec.dev = Some("va".into());
    spec.network = vsha_kernel::config::NetworkModeKind::Netns;
    spec.start = idle_init();
    let st = start(&env, &spec, 1);
    let host_if = vsha_kernel::net::host_veth_name(&name);
    assert_eq!(st.net.link.as_deref(), Some(host_if.as_str()));

    // inside: its own interfaces only
    let (c, o) = vsh(&env.paths, &name, "ip -o addr");
    assert_eq!(c, 0, "{o}");
    assert!(
        o.contains(&format!("{vip}/32")) && o.contains("eth0"),
        "{o}"
    );
    assert!(
        !o.lines().any(|l| l.split_whitespace().nth(1) == Some("va"))
            && !o.contains(&pair.ip(1).to_string()),
        "host addresses invisible: {o}"
    );

    // a service bound to the wildcard, reached from the peer namespace
    let (c, o) = vsh(
        &env.paths,
        &name,
        "echo hello-from-netns > /tmp/index.html; httpd -p 8080 -h /tmp",
    );
    assert_eq!(c, 0, "{o}");
    let p = pair.peer.path();
    let body = std::thread::spawn(move || {
        vsha_kernel::net::enter_netns(&p).unwrap();
        use std::io::Write;
        wait_for("the vserver's httpd from the peer", 60, || {
            let mut s =
                std::net::TcpStream::connect_timeout(&(vip, 8080).into(), Duration::from_secs(2))
                    .ok()?;
            s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").ok()?;
            let mut b = String::new();
            s.read_to_string(&mut b).ok()?;
            Some(b)
        })
    })
    .join()
    .unwrap();
    assert!(body.contains("hello-from-netns"), "{body}");

    local::stop_with(&sys(1), &env.paths, &spec, &st).unwrap();
    assert!(!st.cgroup.v2.exists());
    let (gone, _) = sh(&format!("ip -n {} link show {host_if}", pair.host.name));
    assert!(!gone, "host veth removed");
}

#[test]
fn local_verbs_build_start_exec_status_restart_stop_with_fakeinit() {
    if !need_root() {
        return;
    }
    let t = tag();
    let pair = Pair::new(&t);
    let env = Env::new(&t);
    pair.host.enter();
    let name = format!("vs{t}");
    let tree = local::build(
        &env.paths,
        &name,
        &local::BuildOptions {
            tree: Some(env.dir.path().join("trees").join(&name)),
            ..Default::default()
        },
    )
    .unwrap();
    // build wrote a spec with fakeinit; make stop quick and give it an IP
    let mut spec = VserverSpec::load(&env.paths.config_dir, &name).unwrap();
    assert!(spec.has_flag(vsha_kernel::config::Flag::Fakeinit));
    assert_eq!(spec.tree, tree);
    spec.stop_timeout = 3;
    spec.ip = Some(format!("{}/24", pair.ip(9)));
    write_spec(&env, &spec);

    assert!(!local::running(&env.paths, &name).unwrap());
    let st = local::start(&env.paths, &name).unwrap();
    assert!(matches!(
        local::start(&env.paths, &name),
        Err(vsha_kernel::Error::AlreadyRunning(_))
    ));
    assert!(local::running(&env.paths, &name).unwrap());
    let (c, o) = vsh(&env.paths, &name, "cat /proc/1/cmdline; echo; hostname");
    assert_eq!(c, 0, "{o}");
    assert!(
        o.starts_with("init") || o.starts_with("/sbin/init"),
        "busybox init is PID 1: {o}"
    );
    assert!(o.contains(&name), "{o}");
    let s = local::status(&env.paths, &name).unwrap();
    assert!(s.running && s.init_pid == Some(st.init_pid), "{s:?}");
    assert_eq!(serde_json::to_value(&s).unwrap()["name"], name.as_str());
    let code = local::exec(
        &env.paths,
        &name,
        &["false".into()],
        &ExecOptions {
            stdio: Stdio::Null,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(code, 1, "exit code of the command");

    let st2 = local::restart(&env.paths, &name).unwrap();
    assert_ne!(st2.init_pid, st.init_pid);
    local::stop(&env.paths, &name).unwrap();
    assert!(!local::running(&env.paths, &name).unwrap());
    assert!(matches!(
        local::stop(&env.paths, &name),
        Err(vsha_kernel::Error::NotRunning(_))
    ));
    assert!(!st2.cgroup.v2.exists());
    assert!(no_process_in(&env));
    assert!(local::list(&env.paths).unwrap().is_empty());
}

#[test]
fn import_to_writes_a_loadable_spec() {
    let d = tempfile::tempdir().unwrap();
    let paths = local::Paths::new(d.path().join("etc"), d.path().join("run"));
    let conf = d.path().join("legacy.conf");
    std::fs::write(&conf, "IPROOT=10.9.8.7\nIPROOTMASK=255.255.0.0\nIPROOTDEV=eth0\nS_HOSTNAME=legacy\nS_FLAGS=\"nproc fakeinit\"\nULIMIT=\"-H -u 500\"\n").unwrap();
    std::fs::write(d.path().join("legacy.sh"), "#!/bin/sh\n").unwrap();
    let out = local::import_to(&paths, &conf, Path::new("/vservers")).unwrap();
    let spec = VserverSpec::load(&paths.config_dir, "legacy").unwrap();
    assert_eq!(out, paths.config_dir.join("legacy.toml"));
    assert_eq!(spec.ip.as_deref(), Some("10.9.8.7/16"));
    assert_eq!(spec.limits.nproc, Some(500));
    assert!(paths.config_dir.join("legacy.sh").exists());
    assert!(
        local::import_to(&paths, &conf, Path::new("/vservers")).is_err(),
        "no overwrite"
    );
}

#[test]
fn lock_flag_forbids_new_namespaces_and_private_forbids_enter() {
    if !need_root() {
        return;
    }
    let t = tag();
    let pair = Pair::new(&t);
    let env = Env::new(&t);
    pair.host.enter();
    let run = |flags: Vec<vsha_kernel::config::Flag>, script: &str| {
        let out = env.dir.path().join(format!("lock-{}.out", tag()));
        let code = local::ctx_exec(&local::CtxExecOptions {
            secure: true,
            flags,
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            cgroup_parent: Some(env.paths.cgroup_parent.clone()),
            stdio: Stdio::Log(out.clone()),
            ..Default::default()
        })
        .unwrap();
        (code, std::fs::read_to_string(&out).unwrap_or_default())
    };
    use vsha_kernel::config::Flag;
    // a user namespace is the one context a capability-less root could still make
    let (free, o1) = run(vec![], "unshare -U true");
    let (locked, o2) = run(vec![Flag::Lock], "unshare -U true");
    assert_ne!(locked, 0, "lock forbids unshare: {o2}");
    assert!(o2.contains("not permitted"), "{o2}");
    let userns_allowed = free == 0;
    println!("unshare -U without lock: {free} {o1}");
    assert!(userns_allowed || o1.contains("not permitted"), "{o1}");
    let (code, o3) = run(vec![Flag::Lock], "echo fork-still-works | cat");
    assert_eq!((code, o3.trim()), (0, "fork-still-works"));

    // private: nobody enters
    let name = format!("vs{t}");
    let tree = env.tree(&name);
    let mut spec = VserverSpec::new(&name, &tree);
    spec.flags = vec![Flag::Private, Flag::Lock];
    spec.start = idle_init();
    let st = start(&env, &spec, 1);
    let e = local::exec(&env.paths, &name, &["true".into()], &ExecOptions::default()).unwrap_err();
    assert!(e.to_string().contains("private"), "{e}");
    local::stop_with(&sys(1), &env.paths, &spec, &st).unwrap();
    assert!(!st.cgroup.v2.exists());
}

#[test]
fn ctx_exec_with_a_root_pivots_into_the_tree() {
    if !need_root() {
        return;
    }
    let t = tag();
    let pair = Pair::new(&t);
    let env = Env::new(&t);
    pair.host.enter();
    let tree = env.tree(&format!("r{t}"));
    std::fs::write(tree.join("etc/marker"), "inside-the-tree\n").unwrap();
    let out = env.dir.path().join("root.out");
    let code = local::ctx_exec(&local::CtxExecOptions {
        hostname: Some("rooted".into()),
        secure: true,
        caps: vec!["CAP_NET_RAW".into()],
        root: Some(tree.clone()),
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "cat /etc/marker; hostname; ls /dev | tr '\\n' ' '; echo; grep CapBnd /proc/self/status".into(),
        ],
        cgroup_parent: Some(env.paths.cgroup_parent.clone()),
        stdio: Stdio::Log(out.clone()),
        ..Default::default()
    })
    .unwrap();
    let o = std::fs::read_to_string(&out).unwrap();
    assert_eq!(code, 0, "{o}");
    let l: Vec<&str> = o.lines().collect();
    assert_eq!(l[0], "inside-the-tree");
    assert_eq!(l[1], "rooted");
    for d in [
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts",
    ] {
        assert!(
            l[2].split_whitespace().any(|x| x == d),
            "minimal /dev has {d}: {o}"
        );
    }
    assert!(!l[2].contains("sda") && !l[2].contains("kmsg"), "{o}");
    let want = vsha_kernel::capabilities::CapMask::secure()
        .with(caps::Capability::CAP_NET_RAW)
        .0;
    assert!(
        l[3].ends_with(&format!("{want:016x}")),
        "--cap adds back: {o}"
    );
}

#[test]
fn start_refuses_an_address_another_machine_answers_for() {
    if !need_root() {
        return;
    }
    // the peer namespace already holds .2
    let Fixture {
        pair,
        env,
        name,
        tree,
        mut spec,
    } = fixture(2);
    spec.dev = Some("va".into());
    spec.start = idle_init();
    write_spec(&env, &spec);
    let mut s = sys(1);
    s.arp_probe = Some(Duration::from_secs(3));
    let e = local::start_with(&s, &env.paths, &spec)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already in use"), "{e}");
    assert!(
        !env.v2_parent().join(&name).exists(),
        "nothing left after the refusal"
    );
    let shown = sh_ok(&format!("ip -n {} -4 addr show dev va", pair.host.name));
    assert!(!shown.contains(&format!("{}/24", pair.ip(2))), "{shown}");

    // a free address passes the probe; the configured stop command stops it
    spec.ip = Some(format!("{}/24", pair.ip(10)));
    spec.stop = vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo via-stop-command > /tmp/stopped; kill -TERM 1".into(),
    ];
    write_spec(&env, &spec);
    let st = local::start_with(&s, &env.paths, &spec).unwrap();
    local::stop_with(&s, &env.paths, &spec, &st).unwrap();
    assert_eq!(
        std::fs::read_to_string(tree.join("tmp/stopped"))
            .unwrap()
            .trim(),
        "via-stop-command"
    );
    assert!(!st.cgroup.v2.exists());
    assert!(no_process_in(&env));
}
