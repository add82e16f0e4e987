//! Reading an MmLINK dataset from a local folder or an object-store URL
//! (`file://`, `s3://`, `gs://`, `az://`): the annotations (a JSON list or
//! JSON Lines), then every record's fields and images, with a report of
//! every problem and a policy for what to do with bad records.
//!
//! One listing of the dataset's folder gives every object's size and version
//! (its ETag, or its modification time): images are checked to exist
//! against it instead of one request each, and the dataset gets a digest
//! (the annotations' bytes and every referenced image's size and version),
//! so that a dataset decoded once without a problem is not decoded again
//! while it stays the same.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;
use url::Url;

use super::check::{check_record, path_segments, Problem};
use super::record::{Record, RecordId};
use crate::limits::{self, DecodeError, InputLimits};
use crate::remote;

/// The annotation files looked for, in this order, when a folder is given.
const ANNOTATION_FILES: [&str; 2] = ["annotations.json", "annotations.jsonl"];

/// How many images are fetched and decoded at once: enough to hide an
/// object store's latency, few enough to bound memory.
const IMAGES_IN_FLIGHT: usize = 32;

/// What to do with records that have problems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Any problem is an error that lists them all.
    #[default]
    Fail,
    /// Bad records are left out and counted in the report.
    Skip,
}

/// How far images are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageCheck {
    /// Read and decode every image: the only check that finds corrupt files.
    #[default]
    Decode,
    /// Only check that every image exists (in the folder's listing, or a
    /// `HEAD` each where the store refuses to list).
    Exists,
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub policy: Policy,
    pub images: ImageCheck,
    /// A folder of the digests of datasets already decoded without an image
    /// problem. Under [`ImageCheck::Decode`], a dataset whose digest is
    /// there is only checked for existence; one decoded cleanly is added.
    pub validated: Option<PathBuf>,
    /// Images per record and pixels per image.
    pub limits: InputLimits,
}

/// What reading a dataset found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The annotations file, as given or found.
    pub annotations: String,
    /// Records in the annotations.
    pub records: usize,
    /// Records without any problem.
    pub valid: usize,
    pub problems: Vec<Problem>,
}

impl Report {
    /// Records left out (under [`Policy::Skip`]) for having problems.
    pub fn skipped(&self) -> usize {
        self.records - self.valid
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for problem in &self.problems {
            writeln!(f, "{problem}")?;
        }
        write!(
            f,
            "{}: {} records, {} valid, {} with problems ({} problems)",
            self.annotations,
            self.records,
            self.valid,
            self.skipped(),
            self.problems.len()
        )
    }
}

/// A dataset's valid records and the report of the whole read.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub records: Vec<Record>,
    pub report: Report,
    /// The dataset's digest: its annotations and every referenced image's
    /// size and version. None when the folder could not be listed or an
    /// image is missing.
    pub digest: Option<String>,
    /// The digest was among [`LoadOptions::validated`]: the images were
    /// checked to exist, not decoded again.
    pub validated_before: bool,
}

/// Size and version (ETag, else modification time) of each object under a
/// dataset's folder, as [`remote::version_of`] writes them.
type Inventory = HashMap<StorePath, String>;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("cannot open dataset {location}: {message}")]
    Location { location: String, message: String },
    #[error("no annotations.json or annotations.jsonl in {dir}")]
    NoAnnotations { dir: String },
    #[error("cannot read {file}: {source}")]
    Read {
        file: String,
        source: object_store::Error,
    },
    #[error("{file} is not valid JSON: {source}")]
    Json {
        file: String,
        source: serde_json::Error,
    },
    #[error("{file}: annotations must be a JSON list of records, found {found}")]
    NotAList { file: String, found: &'static str },
    #[error("{report}")]
    Invalid { report: Report },
}

/// A dataset folder in an object store.
struct Dataset {
    store: Arc<dyn ObjectStore>,
    /// The folder, as the store names it.
    dir: StorePath,
    /// The folder as the user wrote it, for messages.
    shown_dir: String,
    /// The annotations file when the location named one.
    file: Option<String>,
}

