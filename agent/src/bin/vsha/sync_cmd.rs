//! `vsha sync`: the standalone tree replication commands (vsha-sync over TCP).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use clap::Subcommand;
use vsha_sync::PushOptions;

#[derive(Subcommand, Debug)]
pub enum SyncCmd {
    /// Receive trees: the current snapshot of NAME is DIR/NAME.
    Serve {
        #[arg(long, value_name = "ADDR")]
        listen: String,
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A shared secret the sender must present.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Send one round of SRC (or keep sending with --watch).
    Push {
        src: PathBuf,
        #[arg(long, value_name = "ADDR")]
        to: String,
        #[arg(long, value_name = "NAME")]
        name: String,
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Keep sending rounds as the tree changes (Ctrl-C stops).
        #[arg(long)]
        watch: bool,
        /// Use the fanotify change journal between rounds (root).
        #[arg(long)]
        journal: bool,
        /// Take part in unification on the receiver.
        #[arg(long)]
        unified: bool,
    },
    /// Compare two local trees; list every difference (exit 1 if any).
    Verify { a: PathBuf, b: PathBuf },
}

fn token(file: &Option<PathBuf>) -> anyhow::Result<Option<Vec<u8>>> {
    match file {
        None => Ok(None),
        Some(f) => {
            let t = std::fs::read(f)
                .with_context(|| format!("reading --token-file {}", f.display()))?;
            let t = String::from_utf8_lossy(&t).trim().as_bytes().to_vec();
            if t.is_empty() {
                return Err(anyhow!("--token-file {}: the file is empty", f.display()));
            }
            Ok(Some(t))
        }
    }
}

pub async fn run(cmd: SyncCmd) -> anyhow::Result<i32> {
    match cmd {
        SyncCmd::Serve {
            listen,
            dir,
            token_file,
        } => {
            let token = token(&token_file)?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            eprintln!(
                "vsha sync: receiving into {} on {listen}; Ctrl-C stops",
                dir.display()
            );
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            vsha_sync::serve(listener, &dir, token, shutdown).await?;
        }
        SyncCmd::Push {
            src,
            to,
            name,
            token_file,
            watch,
            journal,
            unified,
        } => {
            let token = token(&token_file)?;
            let opts = PushOptions {
                watch,
                journal,
                unified,
                ..Default::default()
            };
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            let stats = vsha_sync::push(&src, &to, &name, token, opts, shutdown, |s| {
                eprintln!(
                    "round {}: {} changed, {} deleted, {} bytes sent in {:.2} s{}",
                    s.seq,
                    s.files_changed,
                    s.files_deleted,
                    s.bytes_sent,
                    s.round_duration.as_secs_f64(),
                    if s.unchanged { " (unchanged)" } else { "" }
                );
            })
            .await?;
            println!(
                "{} -> {to} as {name}: snapshot {} ({} entries, {} bytes sent)",
                src.display(),
                stats.seq,
                stats.entries,
                stats.bytes_sent
            );
        }
        SyncCmd::Verify { a, b } => return verify(&a, &b),
    }
    Ok(0)
}

fn verify(a: &Path, b: &Path) -> anyhow::Result<i32> {
    let diffs = vsha_sync::verify(a, b)?;
    for d in &diffs {
        println!("{d}");
    }
    if diffs.is_empty() {
        println!("{} and {} are identical", a.display(), b.display());
        Ok(0)
    } else {
        eprintln!("{} difference(s)", diffs.len());
        Ok(1)
    }
}
