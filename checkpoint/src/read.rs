//! Reading a shard file straight into tensor memory.
//!
//! A [`ShardReader`] takes a safetensors file in order, as it comes from
//! the store: the header first, then each tensor's bytes into the memory
//! of a tensor allocated for it, with no buffer of the whole file in
//! between. The file's CRC-32 is computed piece by piece as the pieces
//! land, while they are still in the cache; the tensors are handed out only
//! once the size and checksum match the manifest's.
//!
//! Tensors loaded onto a GPU are allocated there and filled through one
//! small page-locked buffer per file ([`Landing::Bounced`]): the file's
//! bytes land in it, are checksummed while in the cache, and go to the
//! GPU by DMA each time it fills. A whole-file CPU copy in pageable
//! memory would fault in every page of it and then cross the bus through
//! the driver's own bounce buffer.

use std::collections::HashMap;

use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use tch::{Device, Kind, Tensor};

use crate::error::CheckpointError;
use crate::format::{crc_hex, kind_of, TensorEntry};

/// Headers above this size are not a checkpoint's (safetensors' own bound).
const MAX_HEADER: u64 = 100 << 20;

/// Bytes of a GPU load's page-locked buffer: each fill is one DMA of
/// about 0.1 ms, and the buffer stays in the cache between the read that
/// fills it, the checksum and the copy.
const BOUNCE_BYTES: usize = 4 << 20;

/// Where a file's tensor bytes land as they are read.
pub(crate) enum Landing {
    /// Straight into the memory of CPU tensors.
    Direct,
    /// Into `buf` (`filled` bytes of it so far), copied into the tensor
    /// being filled whenever it is full or the tensor is complete.
    Bounced { buf: Tensor, filled: usize },
}

impl Landing {
    /// The landing for tensors on `device`: page-locked memory for a GPU
    /// (pageable if the driver refuses it; slower, still correct).
    fn for_device(device: Device) -> Self {
        match device {
            Device::Cpu => Landing::Direct,
            _ => Landing::bounced(
                samtrain_torchext::cuda::pinned_bytes(BOUNCE_BYTES).unwrap_or_else(|_| {
                    Tensor::empty([BOUNCE_BYTES as i64], (Kind::Uint8, Device::Cpu))
                }),
            ),
        }
    }

    /// A bounced landing through `buf`, a contiguous CPU uint8 tensor.
    pub fn bounced(buf: Tensor) -> Self {
        Landing::Bounced { buf, filled: 0 }
    }
}

/// A file being read: where it is in the file and what it has filled.
pub(crate) struct ShardReader {
    /// The file's URL, for messages.
    path: String,
    /// Size and checksum the manifest records.
    size: u64,
    crc32: String,
    hasher: crc32fast::Hasher,
    /// Bytes taken so far.
    taken: u64,
    phase: Phase,
    /// Where the tensors are allocated.
    device: Device,
    landing: Landing,
}

enum Phase {
    /// The header's length, 8 bytes little-endian.
    Length([u8; 8]),
    Header(Vec<u8>),
    /// Tensor data: `slots[index]` is being filled, `offset` bytes in.
    Data {
        slots: Vec<Slot>,
        index: usize,
        offset: usize,
    },
}

/// One tensor of the file, in file order.
struct Slot {
    name: String,
    dtype: Dtype,
    shape: Vec<i64>,
    len: usize,
    tensor: Option<Tensor>,
}

/// The tensors of one file, checked against its manifest entry.
pub(crate) struct ShardTensors {
    path: String,
    tensors: HashMap<String, Slot>,
}

impl ShardReader {
    /// A reader of the file at `path` whose tensors go to `device`.
    pub fn new(path: String, size: u64, crc32: String, device: Device) -> Self {
        Self::with_landing(path, size, crc32, device, Landing::for_device(device))
    }

    pub fn with_landing(
        path: String,
        size: u64,
        crc32: String,
        device: Device,
        landing: Landing,
    ) -> Self {
        Self {
            path,
            size,
            crc32,
            hasher: crc32fast::Hasher::new(),
            taken: 0,
            phase: Phase::Length([0; 8]),
            device,
            landing,
        }
    }

    fn damaged(&self, message: String) -> CheckpointError {
        CheckpointError::Safetensors {
            path: self.path.clone(),
            message,
        }
    }

    /// The error of a file of `found` bytes, not the manifest's size.
    pub fn wrong_size(&self, found: u64) -> CheckpointError {
        CheckpointError::Size {
            path: self.path.clone(),
            expected: self.size,
            found,
        }
    }

