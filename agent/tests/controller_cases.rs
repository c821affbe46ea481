//! Data-driven tests of the failover controller (raft-rs `testdata` style).
//!
//! Every file under `tests/controller_testdata/` is a list of blocks:
//!
//! ```text
//! # comment
//! directive key=value key=value ...
//! ----
//! expected output, one line per emitted command ("(none)" if none)
//! <blank line>
//! ```
//!
//! Directives (each file runs top to bottom against one harness):
//!
//! - `case nodes=1,2,3 [down=2] [witness=3] [draining=..] [maintenance=..]
//!   vs=NAME:pair=2,1[:on=2][:gen=3][:rpo=MS][:failback=auto][:stable=MS]
//!   [rep=NAME@NODE:SRC_MS ...] [now=5000] [since=0] [lease=1000]
//!   [margin=200]`: a fresh cluster whose controller became leader at
//!   `since`; every node not `down` renews at `since` and at `now`; one tick
//!   at `now`. `vs=` and `rep=` may repeat.
//! - `cluster nodes=.. [witness=..] [learner=..] [draining=..]
//!   [maintenance=..] [lease=..] [margin=..] [restarts=..] [retry=..]`
//! - `vserver name=web [pair=2,1] [on=2] [gen=3] [rpo=MS] [failback=auto]
//!   [stable=MS] [desired=stopped]`
//! - `replica vs=web node=1 src=MS` (recorded in the replicated state)
//! - `admin node=2 state=draining|maintenance|active`
//! - `leader at=MS`, `follower at=MS`, `tick at=MS`
//! - `renew at=MS nodes=1,2`: one heartbeat round (all observed, then one
//!   decision)
//! - `report at=MS vs=web node=2 gen=3 state=running|stopped|failed
//!   [reason=oom] [restarts=1]`
//! - `force at=MS vs=web to=1 [loss=true]`
//! - `apply`: applies the proposals emitted so far, in order, each only if
//!   the generation it expects is still current (the raft state machine's
//!   compare-and-set); prints the resulting placements.
//!
//! Set `REWRITE=1` to rewrite the expected outputs from the actual ones
//! (then review the diff).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use vsha_agent::controller::{
    Cmd, Controller, ControllerConfig, Event, Now, Observed, PlacementChange, VserverReport,
};
use vsha_agent::model::{
    AdminState, Desired, Failback, FailoverGroup, Limits, NodeId, NodeRecord, Placement,
    ReplicaStatus, Role, Vserver, VserverSpec,
};
use vsha_agent::state::ClusterState;

struct Harness {
    state: ClusterState,
    ctl: Controller,
    cfg: ControllerConfig,
    pending: Vec<PlacementChange>,
}

impl Harness {
    fn new() -> Self {
        let cfg = config(&Args::default());
        Harness {
            state: ClusterState::default(),
            ctl: Controller::new(cfg),
            cfg,
            pending: Vec::new(),
        }
    }

    fn step(&mut self, at: u64, ev: Event) -> Vec<Cmd> {
        self.ctl.step(&self.state, Now::at(at), ev);
        let cmds = self.ctl.take_commands();
        for c in &cmds {
            if let Cmd::Propose(p) = c {
                self.pending.push(p.clone());
            }
        }
        cmds
    }
}

#[derive(Default)]
struct Args {
    /// Repeated keys keep every value, in order.
    kv: Vec<(String, String)>,
}

