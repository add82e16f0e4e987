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

use clap::Args;

/// Where the coordinators are: every command that talks to the control
/// plane takes the same flag.
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
}
