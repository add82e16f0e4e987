//! A cache of the frozen vision encoder's outputs, on disk.
//!
//! SAM fine-tunes the Q-Former and the projection; the ViT (EVA-CLIP ViT-g,
//! most of a step's work) is frozen, so an image it has encoded once gives
//! the same output every later epoch and after every restart. Each output
//! is keyed by everything it depends on: the pixels exactly as the encoder
//! is given them (the transform, and any augmentation, is in them), their
//! dtype and shape, and the digest of the model's weights. A key that
//! matches is the same computation; anything else is a miss, so the cache
//! can never hand back an output of other inputs, only fail to help.
//!
//! One file per image (`<key>.pt`, written beside and renamed into place,
//! so a reader never sees half of one). A file that does not load is a
//! miss and is written again.
//!
//! The folder is bounded: when its entries pass `max_bytes` (checked when
//! the cache opens and after every tenth of that written), the oldest
//! written go until it holds 90% of it, with the leftovers of writes a
//! killed process never finished. Ranks sharing the folder may remove an
//! entry another is about to read: that read is a miss, nothing worse.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tch::{Device, Tensor};

use crate::error::ModelError;

#[derive(Debug)]
pub struct VisionCache {
    dir: PathBuf,
    /// The weights' digest, the first part of every key.
    weights: String,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Writes that failed (the cache only loses the use of those).
    failed: AtomicU64,
    /// The most the folder's entries may take.
    max_bytes: u64,
    /// Bytes written since the folder was last measured.
    written: AtomicU64,
}

/// A write's leftover older than this is a killed process's, not one in
/// progress.
const STALE_PARTIAL: Duration = Duration::from_secs(3600);