    /// The memory the next bytes of the file go to; `None` once the file
    /// is whole.
    pub fn target(&mut self) -> Option<&mut [u8]> {
        let taken = self.taken as usize;
        match &mut self.phase {
            Phase::Length(buf) => Some(&mut buf[taken..]),
            Phase::Header(buf) => Some(&mut buf[taken - 8..]),
            Phase::Data {
                slots,
                index,
                offset,
            } => {
                let slot = slots.get_mut(*index)?;
                match &mut self.landing {
                    Landing::Direct => {
                        let tensor = slot
                            .tensor
                            .as_ref()
                            .expect("the slot being filled has its tensor");
                        // SAFETY: the tensor was allocated contiguous on the
                        // CPU with `len` bytes, and this reader holds it
                        // alone until `finish` hands it out.
                        let all = unsafe {
                            std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut u8, slot.len)
                        };
                        Some(&mut all[*offset..])
                    }
                    Landing::Bounced { buf, filled } => {
                        let room = (buf.numel() - *filled).min(slot.len - *offset);
                        // SAFETY: `buf` is a contiguous CPU uint8 tensor this
                        // reader owns alone.
                        let all = unsafe {
                            std::slice::from_raw_parts_mut(buf.data_ptr() as *mut u8, buf.numel())
                        };
                        Some(&mut all[*filled..*filled + room])
                    }
                }
            }
        }
    }

    /// Records that the first `n` bytes of [`ShardReader::target`] were
    /// written.
    pub fn filled(&mut self, n: usize) -> Result<(), CheckpointError> {
        if n == 0 {
            return Ok(());
        }
        let mut hasher = std::mem::take(&mut self.hasher);
        hasher.update(&self.target().expect("bytes were filled")[..n]);
        self.hasher = hasher;
        self.taken += n as u64;
        if self.taken > self.size {
            return Err(self.wrong_size(self.taken));
        }
        match &mut self.phase {
            Phase::Length(buf) if self.taken == 8 => {
                let len = u64::from_le_bytes(*buf);
                if !(2..=MAX_HEADER).contains(&len) || 8 + len > self.size {
                    return Err(self.damaged(format!("a header of {len} bytes")));
                }
                self.phase = Phase::Header(vec![0; len as usize]);
            }
            Phase::Header(buf) if self.taken as usize == 8 + buf.len() => {
                let header = std::mem::take(buf);
                let slots = self.layout(&header)?;
                self.phase = Phase::Data {
                    slots,
                    index: 0,
                    offset: 0,
                };
                self.next_tensor()?;
            }
            Phase::Data {
                slots,
                index,
                offset,
            } => {
                *offset += n;
                let (end, done) = (*offset, *offset == slots[*index].len);
                if let Landing::Bounced { buf, filled } = &mut self.landing {
                    *filled += n;
                    if done || *filled == buf.numel() {
                        let bytes = std::mem::take(filled);
                        let slot = &slots[*index];
                        flush(&self.path, self.device, buf, bytes, slot, end)?;
                    }
                }
                if done {
                    *index += 1;
                    *offset = 0;
                    self.next_tensor()?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Takes `chunk`, the next bytes of the file, copying it into place.
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<(), CheckpointError> {
        while !chunk.is_empty() {
            let Some(target) = self.target() else {
                return Err(self.wrong_size(self.taken + chunk.len() as u64));
            };
            let n = target.len().min(chunk.len());
            target[..n].copy_from_slice(&chunk[..n]);
            self.filled(n)?;
            chunk = &chunk[n..];
        }
        Ok(())
    }

    /// Allocates the tensor of the slot being filled, skipping empty ones.
    fn next_tensor(&mut self) -> Result<(), CheckpointError> {
        let Phase::Data { slots, index, .. } = &mut self.phase else {
            return Ok(());
        };
        while let Some(slot) = slots.get_mut(*index) {
            let kind = kind_of(slot.dtype).expect("layout keeps only dtypes libtorch has");
            let tensor = Tensor::f_empty(&slot.shape, (kind, self.device))
                .map_err(|e| placement_error(&self.path, self.device, slot, e))?;
            slot.tensor = Some(tensor);
            if slot.len > 0 {
                break;
            }
            *index += 1;
        }
        Ok(())
    }

    /// The tensors the header describes, in file order, checked to fill
    /// the rest of the file exactly.
    fn layout(&self, header: &[u8]) -> Result<Vec<Slot>, CheckpointError> {
        let fields: HashMap<String, serde_json::Value> =
            serde_json::from_slice(header).map_err(|e| self.damaged(format!("header: {e}")))?;
        let mut slots = Vec::new();
        for (name, value) in fields {
            if name == "__metadata__" {
                continue;
            }
            let info: TensorInfo = serde_json::from_value(value)
                .map_err(|e| self.damaged(format!("tensor {name}: {e}")))?;
            if kind_of(info.dtype).is_none() {
                return Err(self.damaged(format!(
                    "tensor {name}: dtype {:?} has no libtorch kind",
                    info.dtype
                )));
            }
            let elements = info
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .and_then(|n| n.checked_mul(info.dtype.size()));
            let (start, end) = info.data_offsets;
            if elements != Some(end.wrapping_sub(start)) || end < start {
                return Err(self.damaged(format!(
                    "tensor {name}: offsets {start}..{end} for {:?} {:?}",
                    info.dtype, info.shape
                )));
            }
            slots.push((
                start,
                Slot {
                    name,
                    dtype: info.dtype,
                    shape: info.shape.iter().map(|&d| d as i64).collect(),
                    len: end - start,
                    tensor: None,
                },
            ));
        }
        // Empty tensors first among those at one offset.
        slots.sort_by_key(|(start, slot)| (*start, slot.len));
        let mut at = 0usize;
        for (start, slot) in &slots {
            if *start != at {
                return Err(
                    self.damaged(format!("tensor {} starts at {start}, not {at}", slot.name))
                );
            }
            at += slot.len;
        }
        let data = self.size - self.taken;
        if at as u64 != data {
            return Err(self.damaged(format!(
                "its tensors hold {at} bytes, the file {data} after its header"
            )));
        }
        Ok(slots.into_iter().map(|(_, slot)| slot).collect())
    }

    /// The tensors, once the whole file was read and its checksum matches.
    pub fn finish(self) -> Result<ShardTensors, CheckpointError> {
        let complete =
            matches!(&self.phase, Phase::Data { slots, index, .. } if *index == slots.len());
        if !complete || self.taken != self.size {
            return Err(self.wrong_size(self.taken));
        }
        let found = crc_hex(self.hasher.finalize());
        if found != self.crc32 {
            return Err(CheckpointError::Checksum {
                path: self.path,
                expected: self.crc32,
                found,
            });
        }
        let Phase::Data { slots, .. } = self.phase else {
            unreachable!("checked complete above")
        };
        Ok(ShardTensors {
            path: self.path,
            tensors: slots.into_iter().map(|s| (s.name.clone(), s)).collect(),
        })
    }
}

/// Copies the first `bytes` bytes of `buf` (a bounced landing) into
/// `slot`'s tensor on `device`, ending at byte `end` of it; `path` is the
/// file's, for the error.
fn flush(
    path: &str,
    device: Device,
    buf: &Tensor,
    bytes: usize,
    slot: &Slot,
    end: usize,
) -> Result<(), CheckpointError> {
    let tensor = slot
        .tensor
        .as_ref()
        .expect("the slot being filled has its tensor");
    let copy = || -> Result<(), tch::TchError> {
        // SAFETY: the bytes `end - bytes .. end` lie inside the tensor,
        // allocated contiguous with `slot.len` bytes on `device` and kept
        // alive by the slot for the view's short life.
        let mut dst = unsafe {
            Tensor::f_from_blob(
                (tensor.data_ptr() as *const u8).add(end - bytes),
                &[bytes as i64],
                &[1],
                Kind::Uint8,
                device,
            )?
        };
        // From page-locked memory the copy is one DMA; it returns once the
        // bytes are on the device, so `buf` may be refilled.
        dst.f_copy_(&buf.f_narrow(0, 0, bytes as i64)?)
    };
    copy().map_err(|e| placement_error(path, device, slot, e))
}

/// The error of a tensor of `path` that `device` could not take.
fn placement_error(path: &str, device: Device, slot: &Slot, e: tch::TchError) -> CheckpointError {
    CheckpointError::Placement {
        path: path.to_owned(),
        tensor: slot.name.clone(),
        device: format!("{device:?}"),
        // libtorch's first line says it; the rest lists its backends.
        message: e.to_string().lines().next().unwrap_or_default().to_owned(),
    }
}

impl ShardTensors {
    /// The tensor `entry` names, checked against the record. A file that
    /// does not hold what its manifest records is damaged, as one whose
    /// checksum differs.
    pub fn tensor(&self, entry: &TensorEntry) -> Result<Tensor, CheckpointError> {
        let fail = |message: String| CheckpointError::Safetensors {
            path: self.path.clone(),
            message: format!("tensor {}: {message}", entry.name),
        };
        let slot = self
            .tensors
            .get(&entry.name)
            .ok_or_else(|| fail("not in the file".into()))?;
        if slot.dtype != entry.dtype || slot.shape != entry.shape {
            return Err(fail(format!(
                "stored as {:?} {:?}, recorded as {:?} {:?}",
                slot.dtype, slot.shape, entry.dtype, entry.shape
            )));
        }
        Ok(slot
            .tensor
            .as_ref()
            .expect("a finished file has every tensor")
            .shallow_clone())
    }
}
