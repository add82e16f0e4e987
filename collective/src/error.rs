//! The collective crate's error type is the seam's: every implementation of
//! [`samtrain_comm::Collective`] fails with the same typed error.

pub use samtrain_comm::{CollectiveError, Result};
