//! The global sample order from (seed, epoch) and each rank's disjoint slice of it.
//!
//! Every rank of a data-parallel world builds the same [`Sampler`] state: the
//! epoch's order is a Fisher–Yates shuffle driven by a SplitMix64 generator
//! written here, so the order depends on `(seed, epoch, num_samples)` only and
//! never on a dependency's version. Training advances in *global steps*: one
//! step takes the next `world_size * batch_size` positions of the order (the
//! global batch), and rank `r` takes the contiguous block
//! `[r * batch_size, (r + 1) * batch_size)` of it. The only state is the
//! [`Position`] (epoch, positions consumed globally), identical on every rank;
//! saving it in a checkpoint and building a sampler from it at another world
//! size or batch size re-shards the rest of the epoch with nothing skipped or
//! repeated.
//!
//! The tail of an epoch (fewer than a global batch left) follows
//! [`TailPolicy`], like the `drop_last` option of torch's
//! `DistributedSampler`.
//!
//! With `balance` on, the global batch is the same set of samples, but the
//! ranks share it by cost instead of in blocks: MmLINK samples carry 1 to 8
//! images, and a data-parallel step waits for the rank with the most. The
//! samples are dealt, costliest first, each to the rank with the least cost
//! so far that still has room for one (every rank still takes exactly
//! `batch_size`). Every rank computes the same deal from the same costs, so
//! the split stays deterministic and the epoch's sample set is unchanged.

use std::sync::Arc;

use crate::rng::SplitMix64;
use serde::{Deserialize, Serialize};

/// What happens to the last, partial global batch of an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TailPolicy {
    /// The partial global batch is not trained on this epoch (torch's
    /// `drop_last=True`); every step has exactly `world_size * batch_size`
    /// distinct samples. The dropped samples differ from epoch to epoch
    /// because the order does.
    #[default]
    Drop,
    /// The partial global batch is filled by wrapping around to the start of
    /// the epoch's order (torch's `drop_last=False`), so every sample is seen
    /// and a few are seen twice in that epoch.
    Pad,
}

/// Where the sampler stands: the same value on every rank, saved in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Position {
    pub epoch: u64,
    /// Positions of the epoch's order consumed by all ranks together.
    pub consumed: u64,
}

/// What the sampler needs besides the world layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerConfig {
    pub num_samples: u64,
    pub seed: u64,
    /// Samples per rank per step.
    pub batch_size: u64,
    #[serde(default)]
    pub tail: TailPolicy,
    /// Share each global batch among the ranks by the samples' costs (see
    /// the module documentation); needs the costs, [`Sampler::balanced`].
    #[serde(default)]
    pub balance: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SamplerError {
    #[error("sampler: the dataset is empty (num_samples = 0)")]
    EmptyDataset,
    #[error("sampler: batch_size must be at least 1")]
    ZeroBatch,
    #[error("sampler: world_size must be at least 1")]
    ZeroWorld,
    #[error("sampler: rank {rank} is outside a world of {world_size}")]
    RankOutOfRange { rank: u64, world_size: u64 },
    #[error(
        "sampler: tail policy `drop` with {num_samples} samples and a global batch of \
         {global_batch} (world_size x batch_size) leaves no step in an epoch; \
         use a smaller batch or tail policy `pad`"
    )]
    NoFullBatch { num_samples: u64, global_batch: u64 },
    #[error("sampler: position consumed = {consumed} is beyond an epoch of {num_samples} samples")]
    PositionBeyondEpoch { consumed: u64, num_samples: u64 },
    #[error("sampler: balance needs one cost per sample ({num_samples}), given {given}")]
    Costs { num_samples: u64, given: usize },
}

/// One global step as one rank sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The epoch the samples come from.
    pub epoch: u64,
    /// This rank's sample indices, `batch_size` of them.
    pub indices: Vec<usize>,
    /// The position after this step: what to save once the step is trained.
    pub position_after: Position,
}

/// One rank's view of the global order. See the module documentation.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplerConfig,
    rank: u64,
    world_size: u64,
    position: Position,
    /// The current epoch's order, rebuilt when the epoch changes.
    order: Vec<usize>,
    /// Each sample's cost (its images), when the config balances.
    costs: Option<Arc<[u32]>>,
}

impl Sampler {
    /// A sampler at `position`, for rank `rank` of `world_size`. The position
    /// may come from a run with another world size or batch size.
    pub fn new(
        config: SamplerConfig,
        rank: u64,
        world_size: u64,
        position: Position,
    ) -> Result<Self, SamplerError> {
        Self::balanced(config, rank, world_size, position, None)
    }

