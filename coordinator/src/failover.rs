//! Finding the leader among several coordinator addresses. Only the leader
//! serves; a standby answers UNAVAILABLE, and a dead or failing-over one
//! does not answer at all, so a caller tries each address in turn (the one
//! that answered last first) until one gives a real answer. The command
//! line's [`crate::client::Client`] and the worker's agent both call
//! through [`Coordinators`].

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::auth::Credentials;
use crate::tls::ClientTls;

/// A channel whose every call carries the caller's credentials.
pub type AuthChannel = InterceptedService<Channel, Credentials>;

/// `host:port` becomes `https://host:port` with TLS, `http://host:port`
/// without; URLs stay as they are.
pub fn url(address: &str, tls: bool) -> String {
    match (address.contains("://"), tls) {
        (true, _) => address.to_owned(),
        (false, true) => format!("https://{address}"),
        (false, false) => format!("http://{address}"),
    }
}

/// Connects to one coordinator, giving up after 2 seconds. With `tls` the
/// files are read now, so a renewed certificate is used by the next call.
pub(crate) async fn connect(address: &str, tls: Option<&ClientTls>) -> Result<Channel, String> {
    let url = url(address, tls.is_some());
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| format!("invalid address: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    match (tls, url.starts_with("https://")) {
        (Some(_), false) => {
            return Err(format!(
                "{address}: TLS is configured (--tls-ca) but the address says plaintext (http://)"
            ))
        }
        // An https:// address without TLS settings trusts the system's roots.
        (tls, true) => {
            let config = tls
                .cloned()
                .unwrap_or_default()
                .config()
                .map_err(|e| format!("TLS: {e}"))?;
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| format!("{address}: TLS: {e}"))?;
        }
        (None, false) => {}
    }
    endpoint
        .connect()
        .await
        .map_err(|e| format!("{address}: cannot connect: {}", with_causes(&e)))
}

/// What to give when a connection was cut off in a way a TLS mismatch
/// explains: a plaintext client talking to a TLS coordinator (the
/// coordinator ends the connection, or its reply is not HTTP/2), or a
/// client without a certificate talking to one that requires it.
fn tls_hint(error: &str, tls: Option<&ClientTls>) -> Option<&'static str> {
    match tls {
        _ if !crate::tls::cut_off_by_tls(error) => None,
        None => Some("if the coordinator serves TLS, give --tls-ca or an https:// address"),
        Some(tls) if tls.identity.is_none() => Some(
            "a coordinator that requires client certificates cuts off a client without one: \
             give --tls-client-cert and --tls-client-key",
        ),
        Some(_) => None,
    }
}

/// An error and its causes: tonic's own text is "transport error", and
/// what a user can act on (refused, unknown CA, certificate required) is
/// underneath.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    causes(e.to_string(), e.source())
}

/// `first`, then each of the causes from `next` on, joined by ": ", each
/// text once (tonic's layers repeat "transport error").
fn causes(first: String, mut next: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut message = first;
    while let Some(cause) = next {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        next = cause.source();
    }
    message
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

/// The coordinator addresses, which one answered last, the credentials
/// every call presents, and a channel to each address that answered.
/// Shared by reference: concurrent calls only race on the preference, a
/// hint, and on which of two new channels to an address is kept.
#[derive(Debug)]
pub(crate) struct Coordinators {
    addresses: Vec<String>,
    preferred: AtomicUsize,
    credentials: Credentials,
    /// Reused while calls on them get answers: a new connection per call
    /// costs a TCP (and TLS) handshake. Clones share them.
    channels: Arc<Mutex<Vec<Option<Channel>>>>,
}

impl Clone for Coordinators {
    fn clone(&self) -> Self {
        Coordinators {
            addresses: self.addresses.clone(),
            preferred: AtomicUsize::new(self.preferred.load(Ordering::Relaxed)),
            credentials: self.credentials.clone(),
            channels: self.channels.clone(),
        }
    }
}

impl Coordinators {
    /// `addresses` as `host:port` or `http://host:port`; the first is
    /// tried first.
    pub(crate) fn new(addresses: Vec<String>, credentials: Credentials) -> Coordinators {
        Coordinators {
            channels: Arc::new(Mutex::new(vec![None; addresses.len()])),
            addresses,
            preferred: AtomicUsize::new(0),
            credentials,
        }
    }

    /// The channel to address `index`: the one kept, or a new one.
    async fn channel(&self, index: usize) -> Result<Channel, String> {
        if let Some(kept) = self.channels.lock().expect("channels lock")[index].clone() {
            return Ok(kept);
        }
        let channel = connect(&self.addresses[index], self.credentials.tls()).await?;
        self.channels.lock().expect("channels lock")[index] = Some(channel.clone());
        Ok(channel)
    }

    /// Forgets the channel to address `index`: the next call connects
    /// anew (and reads the TLS files again).
    fn forget(&self, index: usize) {
        self.channels.lock().expect("channels lock")[index] = None;
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
            let channel = match self.channel(index).await {
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
                        self.forget(index);
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
                    self.forget(index);
                    let message = causes(
                        status.message().to_owned(),
                        std::error::Error::source(&status),
                    );
                    last_error = format!("{address}: {message}");
                    if let Some(hint) = tls_hint(&last_error, self.credentials.tls()) {
                        last_error = format!("{last_error} ({hint})");
                    }
                }
                Err(mut status) => {
                    // A plaintext client's call to a TLS coordinator ends
                    // in an HTTP/2 protocol error: say what to give.
                    if let Some(hint) = tls_hint(status.message(), self.credentials.tls()) {
                        self.forget(index);
                        status = Status::unavailable(format!(
                            "{address}: {} ({hint})",
                            status.message()
                        ));
                    }
                    return Err(Unanswered::Refused {
                        address: address.clone(),
                        status,
                    });
                }
            }
        }
        Err(Unanswered::NoLeader {
            addresses: self.addresses.clone(),
            last_error,
        })
    }
}
