//! The learning-rate schedule: linear warm-up to the peak, then a cosine
//! decay to `min_lr` at the last step, as a pure function of the step so a
//! resumed run needs no schedule state.

use samtrain_proto::spec::TrainingSpec;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    pub fn from_spec(t: &TrainingSpec) -> Self {
        Schedule {
            lr: t.lr,
            min_lr: t.min_lr,
            warmup_steps: t.warmup_steps,
            total_steps: t.steps,
        }
    }

    /// The learning rate of the optimizer step taken after `completed`
    /// steps (0 for the first step). Warm-up steps climb `lr/warmup, ...,
    /// lr`, so the first step already learns (unlike a warm-up that starts
    /// at 0); then `min_lr + (lr - min_lr) (1 + cos(pi p)) / 2` with `p` the
    /// share of the decay done, reaching `min_lr` at `total_steps`.
    pub fn lr(&self, completed: u64) -> f64 {
        if completed < self.warmup_steps {
            return self.lr * (completed + 1) as f64 / self.warmup_steps as f64;
        }
        let decay = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((completed - self.warmup_steps) as f64 / decay as f64).min(1.0);
        self.min_lr
            + (self.lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_by_cosine() {
        let s = Schedule {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 4,
            total_steps: 12,
        };
        let got: Vec<f64> = (0..=12).map(|k| s.lr(k)).collect();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
        assert!(close(got[0], 0.25e-3) && close(got[1], 0.5e-3) && close(got[3], 1e-3));
        assert!(close(got[4], 1e-3), "peak right after warm-up");
        // Half way through the decay: the mean of lr and min_lr.
        assert!(close(got[8], 0.55e-3), "{}", got[8]);
        assert!(close(got[12], 1e-4));
        assert!(got[4..].windows(2).all(|w| w[0] > w[1]), "{got:?}");
    }

    #[test]
    fn no_warmup_starts_at_the_peak() {
        let s = Schedule {
            lr: 2.0,
            min_lr: 0.0,
            warmup_steps: 0,
            total_steps: 2,
        };
        assert_eq!(s.lr(0), 2.0);
        assert!((s.lr(1) - 1.0).abs() < 1e-12);
        assert!(s.lr(2).abs() < 1e-12);
    }
}