impl Dataset {
    fn open(location: &str) -> Result<Self, LoadError> {
        let fail = |message: String| LoadError::Location {
            location: location.to_owned(),
            message,
        };
        let names_file = location.ends_with(".json") || location.ends_with(".jsonl");
        if location.contains("://") {
            let url = Url::parse(location).map_err(|e| fail(e.to_string()))?;
            // Credentials and endpoints come from the environment, as every
            // object-store tool reads them (AWS_ENDPOINT, AWS_ALLOW_HTTP...).
            let options = std::env::vars().filter(|(k, _)| {
                ["AWS_", "GOOGLE_", "AZURE_"]
                    .iter()
                    .any(|prefix| k.starts_with(prefix))
            });
            let (store, path) =
                object_store::parse_url_opts(&url, options).map_err(|e| fail(e.to_string()))?;
            let shown = location.trim_end_matches('/').to_owned();
            let (dir, shown_dir, file) = split_file(path, shown, names_file);
            Ok(Self {
                store: Arc::from(store),
                dir,
                shown_dir,
                file,
            })
        } else {
            let local = std::path::Path::new(location);
            let path = StorePath::from_filesystem_path(local).map_err(|e| fail(e.to_string()))?;
            let names_file = names_file || local.is_file();
            let (dir, shown_dir, file) = split_file(path, location.to_owned(), names_file);
            Ok(Self {
                store: Arc::new(object_store::local::LocalFileSystem::new()),
                dir,
                shown_dir,
                file,
            })
        }
    }

    fn shown(&self, relative: &str) -> String {
        format!("{}/{}", self.shown_dir.trim_end_matches('/'), relative)
    }

    fn path(&self, relative: &str) -> StorePath {
        path_segments(relative).fold(self.dir.clone(), |p, s| p.join(s))
    }

    /// The annotations' name (relative to the folder) and bytes.
    async fn annotations(&self) -> Result<(String, Vec<u8>), LoadError> {
        let candidates: Vec<&str> = match &self.file {
            Some(file) => vec![file.as_str()],
            None => ANNOTATION_FILES.to_vec(),
        };
        for name in candidates {
            let shown = self.shown(name);
            match self.store.get(&self.path(name)).await {
                Ok(got) => {
                    let bytes = got.bytes().await.map_err(|source| LoadError::Read {
                        file: shown,
                        source,
                    })?;
                    return Ok((name.to_owned(), bytes.to_vec()));
                }
                Err(object_store::Error::NotFound { .. }) if self.file.is_none() => continue,
                Err(source) => {
                    return Err(LoadError::Read {
                        file: shown,
                        source,
                    })
                }
            }
        }
        Err(LoadError::NoAnnotations {
            dir: self.shown_dir.clone(),
        })
    }

    /// Every object under the folder, from one listing (paged by the
    /// store); None when the store refuses to list.
    async fn inventory(&self) -> Option<Inventory> {
        let mut listing = self.store.list(Some(&self.dir));
        let mut out = Inventory::new();
        while let Some(meta) = listing.next().await {
            match meta {
                Ok(m) => {
                    let version = remote::version_of(&m);
                    out.insert(m.location, version);
                }
                Err(e) => {
                    tracing::info!(dir = %self.shown_dir, error = %e, "cannot list the dataset; checking each image on its own");
                    return None;
                }
            }
        }
        Some(out)
    }

    /// Why the image at `relative` is unusable, if it is.
    async fn image_problem(
        &self,
        relative: &str,
        check: ImageCheck,
        max_pixels: u64,
        inventory: Option<&Inventory>,
    ) -> Option<String> {
        let path = self.path(relative);
        let not_found = |e: &object_store::Error| match e {
            object_store::Error::NotFound { .. } => "image not found".to_owned(),
            other => format!("cannot read image: {other}"),
        };
        if let Some(listed) = inventory {
            if !listed.contains_key(&path) {
                return Some("image not found".to_owned());
            }
            if check == ImageCheck::Exists {
                return None;
            }
        } else if check == ImageCheck::Exists {
            return self.store.head(&path).await.err().map(|e| not_found(&e));
        }
        let bytes = match self.store.get(&path).await {
            Ok(got) => match got.bytes().await {
                Ok(bytes) => bytes,
                Err(e) => return Some(not_found(&e)),
            },
            Err(e) => return Some(not_found(&e)),
        };
        // Decoding is CPU work: off the async threads, in parallel.
        let decoded = tokio::task::spawn_blocking(move || limits::decode(&bytes, max_pixels).err())
            .await
            .map_err(|e| e.to_string());
        match decoded {
            Ok(None) => None,
            Ok(Some(e @ DecodeError::TooLarge { .. })) => Some(format!("image {e}")),
            Ok(Some(e)) => Some(format!("image cannot be decoded: {e}")),
            Err(e) => Some(format!("image decoding stopped: {e}")),
        }
    }
}

