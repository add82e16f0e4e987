//! The client of the `Jobs` service the command line uses: it tries each
//! coordinator address in turn, so a standby (UNAVAILABLE) or a dead
//! address only moves it on to the next, and any other error is final.

use std::time::Duration;

use samtrain_proto::v1;
use samtrain_proto::v1::jobs_client::JobsClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

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

/// `host:port` becomes `http://host:port`; URLs stay as they are.
pub fn url(address: &str) -> String {
    if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    }
}

/// Connects to one coordinator, giving up after 2 seconds.
pub async fn connect(address: &str) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(url(address))
        .map_err(|e| format!("invalid address: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    endpoint
        .connect()
        .await
        .map_err(|e| format!("{address}: cannot connect: {e}"))
}

/// Whether an error means "try another coordinator".
pub fn is_failover(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// The `Jobs` client over a list of coordinator addresses.
#[derive(Debug, Clone)]
pub struct Client {
    addresses: Vec<String>,
    /// The address that answered last (tried first next time).
    preferred: usize,
}

impl Client {
    /// `addresses` as `host:port` or `http://host:port`.
    pub fn new(addresses: Vec<String>) -> Client {
        Client {
            addresses,
            preferred: 0,
        }
    }

    async fn call<T, F, Fut>(&mut self, f: F) -> Result<T, ClientError>
    where
        F: Fn(JobsClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let n = self.addresses.len();
        let mut last_error = "no coordinator address given".to_owned();
        for i in 0..n {
            let index = (self.preferred + i) % n;
            let address = self.addresses[index].clone();
            let channel = match connect(&address).await {
                Ok(c) => c,
                Err(e) => {
                    last_error = e;
                    continue;
                }
            };
            match f(JobsClient::new(channel)).await {
                Ok(r) => {
                    self.preferred = index;
                    return Ok(r.into_inner());
                }
                Err(status) if is_failover(&status) => {
                    last_error = format!("{address}: {}", status.message());
                }
                Err(status) => return Err(ClientError::Status { address, status }),
            }
        }
        Err(ClientError::NoLeader {
            addresses: self.addresses.clone(),
            last_error,
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

    pub async fn list(&mut self) -> Result<Vec<v1::Job>, ClientError> {
        let r = self
            .call(|mut c| async move { c.list(v1::ListJobsRequest {}).await })
            .await?;
        Ok(r.jobs)
    }

    pub async fn cancel(&mut self, job_id: &str) -> Result<v1::Job, ClientError> {
        let job_id = job_id.to_owned();
        self.call(|mut c| {
            let job_id = job_id.clone();
            async move { c.cancel(v1::CancelJobRequest { job_id }).await }
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
