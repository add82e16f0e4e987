//! The health port: a tiny HTTP/1.1 endpoint for Kubernetes probes,
//! Prometheus and people. `/healthz` answers 200 while the process runs,
//! `/readyz` 200 when the given check passes (the coordinator: it leads and
//! reaches its store; a worker: it is registered) and 503 with the reason
//! otherwise, `/metrics` the process's metrics in OpenMetrics text to a
//! scraper with the metrics token (see `metrics::MetricsEndpoint`), and
//! `/ui` the coordinator's dashboard (see `dashboard`). Anything else is
//! 404.
//!
//! One request per connection, headers only (no request body is read: no
//! route needs one; the dashboard's login sends its token in a header),
//! answered within 5 s.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::{MetricsEndpoint, CONTENT_TYPE};

/// The readiness check: `Err(reason)` when not ready.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Answers the requests under `/ui`.
pub type Handler =
    Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// The most of a request's head that is read (the rest is ignored).
const MAX_HEAD: usize = 16 * 1024;

/// One request's head.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// What follows `?`, undecoded.
    pub query: String,
    /// `(name, value)` with the name in lower case.
    pub headers: Vec<(String, String)>,
    /// The listener's address the request came in on.
    pub local: SocketAddr,
}

impl Request {
    /// Parses a request head; `None` if it is not HTTP/1.x.
    pub fn parse(head: &str, local: SocketAddr) -> Option<Request> {
        let mut lines = head.split("\r\n");
        let mut start = lines.next()?.split_whitespace();
        let (method, target, version) = (start.next()?, start.next()?, start.next()?);
        if !version.starts_with("HTTP/1.") {
            return None;
        }
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let headers = lines
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Some(Request {
            method: method.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            headers,
            local,
        })
    }

    /// Every value of the header `name` (lower case).
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of the header `name` (lower case).
    pub fn header<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.header_values(name).next()
    }

    /// The tokens presented as `Authorization: Bearer <token>`.
    pub fn bearers(&self) -> impl Iterator<Item = &str> {
        self.header_values("authorization")
            .filter_map(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
    }

    /// The value of the cookie `name`.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.header_values("cookie")
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }

    /// The query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| percent_decode(v))
    }
}

/// `%XX` and `+` decoded; a malformed escape is kept as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    let hex = |b: u8| (b as char).to_digit(16);
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: &'static str,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

const PLAIN: &str = "text/plain; charset=utf-8";

impl Response {
    pub fn new(status: &'static str, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// A plain-text answer.
    pub fn text(status: &'static str, body: impl Into<String>) -> Self {
        Response::new(status, PLAIN, body.into())
    }

    /// A JSON answer.
    pub fn json(status: &'static str, value: &serde_json::Value) -> Self {
        Response::new(status, "application/json", value.to_string())
    }

    /// The response with one more header.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\nx-content-type-options: nosniff\r\ncache-control: no-store\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

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

/// What a health port serves besides the probes.
#[derive(Clone, Default)]
pub struct Routes {
    pub metrics: Option<MetricsEndpoint>,
    /// The dashboard, under `/ui`.
    pub ui: Option<Handler>,
}

/// Binds `listen` and serves the probes and `routes` in the background.
pub async fn serve(
    listen: SocketAddr,
    ready: Readiness,
    routes: Routes,
) -> std::io::Result<HealthServer> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (ready, routes) = (ready.clone(), routes.clone());
            tokio::spawn(async move {
                let answered = answer(stream, ready, routes);
                let _ = tokio::time::timeout(Duration::from_secs(5), answered).await;
            });
        }
    });
    Ok(HealthServer { addr, task })
}

async fn answer(mut stream: TcpStream, ready: Readiness, routes: Routes) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let local = stream.local_addr()?;
    let response = match Request::parse(&String::from_utf8_lossy(&head), local) {
        Some(request) => route(request, ready, routes).await,
        None => Response::text("400 Bad Request", "not an HTTP/1.1 request\n"),
    };
    stream.write_all(&response.to_bytes()).await?;
    stream.shutdown().await
}

async fn route(request: Request, ready: Readiness, routes: Routes) -> Response {
    let path = request.path.as_str();
    if let Some(ui) = routes
        .ui
        .as_ref()
        .filter(|_| path == "/ui" || path.starts_with("/ui/"))
    {
        return ui(request).await;
    }
    match (path, &routes.metrics) {
        ("/healthz", _) => Response::text("200 OK", "ok\n"),
        ("/readyz", _) => match ready() {
            Ok(()) => Response::text("200 OK", "ready\n"),
            Err(reason) => {
                Response::text("503 Service Unavailable", format!("not ready: {reason}\n"))
            }
        },
        ("/metrics", Some(m)) if m.admits(&request) => {
            Response::new("200 OK", CONTENT_TYPE, (m.render)().await)
        }
        ("/metrics", Some(m)) => Response::text(
            "401 Unauthorized",
            if m.token.is_some() {
                "/metrics needs the metrics token: Authorization: Bearer <token>\n"
            } else {
                "/metrics answers off loopback only with a token: start this process with --metrics-token-file\n"
            },
        ),
        ("/", _) if routes.ui.is_some() => {
            Response::text("303 See Other", "the dashboard is at /ui\n")
                .with_header("location", "/ui")
        }
        _ => Response::text(
            "404 Not Found",
            if routes.ui.is_some() {
                "try /ui, /healthz, /readyz or /metrics\n"
            } else {
                "try /healthz, /readyz or /metrics\n"
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_head_is_parsed_with_its_query_cookies_and_bearer() {
        let local = "127.0.0.1:80".parse().unwrap();
        let r = Request::parse(
            "GET /ui/api/jobs?token=a%2Bb+c&x=1 HTTP/1.1\r\nHost: h\r\nCookie: a=1; samtrain_ui=tok\r\nAuthorization: Bearer  s3cret \r\n\r\n",
            local,
        )
        .unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("GET", "/ui/api/jobs")
        );
        assert_eq!(r.query_param("token").as_deref(), Some("a+b c"));
        assert_eq!(r.query_param("y"), None);
        assert_eq!(r.cookie("samtrain_ui"), Some("tok"));
        assert_eq!(r.bearers().collect::<Vec<_>>(), ["s3cret"]);
        assert_eq!(r.header("host"), Some("h"));
        assert!(Request::parse("nonsense", local).is_none());
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
