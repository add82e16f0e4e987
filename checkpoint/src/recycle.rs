//! Reusing a local folder's old shard files for new saves. Writing a fresh
//! file makes the kernel find a page (of the page cache) and a disk block
//! for every byte; most of a large save's time went there. Overwriting a
//! file that already holds that much skips both. So when the retention
//! removes a checkpoint from a local folder, its shard files are moved into
//! `.recycled/` beside the checkpoints instead of deleted, and the next save
//! writes each of its shards into one of them (the closest in size) under a
//! staging name, trims it to its size and renames it into place: the file
//! appears whole or not at all, as every other write of the store, and the
//! manifest is still written last. What the next retention finds still in
//! `.recycled/` was not needed, and is deleted.
//!
//! Every file is on disk (`fdatasync`) before it is renamed into place, so
//! a committed checkpoint never names a file whose new bytes a power loss
//! could lose. A file with another name (a hard link of a backup) is
//! deleted, never reused; a process still reading a checkpoint that
//! retention removed may see it change under it (until the next save
//! takes its files, it is still there in `.recycled/`).
//!
//! Object stores have no such cost to save (an upload is a new object), so
//! this is for local folders (a node's disk, a mounted volume) only.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::staging::Data;

/// The folder under a local checkpoint location that holds reusable files.
pub(crate) const RECYCLED_DIR: &str = ".recycled";

/// Files smaller than this are deleted, not kept: reusing them saves
/// nothing worth a rename.
const WORTH_RECYCLING: u64 = 1 << 20;

/// Bytes written at a time: small enough that a piece read just before it
/// is written (to checksum it) is still in the cache when it is.
const PIECE: usize = 1 << 20;

/// The recycle bin of one local checkpoint location.
pub(crate) struct Recycler {
    bin: PathBuf,
}

/// Makes staging names unique within this process (several saves of
/// different ranks may share a folder; the process id tells processes
/// apart).
static STAGED: AtomicU64 = AtomicU64::new(0);

impl Recycler {
    pub(crate) fn new(root: &Path) -> Recycler {
        Recycler {
            bin: root.join(RECYCLED_DIR),
        }
    }

