//! The coordinator process: the `Jobs` and `Workers` gRPC services (tonic)
//! over the leader's [`Control`], the election, the reconcile loop and the
//! health endpoint, started together by [`run`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use samtrain_proto::spec::JobSpec;
use samtrain_proto::v1;
use samtrain_proto::v1::jobs_server::{Jobs, JobsServer};
use samtrain_proto::v1::workers_server::{Workers, WorkersServer};
use tokio::sync::{broadcast, oneshot, Mutex, Notify};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::control::{event, Control, Ending, View};
use crate::election::{Election, LeaderInfo};
use crate::health::{self, HealthServer};
use crate::jobs::{CheckpointRecord, JobRecord, JobState};
use crate::records::{new_worker_id, now_ms, random_suffix, Keys, WorkerRecord};
use crate::store::{self, Compare, Op, StoreError};
use crate::tasks::AbortOnDrop;

/// How to run a coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// gRPC listen address (port 0 picks a free one).
    pub listen: SocketAddr,
    /// `/healthz` and `/readyz`; none to serve no probes.
    pub health_listen: Option<SocketAddr>,
    /// etcd endpoints; empty runs embedded, on the in-memory store.
    pub etcd: Vec<String>,
    /// The store prefix of every key, default `/samtrain`.
    pub prefix: String,
    /// This coordinator's name in the election.
    pub node_id: String,
    /// The TTL of the leader's lease and the default of the workers'.
    pub lease_ttl: Duration,
    /// The address standbys name for this node when it leads; default the
    /// bound gRPC address.
    pub advertise: Option<String>,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        CoordinatorOptions {
            listen: SocketAddr::from(([0, 0, 0, 0], 7070)),
            health_listen: None,
            etcd: Vec::new(),
            prefix: "/samtrain".to_owned(),
            node_id: format!("coordinator-{}", std::process::id()),
            lease_ttl: Duration::from_secs(5),
            advertise: None,
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
}

/// A started coordinator.
pub struct RunningCoordinator {
    addr: SocketAddr,
    health: Option<HealthServer>,
    control: Arc<Control>,
    stop: Option<oneshot::Sender<()>>,
    serving: tokio::task::JoinHandle<Result<(), CoordinatorError>>,
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
        self.control.election.state().is_leader
    }

    /// Waits until this coordinator leads.
    pub async fn until_leader(&self) {
        let mut state = self.control.election.subscribe();
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
        self.control.election.resign().await;
        // Dropping the workers' feeds ends their streams now.
        *self.control.view.lock().await = View::default();
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
    let store = store::open(&options.etcd).await?;
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| CoordinatorError::Listen {
            addr: options.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| CoordinatorError::Listen {
            addr: options.listen,
            source,
        })?;
    let advertise = options
        .advertise
        .clone()
        .unwrap_or_else(|| addr.to_string());
    let election = Election::start(
        store.clone(),
        &prefix,
        LeaderInfo {
            node_id: options.node_id.clone(),
            address: advertise,
        },
        options.lease_ttl,
    );
    // Let the first round of the election settle, so a caller that
    // submits right after `run` finds a leader (at once when embedded).
    let mut first = election.subscribe();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while !first.borrow_and_update().store_ok {
            if first.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    let control = Arc::new(Control {
        store,
        keys: Keys::new(&prefix),
        lease_ttl: options.lease_ttl,
        election,
        view: Mutex::new(View::default()),
        events: broadcast::channel(1024).0,
        wake: Notify::new(),
    });
    let health =
        match options.health_listen {
            Some(listen) => {
                let c = control.clone();
                let ready: health::Readiness = Arc::new(move || {
                    let s = c.election.state();
                    if !s.store_ok {
                        Err(format!("store {} unreachable", c.store.describe()))
                    } else if !s.is_leader {
                        Err("standby (not the leader)".to_owned())
                    } else {
                        Ok(())
                    }
                });
                Some(health::serve(listen, ready).await.map_err(|source| {
                    CoordinatorError::Listen {
                        addr: listen,
                        source,
                    }
                })?)
            }
            None => None,
        };
    let reconcile = AbortOnDrop(tokio::spawn(control.clone().run_loop()));
    let (stop, stopped) = oneshot::channel::<()>();
    let service = Service {
        control: control.clone(),
    };
    let serving = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(JobsServer::new(service.clone()))
            .add_service(WorkersServer::new(service))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            })
            .await
            .map_err(|source| CoordinatorError::Serve { addr, source })
    });
    tracing::info!(%addr, node = %options.node_id, store = %control.store.describe(), "coordinator serving");
    Ok(RunningCoordinator {
        addr,
        health,
        control,
        stop: Some(stop),
        serving,
        _loop: reconcile,
    })
}