impl Args {
    fn parse(words: &[&str]) -> Result<Self, String> {
        let mut kv = Vec::new();
        for w in words {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, got {w:?}"))?;
            kv.push((k.to_string(), v.to_string()));
        }
        Ok(Args { kv })
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.kv
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, k: &str) -> Vec<&str> {
        self.kv
            .iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn u64_or(&self, k: &str, d: u64) -> Result<u64, String> {
        self.get(k).map_or(Ok(d), num)
    }

    fn req(&self, k: &str) -> Result<u64, String> {
        num(self.get(k).ok_or_else(|| format!("missing {k}="))?)
    }

    fn nodes(&self, k: &str) -> Result<Vec<NodeId>, String> {
        self.get(k).map_or(Ok(vec![]), list)
    }
}

fn num(s: &str) -> Result<u64, String> {
    s.parse().map_err(|_| format!("not a number: {s:?}"))
}

fn list(s: &str) -> Result<Vec<NodeId>, String> {
    let s = s.trim_start_matches('(').trim_end_matches(')');
    if s.is_empty() {
        return Ok(vec![]);
    }
    s.split(',').map(num).collect()
}

fn config(a: &Args) -> ControllerConfig {
    let lease = a.u64_or("lease", 1000).unwrap_or(1000);
    ControllerConfig {
        lease_ms: lease,
        drift_margin_ms: a.u64_or("margin", 200).unwrap_or(200),
        max_restarts: a.u64_or("restarts", 2).unwrap_or(2) as u32,
        proposal_retry_ms: a.u64_or("retry", lease).unwrap_or(lease),
    }
}

fn build_cluster(a: &Args) -> Result<ClusterState, String> {
    let mut s = ClusterState::default();
    let witness = a.nodes("witness")?;
    let learner = a.nodes("learner")?;
    let draining = a.nodes("draining")?;
    let maintenance = a.nodes("maintenance")?;
    for id in a.nodes("nodes")? {
        let role = if witness.contains(&id) {
            Role::Witness
        } else if learner.contains(&id) {
            Role::Learner
        } else {
            Role::Voter
        };
        let admin = if draining.contains(&id) {
            AdminState::Draining
        } else if maintenance.contains(&id) {
            AdminState::Maintenance
        } else {
            AdminState::Active
        };
        s.nodes.insert(
            id,
            NodeRecord {
                id,
                addr: format!("127.0.0.{id}:7700"),
                role,
                iface: String::new(),
                admin,
            },
        );
    }
    Ok(s)
}

/// `name=web pair=2,1 ...` (the `vserver` directive) or the `case` form
/// `web:pair=2,1:on=2`.
fn add_vserver(s: &mut ClusterState, a: &Args) -> Result<(), String> {
    let name = a.get("name").ok_or("missing name=")?.to_string();
    let failback = match a.get("failback").unwrap_or("never") {
        "never" => Failback::Never,
        "auto" => Failback::Auto,
        "manual" => Failback::Manual,
        other => return Err(format!("unknown failback {other:?}")),
    };
    let group = match a.get("pair") {
        Some(p) => Some(FailoverGroup {
            nodes: list(p)?,
            failback,
            failback_stable_ms: a.u64_or("stable", 0)?,
        }),
        None => None,
    };
    let desired = match a.get("desired").unwrap_or("running") {
        "running" => Desired::Running,
        "stopped" => Desired::Stopped,
        other => return Err(format!("unknown desired {other:?}")),
    };
    let placement = match a.get("on") {
        Some(n) => Some(Placement {
            node: num(n)?,
            generation: a.u64_or("gen", 1)?,
            desired,
            observed: "unknown".into(),
        }),
        None => None,
    };
    let ip = Ipv4Addr::new(10, 0, 0, (s.vservers.len() + 10) as u8);
    s.vservers.insert(
        name.clone(),
        Vserver {
            spec: VserverSpec {
                name: name.clone(),
                tree: format!("/vservers/{name}"),
                ip,
                prefix: 24,
                dev: String::new(),
                hostname: name.clone(),
                capabilities: vec![],
                limits: Limits::default(),
                start_command: vec![],
                stop_command: vec![],
                health: None,
                max_rpo_ms: a.u64_or("rpo", 0)?,
            },
            group,
            placement,
            replicas: BTreeMap::new(),
            desired: None,
        },
    );
    Ok(())
}

fn set_replica(s: &mut ClusterState, vs: &str, node: NodeId, src: u64) -> Result<(), String> {
    let v = s
        .vservers
        .get_mut(vs)
        .ok_or_else(|| format!("no vserver {vs}"))?;
    v.replicas.insert(
        node,
        ReplicaStatus {
            node,
            snapshot_source_unix_ms: src,
            digest: String::new(),
        },
    );
    Ok(())
}

fn show(cmds: &[Cmd]) -> Vec<String> {
    if cmds.is_empty() {
        return vec!["(none)".into()];
    }
    cmds.iter().map(|c| c.to_string()).collect()
}

fn run(h: &mut Harness, line: &str) -> Result<Vec<String>, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (verb, rest) = words.split_first().ok_or("empty directive")?;
    let a = Args::parse(rest)?;
    match *verb {
        "case" => {
            let cfg = config(&a);
            let mut state = build_cluster(&a)?;
            for v in a.all("vs") {
                let mut parts = v.split(':');
                let name = parts.next().unwrap_or_default();
                let mut words = vec![format!("name={name}")];
                words.extend(parts.map(str::to_string));
                let refs: Vec<&str> = words.iter().map(String::as_str).collect();
                add_vserver(&mut state, &Args::parse(&refs)?)?;
            }
            for r in a.all("rep") {
                let (vs, rest) = r.split_once('@').ok_or("rep=NAME@NODE:SRC")?;
                let (node, src) = rest.split_once(':').ok_or("rep=NAME@NODE:SRC")?;
                set_replica(&mut state, vs, num(node)?, num(src)?)?;
            }
            let since = a.u64_or("since", 0)?;
            let now = a.u64_or("now", 5000)?;
            let down = a.nodes("down")?;
            *h = Harness {
                state,
                ctl: Controller::new(cfg),
                cfg,
                pending: Vec::new(),
            };
            h.ctl.observe(&h.state, Now::at(since), Event::BecameLeader);
            let up: Vec<NodeId> = h
                .state
                .nodes
                .keys()
                .copied()
                .filter(|n| !down.contains(n))
                .collect();
            for &n in &up {
                h.ctl
                    .observe(&h.state, Now::at(since), Event::LeaseRenewed { node: n });
            }
            // Every live node renewed at `now`; then one decision.
            for &n in &up {
                h.ctl
                    .observe(&h.state, Now::at(now), Event::LeaseRenewed { node: n });
            }
            Ok(show(&h.step(now, Event::Tick)))
        }
        "cluster" => {
            h.cfg = config(&a);
            h.state = build_cluster(&a)?;
            h.ctl = Controller::new(h.cfg);
            h.pending.clear();
            Ok(vec!["ok".into()])
        }
        "vserver" => {
            add_vserver(&mut h.state, &a)?;
            Ok(vec!["ok".into()])
        }
        "replica" => {
            let vs = a.get("vs").ok_or("missing vs=")?;
            set_replica(&mut h.state, vs, a.req("node")?, a.req("src")?)?;
            Ok(vec!["ok".into()])
        }
        "admin" => {
            let id = a.req("node")?;
            let admin = match a.get("state").ok_or("missing state=")? {
                "active" => AdminState::Active,
                "draining" => AdminState::Draining,
                "maintenance" => AdminState::Maintenance,
                other => return Err(format!("unknown admin state {other:?}")),
            };
            h.state
                .nodes
                .get_mut(&id)
                .ok_or_else(|| format!("no node {id}"))?
                .admin = admin;
            Ok(vec!["ok".into()])
        }
        "leader" => Ok(show(&h.step(a.req("at")?, Event::BecameLeader))),
        "follower" => Ok(show(&h.step(a.req("at")?, Event::LostLeadership))),
        "tick" => Ok(show(&h.step(a.req("at")?, Event::Tick))),
        "renew" => {
            // One heartbeat round: all renewals observed, then one decision.
            let at = a.req("at")?;
            for n in a.nodes("nodes")? {
                h.ctl
                    .observe(&h.state, Now::at(at), Event::LeaseRenewed { node: n });
            }
            Ok(show(&h.step(at, Event::Tick)))
        }
        "report" => {
            let state = match a.get("state").ok_or("missing state=")? {
                "running" => Observed::Running,
                "stopped" => Observed::Stopped,
                "failed" => Observed::Failed {
                    reason: a.get("reason").unwrap_or("unknown").to_string(),
                },
                other => return Err(format!("unknown state {other:?}")),
            };
            let ev = Event::Report(VserverReport {
                vserver: a.get("vs").ok_or("missing vs=")?.to_string(),
                node: a.req("node")?,
                generation: a.req("gen")?,
                state,
                restarts: a.u64_or("restarts", 0)? as u32,
            });
            Ok(show(&h.step(a.req("at")?, ev)))
        }
        "force" => {
            let ev = Event::ForceFailover {
                vserver: a.get("vs").ok_or("missing vs=")?.to_string(),
                to: a.req("to")?,
                accept_data_loss: a.get("loss") == Some("true"),
            };
            Ok(show(&h.step(a.req("at")?, ev)))
        }
        "apply" => {
            let mut out = Vec::new();
            for p in std::mem::take(&mut h.pending) {
                let Some(v) = h.state.vservers.get_mut(&p.vserver) else {
                    out.push(format!("{}: refused (no such vserver)", p.vserver));
                    continue;
                };
                let current = v.placement.as_ref().map_or(0, |p| p.generation);
                if current != p.expect_generation {
                    out.push(format!(
                        "{}: refused (gen is {current}, expected {})",
                        p.vserver, p.expect_generation
                    ));
                    continue;
                }
                v.placement = Some(Placement {
                    node: p.to,
                    generation: p.generation,
                    desired: Desired::Running,
                    observed: "unknown".into(),
                });
                out.push(format!("{}: node {} gen {}", p.vserver, p.to, p.generation));
            }
            if out.is_empty() {
                out.push("(nothing to apply)".into());
            }
            Ok(out)
        }
        other => Err(format!("unknown directive {other:?}")),
    }
}

