//! The MmLINK format: reading `annotations.json` (or JSON Lines) and images
//! from a folder or an object-store URL, checking every record, and writing
//! synthetic datasets in the same format.
//!
//! - [`load`] / [`load_blocking`]: records plus a [`Report`] of every
//!   problem (file, record id or index, field), under a [`Policy`];
//! - [`synth`]: procedural multi-image datasets (group captioning and
//!   storytelling) with real PNGs and a word-level `tokenizer.json`;
//! - [`content`]: whether an answer names what the synthetic images show.

mod check;
pub mod content;
mod load;
mod record;
pub mod synth;

pub use check::Problem;
pub use load::{load, load_blocking, ImageCheck, LoadError, LoadOptions, Loaded, Policy, Report};
pub use record::{Record, RecordId};
