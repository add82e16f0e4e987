//! The files of a checkpoint: their names, the safetensors encoding of
//! staged tensors (bytes copied once, from the tensor into the buffer that
//! is uploaded), checksums, the per-shard part records and the manifest.
//!
//! ```text
//! <base>/step-00000010/tp-00-of-02.safetensors        parameters of tp rank 0
//!                      optim-tp-00-of-02.safetensors  its optimizer state
//!                      part-tp-00-of-02.json          the two files' sizes, checksums and tensors
//!                      (the same three for tp rank 1)
//!                      meta.json                      training state (tp rank 0)
//!                      manifest.json                  written last: the commit point
//! ```

use std::collections::HashMap;

use bytes::Bytes;
use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use tch::Kind;

use crate::error::CheckpointError;
use crate::staging::{Data, Staged};

/// Written in every record, so that a later layout can tell old checkpoints.
pub const FORMAT: &str = "samtrain-checkpoint/1";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const META_FILE: &str = "meta.json";

pub fn step_folder(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a folder named by [`step_folder`].
pub fn parse_step(folder: &str) -> Option<u64> {
    let digits = folder.strip_prefix("step-")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub fn params_file(tp_rank: u32, tp_size: u32) -> String {
    format!("tp-{tp_rank:02}-of-{tp_size:02}.safetensors")
}

pub fn optimizer_file(tp_rank: u32, tp_size: u32) -> String {
    format!("optim-tp-{tp_rank:02}-of-{tp_size:02}.safetensors")
}

pub fn part_file(tp_rank: u32, tp_size: u32) -> String {
    format!("part-tp-{tp_rank:02}-of-{tp_size:02}.json")
}

/// One file of a checkpoint, as its part record and the manifest list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The name in the step folder.
    pub name: String,
    pub size: u64,
    /// CRC-32 (IEEE) of the whole file, 8 lowercase hex digits.
    pub crc32: String,
}

/// One tensor of a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    /// This shard's shape.
    pub shape: Vec<i64>,
    /// The dimension split across tensor-parallel ranks; `None`: replicated.
    pub shard_dim: Option<i64>,
}

/// What one tensor-parallel rank wrote for a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    pub format: String,
    pub step: u64,
    pub tp_rank: u32,
    pub tp_size: u32,
    /// Checksum of the training state this rank was given: every rank of
    /// one save has the same, so a part left by another attempt at the same
    /// step is not taken for this one.
    pub meta_crc32: String,
    /// The parameters file, then the optimizer file.
    pub files: Vec<FileEntry>,
    pub params: Vec<TensorEntry>,
    pub optimizer: Vec<TensorEntry>,
}

/// The commit record of a checkpoint, written after every other file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub step: u64,
    pub tp_size: u32,
    pub created_unix_ms: u64,
    pub meta: FileEntry,
    /// One per tensor-parallel rank, in rank order.
    pub shards: Vec<PartRecord>,
}

impl Manifest {
    /// Every file of the checkpoint but the manifest.
    pub fn files(&self) -> impl Iterator<Item = &FileEntry> {
        std::iter::once(&self.meta).chain(self.shards.iter().flat_map(|s| s.files.iter()))
    }

    /// Total size of the checkpoint's files.
    pub fn bytes(&self) -> u64 {
        self.files().map(|f| f.size).sum()
    }

    /// Checks that the record is whole: one shard per rank, two files each.
    pub(crate) fn check(&self) -> Result<(), CheckpointError> {
        let fail = |message: String| CheckpointError::Layout {
            step: self.step,
            message,
        };
        if self.format != FORMAT {
            return Err(fail(format!("unknown format {:?}", self.format)));
        }
        if self.tp_size == 0 || self.shards.len() != self.tp_size as usize {
            return Err(fail(format!(
                "{} shards for tensor-parallel size {}",
                self.shards.len(),
                self.tp_size
            )));
        }
        for (i, s) in self.shards.iter().enumerate() {
            if s.tp_rank as usize != i || s.tp_size != self.tp_size || s.files.len() != 2 {
                return Err(fail(format!(
                    "shard {i} is rank {} of {} with {} files",
                    s.tp_rank,
                    s.tp_size,
                    s.files.len()
                )));
            }
        }
        Ok(())
    }
}

pub fn crc_hex(crc: u32) -> String {
    format!("{crc:08x}")
}