    /// Writes `chunks` as the file `dest`, into a recycled file when the
    /// bin holds one; whether one was reused. The file appears at `dest`
    /// whole or not at all. Each piece (at most [`PIECE`] bytes) is shown
    /// to `written`, with the index of its chunk, just before it is
    /// written: what reads it there finds it in the cache.
    pub(crate) fn write(
        &self,
        dest: &Path,
        chunks: &[Data],
        mut written: impl FnMut(usize, &[u8]),
    ) -> io::Result<bool> {
        let size: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        // `<name>#<digits>` is the store's own staging name: listings skip it.
        let staged = PathBuf::from(format!(
            "{}#{}{:06}",
            dest.display(),
            std::process::id(),
            STAGED.fetch_add(1, Ordering::Relaxed)
        ));
        let reused = size >= WORTH_RECYCLING && self.take(size, &staged);
        let result = (|| {
            let mut file = if reused {
                OpenOptions::new().write(true).open(&staged)?
            } else {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&staged)?
            };
            for (i, chunk) in chunks.iter().enumerate() {
                chunk.pieces(PIECE, |piece| {
                    written(i, piece);
                    file.write_all(piece)
                })?;
            }
            // A bigger recycled file keeps no tail of its old bytes.
            file.set_len(size)?;
            // On disk before its name appears (and so before any manifest
            // naming it): after a power loss a committed checkpoint never
            // holds a recycled file's old bytes.
            file.sync_data()?;
            drop(file);
            fs::rename(&staged, dest)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&staged);
        }
        result.map(|()| reused)
    }

    /// Moves a recycled file (the same size if there is one, else the
    /// smallest bigger one, else the biggest) to `to`; false when the bin
    /// has none (or another writer took each first).
    fn take(&self, size: u64, to: &Path) -> bool {
        let Ok(entries) = fs::read_dir(&self.bin) else {
            return false;
        };
        let mut files: Vec<(u64, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| Some((e.metadata().ok()?.len(), e.path())))
            .collect();
        // Closest first: the exact size, then bigger by how much, then
        // smaller (growing a file allocates only the difference).
        files.sort_by_key(|(len, _)| match len.cmp(&size) {
            std::cmp::Ordering::Equal => (0, 0),
            std::cmp::Ordering::Greater => (1, len - size),
            std::cmp::Ordering::Less => (2, size - len),
        });
        files
            .into_iter()
            .any(|(_, file)| fs::rename(file, to).is_ok())
    }

    /// Empties the bin of what the saves since the last call did not use,
    /// then keeps `files` there (the shards of a checkpoint being removed;
    /// small files are deleted).
    pub(crate) fn keep(&self, files: &[PathBuf]) -> io::Result<()> {
        if let Ok(entries) = fs::read_dir(&self.bin) {
            for entry in entries.filter_map(Result::ok) {
                remove_if_there(&entry.path())?;
            }
        }
        for file in files {
            let meta = match fs::metadata(file) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            // A file with another name (a hard-linked backup) is left to it.
            if meta.len() < WORTH_RECYCLING || meta.nlink() > 1 {
                remove_if_there(file)?;
                continue;
            }
            fs::create_dir_all(&self.bin)?;
            let name = format!(
                "{}-{:06}",
                std::process::id(),
                STAGED.fetch_add(1, Ordering::Relaxed)
            );
            match fs::rename(file, self.bin.join(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Deletes `path`; one already gone is no error.
fn remove_if_there(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many files the bin holds.
    fn bin_len(recycler: &Recycler) -> usize {
        fs::read_dir(&recycler.bin).map_or(0, |e| e.count())
    }

    fn chunks(byte: u8, len: usize) -> Vec<Data> {
        vec![
            Data::Owned(vec![byte; len / 2].into()),
            Data::Owned(vec![byte; len - len / 2].into()),
        ]
    }

    #[test]
    fn a_recycled_file_is_written_whole_trimmed_and_renamed_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let recycler = Recycler::new(dir.path());
        let old = dir.path().join("step-1/params.safetensors");
        assert!(!recycler
            .write(&old, &chunks(1, 3 << 20), |_, _| {})
            .unwrap());
        let tiny = dir.path().join("step-1/meta.json");
        assert!(!recycler
            .write(
                &tiny,
                &[Data::Owned(bytes::Bytes::from_static(b"{}"))],
                |_, _| {}
            )
            .unwrap());
        recycler.keep(&[old.clone(), tiny.clone()]).unwrap();
        assert!(!old.exists() && !tiny.exists());
        assert_eq!(
            bin_len(&recycler),
            1,
            "the big file kept, the small one deleted"
        );

        // Smaller than the recycled file: reused and trimmed.
        let new = dir.path().join("step-2/params.safetensors");
        assert!(recycler
            .write(&new, &chunks(2, 2 << 20), |_, _| {})
            .unwrap());
        let bytes = fs::read(&new).unwrap();
        assert_eq!(bytes.len(), 2 << 20);
        assert!(bytes.iter().all(|b| *b == 2));
        assert_eq!(bin_len(&recycler), 0);
        // Nothing left under a staging name.
        let names: Vec<_> = fs::read_dir(dir.path().join("step-2"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["params.safetensors"]);
        // An empty bin: a fresh file.
        let other = dir.path().join("step-2/optimizer.safetensors");
        assert!(!recycler
            .write(&other, &chunks(3, 2 << 20), |_, _| {})
            .unwrap());
    }

    #[test]
    fn the_closest_size_is_taken_and_leftovers_go_at_the_next_keep() {
        let dir = tempfile::tempdir().unwrap();
        let recycler = Recycler::new(dir.path());
        let sizes = [4 << 20, 2 << 20, 8 << 20];
        let files: Vec<PathBuf> = sizes
            .iter()
            .enumerate()
            .map(|(i, len)| {
                let f = dir.path().join(format!("step-1/f{i}"));
                recycler.write(&f, &chunks(1, *len), |_, _| {}).unwrap();
                f
            })
            .collect();
        recycler.keep(&files).unwrap();
        let dest = dir.path().join("step-2/x");
        assert!(recycler
            .write(&dest, &chunks(5, 3 << 20), |_, _| {})
            .unwrap());
        let mut left: Vec<u64> = fs::read_dir(&recycler.bin)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .collect();
        left.sort();
        // 4 MiB was the smallest file bigger than 3 MiB.
        assert_eq!(left, [2 << 20, 8 << 20]);
        recycler.keep(&[]).unwrap();
        assert_eq!(bin_len(&recycler), 0);
    }
}
