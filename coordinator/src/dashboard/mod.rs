//! The coordinator's web dashboard, `/ui` on the health port: the jobs and
//! their states; a job's generation, its ranks (worker, host, step, step
//! time, last report), a live loss curve, checkpoints, evaluation scores
//! with example predictions and recent events; and a cancel button.
//!
//! The page, its script and its style are compiled into the binary (no
//! CDN: clusters are often offline) and poll a small JSON API under
//! `/ui/api/` once a second. The JSON is `samtrain status --json`'s.
//!
//! Who gets in is who may call the `Jobs` API: a coordinator with operator
//! tokens admits a request that carries one (`Authorization: Bearer`), or
//! the cookie that `POST /ui/login` with one sets, which holds the token's
//! SHA-256, not the token (a cookie leaks to every port of its host, and
//! the digest opens the dashboard only, not the API). Anyone else gets the
//! login page, whose script sends the token from its form or from the
//! address's fragment (`/ui#token=<token>`, which `samtrain local` prints):
//! a token never travels in a URL the server, a proxy or their access logs
//! see. An open coordinator
//! (no tokens, loopback only) admits requests to a loopback listener under
//! a loopback host name, so a web page elsewhere cannot reach it through
//! DNS rebinding. A cancel must carry the `x-samtrain-ui` header, which a
//! cross-site form cannot send.

mod history;

use std::sync::Arc;

use samtrain_proto::v1;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tonic::{Code, Status};

use crate::auth::{token_digest, Role, ServerAuth};
use crate::control::Control;
use crate::health::{Handler, Request, Response};
use crate::json::job_json;
pub(crate) use history::JobHistory;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");
const LOGIN: &str = include_str!("assets/login.html");
const LOGIN_SCRIPT: &str = include_str!("assets/login.js");

/// The cookie `POST /ui/login` sets.
const COOKIE: &str = "samtrain_ui";
/// The header a state-changing request must carry.
const ACTION_HEADER: &str = "x-samtrain-ui";
/// Jobs the list shows, newest first.
const LIST_JOBS: usize = 200;
/// Longest job id the API looks up.
const MAX_ID_LEN: usize = 128;

/// The dashboard of one coordinator.
pub(crate) struct Dashboard {
    control: Arc<Control>,
    history: Arc<JobHistory>,
    auth: Option<Arc<ServerAuth>>,
}

impl Dashboard {
    /// The dashboard, following the leader's job events from now on.
    pub(crate) fn start(control: Arc<Control>, auth: Option<Arc<ServerAuth>>) -> Arc<Dashboard> {
        let history = Arc::new(JobHistory::default());
        tokio::spawn(follow(control.subscribe_events(), history.clone()));
        Arc::new(Dashboard {
            control,
            history,
            auth,
        })
    }

    /// The `/ui` routes for the health port.
    pub(crate) fn handler(self: Arc<Self>) -> Handler {
        Arc::new(move |request| {
            let this = self.clone();
            Box::pin(async move { this.answer(request).await })
        })
    }

    async fn answer(&self, r: Request) -> Response {
        if r.query_param("token").is_some() {
            return Response::text(
                "400 Bad Request",
                "a token does not go in the query string, where logs keep it: \
                 open /ui and log in, or /ui#token=<token>\n",
            );
        }
        let path = r.path.trim_end_matches('/');
        // What anyone may fetch: the login, its page and the style.
        match (r.method.as_str(), path) {
            ("POST", "/ui/login") => return self.log_in(&r),
            ("GET", "/ui/login.js") => {
                return Response::new("200 OK", "text/javascript; charset=utf-8", LOGIN_SCRIPT)
            }
            ("GET", "/ui/style.css") => {
                return Response::new("200 OK", "text/css; charset=utf-8", STYLE)
            }
            _ => {}
        }
        if !self.admits(&r) {
            if self.auth.is_some() && (r.method.as_str(), path) == ("GET", "/ui") {
                return Response {
                    status: "401 Unauthorized",
                    ..page(LOGIN)
                };
            }
            return self.refused(&r);
        }
        match (r.method.as_str(), path) {
            ("GET", "/ui") => page(INDEX),
            ("GET", "/ui/app.js") => {
                Response::new("200 OK", "text/javascript; charset=utf-8", SCRIPT)
            }
            ("GET", "/ui/api/jobs") => self.jobs().await,
            (method, p) => match p.strip_prefix("/ui/api/jobs/") {
                Some(rest) => self.job_route(method, rest, &r).await,
                None => Response::text("404 Not Found", "no such page\n"),
            },
        }
    }

