//! The store trait's semantics, the same on a real etcd and in memory:
//! keys and prefix ranges, compare-and-put, lease expiry and revocation
//! deleting keys (and watches seeing it), and an unreachable etcd failing
//! fast with the endpoints named.

use std::time::{Duration, Instant};

use samtrain_testkit::{free_port, Etcd};

use samtrain_coordinator::store::{
    self, Compare, LeaseKeeper, Op, SharedStore, StoreError, WatchEvent,
};

async fn next_event(w: &mut store::WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), w.recv())
        .await
        .expect("a watch event within 5 s")
        .expect("watch open")
}

async fn semantics(s: SharedStore) {
    let name = s.describe();
    keys_and_transactions(&s, &name).await;
    // One watch sees both lease tests' keys come and go.
    let mut watch = s.watch_prefix("/w/").await.unwrap();
    lease_expiry(&s, &name, &mut watch).await;
    keep_alive_and_revocation(&s, &name, &mut watch).await;
}

async fn keys_and_transactions(s: &SharedStore, name: &str) {
    s.put("/t/a", b"1".to_vec(), None).await.unwrap();
    s.put("/t/b", b"2".to_vec(), None).await.unwrap();
    s.put("/u/c", b"3".to_vec(), None).await.unwrap();
    let keys: Vec<String> = s
        .range("/t/")
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["/t/a", "/t/b"], "{name}");
    assert_eq!(s.get("/t/a").await.unwrap().unwrap().value, b"1");
    assert!(s.get("/t/zz").await.unwrap().is_none());

    // Compare-and-put.
    let put = |v: &str| Op::Put {
        key: "/t/a".into(),
        value: v.as_bytes().to_vec(),
        lease: None,
    };
    assert!(!s
        .txn(vec![Compare::Absent("/t/a".into())], vec![put("x")])
        .await
        .unwrap());
    assert!(!s
        .txn(
            vec![Compare::ValueEquals("/t/a".into(), b"9".to_vec())],
            vec![put("x")]
        )
        .await
        .unwrap());
    assert!(s
        .txn(
            vec![Compare::ValueEquals("/t/a".into(), b"1".to_vec())],
            vec![put("x")]
        )
        .await
        .unwrap());
    let rev = s.get("/t/a").await.unwrap().unwrap().mod_revision;
    assert!(s
        .txn(
            vec![Compare::ModRevision("/t/a".into(), rev)],
            vec![Op::Delete { key: "/t/a".into() }]
        )
        .await
        .unwrap());
    assert!(s.get("/t/a").await.unwrap().is_none(), "{name}");
    assert!(s.delete("/t/b").await.unwrap());
    assert!(!s.delete("/t/b").await.unwrap());
}

/// A lease that is not renewed expires and takes its key; a watch sees it.
async fn lease_expiry(s: &SharedStore, name: &str, watch: &mut store::WatchStream) {
    let lease = s.grant(Duration::from_secs(1)).await.unwrap();
    s.put("/w/x", b"alive".to_vec(), Some(lease)).await.unwrap();
    assert_eq!(s.get("/w/x").await.unwrap().unwrap().lease, Some(lease));
    match next_event(watch).await {
        WatchEvent::Put(kv) => assert_eq!(
            (kv.key.as_str(), kv.value.as_slice()),
            ("/w/x", &b"alive"[..])
        ),
        e => panic!("{name}: expected a put, got {e:?}"),
    }
    let t0 = Instant::now();
    assert_eq!(
        next_event(watch).await,
        WatchEvent::Delete { key: "/w/x".into() }
    );
    let waited = t0.elapsed();
    // etcd may keep a 1 s lease up to about 2 s (its minimum granularity).
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(4),
        "{name}: {waited:?}"
    );
    assert!(s.get("/w/x").await.unwrap().is_none());
    let ka = s.keep_alive(lease).await;
    assert!(
        matches!(ka, Err(StoreError::LeaseNotFound { .. })),
        "{name}: {ka:?}"
    );
    assert!(
        s.put("/w/y", vec![], Some(lease)).await.is_err(),
        "{name}: put on a dead lease"
    );
}

