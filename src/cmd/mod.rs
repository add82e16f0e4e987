//! One module per subcommand of `samtrain` (the benchmarks are in
//! `crate::bench`), and the arguments several of them share.

pub mod coordinator;
pub mod data;
pub mod demo;
pub mod eval;
pub mod jobs;
pub mod local;
pub mod model;
pub mod predict;
pub mod train;
pub mod worker;

use std::path::PathBuf;

use clap::Args;
use samtrain_coordinator::auth::{Credentials, TokenSource};
use samtrain_coordinator::client::Client;

/// Where the coordinators are and the token to present: every command that
/// talks to the control plane takes the same flags.
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
}

impl Coordinators {
    /// The `Jobs` client these flags describe.
    pub fn client(&self) -> Client {
        Client::new(self.addresses.clone(), self.credentials())
    }

    /// The credentials these flags give.
    pub fn credentials(&self) -> Credentials {
        match &self.token_file {
            Some(path) => Credentials::token(TokenSource::File(path.clone())),
            None => Credentials::from_token_env(),
        }
    }
}
