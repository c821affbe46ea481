//! Connecting to an agent, with an error that says what to do when none answers.

use std::time::Duration;

use anyhow::anyhow;
use tonic::transport::{Channel, Endpoint};
use vsha_proto::v1::cluster_client::ClusterClient;

pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:7700";

pub async fn connect(endpoint: &str) -> anyhow::Result<ClusterClient<Channel>> {
    let ep = Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|e| anyhow!("--endpoint {endpoint:?} is not HOST:PORT: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(15));
    let channel = ep.connect().await.map_err(|e| {
        let cause = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_else(|| e.to_string());
        anyhow!(
            "no vsha agent answers at {endpoint} ({cause}).\n\
             Start one, for example:\n  \
             vshad --node-id 1 --listen {endpoint} --data-dir /var/lib/vsha --initial-cluster 1={endpoint}\n\
             or run `vsha demo` for a local 3-node cluster; pick another agent with --endpoint or VSHA_ENDPOINT"
        )
    })?;
    Ok(ClusterClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
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
    anyhow!("{kind}: {} (agent {endpoint})", s.message())
}
