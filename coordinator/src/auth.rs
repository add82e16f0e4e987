//! Who may call the coordinator. Every call carries a bearer token
//! (`authorization: Bearer <token>`) and each service admits one role:
//! the `Jobs` service the `operator` role (submit, cancel, get, list,
//! watch), the `Workers` service the `worker` role (register, heartbeat,
//! subscribe, reports). A worker additionally proves on every call after
//! registering that it is the worker it names, with the secret the
//! coordinator issued it ([`WORKER_SECRET_HEADER`], checked by `control`).
//!
//! Tokens come from files (one per line, `#` comments) re-read when they
//! change, so a token is rotated without a restart, or from literal values
//! (`samtrain local` makes a fresh pair for each run). A coordinator with
//! no tokens at all is open: [`crate::process::run`] allows that only on a
//! loopback address, or when the operator says `--insecure`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::tls::ClientTls;

/// The header in which a registered worker presents its secret.
pub const WORKER_SECRET_HEADER: &str = "x-samtrain-worker-secret";

/// Tokens shorter than this are refused: a guessable token is no token.
pub const MIN_TOKEN_LEN: usize = 16;

/// A token file is looked at again at most this often.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Submits, cancels and reads jobs.
    Operator,
    /// Registers, keeps its lease, takes assignments and reports.
    Worker,
}

impl Role {
    /// The role with its article, for messages.
    fn article(self) -> &'static str {
        match self {
            Role::Operator => "an operator",
            Role::Worker => "a worker",
        }
    }
}

/// A problem with a token source, found when it is read.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: a token must be at least {MIN_TOKEN_LEN} characters, got {len}")]
    Short { origin: String, len: usize },
    #[error("{origin}: a token must be printable ASCII without spaces")]
    Characters { origin: String },
    #[error("token file {path} holds no token")]
    Empty { path: PathBuf },
}

/// Where tokens come from: a literal value, or a file re-read when its
/// modification time or size changes.
#[derive(Clone)]
pub enum TokenSource {
    Literal(String),
    File(PathBuf),
}

impl fmt::Debug for TokenSource {
    // Never prints a token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Literal(_) => f.write_str("TokenSource::Literal(..)"),
            TokenSource::File(p) => write!(f, "TokenSource::File({})", p.display()),
        }
    }
}

/// Checks one token's form; `origin` names where it came from.
fn checked(token: &str, origin: &str) -> Result<(), AuthError> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(AuthError::Short {
            origin: origin.to_owned(),
            len: token.len(),
        });
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthError::Characters {
            origin: origin.to_owned(),
        });
    }
    Ok(())
}

