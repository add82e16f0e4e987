//! Running a coordinator process: check the options, open the store, bind
//! the gRPC listener, campaign in the election, serve the probes, start the
//! reconcile loop and the gRPC services, and on shutdown hand the
//! leadership over before the streams close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use samtrain_proto::v1::jobs_server::JobsServer;
use samtrain_proto::v1::workers_server::WorkersServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use crate::auth::{AuthError, AuthOptions, Guard, Role, ServerAuth};
use crate::control::{Control, History};
use crate::dashboard::Dashboard;
use crate::election::{Election, LeaderInfo};
use crate::grpc_timing::GrpcTiming;
use crate::health::{self, HealthServer};
use crate::metrics::MetricsEndpoint;
use crate::records::Keys;
use crate::server::Service;
use crate::store::{self, EtcdAccess, StoreError};
use crate::tasks::AbortOnDrop;
use crate::tls::{self, ReloadingServerTls, ServerTlsFiles, TlsError};

/// How to run a coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// gRPC listen address (port 0 picks a free one).
    pub listen: SocketAddr,
    /// `/healthz` and `/readyz`; none to serve no probes.
    pub health_listen: Option<SocketAddr>,
    /// etcd endpoints; empty runs embedded, on the in-memory store.
    pub etcd: Vec<String>,
    /// etcd's TLS and user, when it requires them.
    pub etcd_access: EtcdAccess,
    /// The store prefix of every key, default `/samtrain`.
    pub prefix: String,
    /// This coordinator's name in the election.
    pub node_id: String,
    /// The TTL of the leader's lease and the default of the workers'.
    pub lease_ttl: Duration,
    /// The address standbys name for this node when it leads; default the
    /// bound gRPC address.
    pub advertise: Option<String>,
    /// The tokens of each role; none at all leaves the API open, which
    /// only a loopback `listen` or `insecure` allows.
    pub auth: AuthOptions,
    /// The certificate and key to serve gRPC over TLS (and the CA of
    /// client certificates, for mutual TLS); none serves plaintext, which
    /// only a loopback `listen` or `insecure` allows.
    pub tls: Option<ServerTlsFiles>,
    /// Serve an open or plaintext API on a non-loopback address (logged as
    /// a warning).
    pub insecure: bool,
    /// How many finished jobs, and for how long, stay listed.
    pub history: History,
    /// The bearer token `/metrics` asks scrapers for; none serves the
    /// metrics on a loopback health listener only.
    pub metrics_token: Option<String>,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        CoordinatorOptions {
            listen: SocketAddr::from(([0, 0, 0, 0], 7070)),
            health_listen: None,
            etcd: Vec::new(),
            etcd_access: EtcdAccess::default(),
            prefix: "/samtrain".to_owned(),
            node_id: format!("coordinator-{}", std::process::id()),
            lease_ttl: Duration::from_secs(5),
            advertise: None,
            auth: AuthOptions::default(),
            tls: None,
            insecure: false,
            history: History::default(),
            metrics_token: None,
        }
    }
}

/// What can stop a coordinator from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server on {addr} failed: {source}")]
    Serve {
        addr: SocketAddr,
        source: tonic::transport::Error,
    },
    #[error("invalid option: {0}")]
    Option(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

/// A started coordinator.
pub struct RunningCoordinator {
    addr: SocketAddr,
    health: Option<HealthServer>,
    control: Arc<Control>,
    stop: Option<oneshot::Sender<()>>,
    serving: JoinHandle<Result<(), CoordinatorError>>,
    _loop: AbortOnDrop<()>,
}

impl RunningCoordinator {
    /// The bound gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound health address, when serving probes.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.as_ref().map(HealthServer::addr)
    }

    /// Whether this coordinator leads now.
    pub fn is_leader(&self) -> bool {
        self.control.is_leader()
    }

    /// Waits until this coordinator leads.
    pub async fn until_leader(&self) {
        let mut state = self.control.leadership();
        while !state.borrow_and_update().is_leader {
            if state.changed().await.is_err() {
                return;
            }
        }
    }

    /// Serves until the server fails or [`RunningCoordinator::shutdown`].
    pub async fn wait(mut self) -> Result<(), CoordinatorError> {
        let serving = std::mem::replace(&mut self.serving, tokio::spawn(async { Ok(()) }));
        serving.await.unwrap_or(Ok(()))
    }

    /// Hands the leadership over at once (the workers' streams end, so
    /// their agents move to the new leader) and stops serving; streams
    /// still open after 2 s are cut.
    pub async fn shutdown(mut self) -> Result<(), CoordinatorError> {
        self.control.step_down().await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let serving = std::mem::replace(&mut self.serving, tokio::spawn(async { Ok(()) }));
        let abort = serving.abort_handle();
        match tokio::time::timeout(Duration::from_secs(2), serving).await {
            Ok(result) => result.unwrap_or(Ok(())),
            Err(_) => {
                abort.abort();
                Ok(())
            }
        }
    }
}