/// Splits a location naming a file into its folder and the file's name.
fn split_file(
    path: StorePath,
    shown: String,
    names_file: bool,
) -> (StorePath, String, Option<String>) {
    if !names_file {
        return (path, shown, None);
    }
    let parts: Vec<_> = path.parts().collect();
    let Some((last, dir)) = parts.split_last() else {
        return (path, shown, None);
    };
    let shown_dir = match shown.rfind(['/', '\\']) {
        Some(i) => shown[..i].to_owned(),
        None => ".".to_owned(),
    };
    (
        dir.iter().cloned().collect(),
        shown_dir,
        Some(last.as_ref().to_owned()),
    )
}

/// Splits the annotations into records: a JSON list, or one JSON value per
/// non-blank line for `.jsonl`. A JSON Lines line that does not parse is a
/// problem of that record, not of the whole file.
fn parse_annotations(
    name: &str,
    shown: &str,
    bytes: &[u8],
) -> Result<(Vec<Value>, Vec<Problem>), LoadError> {
    if name.ends_with(".jsonl") {
        let text = String::from_utf8_lossy(bytes);
        let mut values = Vec::new();
        let mut problems = Vec::new();
        for (line, text) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            match serde_json::from_str(text) {
                Ok(value) => values.push(value),
                Err(e) => {
                    problems.push(Problem {
                        record: None,
                        index: values.len(),
                        field: None,
                        file: shown.to_owned(),
                        message: format!("line {} is not valid JSON: {e}", line + 1),
                    });
                    // Kept as a placeholder so that indices stay positions.
                    values.push(Value::Null);
                }
            }
        }
        return Ok((values, problems));
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|source| LoadError::Json {
        file: shown.to_owned(),
        source,
    })?;
    match value {
        Value::Array(values) => Ok((values, Vec::new())),
        other => Err(LoadError::NotAList {
            file: shown.to_owned(),
            found: match other {
                Value::Object(_) => "an object",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                Value::Bool(_) => "a boolean",
                _ => "null",
            },
        }),
    }
}

