//! The standalone transport: `serve` receives trees over TCP, `push` sends
//! rounds. One TCP connection carries one round.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::error::{Result, SyncError};
use crate::receiver::{receive, Received};
use crate::sender::{send_blocking, PushOptions, RoundStats, SenderState};
use crate::session::run_blocking;
use crate::store::{Store, DEFAULT_KEEP};

/// Receive trees on `listener` into `dir` until `shutdown` completes. Each
/// connection carries one round; rounds for different names run concurrently,
/// a second concurrent round for the same name is refused. In-flight rounds
/// are abandoned at shutdown (their snapshots stay as they were).
pub async fn serve<F>(
    listener: TcpListener,
    dir: &Path,
    token: Option<Vec<u8>>,
    shutdown: F,
) -> Result<()>
where
    F: Future<Output = ()>,
{
    serve_with(
        listener,
        Arc::new(Store::open(dir, DEFAULT_KEEP)?),
        token,
        shutdown,
        |_| {},
    )
    .await
}

/// [`serve`] with an open store and a callback per finished round.
pub async fn serve_with<F, C>(
    listener: TcpListener,
    store: Arc<Store>,
    token: Option<Vec<u8>>,
    shutdown: F,
    on_round: C,
) -> Result<()>
where
    F: Future<Output = ()>,
    C: Fn(&Result<Received>) + Send + Sync + 'static,
{
    tracing::info!(addr = ?listener.local_addr().ok(), dir = %store.dir().display(), "sync receiver listening");
    let on_round = Arc::new(on_round);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => {
                let (sock, peer) = a.map_err(SyncError::Stream)?;
                let _ = sock.set_nodelay(true);
                let (store, token, cb) = (store.clone(), token.clone(), on_round.clone());
                tasks.spawn(async move {
                    let r = receive(store, sock, token).await;
                    match &r {
                        Ok(x) => tracing::info!(%peer, name = %x.name, seq = x.seq, "round done"),
                        Err(e) => tracing::warn!(%peer, error = %e, "round failed"),
                    }
                    cb(&r);
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
    Ok(())
}

async fn one_round(
    addr: &str,
    src: &Path,
    name: &str,
    token: Option<&[u8]>,
    opts: &PushOptions,
    state: SenderState,
    deadline: Option<Instant>,
) -> (Result<RoundStats>, SenderState) {
    let sock = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return (Err(SyncError::Stream(e)), state),
    };
    let _ = sock.set_nodelay(true);
    let (src, name, token, opts) = (
        src.to_path_buf(),
        name.to_string(),
        token.map(|t| t.to_vec()),
        opts.clone(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let mut st = state;
    let r = run_blocking(sock, move |peer| {
        let r = send_blocking(
            peer,
            &src,
            &name,
            token.as_deref(),
            &opts,
            &mut st,
            deadline,
        );
        let _ = tx.send(st);
        r
    })
    .await;
    let state = rx.try_recv().unwrap_or_default();
    match r {
        Ok((mut s, c)) => {
            s.bytes_sent = c.sent.load(std::sync::atomic::Ordering::Relaxed);
            s.bytes_received = c.received.load(std::sync::atomic::Ordering::Relaxed);
            (Ok(s), state)
        }
        Err(e) => (Err(e), state),
    }
}

/// One round, with the freeze protocol when configured: an unfrozen bulk
/// pass, then the cgroup is frozen for a short final pass bounded by
/// `max`; past it the pass is aborted, the cgroup thawed, and it is tried
/// again later (up to `attempts`).
pub async fn push_round(
    src: &Path,
    addr: &str,
    name: &str,
    token: Option<&[u8]>,
    opts: &PushOptions,
    state: SenderState,
) -> (Result<RoundStats>, SenderState) {
    let Some(fc) = opts.freeze.clone() else {
        return one_round(addr, src, name, token, opts, state, None).await;
    };
    let (r, mut state) = one_round(addr, src, name, token, opts, state, None).await;
    let mut pre = match r {
        Ok(s) => s,
        Err(e) => return (Err(e), state),
    };
    let t0 = Instant::now();
    let mut last_err = None;
    for attempt in 0..fc.attempts.max(1) {
        let cg = fc.cgroup.clone();
        let max = fc.max;
        let frozen =
            match tokio::task::spawn_blocking(move || crate::freeze::freeze(&cg, max)).await {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => return (Err(e), state),
                Err(e) => return (Err(SyncError::Freeze(e.to_string())), state),
            };
        let deadline = frozen.since + fc.max;
        let (r, st) = one_round(addr, src, name, token, opts, state, Some(deadline)).await;
        state = st;
        let mut frozen = frozen;
        let held = match frozen.thaw() {
            Ok(d) => d,
            Err(e) => return (Err(e), state),
        };
        match r {
            Ok(mut s) => {
                s.freeze_duration = Some(held);
                s.round_duration = t0.elapsed() + pre.round_duration;
                s.bytes_sent += pre.bytes_sent;
                s.bytes_received += pre.bytes_received;
                s.files_changed += pre.files_changed;
                s.files_deleted += pre.files_deleted;
                s.literal_bytes += pre.literal_bytes;
                return (Ok(s), state);
            }
            Err(SyncError::Aborted(why)) => {
                tracing::warn!(attempt, %why, ?held, "frozen pass exceeded its bound; thawed, retrying");
                last_err = Some(SyncError::Freeze(format!(
                    "frozen pass would exceed {:?} ({why})",
                    fc.max
                )));
                // Catch up unfrozen before the next attempt.
                let (r, st) = one_round(addr, src, name, token, opts, state, None).await;
                state = st;
                if let Ok(s) = r {
                    pre = s;
                }
            }
            Err(e) => return (Err(e), state),
        }
    }
    (
        Err(last_err.unwrap_or_else(|| SyncError::Freeze("no attempt".into()))),
        state,
    )
}

/// Send `src` as `name` to a `serve` at `addr`: one round, or with
/// `opts.watch` rounds as the tree changes until `shutdown`. `on_round` gets
/// every round's figures. Returns the figures of the last round.
pub async fn push<F, C>(
    src: &Path,
    addr: &str,
    name: &str,
    token: Option<Vec<u8>>,
    opts: PushOptions,
    shutdown: F,
    mut on_round: C,
) -> Result<RoundStats>
where
    F: Future<Output = ()>,
    C: FnMut(&RoundStats),
{
    crate::store::check_name(name)?;
    let src: PathBuf = src.to_path_buf();
    let mut state = match &opts.state_file {
        Some(p) => SenderState::load(p),
        None => SenderState::default(),
    };
    tokio::pin!(shutdown);
    let interval = opts.interval.unwrap_or(Duration::from_millis(200));
    loop {
        let (r, st) = push_round(&src, addr, name, token.as_deref(), &opts, state).await;
        state = st;
        if let Some(p) = &opts.state_file {
            state.save(p)?;
        }
        let s = r?;
        on_round(&s);
        if !opts.watch {
            return Ok(s);
        }
        // Wait for a change (journal) or the interval (no journal), or shutdown.
        let wait = async {
            if let Some(j) = state.journal.take() {
                let j = tokio::task::spawn_blocking(move || {
                    // Bounded wait, so a shutdown never strands this thread.
                    let _ = j.wait(Duration::from_millis(1000));
                    j
                })
                .await;
                if let Ok(j) = j {
                    // Let a burst of writes settle a little.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    return Some(j);
                }
                None
            } else {
                tokio::time::sleep(interval).await;
                None
            }
        };
        tokio::select! {
            _ = &mut shutdown => return Ok(s),
            j = wait => { if j.is_some() { state.journal = j; } }
        }
    }
}
