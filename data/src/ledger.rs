//! The sample ledger: a record, carried in every checkpoint, that proves
//! which samples training consumed, across kills, restarts and resizes.
//!
//! Each rank keeps a [`Tally`] of the sample ids it trained on: their count
//! and an order-independent digest (a wrapping sum of each `(epoch, id)`'s
//! hash). A [`Segment`] is a stretch of training at one layout (data-
//! parallel size, per-rank batch, dataset, seed, tail policy): where the
//! sampler's global position stood before and after it, how many sampler
//! steps it took, and every data-parallel rank's tally. A run that resumes
//! at the same layout extends the last segment (tallies add up); a resize
//! starts a new one. The chain of segments up to a checkpoint is that
//! checkpoint's ledger; steps trained after it and lost to a kill are in no
//! ledger, as their updates are in no checkpoint.
//!
//! [`verify`] replays the chain through the [`Sampler`]: each segment must
//! start where the previous one ended (from the start of training), and
//! each rank's tally must equal what the global order gives that rank over
//! the segment. Then every position of each epoch was trained once, and so
//! every sample once (the order is a permutation), except the tail a
//! `drop` policy leaves out; the report says which samples were repeated
//! or left out otherwise.

use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;
use crate::sampler::{epoch_order, Position, Sampler, SamplerConfig, TailPolicy};

/// What one rank trained on: how many samples, and their digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Tally {
    pub count: u64,
    pub digest: u64,
}

impl Tally {
    /// Sample `id` of `epoch` was trained on.
    pub fn add(&mut self, epoch: u64, id: u64) {
        self.count += 1;
        self.digest = self.digest.wrapping_add(sample_hash(epoch, id));
    }

    /// This tally followed by `other`.
    pub fn merged(self, other: Tally) -> Tally {
        Tally {
            count: self.count + other.count,
            digest: self.digest.wrapping_add(other.digest),
        }
    }
}

fn sample_hash(epoch: u64, id: u64) -> u64 {
    SplitMix64::new(SplitMix64::new(epoch ^ 0x4c45_4447_4552).next_u64() ^ id).next_u64()
}

/// A stretch of training at one layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// The sampler's global position before the segment's first step and
    /// after its last.
    pub from: Position,
    pub to: Position,
    /// The optimizer steps it covers, `first_step..=last_step`.
    pub first_step: u64,
    pub last_step: u64,
    /// Sampler steps taken (optimizer steps x gradient accumulation).
    pub micro_steps: u64,
    /// The data-parallel size and the sampler each rank used.
    pub dp: u64,
    pub sampler: SamplerConfig,
    /// Every data-parallel rank's tally, in dp-rank order.
    pub ranks: Vec<Tally>,
}

impl Segment {
    /// Whether `next` continues this segment at the same layout.
    fn continued_by(&self, next: &Segment) -> bool {
        self.dp == next.dp
            && self.sampler == next.sampler
            && self.to == next.from
            && self.last_step + 1 == next.first_step
            && self.ranks.len() == next.ranks.len()
    }
}

/// `chain` followed by `next`: merged into the last segment when it
/// continues it at the same layout, so that the ledger grows by a segment
/// per resize, not per checkpoint.
pub fn append(chain: &mut Vec<Segment>, next: Segment) {
    match chain.last_mut() {
        Some(last) if last.continued_by(&next) => {
            last.to = next.to;
            last.last_step = next.last_step;
            last.micro_steps += next.micro_steps;
            for (a, b) in last.ranks.iter_mut().zip(&next.ranks) {
                *a = a.merged(*b);
            }
        }
        _ => chain.push(next),
    }
}

/// One epoch as the ledger shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EpochReport {
    pub epoch: u64,
    /// Samples in the dataset.
    pub samples: u64,
    /// Samples trained on, repeats counted.
    pub trained: u64,
    /// Distinct samples trained on.
    pub distinct: u64,
    /// Whether training went past this epoch.
    pub complete: bool,
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub steps: u64,
    pub segments: usize,
    pub epochs: Vec<EpochReport>,
    /// Each way the ledger differs from training every sample once.
    pub problems: Vec<String>,
}

impl Verdict {
    pub fn exactly_once(&self) -> bool {
        self.problems.is_empty()
    }
}

