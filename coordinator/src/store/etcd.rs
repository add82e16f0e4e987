//! The [`Store`] on etcd's v3 API (etcd-client). Every call carries a
//! timeout so an unreachable etcd surfaces as an error naming the
//! endpoints, never a hang.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::tls::ClientTls;

use super::{Compare, KeyValue, LeaseId, Op, Store, StoreError, WatchEvent, WatchStream};

/// How long one etcd call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// How to reach an etcd that requires more than its address: TLS
/// (`https://` endpoints) and a user (etcd's auth enabled). The files are
/// read when the store is opened.
#[derive(Debug, Clone, Default)]
pub struct EtcdAccess {
    /// The CA of etcd's server certificate (PEM); `https://` endpoints
    /// without it trust the system's roots.
    pub ca: Option<PathBuf>,
    /// A client certificate and key (PEM), for an etcd started with
    /// `--client-cert-auth`.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// A user, and the file holding its password (first line).
    pub user: Option<(String, PathBuf)>,
}

impl EtcdAccess {
    /// The first line of the password file.
    fn password(&self) -> Result<String, String> {
        let Some((_, file)) = &self.user else {
            return Ok(String::new());
        };
        let text = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let text = String::from_utf8(text).map_err(|_| format!("{}: not UTF-8", file.display()))?;
        Ok(text.lines().next().unwrap_or_default().to_owned())
    }

    /// The connection options these settings add to `options`.
    fn apply(
        &self,
        endpoints: &[String],
        mut options: ConnectOptions,
    ) -> Result<ConnectOptions, String> {
        let https = endpoints.iter().any(|e| e.starts_with("https://"));
        if https {
            let tls = ClientTls {
                ca: self.ca.clone(),
                identity: self.identity.clone(),
                server_name: None,
            }
            .config()
            .map_err(|e| e.to_string())?;
            options = options.with_tls(tls);
        } else if self.ca.is_some() || self.identity.is_some() {
            return Err(
                "TLS files are given but the endpoints are http://; give https:// endpoints".into(),
            );
        }
        if let Some((user, _)) = &self.user {
            let password = self.password()?;
            // A user's token expires (etcd's simple tokens after 5 minutes
            // idle); a call that meets an expired one authenticates again.
            options = options
                .with_user(user.clone(), password)
                .with_auto_token_refresh(true);
        }
        Ok(options)
    }
}

/// etcd, shared by every task of the process (the client multiplexes).
pub struct EtcdStore {
    client: Client,
    endpoints: String,
    /// Whether a user was given: without one, "permission denied" most
    /// likely means etcd's auth is on.
    has_user: bool,
}