#[derive(Clone)]
struct Service {
    control: Arc<Control>,
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn not_found(job_id: &str) -> Status {
    Status::not_found(format!("no job {job_id}"))
}

#[tonic::async_trait]
impl Jobs for Service {
    async fn submit(
        &self,
        request: Request<v1::SubmitRequest>,
    ) -> Result<Response<v1::SubmitResponse>, Status> {
        let r = request.into_inner();
        let source = (!r.source_name.is_empty()).then_some(r.source_name.as_str());
        let spec = JobSpec::from_toml(&r.spec_toml, source)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let c = &self.control;
        let mut view = c.lead().await?;
        let id = loop {
            let id = format!("{}-{}", spec.name, random_suffix());
            if !view.jobs.contains_key(&id) {
                break id;
            }
        };
        let job = JobRecord::new(id.clone(), &spec, r.spec_toml, now_ms());
        let created = c
            .store
            .txn(
                vec![c.election.guard(), Compare::Absent(c.keys.job(&id))],
                vec![Op::Put {
                    key: c.keys.job(&id),
                    value: serde_json::to_vec(&job).expect("job record serialises"),
                    lease: None,
                }],
            )
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if !created {
            return Err(Status::unavailable(
                "not the leader any more; submit again to the new leader",
            ));
        }
        tracing::info!(job = %id, "job submitted");
        view.jobs.insert(id.clone(), job);
        drop(view);
        c.wake.notify_one();
        Ok(Response::new(v1::SubmitResponse { job_id: id }))
    }

    async fn get(&self, request: Request<v1::GetJobRequest>) -> Result<Response<v1::Job>, Status> {
        let id = request.into_inner().job_id;
        let view = self.control.lead().await?;
        let job = view.jobs.get(&id).ok_or_else(|| not_found(&id))?;
        Ok(Response::new(job.to_proto()))
    }

    async fn list(
        &self,
        _request: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        let view = self.control.lead().await?;
        let mut jobs: Vec<&JobRecord> = view.jobs.values().collect();
        jobs.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        Ok(Response::new(v1::ListJobsResponse {
            jobs: jobs.into_iter().map(JobRecord::to_proto).collect(),
        }))
    }

    async fn cancel(
        &self,
        request: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let id = request.into_inner().job_id;
        let c = &self.control;
        let mut view = c.lead().await?;
        let job = view.jobs.get(&id).ok_or_else(|| not_found(&id))?;
        if job.state.is_terminal() {
            return Err(Status::failed_precondition(format!(
                "job {id} already {}",
                job.state.name()
            )));
        }
        let job = c.end(&mut view, &id, Ending::Cancel).await?;
        Ok(Response::new(job.to_proto()))
    }

    type WatchStream = EventStream<v1::JobEvent>;

