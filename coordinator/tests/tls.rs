//! The API over TLS, as clients on the network meet it: a coordinator with
//! a certificate admits clients that trust its CA; with mutual TLS, only
//! those that also present a certificate of the client CA; a plaintext
//! client or an untrusting one gets an error that says what to give; a
//! renewed certificate is served without a restart. (Plaintext off
//! loopback is refused: `security.rs`.)

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{loopback_options, Node};
use samtrain_coordinator::auth::{AuthOptions, TokenSource};
use samtrain_coordinator::client::{Client, ClientTls, Credentials};
use samtrain_coordinator::tls::{generate, GeneratedCerts, ServerTlsFiles};
use samtrain_coordinator::CoordinatorOptions;

/// One CA's set of files in `dir`, named after `tag`.
struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

impl Pki {
    fn write(dir: &Path, tag: &str) -> Pki {
        let made = generate(&["127.0.0.1".to_owned(), "localhost".to_owned()], 1).unwrap();
        Pki::write_files(dir, tag, &made)
    }

    fn write_files(dir: &Path, tag: &str, made: &GeneratedCerts) -> Pki {
        let file = |name: &str, pem: &str| {
            let path = dir.join(format!("{tag}-{name}"));
            std::fs::write(&path, pem).unwrap();
            path
        };
        Pki {
            ca: file("ca.pem", &made.ca_cert),
            server: (
                file("server.pem", &made.server_cert),
                file("server-key.pem", &made.server_key),
            ),
            client: (
                file("client.pem", &made.client_cert),
                file("client-key.pem", &made.client_key),
            ),
        }
    }

    /// A client that trusts this CA, presenting `identity` if given.
    fn trusting(&self, identity: Option<&(PathBuf, PathBuf)>) -> ClientTls {
        ClientTls {
            ca: Some(self.ca.clone()),
            identity: identity.cloned(),
            server_name: None,
        }
    }
}

fn coordinator(cert: &Path, key: &Path, client_ca: Option<&Path>) -> (Node, String) {
    let (auth, operator, _) = AuthOptions::generated();
    let node = Node::start_with(CoordinatorOptions {
        auth,
        tls: Some(ServerTlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: client_ca.map(Path::to_owned),
        }),
        ..loopback_options("tls")
    });
    (node, operator)
}

fn client(node: &Node, token: &str, tls: Option<ClientTls>) -> Client {
    let credentials = Credentials::token(TokenSource::Literal(token.to_owned()));
    let credentials = match tls {
        Some(tls) => credentials.with_tls(tls),
        None => credentials,
    };
    Client::new(vec![node.address()], credentials)
}

#[tokio::test]
async fn mutual_tls_admits_only_trusting_and_trusted_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, stranger) = (Pki::write(dir.path(), "a"), Pki::write(dir.path(), "b"));
    let (node, token) = coordinator(&pki.server.0, &pki.server.1, Some(&pki.ca));

    let trusted = client(&node, &token, Some(pki.trusting(Some(&pki.client))));
    assert!(trusted.clone().list().await.unwrap().is_empty());

    let error = |tls: Option<ClientTls>| {
        let mut c = client(&node, &token, tls);
        async move { c.list().await.unwrap_err().to_string() }
    };
    let without_cert = error(Some(pki.trusting(None))).await;
    assert!(without_cert.contains("--tls-client-cert"), "{without_cert}");
    let foreign_cert = error(Some(pki.trusting(Some(&stranger.client)))).await;
    assert!(
        !foreign_cert.is_empty(),
        "a foreign client certificate was admitted"
    );
    let untrusting = error(Some(stranger.trusting(Some(&pki.client)))).await;
    assert!(untrusting.contains("UnknownIssuer"), "{untrusting}");
    let plaintext = error(None).await;
    assert!(plaintext.contains("--tls-ca"), "{plaintext}");
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (Pki::write(dir.path(), "old"), Pki::write(dir.path(), "new"));
    let live = Pki::write_files(
        dir.path(),
        "live",
        &GeneratedCerts {
            ca_cert: std::fs::read_to_string(&old.ca).unwrap(),
            ca_key: String::new(),
            server_cert: std::fs::read_to_string(&old.server.0).unwrap(),
            server_key: std::fs::read_to_string(&old.server.1).unwrap(),
            client_cert: String::new(),
            client_key: String::new(),
        },
    );
    let (node, token) = coordinator(&live.server.0, &live.server.1, None);
    let mut trusts_old = client(&node, &token, Some(old.trusting(None)));
    let mut trusts_new = client(&node, &token, Some(new.trusting(None)));
    trusts_old.list().await.unwrap();
    assert!(trusts_new.list().await.is_err());

    // What a renewal does: new files in place of the old.
    std::fs::copy(&new.server.0, &live.server.0).unwrap();
    std::fs::copy(&new.server.1, &live.server.1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while trusts_new.list().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A connection made before the renewal stays up; new ones get the new
    // certificate.
    trusts_old.list().await.unwrap();
    let mut new_trusting_old = client(&node, &token, Some(old.trusting(None)));
    let refused = new_trusting_old.list().await.unwrap_err().to_string();
    assert!(refused.contains("UnknownIssuer"), "{refused}");

    // A renewal caught half-written keeps the certificate that loads.
    std::fs::write(&live.server.0, "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut after_a_bad_write = client(&node, &token, Some(new.trusting(None)));
    after_a_bad_write.list().await.unwrap();
}