/// Size and CRC-32 of the file made of `chunks`.
pub fn checksum(chunks: &[Bytes]) -> (u64, u32) {
    let mut hasher = crc32fast::Hasher::new();
    let mut size = 0;
    for c in chunks {
        hasher.update(c);
        size += c.len() as u64;
    }
    (size, hasher.finalize())
}

pub(crate) fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        _ => return None,
    })
}

pub(crate) fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

/// A file as the chunks to upload, in order, with its size and each
/// chunk's CRC-32 where it is known already.
pub(crate) struct Encoded {
    pub chunks: Vec<Data>,
    /// The CRC-32 of each chunk of `chunks`, where staging computed it;
    /// `None` where the writer is to compute it as it writes the chunk.
    pub crcs: Vec<Option<crc32fast::Hasher>>,
    pub size: u64,
}

impl Encoded {
    /// The file's CRC-32: its chunks' combined, those not known yet
    /// computed now (one pass over their bytes).
    pub fn crc(&self) -> std::io::Result<u32> {
        let mut crcs = Vec::with_capacity(self.chunks.len());
        for (chunk, crc) in self.chunks.iter().zip(&self.crcs) {
            crcs.push(match crc {
                Some(known) => known.clone(),
                None => {
                    let mut hasher = crc32fast::Hasher::new();
                    chunk.pieces(usize::MAX, |piece| {
                        hasher.update(piece);
                        Ok(())
                    })?;
                    hasher
                }
            });
        }
        Ok(combine_crcs(crcs))
    }
}

/// The CRC-32 of consecutive pieces from the pieces' own, in order.
pub(crate) fn combine_crcs(pieces: impl IntoIterator<Item = crc32fast::Hasher>) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    for piece in pieces {
        crc.combine(&piece);
    }
    crc.finalize()
}

/// The safetensors file of `tensors`, as chunks in file order: the header,
/// then each tensor's bytes (shared with the staged tensors, not copied).
/// Tensors are laid out by decreasing element size, so every tensor starts
/// at a multiple of its element size, as memory-mapping readers want. Its
/// checksum is the header's combined with the tensors' own: computed when
/// they were staged (small CPU tensors), or by the writer as it writes
/// them (large CPU tensors, staged by a streaming copy; GPU tensors, whose
/// staging is a DMA copy).
pub(crate) fn encode(tensors: &[Staged]) -> Encoded {
    let mut order: Vec<&Staged> = tensors.iter().collect();
    order.sort_by_key(|s| std::cmp::Reverse(s.entry.dtype.size()));
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({ "format": "pt", "writer": FORMAT }),
    );
    let mut offset = 0;
    for s in &order {
        let info = TensorInfo {
            dtype: s.entry.dtype,
            shape: s.entry.shape.iter().map(|&d| d as usize).collect(),
            data_offsets: (offset, offset + s.data.len()),
        };
        offset += s.data.len();
        header.insert(
            s.entry.name.clone(),
            serde_json::to_value(info).expect("tensor info serialises"),
        );
    }
    let mut header = serde_json::to_vec(&header).expect("header serialises");
    // The data starts 8-byte aligned, after the header's length and the header.
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let mut first = (header.len() as u64).to_le_bytes().to_vec();
    first.extend_from_slice(&header);
    let mut header_crc = crc32fast::Hasher::new();
    header_crc.update(&first);
    let crcs = std::iter::once(Some(header_crc))
        .chain(order.iter().map(|s| s.crc.clone()))
        .collect();
    let chunks: Vec<Data> = std::iter::once(Data::Owned(Bytes::from(first)))
        .chain(order.iter().map(|s| s.data.clone()))
        .collect();
    Encoded {
        size: chunks.iter().map(|c| c.len() as u64).sum(),
        crcs,
        chunks,
    }
}

