//! Transport security of the gRPC API (rustls). The coordinator serves its
//! certificate and, for mutual TLS, accepts only clients whose certificate
//! chains to a given CA; the files are looked at again every second and
//! re-read when they change, so a renewed certificate (cert-manager renews
//! before expiry, a Kubernetes Secret mount swaps files in place) takes
//! effect on the next connection without a restart. A client trusts a CA
//! file (or the system's roots) and may present a certificate of its own;
//! it reads them on every new connection, which picks up renewals too.
//! [`generate`] makes a CA and the certificates it signs, for a cluster
//! without its own PKI (`samtrain certs`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A TLS file that does not load, or a configuration rustls refuses.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {message}", .path.display())]
    File { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The coordinator's TLS files, all PEM.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    /// The certificate chain, the coordinator's own first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With it, mutual TLS: a client must present a certificate that
    /// chains to this CA before any call (tokens are still checked).
    pub client_ca: Option<PathBuf>,
}

/// What a client trusts and presents.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// The CA the coordinator's certificate must chain to; without it, the
    /// system's roots.
    pub ca: Option<PathBuf>,
    /// A certificate and key to present, for a coordinator that asks for
    /// one (mutual TLS).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name the coordinator's certificate must carry, when it is not
    /// the host of the address called (an IP address, a port-forward).
    pub server_name: Option<String>,
}

impl ClientTls {
    /// tonic's configuration, read from the files now.
    pub(crate) fn config(&self) -> Result<ClientTlsConfig, TlsError> {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca)?)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(config)
    }
}

