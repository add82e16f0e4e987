//! samtrain's data crate: everything between files on disk and the model's
//! inputs, and back from the model's answers to scores. Today it holds SAM's
//! evaluation protocol ([`eval`]); MmLINK reading, synthetic data and the
//! sampler will join it, each in its own module.

pub mod eval;