/// Reads the dataset at `location` (a folder or annotations file, local or
/// a URL), checking every record and image. Under [`Policy::Fail`] any
/// problem is an error listing them all; under [`Policy::Skip`] bad
/// records are left out and the report counts them.
pub async fn load(location: &str, options: LoadOptions) -> Result<Loaded, LoadError> {
    let dataset = Dataset::open(location)?;
    let (name, bytes) = dataset.annotations().await?;
    let shown = dataset.shown(&name);
    let (values, mut unparsed) = parse_annotations(&name, &shown, &bytes)?;
    let unparsed_at: HashSet<usize> = unparsed.iter().map(|p| p.index).collect();

    let mut checked: Vec<_> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut c = check_record(v, i, &shown, options.limits.max_images_per_record);
            if unparsed_at.contains(&i) {
                // The placeholder's own "not an object" adds nothing.
                c.problems.clear();
            }
            c
        })
        .collect();
    for p in unparsed.drain(..) {
        checked[p.index].problems.push(p);
    }

    // A repeated id is a problem of the later records: the first is kept.
    let mut first_at: HashMap<RecordId, usize> = HashMap::new();
    for (i, c) in checked.iter_mut().enumerate() {
        if let Some(id) = &c.id {
            if let Some(&first) = first_at.get(id) {
                c.problems.push(Problem {
                    record: Some(id.clone()),
                    index: i,
                    field: Some("id".into()),
                    file: shown.clone(),
                    message: format!("duplicate id: record at index {first} has it too"),
                });
            } else {
                first_at.insert(id.clone(), i);
            }
        }
    }

    // Each distinct image once, however many records share it.
    let mut unique: Vec<String> = checked
        .iter()
        .flat_map(|c| c.images.iter().map(|(_, p)| p.clone()))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    unique.sort();
    let inventory = dataset.inventory().await;
    let digest = inventory
        .as_ref()
        .and_then(|listed| dataset_digest(&dataset, &name, &bytes, &unique, listed));
    let marker = options
        .validated
        .as_ref()
        .zip(digest.as_ref())
        .map(|(dir, digest)| dir.join(digest));
    let validated_before =
        options.images == ImageCheck::Decode && marker.as_ref().is_some_and(|m| m.is_file());
    let check = if validated_before {
        ImageCheck::Exists
    } else {
        options.images
    };
    let (dataset_ref, listed) = (&dataset, inventory.as_ref());
    let max_pixels = options.limits.max_image_pixels;
    let image_problems: HashMap<String, String> = futures::stream::iter(unique)
        .map(|path| async move {
            let problem = dataset_ref
                .image_problem(&path, check, max_pixels, listed)
                .await;
            (path, problem)
        })
        .buffer_unordered(IMAGES_IN_FLIGHT)
        .filter_map(|(path, problem)| async move { problem.map(|p| (path, p)) })
        .collect()
        .await;

    let mut records = Vec::new();
    let mut problems = Vec::new();
    for (i, mut c) in checked.into_iter().enumerate() {
        for (k, path) in &c.images {
            if let Some(message) = image_problems.get(path) {
                c.problems.push(Problem {
                    record: c.id.clone(),
                    index: i,
                    field: Some(format!("img_list[{k}]")),
                    file: dataset.shown(path),
                    message: message.clone(),
                });
            }
        }
        match c.record {
            Some(record) if c.problems.is_empty() => records.push(record),
            _ => problems.append(&mut c.problems),
        }
    }

    if let (Some(marker), ImageCheck::Decode, true) = (&marker, check, image_problems.is_empty()) {
        remember_validated(marker, location);
    }
    if validated_before {
        tracing::info!(
            location,
            "dataset unchanged since a full check; images not decoded again"
        );
    }
    let report = Report {
        annotations: shown,
        records: values.len(),
        valid: records.len(),
        problems,
    };
    let loaded = |records, report| Loaded {
        records,
        report,
        digest,
        validated_before,
    };
    if report.problems.is_empty() {
        tracing::info!(annotations = %report.annotations, records = report.records, "dataset read");
        return Ok(loaded(records, report));
    }
    match options.policy {
        Policy::Fail => Err(LoadError::Invalid { report }),
        Policy::Skip => {
            tracing::warn!(
                annotations = %report.annotations,
                records = report.records,
                skipped = report.skipped(),
                problems = report.problems.len(),
                "records with problems left out"
            );
            Ok(loaded(records, report))
        }
    }
}

/// The digest of a dataset: its annotations' name and bytes, then each
/// referenced image (sorted) with its size and version. None when an image
/// is not in the listing.
fn dataset_digest(
    dataset: &Dataset,
    annotations: &str,
    bytes: &[u8],
    images: &[String],
    listed: &Inventory,
) -> Option<String> {
    let mut hash = Sha256::new();
    hash.update(annotations.as_bytes());
    hash.update((bytes.len() as u64).to_le_bytes());
    hash.update(bytes);
    for image in images {
        let version = listed.get(&dataset.path(image))?;
        hash.update(image.as_bytes());
        hash.update(version.as_bytes());
        hash.update([0]);
    }
    Some(remote::short_hex(&hash.finalize()))
}

/// Records a cleanly decoded dataset's digest. A folder that cannot be
/// written only costs the next load a decode.
fn remember_validated(marker: &std::path::Path, location: &str) {
    let written = marker
        .parent()
        .map(std::fs::create_dir_all)
        .transpose()
        .and_then(|_| std::fs::write(marker, location));
    if let Err(e) = written {
        tracing::debug!(error = %e, "cannot record the dataset as validated");
    }
}

/// [`load`] for callers without an async runtime (the CLI, tests); from
/// inside one, await [`load`] instead.
pub fn load_blocking(location: &str, options: LoadOptions) -> Result<Loaded, LoadError> {
    // Blocking on a runtime's own thread would panic: say so instead.
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(LoadError::Location {
            location: location.to_owned(),
            message: "load_blocking called inside an async runtime: await `load`".into(),
        });
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LoadError::Location {
            location: location.to_owned(),
            message: format!("cannot start the I/O runtime: {e}"),
        })?;
    runtime.block_on(load(location, options))
}