/// Whether a connection error reads as one a TLS mismatch explains: the
/// server cut the connection off (it wanted TLS, or a client certificate)
/// or answered with something other than HTTP/2 (TLS to a plaintext
/// client).
pub(crate) fn cut_off_by_tls(error: &str) -> bool {
    [
        "CertificateRequired",
        "BadCertificate",
        "connection closed",
        "broken pipe",
        "h2 protocol error",
    ]
    .iter()
    .any(|s| error.contains(s))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// How often the server's files are looked at for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(1);
/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; connections past it are closed, so a
/// flood of stalled handshakes costs bounded memory.
const MAX_HANDSHAKES: usize = 256;

/// A file's modification time and length: a change in either reloads.
type Stamp = Option<(SystemTime, u64)>;

/// The server's configuration, rebuilt when its files change.
pub(crate) struct ReloadingServerTls {
    files: ServerTlsFiles,
    state: Mutex<Loaded>,
}

struct Loaded {
    config: Arc<ServerConfig>,
    stamps: Vec<Stamp>,
    checked: Instant,
}

impl ReloadingServerTls {
    /// Loads the files once; an error names the file.
    pub(crate) fn open(files: ServerTlsFiles) -> Result<ReloadingServerTls, TlsError> {
        let stamps = stamps(&files);
        let config = Arc::new(server_config(&files)?);
        Ok(ReloadingServerTls {
            files,
            state: Mutex::new(Loaded {
                config,
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    /// The configuration for a new connection. Files that changed but do
    /// not load (a renewal caught half-written) leave the previous
    /// configuration in use, with a warning, until they load.
    pub(crate) fn current(&self) -> Arc<ServerConfig> {
        let mut state = self.state.lock().expect("TLS state lock");
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = Instant::now();
            let now = stamps(&self.files);
            if now != state.stamps {
                match server_config(&self.files) {
                    Ok(config) => {
                        state.config = Arc::new(config);
                        state.stamps = now;
                        tracing::info!(cert = %self.files.cert.display(), "TLS files changed; new connections use them");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS files changed but do not load; serving with the previous ones")
                    }
                }
            }
        }
        state.config.clone()
    }
}

fn stamps(files: &ServerTlsFiles) -> Vec<Stamp> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    })
    .collect()
}

fn server_config(files: &ServerTlsFiles) -> Result<ServerConfig, TlsError> {
    let pem_error = |path: &Path, what: &str, e: rustls::pki_types::pem::Error| TlsError::File {
        path: path.to_owned(),
        message: format!("not a PEM {what}: {e}"),
    };
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(&files.cert, "certificate chain", e))?;
    if chain.is_empty() {
        return Err(TlsError::File {
            path: files.cert.clone(),
            message: "holds no certificate".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| pem_error(&files.key, "private key", e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in
                CertificateDer::pem_file_iter(ca).map_err(|e| pem_error(ca, "CA certificate", e))?
            {
                let cert = cert.map_err(|e| pem_error(ca, "CA certificate", e))?;
                roots.add(cert).map_err(|e| TlsError::File {
                    path: ca.clone(),
                    message: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::File {
                    path: ca.clone(),
                    message: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::File {
            path: files.key.clone(),
            message: format!("does not go with {}: {e}", files.cert.display()),
        })?;
    // gRPC is HTTP/2, which TLS clients ask for by ALPN.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The connections of `listener` once their TLS handshakes complete. The
/// handshakes run off the accept loop, each bounded in time, so a client
/// that stalls holds only its own connection. Accepting ends when the
/// stream is dropped.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingServerTls>,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (ready, stream) = mpsc::channel(64);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = ready.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(connection) => connection,
                Err(e) => {
                    // Out of file descriptors, mostly: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(%peer, limit = MAX_HANDSHAKES, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            // Small replies must not wait on Nagle's algorithm (see process.rs).
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.current());
            let ready = ready.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = ready.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(stream)
}

/// A CA and the certificates it signed, all PEM.
pub struct GeneratedCerts {
    pub ca_cert: String,
    pub ca_key: String,
    /// For the coordinators: valid for every host asked for.
    pub server_cert: String,
    pub server_key: String,
    /// For clients of a coordinator that requires one (mutual TLS).
    pub client_cert: String,
    pub client_key: String,
}

/// A new CA, a server certificate for `hosts` (names or IP addresses) and
/// a client certificate, valid from the start of this year for `years`
/// more years. Keys are ECDSA P-256.
pub fn generate(hosts: &[String], years: u32) -> Result<GeneratedCerts, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let failed = |e: rcgen::Error| TlsError::Config(format!("generating certificates: {e}"));
    let this_year = 1970
        + (SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            / 31_556_952) as i32;
    let dated = |mut params: CertificateParams, name: &str| {
        params.distinguished_name.push(DnType::CommonName, name);
        params.not_before = rcgen::date_time_ymd(this_year, 1, 1);
        params.not_after = rcgen::date_time_ymd(this_year + years as i32 + 1, 1, 1);
        params
    };
    // A name of its own: a verifier finds a certificate's issuer by name,
    // and two CAs of one name would fail as a bad signature, not as an
    // unknown issuer.
    let mut tag = [0u8; 4];
    getrandom::fill(&mut tag).map_err(|e| TlsError::Config(e.to_string()))?;
    let ca_name = format!("samtrain CA {}", crate::auth::hex(&tag));
    let mut ca = dated(CertificateParams::default(), &ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca =
        CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(failed)?).map_err(failed)?;
    let leaf = |names: Vec<String>, name: &str, usage: ExtendedKeyUsagePurpose| {
        let mut params = dated(CertificateParams::new(names).map_err(failed)?, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().map_err(failed)?;
        let cert = params.signed_by(&key, &ca).map_err(failed)?;
        Ok::<_, TlsError>((cert.pem(), key.serialize_pem()))
    };
    let (server_cert, server_key) = leaf(
        hosts.to_vec(),
        "samtrain coordinator",
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert, client_key) = leaf(
        Vec::new(),
        "samtrain client",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    Ok(GeneratedCerts {
        ca_cert: ca.pem(),
        ca_key: ca.key().serialize_pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
    })
}