/// At most this many sample ids are named in one problem.
const NAMED_IDS: usize = 10;

/// Replays `chain` through the sampler (see the module docs).
pub fn verify(chain: &[Segment]) -> Verdict {
    let mut problems = Vec::new();
    let mut epochs: Vec<(u64, u64, Vec<u32>)> = Vec::new(); // (epoch, samples, times seen per id)
    let mut expected_from = Position::default();
    let mut expected_step = 1;
    for (i, seg) in chain.iter().enumerate() {
        let name = format!(
            "steps {}..={} (dp {})",
            seg.first_step, seg.last_step, seg.dp
        );
        if seg.first_step != expected_step {
            problems.push(format!(
                "{name}: starts at step {}, the previous segment ended at step {}",
                seg.first_step,
                expected_step - 1
            ));
        }
        if seg.from != expected_from {
            problems.push(describe_gap(i, &name, expected_from, seg));
        }
        if seg.ranks.len() as u64 != seg.dp {
            problems.push(format!(
                "{name}: {} rank tallies for {} data-parallel ranks",
                seg.ranks.len(),
                seg.dp
            ));
        }
        if seg.sampler.balance {
            replay_balanced(seg, &name, &mut epochs, &mut problems);
            expected_from = seg.to;
            expected_step = seg.last_step + 1;
            continue;
        }
        for (rank, recorded) in seg.ranks.iter().enumerate() {
            let Ok(mut sampler) = Sampler::new(seg.sampler, rank as u64, seg.dp, seg.from) else {
                problems.push(format!("{name}: its sampler settings are not valid"));
                break;
            };
            let tally = replay(&mut sampler, seg, &name, &mut epochs, &mut problems);
            if tally != *recorded {
                problems.push(format!(
                    "{name}: rank {rank} trained {} samples (digest {:016x}); the global order gives it {} (digest {:016x})",
                    recorded.count, recorded.digest, tally.count, tally.digest
                ));
            }
        }
        expected_from = seg.to;
        expected_step = seg.last_step + 1;
    }
    let last_epoch = expected_from.epoch;
    let tail_policy = chain.last().map(|s| s.sampler.tail);
    let reports: Vec<EpochReport> = epochs
        .iter()
        .map(|(epoch, samples, seen)| {
            let trained: u64 = seen.iter().map(|&n| u64::from(n)).sum();
            let distinct = seen.iter().filter(|&&n| n > 0).count() as u64;
            let repeated: Vec<usize> = seen
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 1)
                .map(|(id, _)| id)
                .collect();
            // `pad` repeats a few samples by design to fill the last batch.
            if !repeated.is_empty() && tail_policy != Some(TailPolicy::Pad) {
                problems.push(format!(
                    "epoch {epoch}: {} samples trained more than once: {}",
                    repeated.len(),
                    name_ids(&repeated)
                ));
            }
            EpochReport {
                epoch: *epoch,
                samples: *samples,
                trained,
                distinct,
                complete: *epoch < last_epoch,
            }
        })
        .collect();
    Verdict {
        steps: expected_step - 1,
        segments: chain.len(),
        epochs: reports,
        problems,
    }
}

/// A segment whose ranks shared each global batch by cost: which rank took
/// which sample depends on the samples' costs, which the ledger does not
/// hold, so the ranks are checked together. The global batches are replayed
/// as one rank taking them whole; the ranks' tallies must add up to theirs,
/// and each rank must have trained its batch size at every step.
fn replay_balanced(
    seg: &Segment,
    name: &str,
    epochs: &mut Vec<(u64, u64, Vec<u32>)>,
    problems: &mut Vec<String>,
) {
    let whole = SamplerConfig {
        batch_size: seg.sampler.batch_size * seg.dp,
        balance: false,
        ..seg.sampler
    };
    let Ok(mut sampler) = Sampler::new(whole, 0, 1, seg.from) else {
        problems.push(format!("{name}: its sampler settings are not valid"));
        return;
    };
    let expected = replay(&mut sampler, seg, name, epochs, problems);
    let each = seg.micro_steps * seg.sampler.batch_size;
    for (rank, t) in seg.ranks.iter().enumerate() {
        if t.count != each {
            problems.push(format!(
                "{name}: rank {rank} trained {} samples; {} steps of {} give {each}",
                t.count, seg.micro_steps, seg.sampler.batch_size
            ));
        }
    }
    let together = seg.ranks.iter().fold(Tally::default(), |a, t| a.merged(*t));
    if together != expected {
        problems.push(format!(
            "{name}: the ranks together trained {} samples (digest {:016x}); the global order gives {} (digest {:016x})",
            together.count, together.digest, expected.count, expected.digest
        ));
    }
}

