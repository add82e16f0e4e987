//! Reading one tensor, or one tensor-parallel slice of it, out of a
//! safetensors file without reading the rest.
//!
//! A 7 B checkpoint is about 15 GB in bf16 and 30 GB in fp32; reading it
//! whole (as `Tensor::read_safetensors` does) costs that much host memory on
//! every rank. Here only the JSON header is parsed up front; each tensor is
//! then read with positioned reads straight into a CPU tensor of its own
//! dtype, and only the rows of this rank's slice. Positioned reads rather than
//! a memory map: pages of a map stay counted in the process's resident memory
//! until unmapped, reads into a buffer that is dropped after the copy do not.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};

/// Where one tensor's bytes are in its file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub kind: Kind,
    pub shape: Vec<i64>,
    /// Absolute byte offset of the first element.
    offset: u64,
}

/// A safetensors file whose header has been read.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    file: File,
    header: Vec<u8>,
    tensors: HashMap<String, TensorInfo>,
}

/// Which part of a tensor to read: `len` indices from `start` along `dim`.
#[derive(Debug, Clone, Copy)]
pub struct Slice {
    pub dim: usize,
    pub start: i64,
    pub len: i64,
}

/// The largest header accepted: safetensors itself caps it at 100 MB.
const MAX_HEADER: u64 = 100 << 20;

impl TensorFile {
    /// Opens `path` and parses its header; the tensors stay on disk.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |message: String| ModelError::Weights {
            path: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file_len = file
            .metadata()
            .map_err(|source| ModelError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let mut len = [0u8; 8];
        file.read_exact_at(&mut len, 0)
            .map_err(|e| bad(format!("no safetensors header: {e}")))?;
        let header_len = u64::from_le_bytes(len);
        if header_len > MAX_HEADER || 8 + header_len > file_len {
            return Err(bad(format!(
                "header length {header_len} does not fit a {file_len}-byte file"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| bad(format!("reading the header: {e}")))?;
        let parsed: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
        let data_start = 8 + header_len;
        let mut tensors = HashMap::new();
        for (name, entry) in parsed {
            if name == "__metadata__" {
                continue;
            }
            let info = parse_entry(&name, &entry, data_start, file_len).map_err(bad)?;
            tensors.insert(name, info);
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            header,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw JSON header: every tensor's name, dtype, shape and offsets.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// Reads tensor `name` (or its `slice`) into a new CPU tensor of the
    /// file's dtype. Only the bytes of the slice are read.
    pub fn read(&self, name: &str, slice: Option<Slice>) -> Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| ModelError::Weights {
            path: self.path.clone(),
            message: format!("no tensor {name}"),
        })?;
        let mut shape = info.shape.clone();
        let elem = info.kind.elt_size_in_bytes() as u64;
        // Runs of contiguous bytes: `outer` runs of `run` bytes, `stride` apart.
        let (outer, run, stride, first) = match slice {
            None => (1, numel(&shape) * elem, 0, info.offset),
            Some(s) => {
                let full = shape[s.dim];
                shape[s.dim] = s.len;
                let inner = numel(&info.shape[s.dim + 1..]) * elem;
                (
                    numel(&info.shape[..s.dim]),
                    s.len as u64 * inner,
                    full as u64 * inner,
                    info.offset + s.start as u64 * inner,
                )
            }
        };
        let tensor = Tensor::empty(&shape, (info.kind, Device::Cpu));
        // SAFETY: a freshly allocated, contiguous CPU tensor of exactly
        // `outer * run` bytes, owned here and not shared until returned.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut u8, (outer * run) as usize)
        };
        for (i, chunk) in bytes.chunks_mut(run.max(1) as usize).enumerate() {
            self.file
                .read_exact_at(chunk, first + i as u64 * stride)
                .map_err(|e| ModelError::Weights {
                    path: self.path.clone(),
                    message: format!("reading tensor {name}: {e}"),
                })?;
        }
        Ok(tensor)
    }
}

fn numel(shape: &[i64]) -> u64 {
    shape.iter().map(|&d| d as u64).product()
}

fn parse_entry(
    name: &str,
    entry: &serde_json::Value,
    data_start: u64,
    file_len: u64,
) -> std::result::Result<TensorInfo, String> {
    let dtype = entry["dtype"].as_str().unwrap_or_default();
    let kind = match dtype {
        "F64" => Kind::Double,
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        other => return Err(format!("tensor {name}: unsupported dtype {other:?}")),
    };
    let shape: Vec<i64> = entry["shape"]
        .as_array()
        .and_then(|dims| dims.iter().map(|d| d.as_i64()).collect())
        .filter(|dims: &Vec<i64>| dims.iter().all(|&d| d >= 0))
        .ok_or_else(|| format!("tensor {name}: no valid shape"))?;
    let offsets: Vec<u64> = entry["data_offsets"]
        .as_array()
        .and_then(|o| o.iter().map(|v| v.as_u64()).collect())
        .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
        .ok_or_else(|| format!("tensor {name}: no valid data_offsets"))?;
    let expected = numel(&shape) * kind.elt_size_in_bytes() as u64;
    if offsets[1] - offsets[0] != expected || data_start + offsets[1] > file_len {
        return Err(format!(
            "tensor {name}: data_offsets {offsets:?} do not hold {shape:?} {dtype} inside the file"
        ));
    }
    Ok(TensorInfo {
        kind,
        shape,
        offset: data_start + offsets[0],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, tensors: &[(&str, Tensor)]) -> PathBuf {
        let path = dir.join("t.safetensors");
        Tensor::write_safetensors(tensors, &path).unwrap();
        path
    }

    #[test]
    fn slices_along_every_dimension_equal_narrow() {
        let dir = tempfile::tempdir().unwrap();
        let full = Tensor::arange(4 * 6 * 10, (Kind::Float, Device::Cpu)).view([4, 6, 10]);
        let half = full.to_kind(Kind::BFloat16);
        let path = write(dir.path(), &[("full", full.copy()), ("half", half.copy())]);
        let file = TensorFile::open(&path).unwrap();
        assert_eq!(file.read("full", None).unwrap(), full);
        assert_eq!(file.read("half", None).unwrap(), half);
        for (dim, start, len) in [(0, 2, 2), (1, 3, 3), (2, 5, 5), (1, 0, 1)] {
            let slice = Slice { dim, start, len };
            let expected = full.narrow(dim as i64, start, len);
            assert_eq!(
                file.read("full", Some(slice)).unwrap(),
                expected,
                "{slice:?}"
            );
        }
    }

    #[test]
    fn a_damaged_file_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            &[("x", Tensor::ones([8, 8], (Kind::Float, Device::Cpu)))],
        );
        let len = std::fs::metadata(&path).unwrap().len();
        // Cut the data short: the header now promises bytes past the end.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 4)
            .unwrap();
        let err = TensorFile::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("t.safetensors") && err.contains("tensor x"),
            "{err}"
        );
        std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\xff{}").unwrap();
        let err = TensorFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("header length"), "{err}");
    }
}