    async fn watch(
        &self,
        request: Request<v1::WatchJobRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let id = request.into_inner().job_id;
        let c = self.control.clone();
        // Subscribe before the snapshot so no change falls in between.
        let mut events = c.events.subscribe();
        let view = c.lead().await?;
        let job = view.jobs.get(&id).ok_or_else(|| not_found(&id))?.clone();
        drop(view);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let terminal = job.state.is_terminal();
            if tx
                .send(Ok(event(
                    &id,
                    v1::job_event::Event::Snapshot(job.to_proto()),
                )))
                .await
                .is_err()
            {
                return;
            }
            if terminal {
                return;
            }
            let mut leadership = c.election.subscribe();
            loop {
                tokio::select! {
                    e = events.recv() => match e {
                        Ok(e) if e.job_id == id => {
                            let last = matches!(e.event, Some(v1::job_event::Event::Finished(_)));
                            if tx.send(Ok(e)).await.is_err() || last {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(job = %id, skipped = n, "a watcher fell behind");
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    changed = leadership.changed() => {
                        if changed.is_err() || !leadership.borrow().is_leader {
                            let _ = tx.send(Err(Status::unavailable("the coordinator lost the leadership; watch again"))).await;
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl Service {
    async fn worker(&self, worker_id: &str) -> Result<(WorkerRecord, Option<i64>), Status> {
        let c = &self.control;
        let kv = c
            .store
            .get(&c.keys.worker(worker_id))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "worker {worker_id} is not registered (or its lease expired); register again"
                ))
            })?;
        let record = serde_json::from_slice(&kv.value).map_err(|e| {
            Status::internal(format!("unreadable record of worker {worker_id}: {e}"))
        })?;
        Ok((record, kv.lease))
    }

    /// Checks that a report comes from a member of the job's current
    /// generation; `Ok(None)` when it is stale.
    fn current<'v>(
        view: &'v View,
        job_id: &str,
        generation: u64,
        worker_id: &str,
    ) -> Result<Option<&'v JobRecord>, Status> {
        let job = view.jobs.get(job_id).ok_or_else(|| not_found(job_id))?;
        Ok((job.state == JobState::Running
            && job.generation == generation
            && job.member(worker_id).is_some())
        .then_some(job))
    }
}

#[tonic::async_trait]
impl Workers for Service {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let r = request.into_inner();
        let c = &self.control;
        let port_ok = r
            .advertise
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(Status::invalid_argument(format!(
                "advertise address `{}` must be host:port (where peers reach this worker's collectives)",
                r.advertise
            )));
        }
        let worker_id = if r.worker_id.is_empty() {
            new_worker_id(&r.name)
        } else {
            r.worker_id.clone()
        };
        let ttl_s = if r.lease_ttl_s == 0 {
            c.lease_ttl.as_secs().max(1) as u32
        } else {
            r.lease_ttl_s
        };
        let own_lease = r.lease_id != 0;
        let lease = if own_lease {
            r.lease_id
        } else {
            c.store
                .grant(Duration::from_secs(ttl_s as u64))
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?
        };
        let record = WorkerRecord {
            worker_id: worker_id.clone(),
            name: r.name.clone(),
            advertise: r.advertise.clone(),
            device: r.device.clone(),
            registered_unix_ms: now_ms(),
            own_lease,
        };
        c.store
            .put(&c.keys.worker(&worker_id), record.to_json(), Some(lease))
            .await
            .map_err(|e| match e {
                StoreError::LeaseNotFound { .. } => {
                    Status::failed_precondition(format!("cannot register worker {worker_id}: {e}"))
                }
                e => Status::unavailable(e.to_string()),
            })?;
        tracing::info!(worker = %worker_id, advertise = %r.advertise, device = %r.device, own_lease, "worker registered");
        c.wake.notify_one();
        Ok(Response::new(v1::RegisterResponse {
            worker_id,
            lease_id: lease,
            lease_ttl_s: ttl_s,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let id = request.into_inner().worker_id;
        let (_, lease) = self.worker(&id).await?;
        let lease = lease
            .ok_or_else(|| Status::failed_precondition(format!("worker {id} has no lease")))?;
        let ttl = self
            .control
            .store
            .keep_alive(lease)
            .await
            .map_err(|e| match e {
                StoreError::LeaseNotFound { .. } => {
                    Status::not_found(format!("the lease of worker {id} expired; register again"))
                }
                e => Status::unavailable(e.to_string()),
            })?;
        Ok(Response::new(v1::HeartbeatResponse {
            lease_ttl_s: ttl.as_secs() as u32,
        }))
    }

    type SubscribeStream = EventStream<v1::WorkerEvent>;

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = request.into_inner();
        self.control.ensure_leader()?;
        let (record, _) = self.worker(&r.worker_id).await?;
        let rx = self.control.subscribe(record, r.current).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_progress(
        &self,
        request: Request<v1::ProgressReport>,
    ) -> Result<Response<v1::Ack>, Status> {
        let r = request.into_inner();
        let c = &self.control;
        let mut view = c.lead().await?;
        let Some(job) = Self::current(&view, &r.job_id, r.generation, &r.worker_id)? else {
            return Ok(Response::new(v1::Ack { stale: true }));
        };
        // Rank 0 speaks for the job; the other ranks' figures would repeat it.
        let (Some(p), 0) = (r.progress, r.rank) else {
            return Ok(Response::new(v1::Ack { stale: false }));
        };
        let mut job = job.clone();
        job.step = p.step;
        if p.total_steps > 0 {
            job.total_steps = p.total_steps;
        }
        job.loss = Some(p.loss);
        job.updated_unix_ms = now_ms();
        c.save(&job).await?;
        view.jobs.insert(job.id.clone(), job);
        let _ = c
            .events
            .send(event(&r.job_id, v1::job_event::Event::Progress(p)));
        Ok(Response::new(v1::Ack { stale: false }))
    }

    async fn report_checkpoint(
        &self,
        request: Request<v1::CheckpointReport>,
    ) -> Result<Response<v1::Ack>, Status> {
        let r = request.into_inner();
        let c = &self.control;
        let mut view = c.lead().await?;
        let job = view
            .jobs
            .get(&r.job_id)
            .ok_or_else(|| not_found(&r.job_id))?;
        let Some(ck) = r.checkpoint else {
            return Err(Status::invalid_argument(
                "a checkpoint report needs its checkpoint",
            ));
        };
        // A committed checkpoint stays valid whatever became of its
        // generation; only a newer one replaces the hint.
        if job
            .checkpoint
            .as_ref()
            .is_some_and(|old| old.step >= ck.step)
        {
            return Ok(Response::new(v1::Ack { stale: true }));
        }
        let mut job = job.clone();
        job.checkpoint = Some(CheckpointRecord {
            step: ck.step,
            url: ck.url.clone(),
        });
        job.updated_unix_ms = now_ms();
        c.save(&job).await?;
        view.jobs.insert(job.id.clone(), job);
        tracing::info!(job = %r.job_id, step = ck.step, url = %ck.url, "checkpoint committed");
        let _ = c.events.send(event(
            &r.job_id,
            v1::job_event::Event::CheckpointCommitted(ck),
        ));
        Ok(Response::new(v1::Ack { stale: false }))
    }

    async fn report_outcome(
        &self,
        request: Request<v1::OutcomeReport>,
    ) -> Result<Response<v1::Ack>, Status> {
        let r = request.into_inner();
        let c = &self.control;
        let mut view = c.lead().await?;
        let Some(job) = Self::current(&view, &r.job_id, r.generation, &r.worker_id)? else {
            return Ok(Response::new(v1::Ack { stale: true }));
        };
        let member = job
            .member(&r.worker_id)
            .expect("current() checked membership")
            .clone();
        match r.outcome {
            Some(v1::outcome_report::Outcome::Completed(done)) => {
                if member.rank != 0 {
                    return Ok(Response::new(v1::Ack { stale: false }));
                }
                let mut job = job.clone();
                if let Some(ck) = done.checkpoint {
                    if job.checkpoint.as_ref().is_none_or(|old| old.step < ck.step) {
                        job.checkpoint = Some(CheckpointRecord {
                            step: ck.step,
                            url: ck.url,
                        });
                    }
                }
                let eval: BTreeMap<String, f64> = done.eval.into_iter().collect();
                let members = job.succeed(done.step, eval, now_ms());
                c.save(&job).await?;
                tracing::info!(job = %job.id, step = job.step, eval = ?job.eval, "job succeeded");
                view.jobs.insert(job.id.clone(), job.clone());
                view.release(&members);
                c.announce_state(&job);
                c.wake.notify_one();
            }
            Some(v1::outcome_report::Outcome::Failed(failed)) => {
                let who = format!(
                    "rank {} ({} at {})",
                    member.rank, member.worker_id, member.advertise
                );
                let how = if failed.retriable {
                    Ending::Retriable(format!("{who} failed: {}", failed.message))
                } else {
                    Ending::Permanent(format!("{who} failed permanently: {}", failed.message))
                };
                c.end(&mut view, &r.job_id, how).await?;
            }
            None => {
                return Err(Status::invalid_argument(
                    "an outcome report needs completed or failed",
                ))
            }
        }
        Ok(Response::new(v1::Ack { stale: false }))
    }

    async fn deregister(
        &self,
        request: Request<v1::DeregisterRequest>,
    ) -> Result<Response<v1::Ack>, Status> {
        let id = request.into_inner().worker_id;
        let c = &self.control;
        let Ok((_, lease)) = self.worker(&id).await else {
            return Ok(Response::new(v1::Ack { stale: true }));
        };
        let result = match lease {
            Some(lease) => c.store.revoke(lease).await,
            None => c.store.delete(&c.keys.worker(&id)).await.map(|_| ()),
        };
        result.map_err(|e| Status::unavailable(e.to_string()))?;
        tracing::info!(worker = %id, "worker deregistered");
        c.wake.notify_one();
        Ok(Response::new(v1::Ack { stale: false }))
    }
}
