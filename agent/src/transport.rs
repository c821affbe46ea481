//! Ships the raft thread's messages to peers: one worker per destination,
//! so a slow or dead peer never delays the others. Each worker batches what
//! queued up into one `Peer.Raft` call; snapshots go over the chunked
//! `Peer.InstallSnapshot` stream. Failures are reported back to raft-rs
//! (unreachable, snapshot failure) so it backs off and retries.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use vsha_proto::v1::{RaftBatch, SnapshotChunk};

use crate::model::NodeId;
use crate::peer_client::PeerClients;
use crate::raft_loop::RaftHandle;
use crate::raft_node::Outgoing;

const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
const SNAPSHOT_CHUNK: usize = 1024 * 1024;
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Me {
    pub id: NodeId,
    pub addr: String,
}

pub async fn run(
    raft: RaftHandle,
    peers: PeerClients,
    me: Me,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut workers: HashMap<NodeId, mpsc::UnboundedSender<Outgoing>> = HashMap::new();
    while let Some(m) = outgoing.recv().await {
        let to = m.to;
        let tx = workers.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(worker(raft.clone(), peers.clone(), me.clone(), to, rx));
            tx
        });
        if tx.send(m).is_err() {
            workers.remove(&to);
        }
    }
}

async fn worker(
    raft: RaftHandle,
    peers: PeerClients,
    me: Me,
    to: NodeId,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let mut size = batch[0].bytes.len();
        while size < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(m) => {
                    size += m.bytes.len();
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        let Some(addr) = raft.address_of(to) else {
            tracing::debug!(to, "no address known for peer; dropping messages");
            raft.report_unreachable(to);
            for m in batch.iter().filter(|m| m.snapshot) {
                let _ = m;
                raft.report_snapshot(to, false);
            }
            continue;
        };
        let (snapshots, msgs): (Vec<Outgoing>, Vec<Outgoing>) =
            batch.into_iter().partition(|m| m.snapshot);
        if !msgs.is_empty() {
            send_batch(&raft, &peers, &me, to, &addr, msgs).await;
        }
        for snap in snapshots {
            let ok = send_snapshot(&peers, &me, &addr, snap.bytes).await;
            if let Err(e) = &ok {
                tracing::warn!(to, %addr, error = %e, "snapshot transfer failed; raft will retry");
            } else {
                tracing::info!(to, %addr, "snapshot sent");
            }
            raft.report_snapshot(to, ok.is_ok());
        }
    }
}

async fn send_batch(
    raft: &RaftHandle,
    peers: &PeerClients,
    me: &Me,
    to: NodeId,
    addr: &str,
    msgs: Vec<Outgoing>,
) {
    let Ok(mut client) = peers.client(addr) else {
        raft.report_unreachable(to);
        return;
    };
    let mut req = tonic::Request::new(RaftBatch {
        from: me.id,
        from_addr: me.addr.clone(),
        msgs: msgs.into_iter().map(|m| m.bytes.into()).collect(),
    });
    req.set_timeout(CALL_TIMEOUT);
    if let Err(e) = crate::peer_client::within(CALL_TIMEOUT, client.raft(req)).await {
        tracing::debug!(to, %addr, error = %e.message(), "raft batch not delivered");
        raft.report_unreachable(to);
    }
}

async fn send_snapshot(
    peers: &PeerClients,
    me: &Me,
    addr: &str,
    bytes: Vec<u8>,
) -> Result<(), String> {
    let mut client = peers.client(addr).map_err(|e| e.to_string())?;
    let total = bytes.len() as u64;
    let chunks: Vec<SnapshotChunk> = bytes
        .chunks(SNAPSHOT_CHUNK)
        .map(|c| SnapshotChunk {
            from: me.id,
            from_addr: me.addr.clone(),
            total_len: total,
            data: c.to_vec().into(),
        })
        .collect();
    let mut req = tonic::Request::new(futures::stream::iter(chunks));
    req.set_timeout(SNAPSHOT_TIMEOUT);
    crate::peer_client::within(SNAPSHOT_TIMEOUT, client.install_snapshot(req))
        .await
        .map(|_| ())
        .map_err(|s| s.message().to_string())
}
