//! samtrain's data crate: everything between files on disk and the model's
//! inputs, and back from the model's answers to scores.
//!
//! - [`mmlink`]: the MmLINK format: read, check, synthesise;
//! - [`eval`]: SAM's evaluation protocol.

pub mod eval;
pub mod mmlink;
