//! `samtrain etcd enable-auth`: turns etcd's auth on, with samtrain's etcd
//! user as its root. The chart's hook runs it once the bundled members are
//! up; an operator of an external etcd can run it once by hand.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use samtrain_coordinator::store::etcd;

use super::EtcdFlags;

#[derive(Subcommand)]
pub enum EtcdCommand {
    /// Adds the `--etcd-user` with its password as etcd's root and turns
    /// auth on; does nothing when that user can already log in.
    EnableAuth(EnableAuthArgs),
}

#[derive(Args)]
pub struct EnableAuthArgs {
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "SAMTRAIN_ETCD", value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    #[command(flatten)]
    access: EtcdFlags,
    /// How long to wait for etcd to answer (members still starting).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    wait_s: u64,
}

pub fn run(command: EtcdCommand) -> Result<()> {
    let EtcdCommand::EnableAuth(args) = command;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let access = args.access.access();
    let deadline = Instant::now() + Duration::from_secs(args.wait_s);
    loop {
        match runtime.block_on(etcd::enable_auth(&args.etcd, &access)) {
            Ok(true) => {
                tracing::info!(endpoints = %args.etcd.join(","), "etcd auth turned on");
                return Ok(());
            }
            Ok(false) => {
                tracing::info!(endpoints = %args.etcd.join(","), "etcd auth was already on");
                return Ok(());
            }
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "etcd not ready; trying again in 2 s");
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(e) => return Err(e).context("turning etcd's auth on"),
        }
    }
}