    async fn job_route(&self, method: &str, rest: &str, r: &Request) -> Response {
        let (id, action) = rest.split_once('/').unwrap_or((rest, ""));
        if id.is_empty()
            || id.len() > MAX_ID_LEN
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Response::text("400 Bad Request", "not a job id\n");
        }
        match (method, action) {
            ("GET", "") => self.job(id).await,
            ("POST", "cancel") if r.header(ACTION_HEADER).is_some() => self.cancel(id).await,
            ("POST", "cancel") => Response::text(
                "403 Forbidden",
                format!("a cancel comes from the dashboard, with the {ACTION_HEADER} header\n"),
            ),
            _ => Response::text("405 Method Not Allowed", "no such action\n"),
        }
    }

    /// Sets the cookie for the request's operator token (its
    /// `Authorization: Bearer` header, which the login page sends with the
    /// dashboard's own header).
    fn log_in(&self, r: &Request) -> Response {
        let Some(auth) = &self.auth else {
            return Response::text(
                "400 Bad Request",
                "this coordinator has no tokens: there is nothing to log in with\n",
            );
        };
        if r.header(ACTION_HEADER).is_none() {
            return Response::text(
                "403 Forbidden",
                format!("a login comes from the dashboard, with the {ACTION_HEADER} header\n"),
            );
        }
        let Some(token) = r.bearers().find(|t| auth.holds(Role::Operator, t)) else {
            return Response::text(
                "401 Unauthorized",
                "that is not an operator token of this coordinator\n",
            );
        };
        Response::text("200 OK", "logged in\n").with_header(
            "set-cookie",
            format!(
                "{COOKIE}={}; Path=/ui; HttpOnly; SameSite=Strict",
                token_digest(token)
            ),
        )
    }

    fn admits(&self, r: &Request) -> bool {
        match &self.auth {
            Some(auth) => {
                let by_cookie = r
                    .cookie(COOKIE)
                    .and_then(digest_of_hex)
                    .is_some_and(|d| auth.holds_digest(Role::Operator, &d));
                by_cookie || r.bearers().any(|t| auth.holds(Role::Operator, t))
            }
            None => r.local.ip().is_loopback() && r.header("host").is_some_and(loopback_host),
        }
    }

    fn refused(&self, r: &Request) -> Response {
        let how = if self.auth.is_some() {
            "log in at /ui with an operator token (the token `samtrain submit` uses; `samtrain local` prints an address that logs in), or send Authorization: Bearer <token>"
        } else {
            "this coordinator has no tokens, so its dashboard answers on a loopback address under a loopback host name only"
        };
        let status = "401 Unauthorized";
        if r.path.starts_with("/ui/api/") {
            Response::json(status, &json!({ "error": how }))
        } else {
            Response::text(status, format!("{how}\n"))
        }
    }

    async fn jobs(&self) -> Response {
        match self.control.newest_jobs(LIST_JOBS).await {
            Ok(jobs) => {
                let jobs: Vec<Value> = jobs.iter().map(job_json).collect();
                Response::json("200 OK", &json!({ "jobs": jobs }))
            }
            Err(status) => failed(&status),
        }
    }

    async fn job(&self, id: &str) -> Response {
        match self.control.job(id).await {
            Ok(job) => {
                let loss: Vec<Value> = self
                    .history
                    .loss(id)
                    .into_iter()
                    .map(|(step, loss)| json!([step, loss]))
                    .collect();
                Response::json(
                    "200 OK",
                    &json!({
                        "job": job_json(&job),
                        "loss": loss,
                        "events": self.history.events(id),
                    }),
                )
            }
            Err(status) => failed(&status),
        }
    }

    async fn cancel(&self, id: &str) -> Response {
        match self.control.cancel(id).await {
            Ok(_) => match self.control.job(id).await {
                Ok(job) => Response::json("200 OK", &json!({ "job": job_json(&job) })),
                Err(status) => failed(&status),
            },
            Err(status) => failed(&status),
        }
    }
}

/// An HTML page of the dashboard, its scripts and style its own only.
fn page(html: &'static str) -> Response {
    Response::new("200 OK", "text/html; charset=utf-8", html)
        .with_header("content-security-policy", "default-src 'self'")
}

/// Feeds the history from the leader's events until the stream closes.
async fn follow(mut events: broadcast::Receiver<v1::JobEvent>, history: Arc<JobHistory>) {
    loop {
        match events.recv().await {
            Ok(e) => history.record(&e),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::debug!(skipped = n, "the dashboard's history fell behind");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// `localhost` or a loopback IP, with or without a port.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A control-plane error as the API's JSON.
fn failed(status: &Status) -> Response {
    let http = match status.code() {
        Code::NotFound => "404 Not Found",
        Code::FailedPrecondition => "409 Conflict",
        Code::InvalidArgument => "400 Bad Request",
        _ => "503 Service Unavailable",
    };
    Response::json(http, &json!({ "error": status.message() }))
}

/// The 32 bytes a cookie's 64 hex digits stand for.
fn digest_of_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_host_names_count_as_loopback() {
        for host in [
            "127.0.0.1:7072",
            "localhost",
            "LOCALHOST:80",
            "[::1]:7072",
            "127.3.4.5",
        ] {
            assert!(loopback_host(host), "{host}");
        }
        for host in [
            "evil.example:7072",
            "10.0.0.1",
            "[fe80::1]:80",
            "localhost.evil.example",
        ] {
            assert!(!loopback_host(host), "{host}");
        }
    }

    #[test]
    fn the_cookie_is_the_tokens_digest_in_hex() {
        let cookie = token_digest("a b;c=d%e-0123456789");
        assert!(cookie.bytes().all(|b| b.is_ascii_hexdigit()), "{cookie}");
        let digest = digest_of_hex(&cookie).unwrap();
        assert_eq!(crate::auth::hex(&digest), cookie);
        assert_eq!(digest_of_hex("zz"), None);
        assert_eq!(digest_of_hex(&"é".repeat(32)), None);
    }
}
