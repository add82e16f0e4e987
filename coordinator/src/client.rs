//! The client of the `Jobs` service the command line uses: it tries each
//! coordinator address in turn (the shared failover loop), so a standby
//! (UNAVAILABLE) or a dead address only moves it on to the next, and any
//! other error is final.

use samtrain_proto::v1;
use samtrain_proto::v1::jobs_client::JobsClient;
use tonic::{Code, Status};

pub use crate::auth::Credentials;
pub use crate::failover::{is_failover, url};
use crate::failover::{AuthChannel, Coordinators, Unanswered};
pub use crate::tls::ClientTls;

/// What went wrong talking to the coordinators.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The leader answered with an error; its message says what to do.
    #[error("{}", .status.message())]
    Status { address: String, status: Status },
    /// No address led to a leader.
    #[error("no coordinator leads among {}: {}", .addresses.join(", "), .last_error)]
    NoLeader {
        addresses: Vec<String>,
        last_error: String,
    },
    #[error("invalid coordinator address `{address}`: {message}")]
    Address { address: String, message: String },
}

impl ClientError {
    /// The gRPC code, when the coordinator answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// The `Jobs` client over a list of coordinator addresses.
#[derive(Debug, Clone)]
pub struct Client {
    coordinators: Coordinators,
}

impl Client {
    /// `addresses` as `host:port` or `http://host:port`; every call
    /// presents `credentials` (an operator's token).
    pub fn new(addresses: Vec<String>, credentials: Credentials) -> Client {
        Client {
            coordinators: Coordinators::new(addresses, credentials),
        }
    }

    /// Calls the leader, waiting as long as it takes to answer (a watch
    /// stream stays open for the job's life).
    async fn call<T, F, Fut>(&mut self, f: F) -> Result<T, ClientError>
    where
        F: Fn(JobsClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.coordinators
            .call(None, |channel| f(JobsClient::new(channel)))
            .await
            .map_err(|e| match e {
                Unanswered::Refused { address, status } => ClientError::Status { address, status },
                Unanswered::NoLeader {
                    addresses,
                    last_error,
                } => ClientError::NoLeader {
                    addresses,
                    last_error,
                },
            })
    }

    /// Submits a spec; the new job's id.
    pub async fn submit(
        &mut self,
        spec_toml: &str,
        source_name: &str,
    ) -> Result<String, ClientError> {
        let request = v1::SubmitRequest {
            spec_toml: spec_toml.to_owned(),
            source_name: source_name.to_owned(),
        };
        let r = self
            .call(|mut c| {
                let request = request.clone();
                async move { c.submit(request).await }
            })
            .await?;
        Ok(r.job_id)
    }

    pub async fn get(&mut self, job_id: &str) -> Result<v1::Job, ClientError> {
        let job_id = job_id.to_owned();
        self.call(|mut c| {
            let job_id = job_id.clone();
            async move { c.get(v1::GetJobRequest { job_id }).await }
        })
        .await
    }

    /// Every job, oldest first, a page at a time.
    pub async fn list(&mut self) -> Result<Vec<v1::Job>, ClientError> {
        let mut jobs = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = v1::ListJobsRequest {
                page_size: 0,
                page_token: page_token.clone(),
            };
            let page = self
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.list(request).await }
                })
                .await?;
            jobs.extend(page.jobs);
            if page.next_page_token.is_empty() {
                return Ok(jobs);
            }
            page_token = page.next_page_token;
        }
    }

    pub async fn cancel(&mut self, job_id: &str) -> Result<v1::Job, ClientError> {
        let job_id = job_id.to_owned();
        self.call(|mut c| {
            let job_id = job_id.clone();
            async move { c.cancel(v1::CancelJobRequest { job_id }).await }
        })
        .await
    }

    pub async fn scale(&mut self, job_id: &str, workers: u32) -> Result<v1::Job, ClientError> {
        let job_id = job_id.to_owned();
        self.call(|mut c| {
            let job_id = job_id.clone();
            async move { c.scale(v1::ScaleJobRequest { job_id, workers }).await }
        })
        .await
    }

    pub async fn drain(&mut self, worker_id: &str) -> Result<v1::DrainWorkerResponse, ClientError> {
        let worker_id = worker_id.to_owned();
        self.call(|mut c| {
            let worker_id = worker_id.clone();
            async move { c.drain(v1::DrainWorkerRequest { worker_id }).await }
        })
        .await
    }

    /// The job's events: a snapshot first, then changes until it ends. A
    /// stream that breaks (failover) can be opened again: the new snapshot
    /// carries what was missed.
    pub async fn watch(
        &mut self,
        job_id: &str,
    ) -> Result<tonic::Streaming<v1::JobEvent>, ClientError> {
        let job_id = job_id.to_owned();
        self.call(|mut c| {
            let job_id = job_id.clone();
            async move { c.watch(v1::WatchJobRequest { job_id }).await }
        })
        .await
    }
}
