//! The `Jobs` and `Workers` gRPC services: each handler unpacks its request,
//! asks the leader's [`Control`] and packs the answer. The job-state
//! transitions and their checks live in [`crate::control`].

use std::pin::Pin;
use std::sync::Arc;

use samtrain_proto::v1;
use samtrain_proto::v1::jobs_server::Jobs;
use samtrain_proto::v1::workers_server::Workers;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::auth::WORKER_SECRET_HEADER;
use crate::control::Control;

/// The worker secret a call presents, if any.
fn worker_secret<T>(request: &Request<T>) -> Option<String> {
    request
        .metadata()
        .get(WORKER_SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Both services over one [`Control`]; cheap to clone.
#[derive(Clone)]
pub(crate) struct Service {
    control: Arc<Control>,
}

impl Service {
    pub(crate) fn new(control: Arc<Control>) -> Service {
        Service { control }
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Jobs for Service {
    async fn submit(
        &self,
        request: Request<v1::SubmitRequest>,
    ) -> Result<Response<v1::SubmitResponse>, Status> {
        let r = request.into_inner();
        let job_id = self.control.submit(r.spec_toml, &r.source_name).await?;
        Ok(Response::new(v1::SubmitResponse { job_id }))
    }

    async fn get(&self, request: Request<v1::GetJobRequest>) -> Result<Response<v1::Job>, Status> {
        let job = self.control.job(&request.into_inner().job_id).await?;
        Ok(Response::new(job))
    }

    async fn list(
        &self,
        request: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        let r = request.into_inner();
        let (jobs, next_page_token) = self.control.jobs(r.page_size, &r.page_token).await?;
        Ok(Response::new(v1::ListJobsResponse {
            jobs,
            next_page_token,
        }))
    }

    async fn cancel(
        &self,
        request: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let job = self.control.cancel(&request.into_inner().job_id).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn scale(
        &self,
        request: Request<v1::ScaleJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let r = request.into_inner();
        let job = self.control.scale(&r.job_id, r.workers).await?;
        Ok(Response::new(job))
    }

    async fn drain(
        &self,
        request: Request<v1::DrainWorkerRequest>,
    ) -> Result<Response<v1::DrainWorkerResponse>, Status> {
        let worker_id = request.into_inner().worker_id;
        let job_id = self.control.drain(&worker_id).await?;
        Ok(Response::new(v1::DrainWorkerResponse { worker_id, job_id }))
    }

    type WatchStream = EventStream<v1::JobEvent>;

    async fn watch(
        &self,
        request: Request<v1::WatchJobRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let events = self.control.watch(&request.into_inner().job_id).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }
}

#[tonic::async_trait]
impl Workers for Service {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let secret = worker_secret(&request);
        let registered = self
            .control
            .register_worker(request.into_inner(), secret.as_deref())
            .await?;
        Ok(Response::new(registered))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let secret = worker_secret(&request);
        let ttl = self
            .control
            .heartbeat(&request.into_inner().worker_id, secret.as_deref())
            .await?;
        Ok(Response::new(v1::HeartbeatResponse {
            lease_ttl_s: ttl.as_secs() as u32,
        }))
    }

    type SubscribeStream = EventStream<v1::WorkerEvent>;

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let secret = worker_secret(&request);
        let r = request.into_inner();
        let events = self
            .control
            .subscribe(&r.worker_id, secret.as_deref(), r.current)
            .await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }

    async fn report_progress(
        &self,
        request: Request<v1::ProgressReport>,
    ) -> Result<Response<v1::Ack>, Status> {
        let secret = worker_secret(&request);
        let ack = self
            .control
            .report_progress(request.into_inner(), secret.as_deref())
            .await?;
        Ok(Response::new(ack))
    }

    async fn report_checkpoint(
        &self,
        request: Request<v1::CheckpointReport>,
    ) -> Result<Response<v1::Ack>, Status> {
        let secret = worker_secret(&request);
        let ack = self
            .control
            .report_checkpoint(request.into_inner(), secret.as_deref())
            .await?;
        Ok(Response::new(ack))
    }

    async fn report_outcome(
        &self,
        request: Request<v1::OutcomeReport>,
    ) -> Result<Response<v1::Ack>, Status> {
        let secret = worker_secret(&request);
        let ack = self
            .control
            .report_outcome(request.into_inner(), secret.as_deref())
            .await?;
        Ok(Response::new(ack))
    }

    async fn deregister(
        &self,
        request: Request<v1::DeregisterRequest>,
    ) -> Result<Response<v1::Ack>, Status> {
        let secret = worker_secret(&request);
        let known = self
            .control
            .deregister(&request.into_inner().worker_id, secret.as_deref())
            .await?;
        Ok(Response::new(v1::Ack { stale: !known }))
    }
}
