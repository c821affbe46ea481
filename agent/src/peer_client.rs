//! Clients for other agents' `Peer` service, one lazily connected channel
//! per address, shared by the raft transport, heartbeats and forwarding.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use vsha_proto::v1::peer_client::PeerClient;
use vsha_proto::v1::ProposeRequest;

use crate::command::Command;
use crate::submit::SubmitError;
use crate::tls::{Security, TlsError};

/// Largest message accepted on any call: raft batches can be big.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

#[derive(Clone)]
pub struct PeerClients {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    security: Security,
}

/// An endpoint for another agent, with this agent's transport security.
pub fn endpoint(security: &Security, addr: &str) -> Result<Endpoint, TlsError> {
    Ok(security
        .endpoint(addr)?
        .connect_timeout(Duration::from_millis(800))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5)))
}

impl PeerClients {
    pub fn new(security: Security) -> PeerClients {
        PeerClients {
            channels: Arc::default(),
            security,
        }
    }

    pub fn security(&self) -> &Security {
        &self.security
    }

    pub fn client(&self, addr: &str) -> Result<PeerClient<Channel>, SubmitError> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let channel = match map.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = endpoint(&self.security, addr)
                    .map_err(|e| SubmitError::Transport(format!("peer {e}")))?
                    .connect_lazy();
                map.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(PeerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    /// Forwards a command to the leader at `addr` and returns its verdict.
    pub async fn propose(
        &self,
        addr: &str,
        from: u64,
        cmd: &Command,
        wait: Duration,
    ) -> Result<(), SubmitError> {
        let mut client = self.client(addr)?;
        let mut req = tonic::Request::new(ProposeRequest {
            from,
            command: serde_json::to_vec(cmd).unwrap_or_default().into(),
        });
        req.set_timeout(wait + Duration::from_secs(1));
        let resp = within(wait + Duration::from_secs(2), client.propose(req))
            .await
            .map_err(|s| match s.code() {
                // Not delivered: nothing was proposed.
                tonic::Code::Unavailable => SubmitError::Transport(format!("{addr}: {}", s.message())),
                // Delivered, outcome unknown: must not be retried blindly.
                _ => SubmitError::Timeout(format!(
                    "forwarded to the leader at {addr} but got no verdict ({}); it may still be applied, check `vsha status --stale` before retrying",
                    s.message()
                )),
            })?;
        let verdict: Result<(), SubmitError> = serde_json::from_slice(&resp.into_inner().result)
            .map_err(|e| SubmitError::Transport(format!("unreadable answer from {addr}: {e}")))?;
        verdict
    }
}

/// Bounds a call on the client side too: a peer that accepted the
/// connection and then went silent must not hold the caller forever.
pub async fn within<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {} ms",
            limit.as_millis()
        ))),
    }
}
