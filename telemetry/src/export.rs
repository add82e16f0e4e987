//! The background thread that posts closed spans to the collector: in
//! batches of at most `MAX_BATCH`, at least once a second, and whatever is
//! left when the [`Exporter`] is dropped (waiting up to `FINAL_WAIT`). A
//! collector that cannot be reached costs a warning, never the job.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::TelemetryError;

/// Spans waiting for the thread; past it new spans are dropped.
const QUEUE: usize = 16_384;
/// Spans per request.
const MAX_BATCH: usize = 512;
/// How long spans wait for a batch to fill.
const PERIOD: Duration = Duration::from_secs(1);
/// How long a request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long dropping the exporter waits for the last spans to go out.
const FINAL_WAIT: Duration = Duration::from_secs(5);

/// Where spans are posted.
#[derive(Debug, Clone, PartialEq)]
struct Endpoint {
    /// `host:port`.
    authority: String,
    path: String,
}

impl Endpoint {
    fn parse(endpoint: &str) -> Result<Endpoint, TelemetryError> {
        let fail = |message: &str| TelemetryError::Endpoint {
            endpoint: endpoint.to_owned(),
            message: message.to_owned(),
        };
        let rest = match endpoint.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", _)) => {
                return Err(fail(
                    "samtrain posts spans over plain HTTP to a collector beside it (a sidecar or node agent), which forwards them over TLS",
                ))
            }
            _ => return Err(fail("must be an http:// URL, as http://127.0.0.1:4318")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(fail("needs a host (and no user info)"));
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        // As OpenTelemetry's OTLP endpoint variables: a base to which
        // `/v1/traces` is added, unless it names that path itself.
        let path = match path.trim_end_matches('/') {
            p if p.ends_with("/v1/traces") => p.to_owned(),
            p => format!("{p}/v1/traces"),
        };
        Ok(Endpoint { authority, path })
    }
}

/// Sends the spans an [`crate::OtlpLayer`] records; dropping it sends the
/// rest and stops the thread.
pub struct Exporter {
    spans: SyncSender<Value>,
    /// Set when dropped: the thread sends what is queued and ends.
    finish: Arc<AtomicBool>,
    flushed: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl Exporter {
    pub(crate) fn start(endpoint: &str, service: &str) -> Result<Exporter, TelemetryError> {
        let target = Endpoint::parse(endpoint)?;
        let (spans, queue) = mpsc::sync_channel(QUEUE);
        let (done, flushed) = mpsc::channel();
        let resource = resource(service);
        let finish = Arc::new(AtomicBool::new(false));
        let finishing = finish.clone();
        let thread = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                post_batches(&target, &resource, &queue, &finishing);
                let _ = done.send(());
            })
            .map_err(|e| TelemetryError::Endpoint {
                endpoint: endpoint.to_owned(),
                message: format!("cannot start the export thread: {e}"),
            })?;
        Ok(Exporter {
            spans,
            finish,
            flushed,
            thread: Some(thread),
        })
    }

    pub(crate) fn sender(&self) -> SyncSender<Value> {
        self.spans.clone()
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        // The layer holds a sender too (for the process's life), so the
        // thread is told to finish by a flag rather than a closed channel;
        // it sees the flag within a period and sends what is queued.
        self.finish.store(true, Ordering::SeqCst);
        if self.flushed.recv_timeout(FINAL_WAIT + PERIOD).is_ok() {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// The resource every span of this process belongs to.
fn resource(service: &str) -> Value {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    json!({"attributes": [
        {"key": "service.name", "value": {"stringValue": service}},
        {"key": "host.name", "value": {"stringValue": host}},
        {"key": "process.pid", "value": {"intValue": std::process::id().to_string()}},
    ]})
}

/// Posts batches until `finish` is set (then what is queued) or every
/// sender is gone.
fn post_batches(target: &Endpoint, resource: &Value, queue: &Receiver<Value>, finish: &AtomicBool) {
    let mut batch = Vec::new();
    let mut since = Instant::now();
    let mut failing = false;
    loop {
        let finished = finish.load(Ordering::SeqCst);
        let (finished, due) = if finished {
            // Everything queued, then the last request(s).
            batch.extend(queue.try_iter().take(MAX_BATCH.saturating_sub(batch.len())));
            let more = batch.len() >= MAX_BATCH;
            (!more, true)
        } else {
            match queue.recv_timeout(PERIOD) {
                Err(RecvTimeoutError::Disconnected) => (true, true),
                Ok(span) => {
                    batch.push(span);
                    (false, batch.len() >= MAX_BATCH || since.elapsed() >= PERIOD)
                }
                Err(RecvTimeoutError::Timeout) => (false, true),
            }
        };
        if due && !batch.is_empty() {
            let body = json!({"resourceSpans": [{
                "resource": resource,
                "scopeSpans": [{"scope": {"name": "samtrain"}, "spans": std::mem::take(&mut batch)}],
            }]});
            match post(target, &body.to_string()) {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!(collector = %target.authority, "spans reach the collector again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(collector = %target.authority, error = %e, "spans not exported; dropping them until the collector answers");
                }
                Err(_) => {}
            }
            since = Instant::now();
        }
        if finished {
            return;
        }
    }
}

/// One `POST` with a JSON body; an error unless the answer is 2xx.
fn post(target: &Endpoint, body: &str) -> std::io::Result<()> {
    let addr = target
        .authority
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("the host has no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        target.path,
        target.authority,
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let mut status = [0u8; 12];
    stream.read_exact(&mut status)?;
    // "HTTP/1.1 200"
    match &status[9..10] {
        b"2" => Ok(()),
        _ => Err(std::io::Error::other(format!(
            "the collector answered {}",
            String::from_utf8_lossy(&status[9..12])
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_take_a_host_a_default_port_and_the_traces_path() {
        let parsed = |e: &str| Endpoint::parse(e).map(|e| (e.authority, e.path));
        assert_eq!(
            parsed("http://collector:4318").unwrap(),
            ("collector:4318".into(), "/v1/traces".into())
        );
        assert_eq!(
            parsed("http://collector/").unwrap(),
            ("collector:80".into(), "/v1/traces".into())
        );
        assert_eq!(
            parsed("http://10.0.0.1:4318/otlp/v1/traces").unwrap(),
            ("10.0.0.1:4318".into(), "/otlp/v1/traces".into())
        );
        assert_eq!(
            parsed("http://gateway:4318/otlp/").unwrap(),
            ("gateway:4318".into(), "/otlp/v1/traces".into())
        );
        for bad in [
            "https://c:4318",
            "collector:4318",
            "http://",
            "http://u@c:1",
        ] {
            assert!(parsed(bad).is_err(), "{bad}");
        }
    }
}
