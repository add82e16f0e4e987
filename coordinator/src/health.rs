//! A tiny HTTP/1.1 endpoint for Kubernetes probes and Prometheus: `/healthz`
//! answers 200 while the process runs, `/readyz` 200 when the given check
//! passes (the coordinator: it leads and reaches its store; a worker: it is
//! registered) and 503 with the reason otherwise, `/metrics` the process's
//! metrics in OpenMetrics text to a scraper with the metrics token (see
//! `metrics::MetricsEndpoint`). Anything else is 404.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::{MetricsEndpoint, CONTENT_TYPE};

/// The readiness check: `Err(reason)` when not ready.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A running health endpoint; stops when dropped.
pub struct HealthServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HealthServer {
    /// The bound address (the listen address may use port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `listen` and serves the probes (and `metrics`, when given) in the
/// background.
pub async fn serve(
    listen: SocketAddr,
    ready: Readiness,
    metrics: Option<MetricsEndpoint>,
) -> std::io::Result<HealthServer> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (ready, metrics) = (ready.clone(), metrics.clone());
            tokio::spawn(async move {
                let answered = answer(stream, ready, metrics);
                let _ = tokio::time::timeout(Duration::from_secs(5), answered).await;
            });
        }
    });
    Ok(HealthServer { addr, task })
}

async fn answer(
    mut stream: TcpStream,
    ready: Readiness,
    metrics: Option<MetricsEndpoint>,
) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&request);
    let path = text.split_whitespace().nth(1).unwrap_or("");
    let path = path.split('?').next().unwrap_or("");
    let plain = "text/plain; charset=utf-8";
    let (status, content_type, body) = match (path, &metrics) {
        ("/healthz", _) => ("200 OK", plain, "ok\n".to_owned()),
        ("/readyz", _) => match ready() {
            Ok(()) => ("200 OK", plain, "ready\n".to_owned()),
            Err(reason) => (
                "503 Service Unavailable",
                plain,
                format!("not ready: {reason}\n"),
            ),
        },
        ("/metrics", Some(m)) if m.admits(&text, stream.local_addr()?) => {
            ("200 OK", CONTENT_TYPE, (m.render)().await)
        }
        ("/metrics", Some(m)) => (
            "401 Unauthorized",
            plain,
            if m.token.is_some() {
                "/metrics needs the metrics token: Authorization: Bearer <token>\n"
            } else {
                "/metrics answers off loopback only with a token: start this process with --metrics-token-file\n"
            }
            .to_owned(),
        ),
        _ => (
            "404 Not Found",
            plain,
            "try /healthz, /readyz or /metrics\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
