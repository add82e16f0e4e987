//! The [`Store`] on etcd's v3 API (etcd-client). Every call carries a
//! timeout so an unreachable etcd surfaces as an error naming the
//! endpoints, never a hang.

use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::{Compare, KeyValue, LeaseId, Op, Store, StoreError, WatchEvent, WatchStream};

/// How long one etcd call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// etcd, shared by every task of the process (the client multiplexes).
pub struct EtcdStore {
    client: Client,
    endpoints: String,
}

impl EtcdStore {
    /// Connects and checks that etcd answers, within about 3 seconds.
    pub async fn connect(endpoints: &[String]) -> Result<EtcdStore, StoreError> {
        let names = endpoints.join(",");
        let unreachable = |message: String| StoreError::Unreachable {
            endpoints: names.clone(),
            message,
        };
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
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
        })
    }

    async fn call<T, F>(&self, operation: &str, f: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Operation {
                store: self.describe(),
                operation: operation.to_owned(),
                message: e.to_string(),
            }),
            Err(_) => Err(StoreError::Timeout {
                store: self.describe(),
                operation: operation.to_owned(),
                timeout: CALL_TIMEOUT,
            }),
        }
    }
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
