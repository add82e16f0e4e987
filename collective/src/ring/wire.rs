//! What travels on a ring connection besides tensor bytes: the header every
//! operation opens with (operation, sequence number, element count, dtype,
//! root), which the receiver checks against its own so that ranks calling
//! different operations fail with a clear error, and the dtype codes.

use std::ops::Range;

use tch::Kind;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Op {
    AllReduce = 1,
    AllGather = 2,
    Broadcast = 3,
    Barrier = 4,
}

impl Op {
    pub(super) fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }

    pub(super) fn from_code(code: u8) -> Option<Op> {
        [Op::AllReduce, Op::AllGather, Op::Broadcast, Op::Barrier]
            .into_iter()
            .find(|op| *op as u8 == code)
    }
}

/// What the caller asked for; becomes the operation's header.
#[derive(Clone, Copy, Debug)]
pub(super) struct Call {
    pub(super) op: Op,
    pub(super) kind: Kind,
    pub(super) numel: usize,
    pub(super) root: i64,
}

/// How a reduce step combines a received piece with the local one.
#[derive(Clone, Copy, Debug)]
pub(super) enum Sum {
    F32,
    F64,
    I32,
    I64,
}

pub(super) const HEADER_LEN: usize = 32;
/// Starts the line a failing rank writes back to its previous rank.
pub(super) const NOTICE_MAGIC: [u8; 4] = *b"SRGX";
pub(super) const HEADER_MAGIC: [u8; 4] = *b"SRG1";

/// What every rank of an operation must agree on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Header {
    pub(super) op: u8,
    pub(super) kind: u8,
    pub(super) seq: u64,
    pub(super) numel: u64,
    pub(super) root: i64,
}

impl Header {
    pub(super) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&HEADER_MAGIC);
        b[4] = self.op;
        b[5] = self.kind;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.numel.to_le_bytes());
        b[24..32].copy_from_slice(&self.root.to_le_bytes());
        b
    }

    pub(super) fn decode(b: &[u8; HEADER_LEN]) -> Option<Header> {
        if b[..4] != HEADER_MAGIC {
            return None;
        }
        let word = |r: Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
        Some(Header {
            op: b[4],
            kind: b[5],
            seq: word(8..16),
            numel: word(16..24),
            root: word(24..32) as i64,
        })
    }

    pub(super) fn describe(&self) -> String {
        let op = Op::from_code(self.op).map_or("unknown operation", Op::name);
        format!(
            "{op} #{} of {} elements of dtype code {}{}",
            self.seq,
            self.numel,
            self.kind,
            if self.op == Op::Broadcast as u8 {
                format!(" from root {}", self.root)
            } else {
                String::new()
            }
        )
    }
}

/// A stable code per dtype for the header (tch's own numbering is not part
/// of any wire format).
pub(super) fn kind_code(kind: Kind) -> u8 {
    match kind {
        Kind::Uint8 => 1,
        Kind::Int8 => 2,
        Kind::Int16 => 3,
        Kind::Int => 4,
        Kind::Int64 => 5,
        Kind::Half => 6,
        Kind::Float => 7,
        Kind::Double => 8,
        Kind::Bool => 9,
        Kind::BFloat16 => 10,
        _ => 255,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            op: Op::Broadcast as u8,
            kind: kind_code(Kind::BFloat16),
            seq: 7,
            numel: 1 << 40,
            root: 3,
        };
        assert_eq!(Header::decode(&h.encode()), Some(h));
    }
}
