//! vshad's configuration: a TOML file (every field optional, see
//! docs/config.md) with command-line flags that override it. Loading never
//! binds or opens anything; a bad value is refused naming the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::model::{AdminState, NodeId, NodeRecord, Role};
use crate::tls::TlsPaths;
use crate::validate;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/vsha/vshad.toml";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/vsha";
/// Where `vsha cert` bundles are installed on a machine.
pub const DEFAULT_PKI_DIR: &str = "/etc/vsha/pki";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("config field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

fn field(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        reason: reason.into(),
    }
}

/// The file's shape. Unknown keys are refused so a typo never goes unseen.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: Option<u64>,
    pub listen: Option<String>,
    pub advertise: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub initial_cluster: Option<String>,
    pub join: Option<String>,
    pub tick_ms: Option<u64>,
    pub election_ticks: Option<u64>,
    pub heartbeat_ticks: Option<u64>,
    pub heartbeat_interval_ms: Option<u64>,
    pub liveness_timeout_ms: Option<u64>,
    pub snapshot_interval: Option<u64>,
    pub max_voters: Option<u64>,
    pub log_format: Option<String>,
    /// Timing profile: "default" or "fast" (see docs/config.md).
    pub profile: Option<String>,
    pub lease_ms: Option<u64>,
    pub drift_margin_ms: Option<u64>,
    pub max_restarts: Option<u32>,
    /// Where this node keeps vserver trees (its own and replicas).
    pub vserver_root: Option<PathBuf>,
    /// cgroup directory (under the cgroup2 root) holding this node's contexts.
    pub cgroup_parent: Option<String>,
    /// Run on every event the leader records: argv.
    pub notify_command: Option<Vec<String>>,
    /// "kill" (default): vservers die with the agent; "detach": they keep running.
    pub on_agent_death: Option<String>,
    pub replication_interval_ms: Option<u64>,
    /// HOST:PORT for Prometheus (`GET /metrics`); none = no exporter.
    pub metrics_listen: Option<String>,
    /// Plaintext gRPC (no TLS): for tests and demos only.
    pub insecure: Option<bool>,
    /// The cluster CA certificate (PEM) peers and clients must be signed by.
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM), from `vsha cert node NAME`.
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    pub tls_key: Option<PathBuf>,
}

/// Flags given on the command line; each overrides the file's value.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub node_id: Option<u64>,
    pub listen: Option<String>,
    pub advertise: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub initial_cluster: Option<String>,
    pub join: Option<String>,
    pub log_format: Option<String>,
    /// `--insecure`: true overrides the file; false leaves the file's value.
    pub insecure: bool,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// The validated configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_id: NodeId,
    pub listen: SocketAddr,
    /// The address other agents and the CLI use to reach this one.
    pub advertise: String,
    pub data_dir: PathBuf,
    pub initial_cluster: Option<Vec<NodeRecord>>,
    pub join: Option<String>,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub heartbeat_interval: Duration,
    pub liveness_timeout: Duration,
    pub snapshot_interval: u64,
    pub max_voters: usize,
    pub log_format: LogFormat,
    pub failover: FailoverSettings,
    pub metrics_listen: Option<SocketAddr>,
    /// The TLS files; `None` only when plaintext was asked for explicitly.
    pub tls: Option<TlsPaths>,
}

/// The timing profiles: what each trades is in docs/config.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Default,
    Fast,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Default => "default",
            Profile::Fast => "fast",
        }
    }

    /// (tick_ms, election_ticks, heartbeat_ticks, heartbeat_interval_ms,
    /// lease_ms, drift_margin_ms)
    fn timings(self) -> (u64, u64, u64, u64, u64, u64) {
        match self {
            Profile::Default => (100, 10, 2, 500, 3000, 500),
            Profile::Fast => (50, 8, 1, 100, 500, 100),
        }
    }
}