/// Steps `sampler` through `seg`'s sampler steps: the tally of what it
/// gives, each sample counted as seen in its epoch; a sampler that does not
/// end where the segment says is a problem.
fn replay(
    sampler: &mut Sampler,
    seg: &Segment,
    name: &str,
    epochs: &mut Vec<(u64, u64, Vec<u32>)>,
    problems: &mut Vec<String>,
) -> Tally {
    let mut tally = Tally::default();
    for _ in 0..seg.micro_steps {
        let step = sampler.next_step();
        let seen = epoch_seen(epochs, step.epoch, seg.sampler.num_samples);
        for id in step.indices {
            tally.add(step.epoch, id as u64);
            if let Some(n) = seen.get_mut(id) {
                *n += 1;
            }
        }
    }
    if sampler.position() != seg.to {
        problems.push(format!(
            "{name}: {} sampler steps from {:?} end at {:?}, the ledger says {:?}",
            seg.micro_steps,
            seg.from,
            sampler.position(),
            seg.to
        ));
    }
    tally
}

fn epoch_seen(epochs: &mut Vec<(u64, u64, Vec<u32>)>, epoch: u64, n: u64) -> &mut Vec<u32> {
    let at = match epochs.iter().position(|(e, _, _)| *e == epoch) {
        Some(at) => at,
        None => {
            epochs.push((epoch, n, vec![0; n as usize]));
            epochs.len() - 1
        }
    };
    &mut epochs[at].2
}

/// A segment that does not start where the previous one ended: the
/// positions in between were skipped, or trained again.
fn describe_gap(i: usize, name: &str, expected: Position, seg: &Segment) -> String {
    let after = if i == 0 {
        "the start of training".to_owned()
    } else {
        format!("the previous segment's end {expected:?}")
    };
    if expected.epoch != seg.from.epoch {
        return format!("{name}: starts at {:?}, not at {after}", seg.from);
    }
    let order = epoch_order(
        seg.sampler.seed,
        seg.from.epoch,
        seg.sampler.num_samples as usize,
    );
    let (lo, hi, what) = if seg.from.consumed > expected.consumed {
        (expected.consumed, seg.from.consumed, "skipped")
    } else {
        (seg.from.consumed, expected.consumed, "trained again")
    };
    let ids: Vec<usize> = (lo..hi)
        .filter_map(|p| order.get(p as usize).copied())
        .collect();
    format!(
        "{name}: starts at {:?}, not at {after}: {} samples of epoch {} {what}: {}",
        seg.from,
        ids.len(),
        seg.from.epoch,
        name_ids(&ids)
    )
}