    /// [`Sampler::new`] with each sample's cost, which a config that
    /// balances needs (and one that does not ignores).
    pub fn balanced(
        config: SamplerConfig,
        rank: u64,
        world_size: u64,
        position: Position,
        costs: Option<Arc<[u32]>>,
    ) -> Result<Self, SamplerError> {
        if config.num_samples == 0 {
            return Err(SamplerError::EmptyDataset);
        }
        if config.batch_size == 0 {
            return Err(SamplerError::ZeroBatch);
        }
        if world_size == 0 {
            return Err(SamplerError::ZeroWorld);
        }
        if rank >= world_size {
            return Err(SamplerError::RankOutOfRange { rank, world_size });
        }
        let global_batch = world_size.saturating_mul(config.batch_size);
        if config.tail == TailPolicy::Drop && global_batch > config.num_samples {
            return Err(SamplerError::NoFullBatch {
                num_samples: config.num_samples,
                global_batch,
            });
        }
        if position.consumed > config.num_samples {
            return Err(SamplerError::PositionBeyondEpoch {
                consumed: position.consumed,
                num_samples: config.num_samples,
            });
        }
        let costs = match costs {
            _ if !config.balance => None,
            Some(c) if c.len() as u64 == config.num_samples => Some(c),
            other => {
                return Err(SamplerError::Costs {
                    num_samples: config.num_samples,
                    given: other.map_or(0, |c| c.len()),
                })
            }
        };
        let mut sampler = Sampler {
            config,
            rank,
            world_size,
            position,
            order: epoch_order(config.seed, position.epoch, config.num_samples as usize),
            costs,
        };
        // A position saved at another global batch may now sit in this
        // layout's tail: roll it to the next epoch at once so `position()`
        // always names where the next step starts.
        sampler.roll_epoch_if_done();
        Ok(sampler)
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// Where the next step starts; save this after a step is trained.
    pub fn position(&self) -> Position {
        self.position
    }

    fn global_batch(&self) -> u64 {
        self.world_size * self.config.batch_size
    }

    /// Global steps left in the current epoch at this world layout.
    pub fn steps_left_in_epoch(&self) -> u64 {
        let left = self.config.num_samples - self.position.consumed;
        match self.config.tail {
            TailPolicy::Drop => left / self.global_batch(),
            TailPolicy::Pad => left.div_ceil(self.global_batch()),
        }
    }

    /// This rank's part of the next global step; crosses into the next epoch
    /// when the current one is done.
    pub fn next_step(&mut self) -> Step {
        let n = self.config.num_samples;
        let b = self.config.batch_size;
        // Under `Pad` positions past the end wrap to the epoch's start
        // (repeatedly, when the global batch exceeds the dataset).
        let at = |p: u64| self.order[(p % n) as usize];
        let indices = match &self.costs {
            None => {
                let start = self.position.consumed + self.rank * b;
                (start..start + b).map(at).collect()
            }
            Some(costs) => {
                let start = self.position.consumed;
                let batch: Vec<usize> = (start..start + self.global_batch()).map(at).collect();
                deal(&batch, costs, self.world_size, b).swap_remove(self.rank as usize)
            }
        };
        let epoch = self.position.epoch;
        self.position.consumed = (self.position.consumed + self.global_batch()).min(n);
        self.roll_epoch_if_done();
        Step {
            epoch,
            indices,
            position_after: self.position,
        }
    }

    fn roll_epoch_if_done(&mut self) {
        let left = self.config.num_samples - self.position.consumed;
        let done = match self.config.tail {
            TailPolicy::Drop => left < self.global_batch(),
            TailPolicy::Pad => left == 0,
        };
        if done {
            self.position = Position {
                epoch: self.position.epoch + 1,
                consumed: 0,
            };
            self.order = epoch_order(
                self.config.seed,
                self.position.epoch,
                self.config.num_samples as usize,
            );
        }
    }
}

/// The samples of one global batch dealt to `ranks` ranks of `batch` each:
/// costliest first (ties in batch order), each to the rank with the least
/// cost so far among those with room (ties to the lower rank). Each rank's
/// samples keep their order in the batch.
pub fn deal(global: &[usize], costs: &[u32], ranks: u64, batch: u64) -> Vec<Vec<usize>> {
    let mut by_cost: Vec<usize> = (0..global.len()).collect();
    by_cost.sort_by_key(|&i| (std::cmp::Reverse(costs[global[i]]), i));
    let mut load = vec![0u64; ranks as usize];
    let mut taken: Vec<Vec<usize>> = vec![Vec::with_capacity(batch as usize); ranks as usize];
    for i in by_cost {
        let rank = (0..ranks as usize)
            .filter(|&r| (taken[r].len() as u64) < batch)
            .min_by_key(|&r| (load[r], r))
            .expect("the global batch is ranks x batch samples");
        load[rank] += u64::from(costs[global[i]]);
        taken[rank].push(i);
    }
    taken
        .into_iter()
        .map(|mut slots| {
            slots.sort_unstable();
            slots.into_iter().map(|i| global[i]).collect()
        })
        .collect()
}

/// The global order of an epoch: a permutation of `0..n` fixed by
/// `(seed, epoch)`.
pub fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    // Mixing the epoch through SplitMix64 before combining it with the seed
    // keeps (seed, epoch) and (seed + 1, epoch - 1) from sharing a stream.
    let mut rng = SplitMix64::new(seed ^ SplitMix64::new(epoch ^ 0x5341_4d54_5241_494e).next_u64());
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}
