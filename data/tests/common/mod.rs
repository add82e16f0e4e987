//! Shared by the data crate's integration tests: where the workspace and the
//! venv python (with the Python reference packages and moto) are.

use std::path::{Path, PathBuf};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the data crate sits in the workspace")
        .to_path_buf()
}

/// The venv python that scripts/setup.sh installs.
pub fn python() -> PathBuf {
    let path = std::env::var_os("SAMTRAIN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    assert!(
        path.exists(),
        "the reference python {} is missing: run scripts/setup.sh",
        path.display()
    );
    path
}