/// The tokens of a file: one per line, blank lines and `#` comments skipped.
fn read_tokens(path: &Path) -> Result<Vec<String>, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        checked(line, &format!("{} line {}", path.display(), i + 1))?;
        tokens.push(line.to_owned());
    }
    if tokens.is_empty() {
        return Err(AuthError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(tokens)
}

/// The identity of a file's content as far as reloading cares.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// One source's tokens, as SHA-256 digests, reloaded when a file changes.
struct Loaded {
    source: TokenSource,
    digests: Vec<[u8; 32]>,
    stamp: Option<(SystemTime, u64)>,
    checked_at: Instant,
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl Loaded {
    fn open(source: TokenSource) -> Result<Loaded, AuthError> {
        let (digests, stamp) = match &source {
            TokenSource::Literal(t) => {
                checked(t, "a token given on the command line or environment")?;
                (vec![digest(t.as_bytes())], None)
            }
            TokenSource::File(path) => {
                let stamp = stamp(path);
                let tokens = read_tokens(path)?;
                (tokens.iter().map(|t| digest(t.as_bytes())).collect(), stamp)
            }
        };
        Ok(Loaded {
            source,
            digests,
            stamp,
            checked_at: Instant::now(),
        })
    }

    /// Re-reads a changed file. A file that became unreadable or invalid
    /// keeps the tokens it had (a half-written file must not lock every
    /// caller out), with a warning.
    fn refresh(&mut self) {
        let TokenSource::File(path) = &self.source else {
            return;
        };
        if self.checked_at.elapsed() < RELOAD_EVERY {
            return;
        }
        self.checked_at = Instant::now();
        let now = stamp(path);
        if now == self.stamp {
            return;
        }
        match read_tokens(path) {
            Ok(tokens) => {
                self.digests = tokens.iter().map(|t| digest(t.as_bytes())).collect();
                self.stamp = now;
                tracing::info!(file = %path.display(), tokens = self.digests.len(), "token file reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "token file changed but cannot be used; keeping its previous tokens")
            }
        }
    }

    fn admits(&self, presented: &[u8; 32]) -> bool {
        // Every digest is compared, each in constant time.
        self.digests
            .iter()
            .fold(false, |ok, d| ok | bool::from(d.ct_eq(presented)))
    }
}

/// The coordinator's side: the tokens of each role.
pub struct ServerAuth {
    operator: Mutex<Vec<Loaded>>,
    worker: Mutex<Vec<Loaded>>,
}

impl fmt::Debug for ServerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerAuth(..)")
    }
}

/// Which tokens the coordinator accepts for each role.
#[derive(Debug, Clone, Default)]
pub struct AuthOptions {
    pub operator: Vec<TokenSource>,
    pub worker: Vec<TokenSource>,
}

impl AuthOptions {
    /// No tokens at all: the coordinator is open.
    pub fn is_open(&self) -> bool {
        self.operator.is_empty() && self.worker.is_empty()
    }

    /// A fresh random token for each role, for one local run.
    pub fn generated() -> (AuthOptions, String, String) {
        let operator = new_secret();
        let worker = new_secret();
        let options = AuthOptions {
            operator: vec![TokenSource::Literal(operator.clone())],
            worker: vec![TokenSource::Literal(worker.clone())],
        };
        (options, operator, worker)
    }
}

impl ServerAuth {
    /// Reads every source now, so a missing file or a short token stops
    /// the coordinator at start. A role without tokens admits nobody.
    pub fn open(options: &AuthOptions) -> Result<ServerAuth, AuthError> {
        let load = |sources: &[TokenSource]| -> Result<Vec<Loaded>, AuthError> {
            sources.iter().cloned().map(Loaded::open).collect()
        };
        Ok(ServerAuth {
            operator: Mutex::new(load(&options.operator)?),
            worker: Mutex::new(load(&options.worker)?),
        })
    }

    /// Whether the call's bearer token holds `role`.
    pub fn check(&self, role: Role, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(token) = bearer(metadata) else {
            return Err(Status::unauthenticated(format!(
                "this call needs {} token (authorization: Bearer ...): give --token-file or set SAMTRAIN_TOKEN",
                role.article()
            )));
        };
        if self.holds(role, token) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "the token is not {} token of this coordinator",
                role.article()
            )))
        }
    }
}

impl ServerAuth {
    /// Whether `token` is one of `role`'s tokens (files re-read when they
    /// changed).
    pub fn holds(&self, role: Role, token: &str) -> bool {
        self.holds_digest(role, &digest(token.as_bytes()))
    }

    /// Whether `presented` is the SHA-256 of one of `role`'s tokens (what
    /// the dashboard's cookie carries instead of the token itself).
    pub fn holds_digest(&self, role: Role, presented: &[u8; 32]) -> bool {
        let sources = match role {
            Role::Operator => &self.operator,
            Role::Worker => &self.worker,
        };
        let mut sources = sources.lock().expect("auth lock");
        let mut admitted = false;
        for source in sources.iter_mut() {
            source.refresh();
            admitted |= source.admits(presented);
        }
        admitted
    }
}

/// The bearer token of a call, if any.
fn bearer(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?;
    Some(token.trim())
}

/// The interceptor that admits one role to a service; with no
/// [`ServerAuth`] (an open coordinator) it admits every call.
#[derive(Clone)]
pub(crate) struct Guard {
    pub(crate) auth: Option<Arc<ServerAuth>>,
    pub(crate) role: Role,
}

impl Interceptor for Guard {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(auth) = &self.auth {
            auth.check(self.role, request.metadata())?;
        }
        Ok(request)
    }
}

/// The caller's side: the token it presents, once registered the worker
/// secret, and over TLS what it trusts and the certificate it presents.
/// Cheap to clone; clones share the worker secret.
#[derive(Clone, Default)]
pub struct Credentials {
    token: Option<TokenSource>,
    worker_secret: Arc<Mutex<Option<AsciiMetadataValue>>>,
    tls: Option<Arc<ClientTls>>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({:?})", self.token)
    }
}

impl Credentials {
    /// No token: for an open coordinator.
    pub fn none() -> Credentials {
        Credentials::default()
    }

    pub fn token(source: TokenSource) -> Credentials {
        Credentials {
            token: Some(source),
            ..Credentials::default()
        }
    }

    /// Calls go over TLS, trusting and presenting what `tls` says.
    pub fn with_tls(mut self, tls: ClientTls) -> Credentials {
        self.tls = Some(Arc::new(tls));
        self
    }

    /// The TLS settings, when calls go over TLS.
    pub(crate) fn tls(&self) -> Option<&ClientTls> {
        self.tls.as_deref()
    }

