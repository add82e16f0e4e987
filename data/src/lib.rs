//! samtrain's data crate: everything between files on disk and the model's
//! inputs, and back from the model's answers to scores.
//!
//! - [`mmlink`]: the MmLINK format: read, check, synthesise;
//! - [`remote`]: objects in object storage as cached local files;
//! - [`preprocess`]: images and text to model-ready batches, ahead of the step;
//! - [`sampler`]: the global sample order and each rank's slice of it;
//! - [`ledger`]: the record of which samples training consumed, and its
//!   check that each was trained once;
//! - [`rng`]: the seeded generator behind the sample order and synthetic data;
//! - [`eval`]: SAM's evaluation protocol;
//! - [`limits`]: how many images a record and how many pixels an image may have.

pub mod eval;
pub mod ledger;
pub mod limits;
pub mod mmlink;
pub mod preprocess;
pub mod remote;
pub mod rng;
pub mod sampler;
