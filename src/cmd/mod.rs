//! One module per subcommand of `samtrain` (the benchmarks are in
//! `crate::bench`), and the arguments several of them share.

pub mod certs;
pub mod coordinator;
pub mod data;
pub mod demo;
pub mod etcd;
pub mod eval;
pub mod jobs;
pub mod ledger;
pub mod local;
pub mod model;
pub mod predict;
mod slots;
pub mod train;
pub mod worker;

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use samtrain_coordinator::auth::{Credentials, TokenSource};
use samtrain_coordinator::client::{Client, ClientTls};
use samtrain_coordinator::store::EtcdAccess;

/// Ends the process with this exit status once the command has said why.
/// `main` sends the trace spans still queued first, which
/// `std::process::exit` called from inside a command would drop: the spans
/// of a failed or stuck run are the ones worth reading.
#[derive(Debug)]
pub struct Exit(pub i32);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// Where the coordinators are, the token to present and the TLS to speak:
/// every command that talks to the control plane takes the same flags.
#[derive(Args, Clone, Debug)]
pub struct Coordinators {
    /// Coordinator addresses, comma-separated; the leader is found among
    /// them (a standby is skipped).
    #[arg(
        long = "coordinator",
        env = "SAMTRAIN_COORDINATOR",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:7070"
    )]
    pub addresses: Vec<String>,
    /// A file holding the token to present (its first token is used; it is
    /// read on each call, so a rotated token is picked up). Without it,
    /// `SAMTRAIN_TOKEN` holds the token itself; with neither, calls carry
    /// none (an open, loopback coordinator).
    #[arg(long, env = "SAMTRAIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Call over TLS, trusting this CA (PEM) for the coordinator's
    /// certificate. An `https://` address without it trusts the system's
    /// roots.
    #[arg(long, env = "SAMTRAIN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (PEM) to present, for a coordinator that
    /// requires one (`--tls-client-ca`); with `--tls-client-key`.
    #[arg(long, env = "SAMTRAIN_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    #[arg(long, env = "SAMTRAIN_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// The name the coordinator's certificate must carry, when it is not
    /// the host called (an IP address, a port-forward).
    #[arg(long, env = "SAMTRAIN_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
}

impl Coordinators {
    /// The `Jobs` client these flags describe.
    pub fn client(&self) -> Client {
        Client::new(self.addresses.clone(), self.credentials())
    }

    /// The credentials these flags give.
    pub fn credentials(&self) -> Credentials {
        let credentials = match &self.token_file {
            Some(path) => Credentials::token(TokenSource::File(path.clone())),
            None => Credentials::from_token_env(),
        };
        let tls = self.tls_ca.is_some()
            || self.tls_client_cert.is_some()
            || self.tls_server_name.is_some()
            || self.addresses.iter().any(|a| a.starts_with("https://"));
        if !tls {
            return credentials;
        }
        credentials.with_tls(ClientTls {
            ca: self.tls_ca.clone(),
            identity: self
                .tls_client_cert
                .clone()
                .zip(self.tls_client_key.clone()),
            server_name: self.tls_server_name.clone(),
        })
    }
}

/// How to reach an etcd that requires TLS or a user: the coordinator and
/// the worker take the same flags.
#[derive(Args, Clone, Debug)]
pub struct EtcdFlags {
    /// The CA (PEM) of etcd's server certificate, for `https://` endpoints.
    #[arg(long, env = "SAMTRAIN_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate (PEM) for an etcd with `--client-cert-auth`;
    /// with `--etcd-key`.
    #[arg(long, env = "SAMTRAIN_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, env = "SAMTRAIN_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// The etcd user, for an etcd with auth enabled; with
    /// `--etcd-password-file`.
    #[arg(long, env = "SAMTRAIN_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// A file whose first line is the etcd user's password.
    #[arg(long, env = "SAMTRAIN_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdFlags {
    pub fn access(&self) -> EtcdAccess {
        EtcdAccess {
            ca: self.etcd_ca.clone(),
            identity: self.etcd_cert.clone().zip(self.etcd_key.clone()),
            user: self.etcd_user.clone().zip(self.etcd_password_file.clone()),
        }
    }
}

/// Who may scrape `/metrics` on the health port: the coordinator and the
/// worker take the same flag.
#[derive(Args, Clone, Debug)]
pub struct MetricsFlags {
    /// A file whose first line (after `#` comments) is the bearer token
    /// Prometheus must present to scrape `/metrics`; without it, `/metrics`
    /// answers only on a loopback health listener.
    #[arg(long, env = "SAMTRAIN_METRICS_TOKEN_FILE")]
    pub metrics_token_file: Option<PathBuf>,
}

impl MetricsFlags {
    /// The token, read and checked now.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.metrics_token_file else {
            return Ok(None);
        };
        let size = std::fs::metadata(path)
            .with_context(|| format!("metrics token file {}", path.display()))?
            .len();
        anyhow::ensure!(
            size <= 4096,
            "metrics token file {}: {size} bytes, a token file is at most 4 KiB",
            path.display()
        );
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("metrics token file {}", path.display()))?;
        let token = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .with_context(|| format!("metrics token file {}: no token in it", path.display()))?;
        anyhow::ensure!(
            token.len() >= 16,
            "metrics token file {}: the token has {} characters, at least 16 are needed",
            path.display(),
            token.len()
        );
        Ok(Some(token.to_owned()))
    }
}