/// Starts a coordinator: opens the store (an unreachable etcd fails within
/// a few seconds, naming the endpoints), campaigns for leadership, serves
/// gRPC on `listen` and the probes on `health_listen`.
pub async fn run(options: CoordinatorOptions) -> Result<RunningCoordinator, CoordinatorError> {
    let prefix = checked_prefix(&options)?;
    let auth = checked_auth(&options)?;
    let tls = checked_tls(&options)?;
    let store = store::open(&options.etcd, &options.etcd_access).await?;
    let (listener, addr) = bind(options.listen).await?;
    let advertise = options
        .advertise
        .clone()
        .unwrap_or_else(|| addr.to_string());
    let me = LeaderInfo {
        node_id: options.node_id.clone(),
        address: advertise,
    };
    let election = Election::start(store.clone(), &prefix, me, options.lease_ttl);
    settle(&election).await;
    let control = Arc::new(Control::new(
        store,
        Keys::new(&prefix),
        options.lease_ttl,
        election,
        options.history,
    ));
    let health = match options.health_listen {
        Some(listen) => {
            let dashboard = Dashboard::start(control.clone(), auth.clone());
            Some(
                serve_health(
                    listen,
                    control.clone(),
                    options.metrics_token.clone(),
                    dashboard,
                )
                .await?,
            )
        }
        None => None,
    };
    let reconcile = AbortOnDrop(tokio::spawn(control.clone().run_loop()));
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = serve_grpc(listener, addr, control.clone(), auth, tls, stopped);
    tracing::info!(
        %addr,
        node = %options.node_id,
        store = %control.store_description(),
        tls = options.tls.is_some(),
        mutual_tls = options.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        "coordinator serving"
    );
    Ok(RunningCoordinator {
        addr,
        health,
        control,
        stop: Some(stop),
        serving,
        _loop: reconcile,
    })
}

/// The store prefix without its trailing `/`, once the lease TTL and the
/// prefix are known to be usable.
fn checked_prefix(options: &CoordinatorOptions) -> Result<String, CoordinatorError> {
    if options.lease_ttl < Duration::from_secs(1) {
        return Err(CoordinatorError::Option(format!(
            "lease TTL must be at least 1 s (etcd counts in seconds), got {:?}",
            options.lease_ttl
        )));
    }
    let prefix = options.prefix.trim_end_matches('/').to_owned();
    if prefix.is_empty() || !prefix.starts_with('/') {
        return Err(CoordinatorError::Option(format!(
            "the store prefix must start with `/`, got `{}`",
            options.prefix
        )));
    }
    Ok(prefix)
}

/// The tokens to check, or none for an open API, which is refused on a
/// non-loopback address unless the options say `insecure`.
fn checked_auth(options: &CoordinatorOptions) -> Result<Option<Arc<ServerAuth>>, CoordinatorError> {
    if !options.auth.is_open() {
        return Ok(Some(Arc::new(ServerAuth::open(&options.auth)?)));
    }
    allowed_off_loopback(
        options,
        "without tokens would let anyone who reaches it submit, cancel and forge reports; \
         give --operator-tokens and --worker-tokens (docs/SECURITY.md)",
        "INSECURE: the coordinator's API is open to anyone who reaches this address (--insecure)",
    )?;
    Ok(None)
}

