//! Connecting to an agent, with an error that says what to do when none answers.

use std::time::Duration;

use anyhow::anyhow;
use std::path::{Path, PathBuf};

use clap::Args;
use tonic::transport::Channel;
use vsha_agent::config::DEFAULT_PKI_DIR;
use vsha_agent::tls::{Role, Security, TlsPaths};
use vsha_proto::v1::cluster_client::ClusterClient;

pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:7700";

/// How the CLI authenticates to agents.
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// Plaintext, for an agent started with --insecure (tests, demos).
    #[arg(long, global = true, env = "VSHA_INSECURE")]
    pub insecure: bool,
    /// The cluster CA certificate [default: /etc/vsha/pki/ca.crt].
    #[arg(long, global = true, env = "VSHA_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Your certificate [default: /etc/vsha/pki/client.crt, else node.crt].
    #[arg(long, global = true, env = "VSHA_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key [default: beside the certificate, .key].
    #[arg(long, global = true, env = "VSHA_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// Loads the CLI's certificate. Without --tls-cert, /etc/vsha/pki's
    /// client certificate is used, or the node's on a cluster node.
    pub fn security(&self) -> anyhow::Result<Security> {
        if self.insecure {
            return Ok(Security::Insecure);
        }
        let pki = Path::new(DEFAULT_PKI_DIR);
        let cert = self.tls_cert.clone().unwrap_or_else(|| {
            let client = pki.join("client.crt");
            let node = pki.join("node.crt");
            if !client.exists() && node.exists() {
                node
            } else {
                client
            }
        });
        let paths = TlsPaths {
            ca: self.tls_ca.clone().unwrap_or_else(|| pki.join("ca.crt")),
            key: self
                .tls_key
                .clone()
                .unwrap_or_else(|| cert.with_extension("key")),
            cert,
        };
        Security::load(&paths, Role::Client).map_err(|e| {
            anyhow!(
                "TLS: {e}\n\
                 The CLI needs the cluster CA and a certificate it signed: `vsha cert client NAME` \
                 on the machine holding the CA writes them; install them in /etc/vsha/pki or pass \
                 --tls-ca/--tls-cert/--tls-key (VSHA_TLS_CA/CERT/KEY). For an agent started with \
                 --insecure, pass --insecure."
            )
        })
    }
}

pub async fn connect(
    endpoint: &str,
    security: &Security,
) -> anyhow::Result<ClusterClient<Channel>> {
    let ep = security
        .endpoint(endpoint)
        .map_err(|e| anyhow!("--endpoint: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(15));
    let channel = ep.connect().await.map_err(|e| {
        let cause = error_chain(&e);
        if looks_like_tls(&cause) {
            return anyhow!(
                "TLS handshake with the agent at {endpoint} failed: {cause}.\n\
                 The agent and this CLI must hold certificates from the same cluster CA \
                 (see --tls-ca/--tls-cert/--tls-key)."
            );
        }
        anyhow!(
            "no vsha agent answers at {endpoint} ({cause}).\n\
             Start one, for example:\n  \
             vshad --node-id 1 --listen {endpoint} --data-dir /var/lib/vsha --initial-cluster 1={endpoint}\n\
             or run `vsha demo` for a local 3-node cluster; pick another agent with --endpoint or VSHA_ENDPOINT"
        )
    })?;
    Ok(ClusterClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

/// Every cause of an error, outermost first: tonic's own message is only
/// "transport error"; what went wrong (refused, TLS alert) is underneath.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        parts.push(c.to_string());
        cur = c.source();
    }
    if parts.is_empty() {
        parts.push(e.to_string());
    }
    parts.join(": ")
}

fn looks_like_tls(cause: &str) -> bool {
    let c = cause.to_ascii_lowercase();
    ["certificate", "tls", "alert", "handshake"]
        .iter()
        .any(|k| c.contains(k))
}

/// A gRPC error as the operator should read it.
pub fn explain(endpoint: &str, s: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let kind = match s.code() {
        Code::InvalidArgument => "invalid request",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::FailedPrecondition => "refused",
        Code::Unavailable => "cluster unavailable",
        Code::Unimplemented => "not implemented",
        Code::DeadlineExceeded => "timed out",
        _ => "error",
    };
    let mut msg = format!("{kind}: {} (agent {endpoint})", s.message());
    if s.code() == Code::Unavailable && looks_like_tls(s.message()) {
        msg.push_str(
            "\nThe agent refused this CLI's certificate: it must be signed by the cluster CA \
             (see --tls-ca/--tls-cert/--tls-key).",
        );
    } else if s.code() == Code::Unknown || s.code() == Code::Internal {
        msg.push_str("\nIf the agent runs with TLS, do not pass --insecure.");
    }
    anyhow!(msg)
}