/// Leases, fencing and the vserver runtime of this node.
#[derive(Debug, Clone)]
pub struct FailoverSettings {
    pub profile: Profile,
    pub lease_ms: u64,
    pub drift_margin_ms: u64,
    /// The node stops its vservers this long before its lease ends.
    pub fence_lead_ms: u64,
    pub max_restarts: u32,
    pub vserver_root: PathBuf,
    pub cgroup_parent: String,
    pub notify_command: Vec<String>,
    pub detach_on_agent_death: bool,
    /// Pause between replication rounds of one vserver to one standby.
    pub replication_interval: Duration,
    /// The lease renewal interval (= `heartbeat_interval_ms`).
    pub renew_ms: u64,
}

impl AgentConfig {
    /// Reads `path` (a missing file is an error only when `explicit`) and
    /// applies the overrides.
    pub fn load(path: &Path, explicit: bool, o: Overrides) -> Result<Self, ConfigError> {
        let file = match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::File {
                path: path.display().to_string(),
                reason: e.to_string().trim().to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                FileConfig::default()
            }
            Err(e) => {
                return Err(ConfigError::File {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })
            }
        };
        Self::from_parts(file, o)
    }

    pub fn from_parts(f: FileConfig, o: Overrides) -> Result<Self, ConfigError> {
        let node_id = o
            .node_id
            .or(f.node_id)
            .ok_or_else(|| field("node_id", "required (set it in the file or with --node-id)"))?;
        if node_id == 0 {
            return Err(field("node_id", "node ids start at 1"));
        }
        let listen_s = o
            .listen
            .or(f.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen_s
            .parse()
            .map_err(|_| field("listen", format!("{listen_s:?} is not IP:PORT")))?;
        let advertise = match o.advertise.or(f.advertise) {
            Some(a) => {
                validate::addr("advertise", &a).map_err(|e| field("advertise", e.to_string()))?
            }
            None => {
                if listen.ip().is_unspecified() {
                    return Err(field(
                        "advertise",
                        format!("required when listen is {listen}: peers need an address they can reach"),
                    ));
                }
                listen.to_string()
            }
        };
        let data_dir = o
            .data_dir
            .or(f.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        if data_dir.as_os_str().is_empty() {
            return Err(field("data_dir", "must not be empty"));
        }
        let initial_cluster = match o.initial_cluster.or(f.initial_cluster) {
            Some(s) => Some(parse_initial_cluster(&s, node_id, &advertise)?),
            None => None,
        };
        let join = match o.join.or(f.join) {
            Some(j) => Some(validate::addr("join", &j).map_err(|e| field("join", e.to_string()))?),
            None => None,
        };
        if initial_cluster.is_some() && join.is_some() {
            return Err(field(
                "join",
                "give either initial_cluster (a new cluster) or join (an existing one), not both",
            ));
        }
        let profile = match f.profile.as_deref() {
            None | Some("default") => Profile::Default,
            Some("fast") => Profile::Fast,
            Some(other) => {
                return Err(field(
                    "profile",
                    format!("{other:?} is not \"default\" or \"fast\""),
                ))
            }
        };
        let (p_tick, p_election, p_hb_ticks, p_hb_ms, p_lease, p_margin) = profile.timings();
        let tick_ms = f.tick_ms.unwrap_or(p_tick);
        if !(10..=5000).contains(&tick_ms) {
            return Err(field("tick_ms", format!("{tick_ms} is outside 10..=5000")));
        }
        let election_ticks = f.election_ticks.unwrap_or(p_election);
        let heartbeat_ticks = f.heartbeat_ticks.unwrap_or(p_hb_ticks);
        if heartbeat_ticks == 0 {
            return Err(field("heartbeat_ticks", "must be at least 1"));
        }
        if election_ticks <= heartbeat_ticks || election_ticks > 1000 {
            return Err(field(
                "election_ticks",
                format!("{election_ticks} must be above heartbeat_ticks ({heartbeat_ticks}) and at most 1000"),
            ));
        }
        let heartbeat_interval_ms = f.heartbeat_interval_ms.unwrap_or(p_hb_ms);
        if !(10..=60_000).contains(&heartbeat_interval_ms) {
            return Err(field(
                "heartbeat_interval_ms",
                format!("{heartbeat_interval_ms} is outside 10..=60000"),
            ));
        }
        let liveness_timeout_ms = f.liveness_timeout_ms.unwrap_or(3 * heartbeat_interval_ms);
        if liveness_timeout_ms <= heartbeat_interval_ms {
            return Err(field(
                "liveness_timeout_ms",
                format!("{liveness_timeout_ms} must be above heartbeat_interval_ms ({heartbeat_interval_ms})"),
            ));
        }
        let snapshot_interval = f.snapshot_interval.unwrap_or(1000);
        if snapshot_interval == 0 {
            return Err(field("snapshot_interval", "must be at least 1"));
        }
        let max_voters = f.max_voters.unwrap_or(5);
        if !(1..=7).contains(&max_voters) {
            return Err(field(
                "max_voters",
                format!("{max_voters} is outside 1..=7"),
            ));
        }
        let log_format = match o.log_format.or(f.log_format).as_deref() {
            None | Some("human") => LogFormat::Human,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(field(
                    "log_format",
                    format!("{other:?} is not \"human\" or \"json\""),
                ))
            }
        };
        let lease_ms = f.lease_ms.unwrap_or(p_lease);
        if lease_ms < 2 * heartbeat_interval_ms {
            return Err(field(
                "lease_ms",
                format!("{lease_ms} must be at least twice heartbeat_interval_ms ({heartbeat_interval_ms}) so one lost renewal does not fence the node"),
            ));
        }
        let drift_margin_ms = f.drift_margin_ms.unwrap_or(p_margin);
        if drift_margin_ms * 100 < lease_ms {
            return Err(field(
                "drift_margin_ms",
                format!("{drift_margin_ms} is under 1% of lease_ms ({lease_ms}); monotonic clocks may drift that much"),
            ));
        }
        let max_restarts = f.max_restarts.unwrap_or(3);
        let vserver_root = f.vserver_root.unwrap_or_else(|| data_dir.join("vservers"));
        let cgroup_parent = f
            .cgroup_parent
            .unwrap_or_else(|| format!("vsha-node{node_id}"));
        if cgroup_parent.is_empty()
            || cgroup_parent.starts_with('/')
            || cgroup_parent
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(field(
                "cgroup_parent",
                format!("{cgroup_parent:?} must be a relative path without . or .. components"),
            ));
        }
        let detach_on_agent_death = match f.on_agent_death.as_deref() {
            None | Some("kill") => false,
            Some("detach") => true,
            Some(other) => {
                return Err(field(
                    "on_agent_death",
                    format!("{other:?} is not \"kill\" or \"detach\""),
                ))
            }
        };
        let failover = FailoverSettings {
            profile,
            lease_ms,
            drift_margin_ms,
            fence_lead_ms: lease_ms / 4,
            max_restarts,
            vserver_root,
            cgroup_parent,
            notify_command: f.notify_command.unwrap_or_default(),
            detach_on_agent_death,
            replication_interval: Duration::from_millis(f.replication_interval_ms.unwrap_or(1000)),
            renew_ms: heartbeat_interval_ms,
        };
        let metrics_listen = match f.metrics_listen {
            Some(m) => Some(
                m.parse::<SocketAddr>()
                    .map_err(|_| field("metrics_listen", format!("{m:?} is not IP:PORT")))?,
            ),
            None => None,
        };
        let insecure = o.insecure || f.insecure.unwrap_or(false);
        let tls_given = [
            &o.tls_ca,
            &o.tls_cert,
            &o.tls_key,
            &f.tls_ca,
            &f.tls_cert,
            &f.tls_key,
        ]
        .iter()
        .any(|p| p.is_some());
        if insecure && tls_given {
            return Err(field(
                "insecure",
                "set together with tls_ca/tls_cert/tls_key: choose TLS or plaintext",
            ));
        }
        let pki = Path::new(DEFAULT_PKI_DIR);
        let tls = (!insecure).then(|| TlsPaths {
            ca: o.tls_ca.or(f.tls_ca).unwrap_or_else(|| pki.join("ca.crt")),
            cert: o
                .tls_cert
                .or(f.tls_cert)
                .unwrap_or_else(|| pki.join("node.crt")),
            key: o
                .tls_key
                .or(f.tls_key)
                .unwrap_or_else(|| pki.join("node.key")),
        });
        Ok(AgentConfig {
            node_id,
            listen,
            advertise,
            data_dir,
            initial_cluster,
            join,
            tick: Duration::from_millis(tick_ms),
            election_ticks: election_ticks as usize,
            heartbeat_ticks: heartbeat_ticks as usize,
            heartbeat_interval: Duration::from_millis(heartbeat_interval_ms),
            liveness_timeout: Duration::from_millis(liveness_timeout_ms),
            snapshot_interval,
            max_voters: max_voters as usize,
            log_format,
            failover,
            metrics_listen,
            tls,
        })
    }
}

