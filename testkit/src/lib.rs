//! What samtrain's tests share, so each test starts real parts the same
//! way: an etcd server and an S3-compatible server (moto's) on loopback
//! ports, each started for one test and killed by its PID when dropped; a
//! stand-in OpenTelemetry collector ([`OtlpCollector`]); the venv python
//! that holds the reference implementations; free ports.
//!
//! A dev-dependency only: nothing here is part of samtrain itself.

mod otlp;

pub use otlp::OtlpCollector;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The workspace's root folder.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the testkit crate sits in the workspace")
        .to_path_buf()
}

/// The venv python that scripts/setup.sh installs (`SAMTRAIN_PYTHON`
/// overrides it).
pub fn python() -> PathBuf {
    let path = std::env::var_os("SAMTRAIN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    assert!(
        path.exists(),
        "the reference python {} is missing: run scripts/setup.sh",
        path.display()
    );
    path
}

/// A loopback port nothing listens on as of now, for a server a test is
/// about to start.
///
/// Ports come from below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), so that between this call and the
/// server's bind no outgoing connection and no port-0 bind (a worker's
/// collective port, a client's local port) can take the port, and a
/// connect to it before the server listens cannot land on itself (TCP's
/// simultaneous open). A process never gets the same port twice, so two
/// servers of one test never share one. Each process starts at an offset of
/// its PID, so test binaries run side by side rarely try the same ports.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<PortCursor>> = Mutex::new(None);
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    given.get_or_insert_with(PortCursor::new).next()
}

/// Where [`free_port`] looks next.
struct PortCursor {
    /// The ports below the ephemeral range that it hands out.
    range: std::ops::Range<u16>,
    next: u16,
    /// Every port handed out (or skipped as taken), so none comes twice,
    /// the kernel's own choices included.
    given: std::collections::HashSet<u16>,
}

impl PortCursor {
    /// The lowest port [`free_port`] hands out; below it sit well-known
    /// services.
    const LOWEST: u16 = 10_000;

    fn new() -> PortCursor {
        let ephemeral_low = ephemeral_low().unwrap_or(Self::LOWEST);
        let range = Self::LOWEST..ephemeral_low.max(Self::LOWEST);
        let span = u32::from(range.end - range.start).max(1);
        let offset = (std::process::id().wrapping_mul(7919) % span) as u16;
        PortCursor {
            next: range.start + offset,
            range,
            given: Default::default(),
        }
    }

    fn next(&mut self) -> u16 {
        // Fewer than a thousand ports below the ephemeral range: take the
        // kernel's choice, never one handed out before.
        if self.range.len() < 1_000 {
            loop {
                let port = bound_port(0).expect("binding a loopback port");
                if self.given.insert(port) {
                    return port;
                }
            }
        }
        for _ in 0..self.range.len() {
            let port = self.next;
            self.next = if port + 1 >= self.range.end {
                self.range.start
            } else {
                port + 1
            };
            if self.given.insert(port) && bound_port(port).is_some() {
                return port;
            }
        }
        panic!("no free loopback port left in {:?}", self.range);
    }
}

