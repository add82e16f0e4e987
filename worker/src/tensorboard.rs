//! What world rank 0 writes to TensorBoard when the spec names a place
//! (`logging.tensorboard`): the training scalars at every progress report,
//! each committed save's timing, and the final evaluation's scores and
//! example predictions. The event files themselves are
//! `samtrain_tensorboard`'s, written off the training thread.

use std::sync::Arc;

use samtrain_data::eval::Summary;
use samtrain_tensorboard::{TensorBoard, TensorBoardError};

use crate::report::{EvalExample, SaveTiming, StepMetrics, TrainEvent};

/// The job's TensorBoard run, shared by the trainer and its event sink.
#[derive(Clone)]
pub(crate) struct Board(Arc<TensorBoard>);

impl Board {
    /// Starts writing to `location` (its first record is written before
    /// this returns, so a bad bucket fails here, naming it).
    pub(crate) fn start(location: &str) -> Result<Board, TensorBoardError> {
        Ok(Board(Arc::new(TensorBoard::start(location)?)))
    }

    /// Records what an event says (progress and committed saves).
    pub(crate) fn event(&self, event: &TrainEvent) {
        match event {
            TrainEvent::Progress(m) => self.progress(m),
            TrainEvent::Checkpoint { checkpoint, save } => self.saved(checkpoint.step, save),
            TrainEvent::Started { .. } | TrainEvent::CheckpointFailed { .. } => {}
        }
    }

    fn progress(&self, m: &StepMetrics) {
        let tb = &self.0;
        for (tag, value) in [
            ("train/loss", m.loss),
            ("train/learning_rate", m.lr),
            ("train/grad_norm", m.grad_norm),
            ("train/samples_per_second", m.samples_per_s),
            ("train/tokens_per_second", m.tokens_per_s),
            ("step_time/data_seconds", m.data_s),
            (
                "step_time/compute_seconds",
                (m.compute_s - m.data_s).max(0.0),
            ),
            ("step_time/communication_seconds", m.comm_s),
        ] {
            tb.scalar(tag, m.step, value);
        }
        tb.scalar("train/epoch", m.step, m.epoch as f64);
    }

    fn saved(&self, step: u64, save: &SaveTiming) {
        let tb = &self.0;
        tb.scalar(
            "checkpoint/save_seconds",
            step,
            save.blocked_s + save.upload_s,
        );
        tb.scalar("checkpoint/blocked_seconds", step, save.blocked_s);
        tb.scalar("checkpoint/bytes", step, save.bytes as f64);
    }

    /// The final evaluation at `step`: its scores and a table of examples.
    pub(crate) fn evaluation(&self, step: u64, scores: &Summary, examples: &[EvalExample]) {
        let tb = &self.0;
        tb.scalar("eval/cider", step, scores.cider);
        tb.scalar("eval/bleu4", step, scores.bleu4);
        tb.scalar("eval/rouge_l", step, scores.rouge);
        if !examples.is_empty() {
            tb.text("eval/examples", step, &examples_table(examples));
        }
    }

    /// Writes out everything recorded so far.
    pub(crate) fn flush(&self) {
        if let Err(e) = self.0.flush() {
            tracing::warn!(error = %e, "TensorBoard events not written");
        }
    }
}

/// A Markdown table (TensorBoard's text plugin renders Markdown).
fn examples_table(examples: &[EvalExample]) -> String {
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut table = String::from("| sample | prediction | reference |\n|---|---|---|\n");
    for e in examples {
        table.push_str(&format!(
            "| {} | {} | {} |\n",
            cell(&e.sample_id),
            cell(&e.prediction),
            cell(&e.reference)
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_become_a_markdown_table_whose_cells_cannot_break_it() {
        let table = examples_table(&[EvalExample {
            sample_id: "7".into(),
            prediction: "a | b\nc".into(),
            reference: "d".into(),
        }]);
        assert_eq!(
            table,
            "| sample | prediction | reference |\n|---|---|---|\n| 7 | a \\| b c | d |\n"
        );
    }
}