impl EtcdStore {
    /// Connects and checks that etcd answers, within about 3 seconds.
    pub async fn connect(
        endpoints: &[String],
        access: &EtcdAccess,
    ) -> Result<EtcdStore, StoreError> {
        let names = endpoints.join(",");
        let unreachable = |message: String| {
            let cut_off = crate::tls::cut_off_by_tls(&message);
            let message = if cut_off && access.identity.is_none() && names.contains("https://") {
                format!("{message} (if etcd requires client certificates, give --etcd-cert and --etcd-key)")
            } else {
                message
            };
            StoreError::Unreachable {
                endpoints: names.clone(),
                message,
            }
        };
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let options = access.apply(endpoints, options).map_err(&unreachable)?;
        let connect = Client::connect(endpoints, Some(options));
        let mut client = tokio::time::timeout(CALL_TIMEOUT, connect)
            .await
            .map_err(|_| unreachable(format!("no answer within {CALL_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::time::timeout(CALL_TIMEOUT, client.status())
            .await
            .map_err(|_| unreachable(format!("no answer within {CALL_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(EtcdStore {
            client,
            endpoints: names,
            has_user: access.user.is_some(),
        })
    }

    async fn call<T, F>(&self, operation: &str, f: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let mut message = e.to_string();
                if !self.has_user && message.contains("permission denied") {
                    message.push_str(
                        " (if etcd's auth is on, give --etcd-user and --etcd-password-file)",
                    );
                }
                Err(StoreError::Operation {
                    store: self.describe(),
                    operation: operation.to_owned(),
                    message,
                })
            }
            Err(_) => Err(StoreError::Timeout {
                store: self.describe(),
                operation: operation.to_owned(),
                timeout: CALL_TIMEOUT,
            }),
        }
    }
}

/// Turns etcd's auth on with `access`'s user as its root: adds the user
/// (when missing), grants it the root role, enables auth. Nothing changes
/// when the user can already log in (auth is on); true when it was turned
/// on now. For a new cluster, by its operator (the chart's hook).
pub async fn enable_auth(endpoints: &[String], access: &EtcdAccess) -> Result<bool, StoreError> {
    let Some((user, _)) = &access.user else {
        return Err(StoreError::Unreachable {
            endpoints: endpoints.join(","),
            message: "turning auth on needs the root user and its password (--etcd-user, --etcd-password-file)".into(),
        });
    };
    if EtcdStore::connect(endpoints, access).await.is_ok() {
        return Ok(false);
    }
    let anonymous = EtcdAccess {
        user: None,
        ..access.clone()
    };
    let store = EtcdStore::connect(endpoints, &anonymous).await?;
    let password = access
        .password()
        .map_err(|message| StoreError::Unreachable {
            endpoints: store.endpoints.clone(),
            message,
        })?;
    let mut client = store.client.clone();
    if let Err(e) = store
        .call("add user", client.user_add(user.clone(), password, None))
        .await
    {
        if !e.to_string().contains("already exists") {
            return Err(e);
        }
    }
    let mut client = store.client.clone();
    store
        .call("grant root", client.user_grant_role(user.clone(), "root"))
        .await?;
    let mut client = store.client.clone();
    store.call("enable auth", client.auth_enable()).await?;
    Ok(true)
}

fn key_value(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        lease: (kv.lease() != 0).then_some(kv.lease()),
        mod_revision: kv.mod_revision(),
    }
}

fn put_options(lease: Option<LeaseId>) -> Option<PutOptions> {
    lease.map(|l| PutOptions::new().with_lease(l))
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd [{}]", self.endpoints)
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut c = self.client.clone();
        let r = self.call("get", c.get(key, None)).await?;
        Ok(r.kvs().first().map(key_value))
    }

    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let mut c = self.client.clone();
        let r = self
            .call(
                "range",
                c.get(prefix, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        Ok(r.kvs().iter().map(key_value).collect())
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        self.call("put", c.put(key, value, put_options(lease)))
            .await?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut c = self.client.clone();
        let r = self.call("delete", c.delete(key, None)).await?;
        Ok(r.deleted() > 0)
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool, StoreError> {
        let compares: Vec<EtcdCompare> = compares
            .into_iter()
            .map(|c| match c {
                Compare::ValueEquals(k, v) => EtcdCompare::value(k, CompareOp::Equal, v),
                Compare::Absent(k) => EtcdCompare::version(k, CompareOp::Equal, 0),
                Compare::ModRevision(k, r) => EtcdCompare::mod_revision(k, CompareOp::Equal, r),
            })
            .collect();
        let ops: Vec<TxnOp> = ops
            .into_iter()
            .map(|o| match o {
                Op::Put { key, value, lease } => TxnOp::put(key, value, put_options(lease)),
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        let mut c = self.client.clone();
        let r = self
            .call("txn", c.txn(Txn::new().when(compares).and_then(ops)))
            .await?;
        Ok(r.succeeded())
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut c = self.client.clone();
        let secs = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let r = self.call("lease grant", c.lease_grant(secs, None)).await?;
        Ok(r.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let mut c = self.client.clone();
        let renew = async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        let answer = match self.call("lease keep-alive", renew).await {
            Ok(a) => a,
            // etcd answers a renewal of an expired lease with this error.
            Err(StoreError::Operation { message, .. }) if message.contains("lease not found") => {
                return Err(StoreError::LeaseNotFound {
                    store: self.describe(),
                    lease,
                })
            }
            Err(e) => return Err(e),
        };
        match answer {
            Some(r) if r.ttl() > 0 => Ok(Duration::from_secs(r.ttl() as u64)),
            Some(_) => Err(StoreError::LeaseNotFound {
                store: self.describe(),
                lease,
            }),
            None => Err(StoreError::Operation {
                store: self.describe(),
                operation: "lease keep-alive".to_owned(),
                message: "the keep-alive stream closed without an answer".to_owned(),
            }),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        match self.call("lease revoke", c.lease_revoke(lease)).await {
            Ok(_) => Ok(()),
            // Revoking a lease that already expired is what the caller wanted.
            Err(StoreError::Operation { message, .. }) if message.contains("lease not found") => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn watch_prefix(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        let mut c = self.client.clone();
        let mut stream = self
            .call(
                "watch",
                c.watch(prefix, Some(WatchOptions::new().with_prefix())),
            )
            .await?;
        let (tx, rx) = mpsc::channel(256);
        let store = self.describe();
        tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                let response = match item {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(store = %store, error = %e, "watch broke");
                        return;
                    }
                };
                if response.canceled() {
                    tracing::warn!(store = %store, reason = response.cancel_reason(), "watch cancelled");
                    return;
                }
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let change = match event.event_type() {
                        EventType::Put => WatchEvent::Put(key_value(kv)),
                        EventType::Delete => WatchEvent::Delete {
                            key: String::from_utf8_lossy(kv.key()).into_owned(),
                        },
                    };
                    if tx.send(change).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}