fn name_ids(ids: &[usize]) -> String {
    let shown: Vec<String> = ids.iter().take(NAMED_IDS).map(usize::to_string).collect();
    if ids.len() > NAMED_IDS {
        format!(
            "ids {} and {} more",
            shown.join(", "),
            ids.len() - NAMED_IDS
        )
    } else {
        format!("ids {}", shown.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(n: u64, batch: u64) -> SamplerConfig {
        SamplerConfig {
            num_samples: n,
            seed: 5,
            batch_size: batch,
            tail: TailPolicy::Drop,
            balance: false,
        }
    }

    /// Images per sample of a mixed set, for balanced segments.
    fn costs(n: u64) -> std::sync::Arc<[u32]> {
        (0..n).map(|i| 1 + (i * 5 % 8) as u32).collect()
    }

    /// The segment `dp` ranks write training `steps` steps from `from`.
    fn trained(
        from: Position,
        first_step: u64,
        steps: u64,
        dp: u64,
        cfg: SamplerConfig,
    ) -> Segment {
        let mut to = from;
        let ranks = (0..dp)
            .map(|r| {
                let costs = cfg.balance.then(|| costs(cfg.num_samples));
                let mut s = Sampler::balanced(cfg, r, dp, from, costs).unwrap();
                let mut t = Tally::default();
                for _ in 0..steps {
                    let step = s.next_step();
                    step.indices
                        .iter()
                        .for_each(|&id| t.add(step.epoch, id as u64));
                }
                to = s.position();
                t
            })
            .collect();
        Segment {
            from,
            to,
            first_step,
            last_step: first_step + steps - 1,
            micro_steps: steps,
            dp,
            sampler: cfg,
            ranks,
        }
    }

    #[test]
    fn resizes_and_resumes_verify_and_merge() {
        let mut chain = Vec::new();
        let a = trained(Position::default(), 1, 5, 1, config(100, 4));
        let b = trained(a.to, 6, 5, 1, config(100, 4));
        append(&mut chain, a);
        append(&mut chain, b);
        assert_eq!(
            chain.len(),
            1,
            "a resume at the same layout extends the segment"
        );
        let c = trained(chain[0].to, 11, 10, 2, config(100, 4));
        append(&mut chain, c);
        assert_eq!(chain.len(), 2);
        let v = verify(&chain);
        assert!(v.exactly_once(), "{:?}", v.problems);
        assert_eq!(v.steps, 20);
        // 40 samples at dp 1, then 8 per step: epoch 0 ends after 40 + 56
        // (4 left, under a global batch of 8: dropped); epoch 1 has the
        // last 3 steps' 24.
        assert_eq!((v.epochs[0].distinct, v.epochs[0].trained), (96, 96));
        assert!(v.epochs[0].complete);
        assert_eq!((v.epochs[1].distinct, v.epochs[1].trained), (24, 24));
        assert!(!v.epochs[1].complete);
    }

    #[test]
    fn balanced_segments_verify_by_the_ranks_together() {
        let balanced = SamplerConfig {
            balance: true,
            ..config(100, 4)
        };
        let a = trained(Position::default(), 1, 5, 2, balanced);
        let b = trained(a.to, 6, 10, 3, balanced);
        let plain = trained(b.to, 16, 2, 3, config(100, 4));
        let chain = vec![a.clone(), b.clone(), plain];
        let v = verify(&chain);
        assert!(v.exactly_once(), "{:?}", v.problems);
        // 40 at dp 2, then 5 steps of 12 finish epoch 0.
        assert_eq!(v.epochs[0].trained, 100);

        // Two ranks that swapped samples still add up; one that trained a
        // sample of another's does not.
        let mut swapped = b.clone();
        swapped.ranks.swap(0, 2);
        assert!(verify(&[a.clone(), swapped]).exactly_once());
        let mut wrong = b;
        wrong.ranks[1].digest ^= 1;
        let v = verify(&[a, wrong]);
        assert!(
            v.problems.iter().any(|p| p.contains("the ranks together")),
            "{:?}",
            v.problems
        );
    }

    #[test]
    fn skipped_repeated_and_misreported_samples_are_named() {
        let a = trained(Position::default(), 1, 5, 1, config(100, 4));
        // Resumed from a position 8 past where the ledger ended.
        let skip = Position {
            epoch: 0,
            consumed: a.to.consumed + 8,
        };
        let b = trained(skip, 6, 2, 1, config(100, 4));
        let v = verify(&[a.clone(), b]);
        assert!(
            v.problems[0].contains("8 samples of epoch 0 skipped"),
            "{:?}",
            v.problems
        );

        let again = trained(
            Position {
                epoch: 0,
                consumed: 12,
            },
            6,
            2,
            1,
            config(100, 4),
        );
        let v = verify(&[a.clone(), again]);
        assert!(
            v.problems.iter().any(|p| p.contains("trained again")),
            "{:?}",
            v.problems
        );
        assert!(
            v.problems
                .iter()
                .any(|p| p.contains("trained more than once")),
            "{:?}",
            v.problems
        );

        let mut lied = a.clone();
        lied.ranks[0].add(0, 3);
        let v = verify(&[lied]);
        assert!(
            v.problems[0].contains("rank 0 trained 21 samples"),
            "{:?}",
            v.problems
        );
    }
}
