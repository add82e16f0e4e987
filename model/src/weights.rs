//! Checkpoint I/O in the Hugging Face layout.
//!
//! A model folder holds `config.json`, the InstructBLIP tensors in
//! `model.safetensors` (or shards listed by `model.safetensors.index.json`)
//! and SAM's own tensors (guidance, LoRA) in `sam.safetensors`. Every
//! tensor is matched by name; a wrong shape is an error naming the tensor.
//! SAM's tensors may be absent: they keep their initialisation (the exchange
//! Linears zero), so an InstructBLIP checkpoint loads as SAM at its start.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tch::nn::VarStore;
use tch::Tensor;

use crate::config::SamConfig;
use crate::error::{ModelError, Result};
use crate::tensor_file::{Slice, TensorFile};
use samtrain_comm::shard_dim;

pub const CONFIG_FILE: &str = "config.json";
pub const MODEL_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SAM_FILE: &str = "sam.safetensors";

/// Tensors that are samtrain's, not InstructBLIP's: they go to `sam.safetensors`.
pub fn is_sam_tensor(name: &str) -> bool {
    name.starts_with("sam.") || name.contains(".lora_A.") || name.contains(".lora_B.")
}

/// Checkpoint tensors transformers keeps that samtrain recomputes.
fn is_ignored(name: &str) -> bool {
    name.ends_with("position_ids") || name.ends_with("rotary_emb.inv_freq")
}

/// The safetensors files of a model folder, in load order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    let mut files = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
            path: index.clone(),
            source,
        })?;
        let parsed: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Weights {
                path: index.clone(),
                message: e.to_string(),
            })?;
        let map = parsed
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Weights {
                path: index.clone(),
                message: "no weight_map object".into(),
            })?;
        let mut shards: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        shards.sort();
        shards.dedup();
        shards
    } else if dir.join(MODEL_FILE).exists() {
        vec![dir.join(MODEL_FILE)]
    } else {
        return Err(ModelError::Weights {
            path: dir.to_path_buf(),
            message: format!("neither {MODEL_FILE} nor {INDEX_FILE} found"),
        });
    };
    if dir.join(SAM_FILE).exists() {
        files.push(dir.join(SAM_FILE));
    }
    Ok(files)
}

/// A digest naming the weights of the model folder `dir` without reading
/// them: `config.json`, and per weight file its name, length, modification
/// time and safetensors header (names, dtypes, shapes, offsets). A worker
/// keeps a loaded model between generations only while this is unchanged.
pub fn fingerprint(dir: &Path) -> Result<String> {
    folder_digest(dir, |file, f, hash| {
        let modified = f
            .metadata()
            .map_err(io_error(file))?
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        hash.update(modified.to_le_bytes());
        Ok(())
    })
}

/// Bytes read at each sampled place of a weight file by [`base_digest`].
const SAMPLE_BYTES: u64 = 64 * 1024;
/// Places sampled per weight file, spread evenly over it.
const SAMPLES_PER_FILE: u64 = 16;

/// A digest of the base model in `dir`, which a checkpoint records so that
/// it is never resumed onto other weights: `config.json`, and per weight
/// file its name, length, safetensors header and 16 samples of 64 KiB
/// spread over its contents (the first and last bytes included). Unlike
/// [`fingerprint`] it ignores modification times, so a copy of the folder
/// (another node's cache, a re-download) has the same digest, and it reads
/// about 1 MiB per file, not the weights: two checkpoints of the same
/// shapes (LLaMA and Vicuna, say) differ throughout, so in the samples.
pub fn base_digest(dir: &Path) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut sample = vec![0u8; SAMPLE_BYTES as usize];
    folder_digest(dir, |file, f, hash| {
        let len = f.metadata().map_err(io_error(file))?.len();
        let span = len.saturating_sub(SAMPLE_BYTES);
        for i in 0..SAMPLES_PER_FILE {
            let at = span * i / (SAMPLES_PER_FILE - 1);
            let n = SAMPLE_BYTES.min(len - at) as usize;
            f.seek(SeekFrom::Start(at)).map_err(io_error(file))?;
            f.read_exact(&mut sample[..n]).map_err(io_error(file))?;
            hash.update(&sample[..n]);
        }
        Ok(())
    })
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.to_path_buf();
    move |source| ModelError::Io { path, source }
}