impl VisionCache {
    /// The cache in `dir` (created if missing) for the encoder whose
    /// weights have digest `weights` (`weights::base_digest`), holding at
    /// most `max_bytes`; the oldest entries beyond that are removed now.
    pub fn open(dir: &Path, weights: &str, max_bytes: u64) -> Result<Self, ModelError> {
        std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let cache = Self {
            dir: dir.to_path_buf(),
            weights: weights.to_owned(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            max_bytes,
            written: AtomicU64::new(0),
        };
        cache.prune().map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(cache)
    }

    /// Removes the oldest entries while the folder holds more than
    /// `max_bytes`, down to 90% of it, and leftovers of killed writes.
    fn prune(&self) -> std::io::Result<()> {
        let now = SystemTime::now();
        let mut entries = Vec::new();
        let mut total = 0u64;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // Gone meanwhile (another rank pruned it): nothing to do.
            let Ok(meta) = entry.metadata() else { continue };
            let modified = meta.modified().unwrap_or(now);
            if name.ends_with(".partial") {
                if now.duration_since(modified).unwrap_or_default() > STALE_PARTIAL {
                    let _ = std::fs::remove_file(entry.path());
                }
            } else if name.ends_with(".pt") && meta.is_file() {
                total += meta.len();
                entries.push((modified, meta.len(), entry.path()));
            }
        }
        self.written.store(0, Ordering::Relaxed);
        if total <= self.max_bytes {
            return Ok(());
        }
        entries.sort();
        let target = self.max_bytes / 10 * 9;
        let mut removed = 0usize;
        for (_, len, path) in entries {
            if total <= target {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
            total = total.saturating_sub(len);
        }
        tracing::info!(dir = %self.dir.display(), removed, bytes = total, max_bytes = self.max_bytes, "vision cache pruned to its bound");
        Ok(())
    }

    /// Lookups answered from the cache, lookups that were not, and writes
    /// that failed.
    pub fn stats(&self) -> (u64, u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    /// The key of one image's pixels `[3, H, W]`.
    fn key(&self, image: &Tensor) -> String {
        let image = image.to_device(Device::Cpu).contiguous();
        let len = image.numel() * image.kind().elt_size_in_bytes();
        let mut hasher = Sha256::new();
        hasher.update(self.weights.as_bytes());
        hasher.update(format!("{:?}{:?}", image.kind(), image.size()).as_bytes());
        if len > 0 {
            // SAFETY: a contiguous CPU tensor of `len` bytes, alive and
            // unchanged while it is read here.
            let bytes = unsafe { std::slice::from_raw_parts(image.data_ptr() as *const u8, len) };
            hasher.update(bytes);
        }
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn file(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.pt"))
    }

    fn get(&self, key: &str) -> Option<Tensor> {
        let found = Tensor::load(self.file(key)).ok();
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    fn put(&self, key: &str, output: &Tensor) {
        let file = self.file(key);
        let partial = self
            .dir
            .join(format!(".{key}.{}.partial", std::process::id()));
        let written = output
            .to_device(Device::Cpu)
            .save(&partial)
            .map_err(|e| e.to_string())
            .and_then(|()| std::fs::metadata(&partial).map_err(|e| e.to_string()))
            .and_then(|meta| {
                std::fs::rename(&partial, &file)
                    .map(|()| meta.len())
                    .map_err(|e| e.to_string())
            });
        if let Ok(len) = written {
            let since = self.written.fetch_add(len, Ordering::Relaxed) + len;
            if since > self.max_bytes / 10 {
                if let Err(error) = self.prune() {
                    tracing::warn!(dir = %self.dir.display(), %error, "cannot prune the vision cache");
                }
            }
        }
        if let Err(error) = written {
            let _ = std::fs::remove_file(&partial);
            if self.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(dir = %self.dir.display(), %error, "cannot write to the vision cache; images it misses are encoded again");
            }
        }
    }

    /// The encoder's outputs for `pixels` `[N, 3, H, W]`: those the cache
    /// has, and `encode` of the others (in one call, on the subset, in
    /// order), which are then added to it.
    pub fn encode(&self, pixels: &Tensor, encode: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
        let n = pixels.size()[0];
        let keys: Vec<String> = (0..n).map(|i| self.key(&pixels.get(i))).collect();
        let mut outputs: Vec<Option<Tensor>> = keys.iter().map(|k| self.get(k)).collect();
        let missing: Vec<i64> = (0..n).filter(|&i| outputs[i as usize].is_none()).collect();
        if !missing.is_empty() {
            let device = pixels.device();
            let index = Tensor::from_slice(&missing).to_device(device);
            let computed = encode(&pixels.index_select(0, &index));
            for (j, &i) in missing.iter().enumerate() {
                let one = computed.get(j as i64);
                self.put(&keys[i as usize], &one);
                outputs[i as usize] = Some(one);
            }
        }
        let outputs: Vec<Tensor> = outputs
            .into_iter()
            .map(|t| {
                t.expect("every output found or computed")
                    .to_device(pixels.device())
            })
            .collect();
        Tensor::stack(&outputs, 0)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use tch::Kind;

    use super::*;

    /// `n` distinct images of 3 x 4 x 4, made without the global generator.
    fn images(n: i64, offset: f64) -> Tensor {
        ((Tensor::arange(n * 48, (Kind::Float, Device::Cpu)) + offset) * 0.37)
            .sin()
            .view([n, 3, 4, 4])
    }

    /// A stand-in encoder: `[N, 3, 4, 4]` to `[N, 2, 6]`, counting images.
    fn encoder(seen: &Cell<i64>) -> impl Fn(&Tensor) -> Tensor + '_ {
        move |p: &Tensor| {
            seen.set(seen.get() + p.size()[0]);
            p.view([-1, 2, 24]).narrow(2, 0, 6) * 2.0 + 1.0
        }
    }

    #[test]
    fn images_seen_before_skip_the_encoder_and_come_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let cache = VisionCache::open(dir.path(), "weights-a", u64::MAX).unwrap();
        let seen = Cell::new(0);
        let first = images(4, 0.0);
        let direct = encoder(&Cell::new(0))(&first);
        let a = cache.encode(&first, encoder(&seen));
        assert_eq!((seen.get(), cache.stats()), (4, (0, 4, 0)));
        assert!(a.equal(&direct));
        let b = cache.encode(&first, encoder(&seen));
        assert_eq!((seen.get(), cache.stats()), (4, (4, 4, 0)));
        assert!(b.equal(&direct));

        // Two seen, one new: only the new one is encoded, in its place.
        let mixed = Tensor::cat(&[first.narrow(0, 1, 2), images(1, 1000.0)], 0);
        let c = cache.encode(&mixed, encoder(&seen));
        assert_eq!(seen.get(), 5);
        assert!(c.equal(&encoder(&Cell::new(0))(&mixed)));

        // Other weights, or another dtype, are other keys.
        let other = VisionCache::open(dir.path(), "weights-b", u64::MAX).unwrap();
        let _ = other.encode(&first, encoder(&seen));
        assert_eq!(seen.get(), 9);
        let _ = cache.encode(&first.to_kind(Kind::Double), |p| {
            encoder(&seen)(&p.to_kind(Kind::Float)).to_kind(Kind::Double)
        });
        assert_eq!(seen.get(), 13);
    }

    #[test]
    fn a_damaged_entry_is_a_miss_and_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = VisionCache::open(dir.path(), "w", u64::MAX).unwrap();
        let seen = Cell::new(0);
        let one = images(1, 0.0);
        let _ = cache.encode(&one, encoder(&seen));
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::write(&file, b"not a tensor").unwrap();
        let again = cache.encode(&one, encoder(&seen));
        assert_eq!(seen.get(), 2);
        assert!(again.equal(&encoder(&Cell::new(0))(&one)));
        let _ = cache.encode(&one, encoder(&seen));
        assert_eq!(seen.get(), 2, "the entry was written again");
    }

    /// Entries of the folder and their total size.
    fn entries(dir: &Path) -> (usize, u64) {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .fold((0, 0), |(n, b), len| (n + 1, b + len))
    }

    #[test]
    fn the_folder_stays_within_its_bound_keeping_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let seen = Cell::new(0);
        let image = |i: i64| images(1, 100.0 * (i + 1) as f64);
        // The size of one entry, from an unbounded cache.
        let unbounded = VisionCache::open(dir.path(), "w", u64::MAX).unwrap();
        let _ = unbounded.encode(&image(0), encoder(&seen));
        let (_, one) = entries(dir.path());

        // Room for 4 entries while 10 images are written, one at a time.
        let bounded = VisionCache::open(dir.path(), "w", 4 * one).unwrap();
        for i in 1..10 {
            let _ = bounded.encode(&image(i), encoder(&seen));
            let (n, bytes) = entries(dir.path());
            assert!(
                bytes <= 4 * one,
                "{n} entries, {bytes} bytes after image {i}"
            );
        }

        // Ten entries written a second apart (set here: file times can be
        // coarser than the writes), and a killed write's leftover from an
        // hour before: a cache opened for 4 keeps the newest 3 (90%).
        let _ = std::fs::remove_dir_all(dir.path());
        let unbounded = VisionCache::open(dir.path(), "w", u64::MAX).unwrap();
        let start = SystemTime::now() - Duration::from_secs(100);
        let set_time = |path: &Path, at: SystemTime| {
            std::fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(at)
                .unwrap()
        };
        for i in 0..10 {
            let _ = unbounded.encode(&image(i), encoder(&seen));
            let newest = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap())
                .max_by_key(|e| e.metadata().unwrap().modified().unwrap())
                .unwrap()
                .path();
            set_time(&newest, start + Duration::from_secs(i as u64));
        }
        let leftover = dir.path().join(".abc.1.partial");
        std::fs::write(&leftover, b"half").unwrap();
        set_time(&leftover, start - STALE_PARTIAL);
        let cache = VisionCache::open(dir.path(), "w", 4 * one).unwrap();
        assert!(!leftover.exists());
        assert_eq!(entries(dir.path()).0, 3);
        let before = seen.get();
        for i in 7..10 {
            let _ = cache.encode(&image(i), encoder(&seen));
        }
        assert_eq!(seen.get(), before, "the newest 3 were kept");
        let _ = cache.encode(&image(6), encoder(&seen));
        assert_eq!(seen.get(), before + 1, "the older ones were removed");
    }
}