struct Block {
    /// Lines before the directive (comments, blanks), kept for rewriting.
    preamble: Vec<String>,
    directive: String,
    expected: Vec<String>,
    line_no: usize,
}

fn parse_file(text: &str) -> Result<(Vec<Block>, Vec<String>), String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut preamble = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if l.trim().is_empty() || l.trim_start().starts_with('#') {
            preamble.push(l.to_string());
            i += 1;
            continue;
        }
        let line_no = i + 1;
        let directive = l.trim().to_string();
        i += 1;
        if lines.get(i).map(|l| l.trim()) != Some("----") {
            return Err(format!("line {}: expected ---- after the directive", i + 1));
        }
        i += 1;
        let mut expected = Vec::new();
        while i < lines.len() && !lines[i].trim().is_empty() {
            expected.push(lines[i].trim_end().to_string());
            i += 1;
        }
        blocks.push(Block {
            preamble: std::mem::take(&mut preamble),
            directive,
            expected,
            line_no,
        });
    }
    Ok((blocks, preamble))
}

fn data_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/controller_testdata");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    files
}

#[test]
fn controller_testdata() {
    let rewrite = std::env::var_os("REWRITE").is_some();
    let mut failures = Vec::new();
    let mut cases = 0;
    let files = data_files();
    assert!(!files.is_empty(), "no data files");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let (blocks, trailer) =
            parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut h = Harness::new();
        let mut out = String::new();
        for b in &blocks {
            cases += 1;
            let actual = match run(&mut h, &b.directive) {
                Ok(lines) => lines,
                Err(e) => vec![format!("error: {e}")],
            };
            if actual != b.expected {
                failures.push(format!(
                    "{}:{}: {}\n  expected:\n    {}\n  actual:\n    {}",
                    path.display(),
                    b.line_no,
                    b.directive,
                    b.expected.join("\n    "),
                    actual.join("\n    ")
                ));
            }
            for p in &b.preamble {
                out.push_str(p);
                out.push('\n');
            }
            out.push_str(&b.directive);
            out.push_str("\n----\n");
            for l in &actual {
                out.push_str(l);
                out.push('\n');
            }
        }
        for p in &trailer {
            out.push_str(p);
            out.push('\n');
        }
        if rewrite {
            std::fs::write(&path, out).unwrap();
        }
    }
    eprintln!("{cases} data-driven controller cases");
    if !rewrite {
        assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
    }
}
