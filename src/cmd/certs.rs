//! `samtrain certs`: a CA, a coordinator certificate and a client
//! certificate, for serving the API over TLS (and mutual TLS) on a cluster
//! without its own PKI. Keys are written readable by their owner only, and
//! nothing is overwritten.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use samtrain_coordinator::tls;

#[derive(Args)]
pub struct CertsArgs {
    /// The folder to write into (created if missing).
    #[arg(long, default_value = "samtrain-tls")]
    out: PathBuf,
    /// A name or IP address clients call the coordinators by; repeat for
    /// each (every coordinator of a failover group shares the certificate).
    #[arg(long = "host", required = true)]
    hosts: Vec<String>,
    /// Years of validity after this one.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    years: u32,
}

pub fn run(args: CertsArgs) -> Result<()> {
    let made = tls::generate(&args.hosts, args.years)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let files = [
        ("ca.pem", &made.ca_cert, false),
        ("ca-key.pem", &made.ca_key, true),
        ("server.pem", &made.server_cert, false),
        ("server-key.pem", &made.server_key, true),
        ("client.pem", &made.client_cert, false),
        ("client-key.pem", &made.client_key, true),
    ];
    for (name, _, _) in &files {
        let path = args.out.join(name);
        if path.exists() {
            bail!(
                "{} exists; samtrain certs does not overwrite (remove the folder's files to make new ones)",
                path.display()
            );
        }
    }
    for (name, pem, secret) in files {
        write(&args.out.join(name), pem, secret)?;
    }
    let d = args.out.display();
    println!(
        "wrote a CA and certificates for {} to {d}\n\
         coordinator: --tls-cert {d}/server.pem --tls-key {d}/server-key.pem [--tls-client-ca {d}/ca.pem]\n\
         clients:     --tls-ca {d}/ca.pem [--tls-client-cert {d}/client.pem --tls-client-key {d}/client-key.pem]\n\
         keep ca-key.pem offline: it signs certificates anyone would trust",
        args.hosts.join(", ")
    );
    Ok(())
}

fn write(path: &Path, pem: &str, secret: bool) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(pem.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