    /// The token in `SAMTRAIN_TOKEN`, if set: what callers without
    /// `--token-file` (whose flag also reads `SAMTRAIN_TOKEN_FILE`) present.
    pub fn from_token_env() -> Credentials {
        match std::env::var("SAMTRAIN_TOKEN") {
            Ok(t) if !t.is_empty() => Credentials::token(TokenSource::Literal(t)),
            _ => Credentials::none(),
        }
    }

    /// The same token and TLS with a worker secret of its own: calls as
    /// another worker (a node's agent removing its dead rank).
    pub(crate) fn for_another_worker(&self) -> Credentials {
        Credentials {
            token: self.token.clone(),
            worker_secret: Arc::default(),
            tls: self.tls.clone(),
        }
    }

    /// Presents `secret` as this worker's on every later call.
    pub(crate) fn set_worker_secret(&self, secret: &str) {
        let value = AsciiMetadataValue::try_from(secret).ok();
        *self.worker_secret.lock().expect("credentials lock") = value;
    }

    /// The token now (a file is read on each call, so a rotated token is
    /// picked up by the next one).
    fn current_token(&self) -> Result<Option<String>, Status> {
        match &self.token {
            None => Ok(None),
            Some(TokenSource::Literal(t)) => Ok(Some(t.clone())),
            Some(TokenSource::File(path)) => read_tokens(path)
                .map(|mut t| Some(t.swap_remove(0)))
                .map_err(|e| Status::unauthenticated(e.to_string())),
        }
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = self.current_token()? {
            let value = AsciiMetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| Status::unauthenticated("the token is not valid ASCII"))?;
            request.metadata_mut().insert("authorization", value);
        }
        if let Some(secret) = self.worker_secret.lock().expect("credentials lock").clone() {
            request.metadata_mut().insert(WORKER_SECRET_HEADER, secret);
        }
        Ok(request)
    }
}

/// 256 random bits from the operating system, as 64 hex digits.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    hex(&bytes)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of a token, in hex: the dashboard's cookie.
pub(crate) fn token_digest(token: &str) -> String {
    hex(&digest(token.as_bytes()))
}

/// The SHA-256 of a worker secret, as stored in the worker's record.
pub(crate) fn secret_digest(secret: &str) -> String {
    hex(&digest(secret.as_bytes()))
}

/// Whether `secret` is the one whose digest a record holds (constant time).
pub(crate) fn secret_matches(secret: &str, stored_digest: &str) -> bool {
    let presented = secret_digest(secret);
    presented.len() == stored_digest.len()
        && bool::from(presented.as_bytes().ct_eq(stored_digest.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_bearer(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(
            "authorization",
            AsciiMetadataValue::try_from(format!("Bearer {token}")).unwrap(),
        );
        m
    }

    #[test]
    fn each_role_admits_only_its_own_tokens() {
        let (options, operator, worker) = AuthOptions::generated();
        let auth = ServerAuth::open(&options).unwrap();
        assert!(auth.check(Role::Operator, &with_bearer(&operator)).is_ok());
        assert!(auth.check(Role::Worker, &with_bearer(&worker)).is_ok());
        let denied = auth
            .check(Role::Operator, &with_bearer(&worker))
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        let missing = auth.check(Role::Worker, &MetadataMap::new()).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn a_token_file_is_reloaded_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("operators");
        std::fs::write(&path, "# operators\nfirst-token-0123456789\n").unwrap();
        let auth = ServerAuth::open(&AuthOptions {
            operator: vec![TokenSource::File(path.clone())],
            worker: vec![],
        })
        .unwrap();
        assert!(auth
            .check(Role::Operator, &with_bearer("first-token-0123456789"))
            .is_ok());
        // A different length changes the stamp even within one mtime tick.
        std::fs::write(&path, "second-token-0123456789xyz\n").unwrap();
        std::thread::sleep(RELOAD_EVERY + Duration::from_millis(100));
        assert!(auth
            .check(Role::Operator, &with_bearer("second-token-0123456789xyz"))
            .is_ok());
        assert!(auth
            .check(Role::Operator, &with_bearer("first-token-0123456789"))
            .is_err());
    }

    #[test]
    fn short_tokens_are_refused_with_their_origin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workers");
        std::fs::write(&path, "\nshort\n").unwrap();
        let err = ServerAuth::open(&AuthOptions {
            operator: vec![],
            worker: vec![TokenSource::File(path.clone())],
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("line 2") && err.contains("at least 16"),
            "{err}"
        );
    }

    #[test]
    fn worker_secrets_match_only_their_digest() {
        let secret = new_secret();
        assert_eq!(secret.len(), 64);
        let stored = secret_digest(&secret);
        assert!(secret_matches(&secret, &stored));
        assert!(!secret_matches(&new_secret(), &stored));
        assert!(!secret_matches(&secret, ""));
    }
}
