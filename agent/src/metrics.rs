//! Prometheus metrics (OpenMetrics text) on `metrics_listen`, `GET
//! /metrics`. Counters and histograms are fed where things happen (the
//! leader runtime, replication); gauges are read from the raft view, the
//! liveness table and the leader's live view at scrape time. docs/metrics.md
//! lists them with the Grafana dashboard and alert rules.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabel {
    pub vserver: String,
    pub standby: String,
}

type FGauge = Gauge<f64, AtomicU64>;

fn seconds_histogram() -> Histogram {
    // 10 ms .. ~82 s
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

/// Every metric of one agent.
pub struct Metrics {
    registry: Registry,
    pub raft_term: Gauge,
    pub raft_leader: Gauge,
    pub raft_commit_index: Gauge,
    pub raft_applied_index: Gauge,
    pub lease_age_seconds: Family<NodeLabel, FGauge>,
    pub vservers: Family<StateLabel, Gauge>,
    pub failovers: Counter,
    pub failover_phase_seconds: Family<PhaseLabel, Histogram, fn() -> Histogram>,
    pub migration_downtime_seconds: Histogram,
    pub replica_lag_seconds: Family<ReplicaLabel, FGauge>,
    pub replicated_bytes: Counter,
    pub sync_round_seconds: Histogram,
    pub journal_fallbacks: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vsha");
        let m = Metrics {
            raft_term: Gauge::default(),
            raft_leader: Gauge::default(),
            raft_commit_index: Gauge::default(),
            raft_applied_index: Gauge::default(),
            lease_age_seconds: Family::default(),
            vservers: Family::default(),
            failovers: Counter::default(),
            failover_phase_seconds: Family::new_with_constructor(seconds_histogram),
            migration_downtime_seconds: seconds_histogram(),
            replica_lag_seconds: Family::default(),
            replicated_bytes: Counter::default(),
            sync_round_seconds: seconds_histogram(),
            journal_fallbacks: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "raft_term",
            "Raft term this agent is in",
            m.raft_term.clone(),
        );
        registry.register(
            "raft_leader",
            "Node id of the raft leader (0: none known)",
            m.raft_leader.clone(),
        );
        registry.register(
            "raft_commit_index",
            "Raft commit index",
            m.raft_commit_index.clone(),
        );
        registry.register(
            "raft_applied_index",
            "Raft index applied to the state machine",
            m.raft_applied_index.clone(),
        );
        registry.register(
            "lease_age_seconds",
            "Time since the leader last renewed each node's lease (leader only)",
            m.lease_age_seconds.clone(),
        );
        registry.register(
            "vservers",
            "Vservers per state as their holders report it (leader only)",
            m.vservers.clone(),
        );
        registry.register(
            "failovers",
            "Vservers moved off a node whose lease ran out",
            m.failovers.clone(),
        );
        registry.register(
            "failover_phase_seconds",
            "Duration of each failover phase (detect+lease wait, commit, start+report)",
            m.failover_phase_seconds.clone(),
        );
        registry.register(
            "migration_downtime_seconds",
            "Planned moves: from the stop order to the new holder running",
            m.migration_downtime_seconds.clone(),
        );
        registry.register(
            "replica_lag_seconds",
            "Age of each standby's newest complete replica (leader only)",
            m.replica_lag_seconds.clone(),
        );
        registry.register(
            "replicated_bytes",
            "Bytes this node sent in replication rounds",
            m.replicated_bytes.clone(),
        );
        registry.register(
            "sync_round_seconds",
            "Duration of this node's replication rounds",
            m.sync_round_seconds.clone(),
        );
        registry.register(
            "journal_fallbacks",
            "Replication rounds that fell back to a full scan (change journal unavailable or overflowed)",
            m.journal_fallbacks.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }

    pub fn observe_phase(&self, phase: &str, ms: u64) {
        self.failover_phase_seconds
            .get_or_create(&PhaseLabel {
                phase: phase.to_string(),
            })
            .observe(ms as f64 / 1000.0);
    }
}

/// What a scrape refreshes before encoding.
pub type Refresh = Box<dyn Fn(&Metrics) + Send + Sync>;

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, refresh: Arc<Refresh>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let (m, r) = (Arc::clone(&metrics), Arc::clone(&refresh));
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            // Read the request head (bounded: 8 KiB, 5 s).
            let head = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    match conn.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            n += k;
                            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
            })
            .await;
            if head.is_err() {
                return;
            }
            let line = String::from_utf8_lossy(&buf[..n]);
            let (status, ctype, body) = if line.starts_with("GET /metrics ") {
                r(&m);
                (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    m.encode(),
                )
            } else {
                (
                    "404 Not Found",
                    "text/plain",
                    "only GET /metrics here\n".to_string(),
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_named_and_labelled() {
        let m = Metrics::new();
        m.raft_term.set(7);
        m.failovers.inc();
        m.observe_phase("commit", 50);
        m.replica_lag_seconds
            .get_or_create(&ReplicaLabel {
                vserver: "web".into(),
                standby: "2".into(),
            })
            .set(0.75);
        let text = m.encode();
        for want in [
            "vsha_raft_term 7",
            "vsha_failovers_total 1",
            "vsha_failover_phase_seconds_count{phase=\"commit\"} 1",
            "vsha_replica_lag_seconds{vserver=\"web\",standby=\"2\"} 0.75",
            "# EOF",
        ] {
            assert!(text.contains(want), "no {want:?} in:\n{text}");
        }
    }

    #[tokio::test]
    async fn serves_get_metrics_and_refuses_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Arc::new(Metrics::new());
        let refresh: Arc<Refresh> = Arc::new(Box::new(|m: &Metrics| {
            m.raft_leader.set(3);
        }));
        let task = tokio::spawn(serve(listener, m, refresh));
        let get = |path: &'static str| async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).await.unwrap();
            s
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.contains("vsha_raft_leader 3"),
            "refresh ran before encoding: {ok}"
        );
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
        task.abort();
    }
}