/// `ID=HOST:PORT,...` as etcd's flag; must name this node with its address.
pub fn parse_initial_cluster(
    s: &str,
    me: NodeId,
    my_addr: &str,
) -> Result<Vec<NodeRecord>, ConfigError> {
    let mut out: Vec<NodeRecord> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| field("initial_cluster", format!("{part:?} is not ID=HOST:PORT")))?;
        let id: NodeId = id.trim().parse().ok().filter(|i| *i > 0).ok_or_else(|| {
            field(
                "initial_cluster",
                format!("{id:?} is not a node id (1 or more)"),
            )
        })?;
        // `ID=HOST:PORT/witness`: a voter that runs no vservers.
        let (addr, role) = match addr.trim().split_once('/') {
            None => (addr, Role::Voter),
            Some((a, "witness")) => (a, Role::Witness),
            Some((_, other)) => {
                return Err(field(
                    "initial_cluster",
                    format!("{part:?}: role {other:?} is not \"witness\" (initial members vote)"),
                ))
            }
        };
        let addr = validate::addr("initial_cluster", addr)
            .map_err(|e| field("initial_cluster", e.to_string()))?;
        if out.iter().any(|n| n.id == id) {
            return Err(field(
                "initial_cluster",
                format!("node {id} is listed twice"),
            ));
        }
        if out.iter().any(|n| n.addr == addr) {
            return Err(field(
                "initial_cluster",
                format!("address {addr} is listed twice"),
            ));
        }
        out.push(NodeRecord {
            id,
            addr,
            role,
            iface: String::new(),
            admin: AdminState::Active,
        });
    }
    if out.is_empty() {
        return Err(field("initial_cluster", "lists no node"));
    }
    if out.len() > 7 {
        return Err(field(
            "initial_cluster",
            format!(
                "{} voters; at most 7 (add more nodes later as learners)",
                out.len()
            ),
        ));
    }
    match out.iter().find(|n| n.id == me) {
        None => Err(field(
            "initial_cluster",
            format!("does not list this node ({me})"),
        )),
        Some(n) if n.addr != my_addr => Err(field(
            "initial_cluster",
            format!(
                "lists node {me} at {} but this node advertises {my_addr}",
                n.addr
            ),
        )),
        Some(_) => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(e: ConfigError) -> String {
        match e {
            ConfigError::Field { field, .. } => field.to_string(),
            ConfigError::File { reason, .. } => reason,
        }
    }

    fn load(text: &str, o: Overrides) -> Result<AgentConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vshad.toml");
        std::fs::write(&p, text).unwrap();
        AgentConfig::load(&p, true, o)
    }

    #[test]
    fn defaults_and_overrides() {
        let c = load(
            "node_id = 2\nlisten = \"127.0.0.2:7700\"\n",
            Overrides {
                listen: Some("127.0.0.3:7701".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.node_id, 2);
        assert_eq!(c.listen.to_string(), "127.0.0.3:7701");
        assert_eq!(c.advertise, "127.0.0.3:7701");
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.tick, Duration::from_millis(100));
        assert_eq!(c.liveness_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn tls_is_the_default_and_plaintext_is_explicit() {
        let c = load("node_id = 1\n", Overrides::default()).unwrap();
        let tls = c.tls.expect("TLS on by default");
        assert_eq!(tls.cert, Path::new(DEFAULT_PKI_DIR).join("node.crt"));
        let c = load(
            "node_id = 1\ntls_key = \"/k\"\n",
            Overrides {
                tls_cert: Some("/c".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(
            (tls.cert.as_path(), tls.key.as_path()),
            (Path::new("/c"), Path::new("/k"))
        );
        let insecure = Overrides {
            insecure: true,
            ..Default::default()
        };
        assert!(load("node_id = 1\n", insecure.clone())
            .unwrap()
            .tls
            .is_none());
        assert!(load("node_id = 1\ninsecure = true\n", Overrides::default())
            .unwrap()
            .tls
            .is_none());
        assert_eq!(
            named(load("node_id = 1\ntls_ca = \"/ca\"\n", insecure).unwrap_err()),
            "insecure"
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let o = Overrides::default;
        assert_eq!(named(load("listen = \"x\"\n", o()).unwrap_err()), "node_id");
        assert_eq!(
            named(load("node_id = 1\nlisten = \"nope\"\n", o()).unwrap_err()),
            "listen"
        );
        assert_eq!(named(load("node_id = 0\n", o()).unwrap_err()), "node_id");
        assert_eq!(
            named(
                load(
                    "node_id = 1\nelection_ticks = 2\nheartbeat_ticks = 2\n",
                    o()
                )
                .unwrap_err()
            ),
            "election_ticks"
        );
        assert_eq!(
            named(load("node_id = 1\nmax_voters = 9\n", o()).unwrap_err()),
            "max_voters"
        );
        assert_eq!(
            named(load("node_id = 1\nlisten = \"0.0.0.0:7700\"\n", o()).unwrap_err()),
            "advertise"
        );
        assert_eq!(
            named(load("node_id = 1\nlog_format = \"xml\"\n", o()).unwrap_err()),
            "log_format"
        );
        // Unknown keys and type errors come from the TOML parser with the key's name.
        let e = load("node_id = 1\nlisen = \"127.0.0.1:1\"\n", o()).unwrap_err();
        assert!(named(e).contains("lisen"));
        let e = load("node_id = \"one\"\n", o()).unwrap_err();
        assert!(named(e).contains("node_id"));
    }

    #[test]
    fn initial_cluster_rules() {
        let ok = parse_initial_cluster("1=127.0.0.1:7700, 2=127.0.0.2:7700", 1, "127.0.0.1:7700")
            .unwrap();
        assert_eq!(ok.len(), 2);
        let w = parse_initial_cluster(
            "1=127.0.0.1:7700,2=127.0.0.2:7700,3=127.0.0.3:7700/witness",
            1,
            "127.0.0.1:7700",
        )
        .unwrap();
        assert_eq!(w[2].role, Role::Witness);
        assert_eq!(w[2].addr, "127.0.0.3:7700");
        for (s, me, addr) in [
            (
                "1=127.0.0.1:7700,2=127.0.0.2:7700/boss",
                1,
                "127.0.0.1:7700",
            ),
            ("1=127.0.0.1:7700,1=127.0.0.2:7700", 1, "127.0.0.1:7700"),
            ("1=127.0.0.1:7700,2=127.0.0.1:7700", 1, "127.0.0.1:7700"),
            ("2=127.0.0.2:7700", 1, "127.0.0.1:7700"),
            ("1=127.0.0.9:7700", 1, "127.0.0.1:7700"),
            ("x=127.0.0.1:7700", 1, "127.0.0.1:7700"),
            ("1:127.0.0.1:7700", 1, "127.0.0.1:7700"),
            ("", 1, "127.0.0.1:7700"),
        ] {
            let e = parse_initial_cluster(s, me, addr).unwrap_err();
            assert_eq!(named(e), "initial_cluster", "{s}");
        }
        let e = load(
            "node_id = 1\ninitial_cluster = \"1=127.0.0.1:7700\"\njoin = \"127.0.0.2:7700\"\n",
            Overrides::default(),
        )
        .unwrap_err();
        assert_eq!(named(e), "join");
    }
}