/// Keep-alive holds a key past its TTL; revocation deletes it at once.
async fn keep_alive_and_revocation(s: &SharedStore, name: &str, watch: &mut store::WatchStream) {
    let lease = s.grant(Duration::from_secs(1)).await.unwrap();
    s.put("/w/kept", b"k".to_vec(), Some(lease)).await.unwrap();
    let keeper = LeaseKeeper::start(s.clone(), lease, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        s.get("/w/kept").await.unwrap().is_some(),
        "{name}: kept alive"
    );
    assert!(!keeper.is_lost());
    let t0 = Instant::now();
    s.revoke(lease).await.unwrap();
    assert!(s.get("/w/kept").await.unwrap().is_none(), "{name}");
    assert!(t0.elapsed() < Duration::from_millis(500));
    s.revoke(lease).await.expect("revoking twice is fine");
    // The put of /w/kept, then its delete.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(next_event(watch).await);
    }
    assert!(
        matches!(&seen[0], WatchEvent::Put(kv) if kv.key == "/w/kept"),
        "{name}: {seen:?}"
    );
    assert_eq!(
        seen[1],
        WatchEvent::Delete {
            key: "/w/kept".into()
        }
    );
}

#[tokio::test]
async fn memory_store_semantics() {
    semantics(store::open(&[], &Default::default()).await.unwrap()).await;
}

#[tokio::test]
async fn etcd_store_semantics() {
    let etcd = Etcd::start();
    semantics(
        store::open(std::slice::from_ref(&etcd.endpoint), &Default::default())
            .await
            .unwrap(),
    )
    .await;
}

#[tokio::test]
async fn unreachable_etcd_fails_fast_naming_the_endpoints() {
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let t0 = Instant::now();
    let err = match store::open(std::slice::from_ref(&endpoint), &Default::default()).await {
        Ok(_) => panic!("nothing listens there"),
        Err(e) => e,
    };
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let message = err.to_string();
    assert!(
        message.contains(&endpoint) && message.contains("unreachable"),
        "{message}"
    );
}

/// An etcd as a hardened cluster runs it: TLS with client certificates,
/// and auth enabled with a root user.
#[tokio::test]
async fn an_etcd_with_tls_and_auth_is_reached_with_its_ca_certificate_and_user() {
    use samtrain_coordinator::store::{etcd, EtcdAccess};
    use samtrain_testkit::EtcdTls;

    let dir = tempfile::tempdir().unwrap();
    let made = samtrain_coordinator::tls::generate(&["127.0.0.1".to_owned()], 1).unwrap();
    let file = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let ca = file("ca.pem", &made.ca_cert);
    let (cert, key) = (
        file("server.pem", &made.server_cert),
        file("server-key.pem", &made.server_key),
    );
    let client = (
        file("client.pem", &made.client_cert),
        file("client-key.pem", &made.client_key),
    );
    let password = file("password", "s3cret\n");
    let etcd = Etcd::start_with(Some(EtcdTls {
        cert: &cert,
        key: &key,
        client_ca: &ca,
    }));
    let endpoints = std::slice::from_ref(&etcd.endpoint);

    let full = EtcdAccess {
        ca: Some(ca.clone()),
        identity: Some(client.clone()),
        user: Some(("root".to_owned(), password.clone())),
    };
    // Auth on, as the chart's hook turns it on; a second run changes nothing.
    assert!(etcd::enable_auth(endpoints, &full).await.unwrap());
    assert!(!etcd::enable_auth(endpoints, &full).await.unwrap());
    semantics(store::open(endpoints, &full).await.unwrap()).await;

    let refused = |access: EtcdAccess| async move {
        match store::open(endpoints, &access).await {
            Ok(store) => store
                .put("/refused", b"x".to_vec(), None)
                .await
                .err()
                .map(|e| e.to_string())
                .unwrap_or_else(|| panic!("{access:?} was let in")),
            Err(e) => e.to_string(),
        }
    };
    let no_user = refused(EtcdAccess {
        user: None,
        ..full.clone()
    })
    .await;
    assert!(no_user.contains("--etcd-user"), "{no_user}");
    let wrong = file("wrong", "guess");
    let bad_password = refused(EtcdAccess {
        user: Some(("root".to_owned(), wrong)),
        ..full.clone()
    })
    .await;
    assert!(
        bad_password.contains("authentication failed"),
        "{bad_password}"
    );
    let no_certificate = refused(EtcdAccess {
        identity: None,
        ..full.clone()
    })
    .await;
    assert!(no_certificate.contains("--etcd-cert"), "{no_certificate}");
    let untrusted = refused(EtcdAccess {
        ca: None,
        ..full.clone()
    })
    .await;
    assert!(untrusted.contains("UnknownIssuer"), "{untrusted}");
}
