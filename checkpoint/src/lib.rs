//! Checkpoints for samtrain in object storage.
