//! A shared abort flag: the coordinator may end a training generation while
//! ranks wait inside a collective, and a triggered [`Abort`] makes every
//! operation (and connection setup) that watches it return
//! [`CollectiveError::Aborted`](crate::CollectiveError::Aborted) within a
//! few tens of milliseconds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Cheap to clone; all clones share one flag. Once triggered it stays
/// triggered: a new generation makes a new `Abort`.
#[derive(Clone, Debug, Default)]
pub struct Abort(Arc<AtomicBool>);

impl Abort {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every operation watching this flag fail promptly.
    pub fn trigger(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A flag owned elsewhere (the agent's end-of-generation flag) becomes the
/// abort of the generation's collectives.
impl From<Arc<AtomicBool>> for Abort {
    fn from(flag: Arc<AtomicBool>) -> Self {
        Abort(flag)
    }
}
