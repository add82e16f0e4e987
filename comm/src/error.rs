//! Why a collective failed. Every failure that involves a peer names its
//! rank and address, so an operator can tell which process died or stalled;
//! the operation and the group are named too.

use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CollectiveError {
    /// The peer closed or reset its connection: it died, or it gave up on an
    /// earlier failure of its own.
    #[error("{op} in group {group}: connection with rank {peer} ({addr}) closed: {detail}")]
    PeerClosed {
        op: &'static str,
        group: &'static str,
        peer: i64,
        addr: String,
        detail: String,
    },
    /// Nothing moved on a connection for the whole timeout.
    #[error(
        "{op} in group {group}: no progress for {timeout:?} {waiting} rank {peer} ({addr}); \
         the peer is stuck or not calling {op}"
    )]
    Timeout {
        op: &'static str,
        group: &'static str,
        peer: i64,
        addr: String,
        timeout: Duration,
        /// "receiving from" or "sending to".
        waiting: &'static str,
    },
    #[error("{op} in group {group}: aborted")]
    Aborted {
        op: &'static str,
        group: &'static str,
    },
    #[error("{op} in group {group}: I/O with rank {peer} ({addr}): {source}")]
    Io {
        op: &'static str,
        group: &'static str,
        peer: i64,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The neighbour called another operation, or the same one with another
    /// size, data type or root.
    #[error("{op} in group {group}: rank {peer} ({addr}) disagrees: {detail}")]
    Mismatch {
        op: &'static str,
        group: &'static str,
        peer: i64,
        addr: String,
        detail: String,
    },
    /// A peer's listener refused this rank's connection.
    #[error("connect: rank {peer} ({addr}) refused the connection for group {group}: {reason}")]
    Refused {
        group: &'static str,
        peer: i64,
        addr: String,
        reason: String,
    },
    #[error("connect: could not reach rank {peer} ({addr}) for group {group} within {timeout:?}: {last}")]
    Unreachable {
        group: &'static str,
        peer: i64,
        addr: String,
        timeout: Duration,
        last: String,
    },
    #[error("connect: rank(s) {missing} did not connect for group {group} within {timeout:?}")]
    AcceptTimeout {
        group: &'static str,
        missing: String,
        timeout: Duration,
    },
    #[error("connect: listener {addr}: {source}")]
    Listener {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The group failed earlier; its streams are in an unknown state.
    #[error("{op} in group {group}: the group is unusable after an earlier failure: {first}")]
    Broken {
        op: &'static str,
        group: &'static str,
        first: String,
    },
    /// A bad argument from the caller (device, dtype, root, options).
    #[error("{op}: {message}")]
    Invalid { op: &'static str, message: String },
    #[error("{op}: {source}")]
    Torch {
        op: &'static str,
        #[source]
        source: tch::TchError,
    },
    #[error("{op}: NCCL: {message}")]
    Nccl { op: &'static str, message: String },
}

impl CollectiveError {
    /// The operation that failed ("connect" for group setup).
    pub fn op(&self) -> &'static str {
        match self {
            Self::PeerClosed { op, .. }
            | Self::Timeout { op, .. }
            | Self::Aborted { op, .. }
            | Self::Io { op, .. }
            | Self::Mismatch { op, .. }
            | Self::Broken { op, .. }
            | Self::Invalid { op, .. }
            | Self::Torch { op, .. }
            | Self::Nccl { op, .. } => op,
            Self::Refused { .. }
            | Self::Unreachable { .. }
            | Self::AcceptTimeout { .. }
            | Self::Listener { .. } => "connect",
        }
    }
}

/// The panic payload of a collective that fails where its error cannot be
/// returned: the model's tensor-parallel all-reduce runs inside the forward
/// pass, whose layers return plain tensors. Whoever catches the unwind
/// (`std::panic::catch_unwind`) gets the typed error back with
/// [`CollectiveFailure::from_panic`] instead of matching on a message.
#[derive(Debug)]
pub struct CollectiveFailure(pub CollectiveError);

impl CollectiveFailure {
    /// Unwinds with `error` as the payload.
    pub fn raise(error: CollectiveError) -> ! {
        std::panic::panic_any(CollectiveFailure(error))
    }

    /// The collective's error, if `payload` is a [`CollectiveFailure`].
    pub fn from_panic(
        payload: Box<dyn std::any::Any + Send>,
    ) -> Result<CollectiveError, Box<dyn std::any::Any + Send>> {
        payload
            .downcast::<CollectiveFailure>()
            .map(|failure| failure.0)
    }
}

pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_collective_failure_unwinds_with_its_typed_error() {
        let payload = std::panic::catch_unwind(|| {
            CollectiveFailure::raise(CollectiveError::Aborted {
                op: "all_reduce",
                group: "tp",
            })
        })
        .unwrap_err();
        let error = CollectiveFailure::from_panic(payload).expect("a CollectiveFailure");
        assert!(matches!(
            error,
            CollectiveError::Aborted {
                op: "all_reduce",
                group: "tp"
            }
        ));
        assert_eq!(error.op(), "all_reduce");

        let other = std::panic::catch_unwind(|| panic!("something else")).unwrap_err();
        let back = CollectiveFailure::from_panic(other).expect_err("not a collective's");
        assert_eq!(back.downcast_ref::<&str>(), Some(&"something else"));
    }
}
