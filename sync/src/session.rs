//! Runs one side of a round over any tokio byte stream: a reader task and a
//! writer task move frames between the stream and the blocking side (all
//! filesystem work happens on a blocking thread, never on a tokio worker).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::error::{Result, SyncError};
use crate::wire::{read_frame, write_frame, Frame};

/// Byte counters of one session.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes written to the stream.
    pub sent: AtomicU64,
    /// Bytes read from the stream.
    pub received: AtomicU64,
}

/// The blocking side's view of the peer.
pub struct Peer {
    rx: mpsc::Receiver<Result<Frame>>,
    tx: Option<mpsc::Sender<Frame>>,
    /// Byte counters.
    pub counters: Arc<Counters>,
}

impl Peer {
    /// Next frame; a closed stream is a truncated round.
    pub fn recv(&mut self) -> Result<Frame> {
        match self.rx.blocking_recv() {
            Some(r) => r,
            None => Err(SyncError::Truncated("the stream ended")),
        }
    }

    /// Queue a frame for the writer.
    pub fn send(&self, f: Frame) -> Result<()> {
        match &self.tx {
            Some(tx) => tx.blocking_send(f).map_err(|_| {
                SyncError::Stream(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "peer stream closed",
                ))
            }),
            None => Err(SyncError::Stream(std::io::Error::other("sender closed"))),
        }
    }
}

struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Run `f` on a blocking thread, connected to the frames of `stream`.
pub async fn run_blocking<S, T, F>(stream: S, f: F) -> Result<(T, Arc<Counters>)>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    T: Send + 'static,
    F: FnOnce(&mut Peer) -> Result<T> + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let counters = Arc::new(Counters::default());
    let (in_tx, in_rx) = mpsc::channel::<Result<Frame>>(64);
    let (out_tx, mut out_rx) = mpsc::channel::<Frame>(16);
    let c1 = counters.clone();
    let reader = tokio::spawn(async move {
        loop {
            match read_frame(&mut rd).await {
                Ok(Some((f, n))) => {
                    c1.received.fetch_add(n as u64, Ordering::Relaxed);
                    if in_tx.send(Ok(f)).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = in_tx.send(Err(e)).await;
                    break;
                }
            }
        }
    });
    let c2 = counters.clone();
    let writer = tokio::spawn(async move {
        let mut w = tokio::io::BufWriter::with_capacity(1 << 20, wr);
        let mut res: Result<()> = Ok(());
        while let Some(f) = out_rx.recv().await {
            match write_frame(&mut w, &f).await {
                Ok(n) => {
                    c2.sent.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
            if out_rx.is_empty() {
                if let Err(e) = w.flush().await {
                    res = Err(SyncError::Stream(e));
                    break;
                }
            }
        }
        let _ = w.flush().await;
        let _ = w.shutdown().await;
        res
    });
    // If this future is dropped (the round is cancelled), stop both tasks so
    // the blocking side sees the stream end and rolls back.
    let _guard = AbortOnDrop(vec![reader.abort_handle(), writer.abort_handle()]);
    let mut peer = Peer {
        rx: in_rx,
        tx: Some(out_tx),
        counters: counters.clone(),
    };
    let out = tokio::task::spawn_blocking(move || {
        let r = f(&mut peer);
        drop(peer);
        r
    })
    .await
    .map_err(|e| SyncError::Protocol(format!("round thread failed: {e}")))?;
    let w = writer.await;
    reader.abort();
    let v = out?;
    match w {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(e) => return Err(SyncError::Protocol(format!("writer task failed: {e}"))),
    }
    Ok((v, counters))
}
