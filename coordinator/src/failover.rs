//! Finding the leader among several coordinator addresses. Only the leader
//! serves; a standby answers UNAVAILABLE, and a dead or failing-over one
//! does not answer at all, so a caller tries each address in turn (the one
//! that answered last first) until one gives a real answer. The command
//! line's [`crate::client::Client`] and the worker's agent both call
//! through [`Coordinators`].

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::auth::Credentials;

/// A channel whose every call carries the caller's credentials.
pub type AuthChannel = InterceptedService<Channel, Credentials>;

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

/// Why no coordinator gave an answer.
#[derive(Debug)]
pub(crate) enum Unanswered {
    /// A coordinator (the leader) answered with an error that another
    /// coordinator would repeat.
    Refused { address: String, status: Status },
    /// Every address was down, a standby, or silent.
    NoLeader {
        addresses: Vec<String>,
        last_error: String,
    },
}

/// The coordinator addresses, which one answered last, and the
/// credentials every call presents. Shared by reference: concurrent calls
/// only race on the preference, a hint.
#[derive(Debug)]
pub(crate) struct Coordinators {
    addresses: Vec<String>,
    preferred: AtomicUsize,
    credentials: Credentials,
}

impl Clone for Coordinators {
    fn clone(&self) -> Self {
        Coordinators {
            addresses: self.addresses.clone(),
            preferred: AtomicUsize::new(self.preferred.load(Ordering::Relaxed)),
            credentials: self.credentials.clone(),
        }
    }
}

impl Coordinators {
    /// `addresses` as `host:port` or `http://host:port`; the first is
    /// tried first.
    pub(crate) fn new(addresses: Vec<String>, credentials: Credentials) -> Coordinators {
        Coordinators {
            addresses,
            preferred: AtomicUsize::new(0),
            credentials,
        }
    }

    /// Calls `f` on a channel to each coordinator in turn until one answers
    /// with something other than "try elsewhere". A `timeout` bounds each
    /// attempt, so a coordinator that hangs counts as silent.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        timeout: Option<Duration>,
        f: F,
    ) -> Result<T, Unanswered>
    where
        F: Fn(AuthChannel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let n = self.addresses.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last_error = "no coordinator address given".to_owned();
        for i in 0..n {
            let index = (start + i) % n;
            let address = &self.addresses[index];
            let channel = match connect(address).await {
                Ok(c) => InterceptedService::new(c, self.credentials.clone()),
                Err(e) => {
                    last_error = e;
                    continue;
                }
            };
            let answer = match timeout {
                Some(limit) => match tokio::time::timeout(limit, f(channel)).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        last_error = format!("{address}: no answer within {} s", limit.as_secs());
                        continue;
                    }
                },
                None => f(channel).await,
            };
            match answer {
                Ok(r) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(r.into_inner());
                }
                Err(status) if is_failover(&status) => {
                    last_error = format!("{address}: {}", status.message());
                }
                Err(status) => {
                    return Err(Unanswered::Refused {
                        address: address.clone(),
                        status,
                    })
                }
            }
        }
        Err(Unanswered::NoLeader {
            addresses: self.addresses.clone(),
            last_error,
        })
    }
}