/// SHA-256 (its first 16 bytes, in hex) of `config.json` and, per weight
/// file, its name, length and safetensors header, then what `more` adds
/// from the open file.
fn folder_digest(
    dir: &Path,
    mut more: impl FnMut(&Path, &mut std::fs::File, &mut Sha256) -> Result<()>,
) -> Result<String> {
    let mut hash = Sha256::new();
    let config = dir.join(CONFIG_FILE);
    hash.update(std::fs::read(&config).map_err(io_error(&config))?);
    for file in weight_files(dir)? {
        let mut f = std::fs::File::open(&file).map_err(io_error(&file))?;
        let len = f.metadata().map_err(io_error(&file))?.len();
        hash.update(file.file_name().unwrap_or_default().as_encoded_bytes());
        hash.update(len.to_le_bytes());
        hash.update(TensorFile::open(&file)?.header());
        more(&file, &mut f, &mut hash)?;
    }
    Ok(hash
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The names of every tensor the weight files of `dir` hold (headers only).
pub fn checkpoint_names(dir: &Path) -> Result<std::collections::HashSet<String>> {
    let mut names = std::collections::HashSet::new();
    for file in weight_files(dir)? {
        names.extend(TensorFile::open(&file)?.names().map(str::to_owned));
    }
    Ok(names)
}

/// What a load did, for logs and tests.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: usize,
    /// SAM tensors absent from the checkpoint, left at their initialisation.
    pub initialised: Vec<String>,
    /// Checkpoint tensors the model has no use for.
    pub unused: Vec<String>,
}

/// Fills every variable of `vs` from the model folder `dir`, one tensor at a
/// time: each is copied from the memory-mapped file (only this rank's slice
/// under tensor parallelism, `tp = (rank, world)`) straight into the
/// variable, converting dtype and device, and its pages are released. Peak
/// host memory is about one tensor plus what is kept, not the checkpoint.
pub fn load(vs: &VarStore, dir: &Path, tp: Option<(i64, i64)>) -> Result<LoadReport> {
    let files = weight_files(dir)?
        .iter()
        .map(|f| TensorFile::open(f))
        .collect::<Result<Vec<_>>>()?;
    // Later files win, as they did when every file was read into one map:
    // `sam.safetensors` comes last and may override.
    let mut found: HashMap<&str, &TensorFile> = HashMap::new();
    for file in &files {
        for name in file.names() {
            found.insert(name, file);
        }
    }
    let mut report = LoadReport::default();
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    for (name, var) in &vars {
        let Some(file) = found.remove(name.as_str()) else {
            if is_sam_tensor(name) {
                report.initialised.push(name.clone());
                continue;
            }
            return Err(ModelError::MissingTensor {
                name: name.clone(),
                path: dir.to_path_buf(),
            });
        };
        let full = file.info(name).map(|i| i.shape.clone()).unwrap_or_default();
        let path = file.path().to_path_buf();
        let slice = match (tp, shard_dim(name)) {
            (Some((rank, world)), Some(dim)) if world > 1 => {
                let mut expected = var.size();
                expected[dim as usize] *= world;
                if full != expected {
                    return Err(shape_error(name, expected, full, path));
                }
                let len = var.size()[dim as usize];
                Some(Slice {
                    dim: dim as usize,
                    start: rank * len,
                    len,
                })
            }
            _ => None,
        };
        if slice.is_none() && full != var.size() {
            return Err(shape_error(name, var.size(), full, path));
        }
        // The copy converts dtype and moves to the variable's device in one pass.
        file.read_into(name, slice, var)?;
        report.loaded += 1;
    }
    report.unused = found
        .into_keys()
        .filter(|n| !is_ignored(n))
        .map(str::to_owned)
        .collect();
    report.unused.sort();
    if !report.unused.is_empty() {
        tracing::warn!(count = report.unused.len(), first = %report.unused[0], "checkpoint tensors not used by the model");
    }
    tracing::info!(
        loaded = report.loaded,
        initialised = report.initialised.len(),
        dir = %dir.display(),
        "weights loaded"
    );
    Ok(report)
}

fn shape_error(name: &str, expected: Vec<i64>, found: Vec<i64>, path: PathBuf) -> ModelError {
    ModelError::Shape {
        name: name.into(),
        expected,
        found,
        path,
    }
}

/// Writes a model folder: `config.json`, `model.safetensors` (InstructBLIP's
/// tensors, loadable by transformers) and `sam.safetensors` (SAM's own).
/// Only for an unsharded model (tensor-parallel degree 1).
pub fn save(vs: &VarStore, config: &SamConfig, dir: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let (sam, hf): (Vec<_>, Vec<_>) = vars
        .iter()
        .map(|(n, t)| {
            (
                n.as_str(),
                t.detach().to_device(tch::Device::Cpu).contiguous(),
            )
        })
        .partition(|(n, _)| is_sam_tensor(n));
    for (file, tensors) in [(MODEL_FILE, hf), (SAM_FILE, sam)] {
        let path = dir.join(file);
        Tensor::write_safetensors(&tensors, &path).map_err(|e| ModelError::Weights {
            path: path.clone(),
            message: e.to_string(),
        })?;
    }
    let mut json = serde_json::to_value(config).expect("config serialises");
    // transformers picks each part's class by `model_type`; without the text
    // config's it would build its default text model (OPT) at random.
    json["model_type"] = "instructblip".into();
    json["vision_config"]["model_type"] = "instructblip_vision_model".into();
    json["qformer_config"]["model_type"] = "instructblip_qformer".into();
    json["text_config"]["model_type"] = "llama".into();
    json["architectures"] = serde_json::json!(["InstructBlipForConditionalGeneration"]);
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&json).expect("json")).map_err(io(&path))?;
    Ok(())
}
