//! `samtrain coordinator`: runs one coordinator, the control plane: the
//! gRPC API, leader election (with etcd; a second one is a standby that
//! takes over) and the health probes. Without `--etcd` it runs embedded, in
//! memory. Every flag also reads an env var (`SAMTRAIN_*`), which the Helm
//! chart sets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use samtrain_coordinator::auth::{AuthOptions, TokenSource};
use samtrain_coordinator::tls::ServerTlsFiles;
use samtrain_coordinator::{CoordinatorOptions, History};

#[derive(Args)]
pub struct CoordinatorArgs {
    /// gRPC listen address.
    #[arg(long, env = "SAMTRAIN_LISTEN", default_value = "0.0.0.0:7070")]
    listen: SocketAddr,
    /// `/healthz`, `/readyz` (200 only on the leader) and `/metrics`.
    #[arg(long, env = "SAMTRAIN_HEALTH_LISTEN", default_value = "0.0.0.0:7071")]
    health_listen: SocketAddr,
    /// etcd endpoints, comma-separated; none runs embedded (in memory).
    #[arg(long, env = "SAMTRAIN_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// The prefix of every key in etcd.
    #[arg(long, env = "SAMTRAIN_ETCD_PREFIX", default_value = "/samtrain")]
    etcd_prefix: String,
    #[command(flatten)]
    etcd_flags: super::EtcdFlags,
    #[command(flatten)]
    metrics: super::MetricsFlags,
    /// This coordinator's name in the election (default: the host name).
    #[arg(long, env = "SAMTRAIN_NODE_ID")]
    node_id: Option<String>,
    /// Lease TTL in seconds, of the leader and (by default) the workers.
    #[arg(long, env = "SAMTRAIN_LEASE_TTL", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    lease_ttl: u64,
    /// The address standbys give clients for this node when it leads
    /// (default: the bound listen address).
    #[arg(long, env = "SAMTRAIN_ADVERTISE")]
    advertise: Option<String>,
    /// A file of operator tokens (one per line, `#` comments), re-read when
    /// it changes: they may submit, cancel, get, list and watch jobs.
    #[arg(long, env = "SAMTRAIN_OPERATOR_TOKENS_FILE")]
    operator_tokens: Option<PathBuf>,
    /// A file of worker tokens, the same way: they may register workers,
    /// keep their leases and report.
    #[arg(long, env = "SAMTRAIN_WORKER_TOKENS_FILE")]
    worker_tokens: Option<PathBuf>,
    /// Serve gRPC over TLS with this certificate chain (PEM); re-read when
    /// it changes. With `--tls-key`.
    #[arg(long, env = "SAMTRAIN_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `--tls-cert`.
    #[arg(long, env = "SAMTRAIN_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: only clients presenting a certificate that chains to
    /// this CA (PEM) may connect; tokens are still checked.
    #[arg(long, env = "SAMTRAIN_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve without tokens, or without TLS, on a non-loopback address:
    /// anyone who reaches it (or sees its traffic) controls every job. Only
    /// for networks where that is true anyway.
    #[arg(long, env = "SAMTRAIN_INSECURE")]
    insecure: bool,
    /// Finished jobs kept in the history (`samtrain list`); older ones go.
    #[arg(long, env = "SAMTRAIN_HISTORY_JOBS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    history_jobs: u64,
    /// Days a finished job stays in the history.
    #[arg(long, env = "SAMTRAIN_HISTORY_DAYS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3650))]
    history_days: u64,
}

pub fn run(args: CoordinatorArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: CoordinatorArgs) -> Result<()> {
    let node_id = args.node_id.unwrap_or_else(|| {
        std::env::var("HOSTNAME").unwrap_or_else(|_| format!("coordinator-{}", std::process::id()))
    });
    let running = samtrain_coordinator::run(CoordinatorOptions {
        listen: args.listen,
        health_listen: Some(args.health_listen),
        etcd: args.etcd,
        etcd_access: args.etcd_flags.access(),
        prefix: args.etcd_prefix,
        node_id,
        lease_ttl: Duration::from_secs(args.lease_ttl),
        advertise: args.advertise,
        auth: AuthOptions {
            operator: args
                .operator_tokens
                .map(TokenSource::File)
                .into_iter()
                .collect(),
            worker: args
                .worker_tokens
                .map(TokenSource::File)
                .into_iter()
                .collect(),
        },
        tls: args
            .tls_cert
            .zip(args.tls_key)
            .map(|(cert, key)| ServerTlsFiles {
                cert,
                key,
                client_ca: args.tls_client_ca,
            }),
        insecure: args.insecure,
        history: History {
            max_jobs: args.history_jobs as usize,
            max_age: Duration::from_secs(args.history_days * 86_400),
        },
        metrics_token: args.metrics.token()?,
    })
    .await
    .context("starting the coordinator")?;
    eprintln!(
        "coordinator on {} (health on {})",
        running.addr(),
        running
            .health_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down; handing the leadership over");
    running.shutdown().await.context("stopping the coordinator")
}