/// Tensors by name, keeping the order of `entries`.
pub(crate) fn index(entries: &[TensorEntry]) -> HashMap<&str, &TensorEntry> {
    entries.iter().map(|e| (e.name.as_str(), e)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_files_read_back_bit_for_bit_with_tch_and_the_reader() {
        use std::sync::Arc;
        use tch::Tensor;

        use tch::Device;

        use crate::read::{Landing, ShardReader};
        use crate::staging::{stage_all, StagingPool};

        let a = Tensor::from_slice(&[1.5f32, -0.0, f32::NAN, 3.25]).reshape([2, 2]);
        let b = Tensor::from_slice(&[7i64, -9]);
        let c = Tensor::from_slice(&[1u8, 2, 3]).to_kind(Kind::BFloat16);
        let empty = Tensor::from_slice::<f32>(&[]).reshape([0, 4]);
        let pool = Arc::new(StagingPool::default());
        let named = [("a", &a), ("b", &b), ("c", &c), ("empty", &empty)];
        let list: Vec<_> = named.iter().map(|&(n, t)| (n, t, None)).collect();
        let staged = stage_all(&pool, &list, false).unwrap();
        let encoded = encode(&staged);
        let bytes: Vec<u8> = encoded
            .chunks
            .iter()
            .flat_map(|c| c.bytes().to_vec())
            .collect();
        assert_eq!(encoded.size, bytes.len() as u64);
        assert_eq!(
            encoded.crc().unwrap(),
            crc32fast::hash(&bytes),
            "combined checksum"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let read: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect();
        // Bitwise: compare the raw bytes, NaN and -0.0 included.
        let raw = |x: &Tensor| {
            let mut v = vec![0u8; x.numel() * x.kind().elt_size_in_bytes()];
            x.copy_data_u8(&mut v, x.numel());
            v
        };
        for (name, t) in named {
            let r = &read[name];
            assert_eq!(r.kind(), t.kind());
            assert_eq!(r.size(), t.size());
            assert_eq!(raw(r), raw(t), "{name}");
        }
        // The reader, fed in pieces that straddle the header and tensors.
        let mut reader = ShardReader::new(
            "x".into(),
            encoded.size,
            crc_hex(encoded.crc().unwrap()),
            Device::Cpu,
        );
        for piece in bytes.chunks(7) {
            reader.push(piece).unwrap();
        }
        let shard = reader.finish().unwrap();
        for (s, (name, t)) in staged.iter().zip(named) {
            let back = shard.tensor(&s.entry).unwrap();
            assert_eq!(back.size(), t.size(), "{name}");
            assert_eq!(raw(&back), raw(t), "{name}");
        }
        // Through a bounce buffer, as onto a GPU: one of 5 bytes, fed in
        // pieces of 7, so that a fill ends inside a piece, at a tensor's
        // end and at a piece's end, and tensors span several fills.
        for bounce in [5, 4096] {
            let mut reader = ShardReader::with_landing(
                "x".into(),
                encoded.size,
                crc_hex(encoded.crc().unwrap()),
                Device::Cpu,
                Landing::bounced(Tensor::zeros([bounce], (tch::Kind::Uint8, Device::Cpu))),
            );
            for piece in bytes.chunks(7) {
                reader.push(piece).unwrap();
            }
            let shard = reader.finish().unwrap();
            for (s, (name, t)) in staged.iter().zip(named) {
                assert_eq!(raw(&shard.tensor(&s.entry).unwrap()), raw(t), "{name}");
            }
        }
        // One flipped bit fails the checksum; a missing byte the size.
        let mut flipped = bytes.clone();
        flipped[bytes.len() - 1] ^= 1;
        let mut reader = ShardReader::new(
            "x".into(),
            encoded.size,
            crc_hex(encoded.crc().unwrap()),
            Device::Cpu,
        );
        reader.push(&flipped).unwrap();
        assert!(matches!(
            reader.finish(),
            Err(CheckpointError::Checksum { .. })
        ));
        let mut reader = ShardReader::new(
            "x".into(),
            encoded.size,
            crc_hex(encoded.crc().unwrap()),
            Device::Cpu,
        );
        reader.push(&bytes[..bytes.len() - 1]).unwrap();
        assert!(matches!(reader.finish(), Err(CheckpointError::Size { .. })));
        let mut reader = ShardReader::new(
            "x".into(),
            encoded.size - 1,
            crc_hex(encoded.crc().unwrap()),
            Device::Cpu,
        );
        assert!(reader.push(&bytes).unwrap_err().is_corrupt());
    }

    #[test]
    fn step_folders_parse_back() {
        assert_eq!(parse_step(&step_folder(10)), Some(10));
        assert_eq!(
            parse_step(&step_folder(123_456_789_012)),
            Some(123_456_789_012)
        );
        assert_eq!(parse_step("step-12"), None);
        assert_eq!(parse_step("step-0000001x"), None);
        assert_eq!(parse_step("other"), None);
    }
}