/// The first port of the kernel's ephemeral range, where Linux says it.
fn ephemeral_low() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// The port of a loopback listener bound to `port` (0: the kernel's
/// choice) and closed at once, if the bind succeeds.
fn bound_port(port: u16) -> Option<u16> {
    let listener = TcpListener::bind(("127.0.0.1", port)).ok()?;
    Some(listener.local_addr().ok()?.port())
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An etcd server (Debian's etcd-server) with a temporary data folder.
pub struct Etcd {
    child: Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

/// The PEM files of an etcd that serves TLS and requires client
/// certificates signed by `client_ca`.
pub struct EtcdTls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub client_ca: &'a Path,
}

impl Etcd {
    pub fn start() -> Etcd {
        Etcd::start_with(None)
    }

    /// With `tls`, the client endpoint is `https://` and asks for client
    /// certificates.
    pub fn start_with(tls: Option<EtcdTls<'_>>) -> Etcd {
        let dir = tempfile::tempdir().expect("a temporary folder for etcd");
        let client = free_port();
        let peer = free_port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut command = Command::new("etcd");
        if let Some(tls) = tls {
            command
                .arg("--cert-file")
                .arg(tls.cert)
                .arg("--key-file")
                .arg(tls.key)
                .arg("--trusted-ca-file")
                .arg(tls.client_ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd on PATH (Debian etcd-server): run scripts/setup.sh");
        let etcd = Etcd {
            child,
            endpoint,
            _dir: dir,
        };
        wait_for_port(client, "etcd", Duration::from_secs(10));
        etcd
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// moto's S3 server from the venv, with one bucket.
pub struct S3Server {
    child: Child,
    pub port: u16,
}

impl S3Server {
    /// Starts a server on `port` (see [`free_port`]) and creates `bucket`.
    pub fn start(port: u16, bucket: &str) -> S3Server {
        Self::spawn(port, bucket, false)
    }

    /// A server that checks credentials once `bucket` exists: every request
    /// signed with the test keys (which its IAM does not know) gets a 403.
    pub fn start_denying(port: u16, bucket: &str) -> S3Server {
        Self::spawn(port, bucket, true)
    }

    fn spawn(port: u16, bucket: &str, deny: bool) -> S3Server {
        let moto = python()
            .parent()
            .expect("the venv python sits in bin/")
            .join("moto_server");
        let mut command = Command::new(&moto);
        if deny {
            // moto lets this many requests through unauthenticated: the
            // bucket's creation.
            command.env("INITIAL_NO_AUTH_ACTION_COUNT", "1");
        }
        let child = command
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", moto.display()));
        let server = S3Server { child, port };
        wait_for_port(port, "moto_server", Duration::from_secs(30));
        server.create_bucket(bucket);
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment object_store reads to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", self.endpoint().as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// The object_store options that reach this server.
    pub fn options(&self) -> Vec<(String, String)> {
        s3_options(&self.endpoint())
    }

    /// Creates a bucket with a plain HTTP request (moto does not check
    /// signatures unless told to).
    fn create_bucket(&self, bucket: &str) {
        self.put(&format!("/{bucket}"), &[]);
    }

    /// Uploads `bytes` as `key` of `bucket` (an unsigned PUT).
    pub fn put_object(&self, bucket: &str, key: &str, bytes: &[u8]) {
        self.put(&format!("/{bucket}/{key}"), bytes);
    }

    /// Every file under `dir` as `prefix/<its path relative to dir>`.
    pub fn put_folder(&self, bucket: &str, prefix: &str, dir: &Path) {
        for entry in std::fs::read_dir(dir).expect("read the folder") {
            let path = entry.expect("a folder entry").path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            let key = format!("{prefix}/{name}");
            if path.is_dir() {
                self.put_folder(bucket, &key, &path);
            } else {
                self.put_object(bucket, &key, &std::fs::read(&path).expect("read a file"));
            }
        }
    }

    fn put(&self, target: &str, body: &[u8]) {
        let port = self.port;
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to moto");
        write!(
            s,
            "PUT {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .expect("sending the request");
        s.write_all(body).expect("sending the body");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("reading the reply");
        assert!(reply.starts_with("HTTP/1.1 200"), "PUT {target}: {reply}");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The object_store options for a moto server at `endpoint`; a function of
/// the address alone, so a client can be set up before the server starts
/// (as for a store that is down and comes back).
pub fn s3_options(endpoint: &str) -> Vec<(String, String)> {
    [
        ("aws_endpoint", endpoint),
        ("aws_allow_http", "true"),
        ("aws_region", "us-east-1"),
        ("aws_access_key_id", "test"),
        ("aws_secret_access_key", "test"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ephemeral_low = ephemeral_low().expect("Linux's ephemeral port range");
        let ports: Vec<u16> = (0..300).map(|_| free_port()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for &port in &ports {
            if ephemeral_low >= PortCursor::LOWEST + 1_000 {
                assert!(
                    (PortCursor::LOWEST..ephemeral_low).contains(&port),
                    "{port}"
                );
            }
            TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}