/// The TLS configuration, or none for plaintext, which is refused on a
/// non-loopback address unless the options say `insecure`: tokens would
/// cross the network in clear.
fn checked_tls(
    options: &CoordinatorOptions,
) -> Result<Option<Arc<ReloadingServerTls>>, CoordinatorError> {
    if let Some(files) = &options.tls {
        return Ok(Some(Arc::new(ReloadingServerTls::open(files.clone())?)));
    }
    allowed_off_loopback(
        options,
        "without TLS would send every token and job spec in clear; \
         give --tls-cert and --tls-key (`samtrain certs` makes a set; docs/SECURITY.md)",
        "INSECURE: the coordinator's API is served without TLS (--insecure)",
    )?;
    Ok(None)
}

/// What an unprotected API (no tokens, or no TLS) is allowed: loopback
/// always; any other address only with `insecure`, logged as `warning`.
/// Refused otherwise, saying `what_to_give`.
fn allowed_off_loopback(
    options: &CoordinatorOptions,
    what_to_give: &str,
    warning: &'static str,
) -> Result<(), CoordinatorError> {
    if options.listen.ip().is_loopback() {
        return Ok(());
    }
    if !options.insecure {
        return Err(CoordinatorError::Option(format!(
            "listening on {} {what_to_give}, listen on 127.0.0.1, or say --insecure",
            options.listen
        )));
    }
    tracing::warn!(listen = %options.listen, "{warning}");
    Ok(())
}

/// The gRPC listener and the address it is bound to (port 0 resolved).
async fn bind(listen: SocketAddr) -> Result<(TcpListener, SocketAddr), CoordinatorError> {
    let failed = |source| CoordinatorError::Listen {
        addr: listen,
        source,
    };
    let listener = TcpListener::bind(listen).await.map_err(failed)?;
    let addr = listener.local_addr().map_err(failed)?;
    Ok((listener, addr))
}

/// Lets the first round of the election settle (up to 3 s), so a caller
/// that submits right after [`run`] finds a leader (at once when embedded).
async fn settle(election: &Election) {
    let mut first = election.subscribe();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while !first.borrow_and_update().store_ok {
            if first.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
}

/// `/healthz` and `/readyz` (ready while this node leads), `/metrics` and
/// the dashboard.
async fn serve_health(
    listen: SocketAddr,
    control: Arc<Control>,
    metrics_token: Option<String>,
    dashboard: Arc<Dashboard>,
) -> Result<HealthServer, CoordinatorError> {
    let metrics = MetricsEndpoint {
        render: {
            let control = control.clone();
            Arc::new(move || {
                let control = control.clone();
                Box::pin(async move { control.render_metrics().await })
            })
        },
        token: metrics_token,
    };
    let ready: health::Readiness = Arc::new(move || control.readiness());
    let routes = health::Routes {
        metrics: Some(metrics),
        ui: Some(dashboard.handler()),
    };
    health::serve(listen, ready, routes)
        .await
        .map_err(|source| CoordinatorError::Listen {
            addr: listen,
            source,
        })
}

/// Serves the `Jobs` service to operators and the `Workers` service to
/// workers, over TLS when given, until `stopped` fires.
fn serve_grpc(
    listener: TcpListener,
    addr: SocketAddr,
    control: Arc<Control>,
    auth: Option<Arc<ServerAuth>>,
    tls: Option<Arc<ReloadingServerTls>>,
    stopped: oneshot::Receiver<()>,
) -> JoinHandle<Result<(), CoordinatorError>> {
    let timing = GrpcTiming {
        control: control.clone(),
    };
    let service = Service::new(control);
    let operators = Guard {
        auth: auth.clone(),
        role: Role::Operator,
    };
    let workers = Guard {
        auth,
        role: Role::Worker,
    };
    let router = tonic::transport::Server::builder()
        .layer(timing)
        .add_service(JobsServer::with_interceptor(service.clone(), operators))
        .add_service(WorkersServer::with_interceptor(service, workers));
    let stopped = async {
        let _ = stopped.await;
    };
    tokio::spawn(async move {
        match tls {
            Some(tls) => {
                router
                    .serve_with_incoming_shutdown(tls::incoming(listener, tls), stopped)
                    .await
            }
            None => {
                // Without TCP_NODELAY a small reply waits on Nagle's
                // algorithm and the client's delayed ACK: 12.7 ms per
                // sequential call on loopback instead of 0.36 ms
                // (docs/PERFORMANCE.md).
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                router.serve_with_incoming_shutdown(incoming, stopped).await
            }
        }
        .map_err(|source| CoordinatorError::Serve { addr, source })
    })
}
