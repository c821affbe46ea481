//! vshad: the vsha agent. Thin: parse flags, load the config (exit 64 when
//! it is bad), bind, run until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use vsha_agent::config::{AgentConfig, LogFormat, Overrides, DEFAULT_CONFIG_PATH};
use vsha_agent::tls::{Role, Security};

/// EX_CONFIG from sysexits.h: the configuration is unusable.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(name = "vshad", version, about = "The vsha agent: one per node")]
struct Args {
    /// Configuration file (TOML; see docs/config.md).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// This node's id (1 or more), unique in the cluster.
    #[arg(long, value_name = "N")]
    node_id: Option<u64>,
    /// Address for the gRPC server (operators and peers).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Address peers use to reach this node (default: --listen).
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Where the raft log and snapshots live.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Bootstrap a new cluster from these voters: ID=HOST:PORT,...
    #[arg(long, value_name = "ID=HOST:PORT,...")]
    initial_cluster: Option<String>,
    /// Join an existing cluster through this member (after `vsha node add`).
    #[arg(long, value_name = "HOST:PORT")]
    join: Option<String>,
    /// Log format: human or json.
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// Plaintext gRPC without TLS: tests and demos only.
    #[arg(long, env = "VSHA_INSECURE", conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    insecure: bool,
    /// The cluster CA certificate [default: /etc/vsha/pki/ca.crt].
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This node's certificate [default: /etc/vsha/pki/node.crt].
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// This node's private key [default: /etc/vsha/pki/node.key].
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VSHA_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,raft=warn,raft_engine=warn,h2=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    // `vshad guard` is the agent's own guard process (started by the agent,
    // see failover/guard.rs), not a command for operators.
    if std::env::args().nth(1).as_deref() == Some("guard") {
        init_logging(LogFormat::Human);
        vsha_agent::failover::guard::run_guard();
        return ExitCode::SUCCESS;
    }
    let args = Args::parse();
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let overrides = Overrides {
        node_id: args.node_id,
        listen: args.listen,
        advertise: args.advertise,
        data_dir: args.data_dir,
        initial_cluster: args.initial_cluster,
        join: args.join,
        log_format: args.log_format,
        insecure: args.insecure,
        tls_ca: args.tls_ca,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
    };
    let cfg = match AgentConfig::load(&path, explicit, overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vshad: bad configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let security = match &cfg.tls {
        None => Security::Insecure,
        Some(paths) => match Security::load(paths, Role::Node) {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "vshad: TLS: {e}\n\
                     Every agent needs the cluster CA and a node certificate: create them with \
                     `vsha cert init` and `vsha cert node NAME` (docs/operations.md), and set \
                     tls_ca/tls_cert/tls_key if they are not in /etc/vsha/pki; \
                     or run with --insecure (plaintext; tests and demos only)."
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    init_logging(cfg.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vshad: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(cfg, security)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("vshad: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cfg: AgentConfig, security: Security) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    vsha_agent::agent::run(cfg, security, listener, shutdown).await?;
    Ok(())
}
