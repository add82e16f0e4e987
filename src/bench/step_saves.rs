//! The saves of `samtrain bench train-step --save-every N`: a samtrain
//! checkpoint of the trained state after every N-th step, lent to the
//! upload (read in place, in the background) and settled before the next
//! optimizer step, as in training.
//!
//! What a save costs training is more than what it blocks: the upload and
//! the retention's read-back run beside the steps that follow, on the same
//! cores and memory bus. So the bench times the steps as training would
//! live them (no pause for the uploads), adds the wait for the last upload
//! at the end, and a save's cost is the difference from the same bench
//! without saves, per save.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use samtrain_checkpoint::{CheckpointOptions, Checkpointer, Settled, ShardState};
use samtrain_worker::optim::AdamW;
use tch::Tensor;

use super::median;

pub(super) struct Saves {
    every: usize,
    ckpt: Checkpointer,
    /// Whether the newest save is timed, and what its call blocked, until
    /// the optimizer settles its loan.
    pending: Option<(bool, Duration)>,
    /// What each timed save blocked training: its call and its settling.
    blocked_ms: Vec<f64>,
    /// What settling each timed save's loan took.
    settle_ms: Vec<f64>,
    /// Bytes the settling of timed saves copied, each.
    copied: Vec<u64>,
    bytes: u64,
}

/// What the saves of a run cost.
pub(super) struct SaveReport {
    pub saves: usize,
    /// Tensor bytes of one save.
    pub bytes: u64,
    /// Median time a save blocked training (its call and its settling).
    pub blocked_ms: f64,
    /// Median time settling a save's loan took (part of `blocked_ms`).
    pub settle_ms: f64,
    /// Median bytes a save's settling copied (what the upload had not read
    /// by the next optimizer step).
    pub copied: u64,
    /// The wait for the last upload after the last step.
    pub final_flush: Duration,
}

impl Saves {
    /// Saves into `dir` after every `every`-th step. The checkpoints of an
    /// earlier run there are removed first; a folder that holds anything
    /// else is refused, never emptied.
    pub fn open(every: usize, dir: &Path) -> Result<Self> {
        if dir.exists() {
            let entries =
                std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
            for entry in entries {
                let name = entry?.file_name();
                let name = name.to_string_lossy();
                ensure!(
                    name.starts_with("step-") || name == ".recycled",
                    "--save-to {} holds {name}, which is not a checkpoint: give a new folder \
                     or one of an earlier run",
                    dir.display()
                );
            }
            std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
        }
        let mut options = CheckpointOptions::new(dir.display().to_string());
        options.keep = 2;
        Ok(Self {
            every,
            ckpt: Checkpointer::open(options)?,
            pending: None,
            blocked_ms: Vec::new(),
            settle_ms: Vec::new(),
            copied: Vec::new(),
            bytes: 0,
        })
    }

    /// After step `step`'s optimizer step: starts a save when one is due.
    pub fn after_step(
        &mut self,
        step: usize,
        timed: bool,
        params: &[(String, Tensor)],
        opt: &mut AdamW,
    ) -> Result<()> {
        if (step + 1) % self.every != 0 {
            return Ok(());
        }
        let state = ShardState {
            step: step as u64 + 1,
            tp_rank: 0,
            tp_size: 1,
            writer: true,
            tensors: params
                .iter()
                .map(|(n, p)| (n.clone(), p.detach()))
                .collect(),
            optimizer: opt.state(),
            meta: serde_json::json!({ "step": step + 1 }),
        };
        self.bytes = state
            .tensors
            .iter()
            .chain(&state.optimizer)
            .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum();
        let (ticket, loan) = self.ckpt.save_lending(state)?;
        opt.lend(loan);
        self.pending = Some((timed, ticket.staging()));
        Ok(())
    }

    /// Before an optimizer step: what settling the newest save's loan took
    /// (`AdamW::settle_loan`), which blocks training too.
    pub fn settled(&mut self, settled: Option<Settled>) {
        if let Some((timed, call)) = self.pending.take() {
            let settled = settled.unwrap_or_default();
            if timed {
                self.blocked_ms
                    .push((call + settled.took).as_secs_f64() * 1e3);
                self.settle_ms.push(settled.took.as_secs_f64() * 1e3);
                self.copied.push(settled.copied);
            }
        }
    }

    /// Waits for the last saves to end and reports.
    pub fn finish(mut self) -> Result<SaveReport> {
        let start = Instant::now();
        for outcome in self.ckpt.flush()? {
            ensure!(!outcome.is_failed(), "a save failed: {:?}", outcome.status);
        }
        let final_flush = start.elapsed();
        // No update follows the last save: it blocked its call alone.
        self.settled(None);
        ensure!(
            !self.blocked_ms.is_empty(),
            "no save was timed: --steps is too few for --save-every"
        );
        Ok(SaveReport {
            saves: self.blocked_ms.len(),
            bytes: self.bytes,
            blocked_ms: median(self.blocked_ms.iter().copied()),
            settle_ms: median(self.settle_ms.iter().copied()),
            copied: median(self.copied.iter().map(|&b| b as f64)) as u64,
            final_flush,
        })
    }
}
