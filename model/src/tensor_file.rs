//! Reading one tensor, or one tensor-parallel slice of it, out of a
//! safetensors file without reading the rest.
//!
//! A 7 B checkpoint is about 15 GB in bf16 and 30 GB in fp32; reading it
//! whole (as `Tensor::read_safetensors` does) costs that much host memory on
//! every rank. Here only the JSON header is parsed up front and the file is
//! memory-mapped; each tensor (or this rank's slice of it, a strided view) is
//! copied straight from the map into its destination, which converts dtype
//! and device in the same pass, and its pages are then given back to the
//! kernel (`MADV_DONTNEED`: they stay in the page cache but leave this
//! process's resident set). So no intermediate buffer is written, and the
//! resident set grows by about one tensor at a time.
//!
//! A weights file must not be truncated while it is being loaded (a read
//! past the new end would fault), as for any memory-mapped checkpoint.

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

/// A safetensors file whose header has been read, mapped read-only.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    map: Mapping,
    header: Vec<u8>,
    tensors: HashMap<String, TensorInfo>,
}

/// A read-only private memory map of a whole file, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(file: &File, len: u64) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh read-only mapping of an open file; the kernel
        // picks the address, and the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr,
            len: len as usize,
        })
    }

    /// Drops the pages of `[start, start + len)` from this process's
    /// resident set (page-aligned inward-out; they stay in the page cache).
    fn release(&self, start: u64, len: u64) {
        let page = 4096u64;
        let begin = start / page * page;
        let end = (start + len).min(self.len as u64);
        if end > begin {
            // SAFETY: the range lies inside this mapping; DONTNEED on a
            // private read-only file mapping only discards cached PTEs.
            unsafe {
                libc::madvise(
                    self.ptr.add(begin as usize),
                    (end - begin) as usize,
                    libc::MADV_DONTNEED,
                );
            }
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped, once; no view outlives the
        // `TensorFile` (views live only inside `read_into`).
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
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
        let map = Mapping::new(&file, file_len).map_err(|e| bad(format!("cannot map: {e}")))?;
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
            map,
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
    /// file's dtype.
    pub fn read(&self, name: &str, slice: Option<Slice>) -> Result<Tensor> {
        let info = self.info_of(name)?;
        let mut shape = info.shape.clone();
        if let Some(s) = slice {
            shape[s.dim] = s.len;
        }
        let tensor = Tensor::empty(&shape, (info.kind, Device::Cpu));
        self.read_into(name, slice, &tensor)?;
        Ok(tensor)
    }

    /// Copies tensor `name` (or its `slice`) into `dest`, converting to
    /// `dest`'s dtype and device; `dest` must have the slice's shape.
    pub fn read_into(&self, name: &str, slice: Option<Slice>, dest: &Tensor) -> Result<()> {
        let info = self.info_of(name)?;
        let bytes = numel(&info.shape) * info.kind.elt_size_in_bytes() as u64;
        let strides = contiguous_strides(&info.shape);
        // SAFETY: `parse_entry` checked that the tensor's bytes lie inside
        // the file, hence inside the mapping, which outlives the view: the
        // view and its narrowing are dropped before this function returns.
        // x86-64 and aarch64 load unaligned elements correctly.
        let view = unsafe {
            Tensor::from_blob(
                (self.map.ptr as *const u8).add(info.offset as usize),
                &info.shape,
                &strides,
                info.kind,
                Device::Cpu,
            )
        };
        let part = match slice {
            Some(s) => view.narrow(s.dim as i64, s.start, s.len),
            None => view.shallow_clone(),
        };
        if part.size() != dest.size() {
            return Err(ModelError::Shape {
                name: name.to_owned(),
                expected: dest.size(),
                found: part.size(),
                path: self.path.clone(),
            });
        }
        let copied = tch::no_grad(|| dest.shallow_clone().f_copy_(&part));
        drop(part);
        drop(view);
        self.map.release(info.offset, bytes);
        copied.map_err(ModelError::from)
    }

    fn info_of(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| ModelError::Weights {
            path: self.path.clone(),
            message: format!("no tensor {name}"),
        })
    }
}

/// Row-major strides of `shape`, in elements.
fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1);
    }
    strides
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
