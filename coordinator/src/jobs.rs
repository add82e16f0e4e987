//! The job state machine and its stored form. A job moves
//! pending -> rendezvous -> running, and from running to succeeded, to
//! restarting (a generation ended; back to rendezvous), to failed (a
//! permanent failure, or `max_restarts` used up) or to cancelled. Each
//! record is JSON under `<prefix>/jobs/<id>`; only the leader writes them.
//! The transitions here are plain functions of a record, so the policy is
//! testable without a store or a network.

use std::collections::HashMap;

use samtrain_proto::spec::{JobSpec, ParallelSpec, StragglerPolicy};
use samtrain_proto::{v1, Checkpoint, Scores};
use serde::{Deserialize, Serialize};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Rendezvous,
    Running,
    Restarting,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// Every state, in the order of a job's life.
    pub const ALL: [JobState; 7] = [
        JobState::Pending,
        JobState::Rendezvous,
        JobState::Running,
        JobState::Restarting,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// The job waits for workers to form its next generation.
    pub fn needs_workers(self) -> bool {
        matches!(
            self,
            JobState::Pending | JobState::Rendezvous | JobState::Restarting
        )
    }

    pub fn to_proto(self) -> v1::JobState {
        match self {
            JobState::Pending => v1::JobState::Pending,
            JobState::Rendezvous => v1::JobState::Rendezvous,
            JobState::Running => v1::JobState::Running,
            JobState::Restarting => v1::JobState::Restarting,
            JobState::Succeeded => v1::JobState::Succeeded,
            JobState::Failed => v1::JobState::Failed,
            JobState::Cancelled => v1::JobState::Cancelled,
        }
    }

    /// The lower-case name users see.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Rendezvous => "rendezvous",
            JobState::Running => "running",
            JobState::Restarting => "restarting",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// One worker of a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub worker_id: String,
    pub name: String,
    pub advertise: String,
    pub rank: u32,
    /// The node it runs on (empty in records from before nodes).
    #[serde(default)]
    pub node: String,
}

/// The rendezvous, restart and straggler settings of a job, copied from
/// its spec (`max_workers` as `Scale` changed it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub tp: u32,
    pub min_workers: u32,
    pub max_workers: u32,
    pub last_call_s: f64,
    pub max_restarts: u32,
    #[serde(default = "default_straggler_factor")]
    pub straggler_factor: f64,
    #[serde(default = "default_straggler_steps")]
    pub straggler_steps: u64,
    #[serde(default)]
    pub straggler_policy: StragglerPolicy,
    #[serde(default)]
    pub tp_across_nodes: bool,
}

fn default_straggler_factor() -> f64 {
    ParallelSpec::default().straggler_factor
}

fn default_straggler_steps() -> u64 {
    ParallelSpec::default().straggler_steps
}

impl Policy {
    pub fn of(spec: &JobSpec) -> Policy {
        Policy {
            tp: spec.parallel.tp.max(1),
            min_workers: spec.parallel.min_workers,
            max_workers: spec.parallel.max_workers,
            last_call_s: spec.parallel.last_call_s,
            max_restarts: spec.restart.max_restarts,
            straggler_factor: spec.parallel.straggler_factor,
            straggler_steps: spec.parallel.straggler_steps,
            straggler_policy: spec.parallel.straggler_policy,
            tp_across_nodes: spec.parallel.tp_across_nodes,
        }
    }
}

/// The message of a job waiting for its generation's workers.
pub const WAITING_FOR_WORKERS: &str = "waiting for workers";

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub name: String,
    pub spec_toml: String,
    pub policy: Policy,
    pub state: JobState,
    /// The running generation, or the next one to form.
    pub generation: u64,
    pub restarts: u32,
    /// Generations ended to change size (not failures).
    #[serde(default)]
    pub resizes: u32,
    pub step: u64,
    pub total_steps: u64,
    pub loss: Option<f64>,
    /// The newest committed checkpoint.
    pub checkpoint: Option<Checkpoint>,
    /// The newest save that failed with no commit after it.
    #[serde(default)]
    pub checkpoint_failure: Option<CheckpointFailure>,
    /// The running generation's members in rank order (empty otherwise).
    pub members: Vec<MemberRecord>,
    /// The running generation's secret, which its members' collectives
    /// prove they hold (never shown by `Get`).
    #[serde(default)]
    pub ring_secret: String,
    pub message: String,
    /// The final evaluation's scores, once succeeded with one.
    pub eval: Option<Scores>,
    /// A few of its predictions beside their references.
    #[serde(default)]
    pub eval_examples: Vec<v1::EvalExample>,
    pub created_unix_ms: i64,
    pub updated_unix_ms: i64,
    pub finished_unix_ms: Option<i64>,
}

/// A save that failed: the checkpoint that was not committed, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointFailure {
    pub checkpoint: Checkpoint,
    pub reason: String,
}

impl CheckpointFailure {
    pub fn to_proto(&self) -> v1::CheckpointFailed {
        v1::CheckpointFailed {
            checkpoint: Some(self.checkpoint.clone()),
            reason: self.reason.clone(),
        }
    }
}

/// What ending a generation did.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationEnd {
    pub ended_generation: u64,
    /// The members to tell (they go back to waiting).
    pub members: Vec<MemberRecord>,
    /// The job failed for good (max_restarts used up, or a permanent failure).
    pub failed: bool,
}

impl JobRecord {
    /// A new pending job.
    pub fn new(id: String, spec: &JobSpec, spec_toml: String, now: i64) -> JobRecord {
        JobRecord {
            id,
            name: spec.name.clone(),
            spec_toml,
            policy: Policy::of(spec),
            state: JobState::Pending,
            generation: 0,
            restarts: 0,
            resizes: 0,
            step: 0,
            total_steps: spec.training.steps,
            loss: None,
            checkpoint: None,
            checkpoint_failure: None,
            members: Vec::new(),
            ring_secret: String::new(),
            message: WAITING_FOR_WORKERS.to_owned(),
            eval: None,
            eval_examples: Vec::new(),
            created_unix_ms: now,
            updated_unix_ms: now,
            finished_unix_ms: None,
        }
    }

    fn finish(&mut self, state: JobState, message: String, now: i64) {
        self.state = state;
        self.message = message;
        self.finished_unix_ms = Some(now);
        self.updated_unix_ms = now;
    }

    /// A generation forms with these members (rank order).
    pub fn form(&mut self, members: Vec<MemberRecord>, ring_secret: String, now: i64) {
        self.state = JobState::Running;
        self.ring_secret = ring_secret;
        self.message = format!(
            "generation {} running on {} workers",
            self.generation,
            members.len()
        );
        self.members = members;
        self.updated_unix_ms = now;
    }

    /// The running generation ended by a retriable failure or a lost
    /// member: count a restart, or fail once `max_restarts` are used up.
    pub fn end_generation(&mut self, reason: &str, now: i64) -> GenerationEnd {
        let ended_generation = self.generation;
        let members = std::mem::take(&mut self.members);
        self.generation += 1;
        self.updated_unix_ms = now;
        if self.restarts >= self.policy.max_restarts {
            self.finish(
                JobState::Failed,
                format!(
                    "generation {ended_generation} ended and max_restarts ({}) is used up: {reason}",
                    self.policy.max_restarts
                ),
                now,
            );
            GenerationEnd {
                ended_generation,
                members,
                failed: true,
            }
        } else {
            self.restarts += 1;
            self.state = JobState::Restarting;
            self.message = format!(
                "generation {ended_generation} ended (restart {} of {}): {reason}",
                self.restarts, self.policy.max_restarts
            );
            GenerationEnd {
                ended_generation,
                members,
                failed: false,
            }
        }
    }

    /// The running generation ended to change size (growth, scale, drain)
    /// after a committed checkpoint: no restart is counted.
    pub fn resize(&mut self, reason: &str, now: i64) -> GenerationEnd {
        let ended_generation = self.generation;
        let members = std::mem::take(&mut self.members);
        self.generation += 1;
        self.resizes += 1;
        self.updated_unix_ms = now;
        self.state = JobState::Restarting;
        self.message = format!("generation {ended_generation} ended to resize: {reason}");
        GenerationEnd {
            ended_generation,
            members,
            failed: false,
        }
    }

    /// At most `workers` workers from now on; `min_workers` drops to it.
    /// The caller checks the bounds.
    pub fn scale(&mut self, workers: u32, now: i64) {
        self.policy.max_workers = workers;
        self.policy.min_workers = self.policy.min_workers.min(workers);
        self.updated_unix_ms = now;
    }

    /// A permanent failure: the job fails at once.
    pub fn fail(&mut self, reason: &str, now: i64) -> GenerationEnd {
        let ended_generation = self.generation;
        let members = std::mem::take(&mut self.members);
        if !members.is_empty() {
            self.generation += 1;
        }
        self.finish(JobState::Failed, reason.to_owned(), now);
        GenerationEnd {
            ended_generation,
            members,
            failed: true,
        }
    }

    /// Cancelled by a user; checkpoints stay where they are.
    pub fn cancel(&mut self, now: i64) -> GenerationEnd {
        let ended_generation = self.generation;
        let members = std::mem::take(&mut self.members);
        if !members.is_empty() {
            self.generation += 1;
        }
        self.finish(JobState::Cancelled, "cancelled".to_owned(), now);
        GenerationEnd {
            ended_generation,
            members,
            failed: false,
        }
    }

    /// Rank 0 reported completion.
    pub fn succeed(&mut self, step: u64, eval: Option<Scores>, now: i64) -> Vec<MemberRecord> {
        let members = std::mem::take(&mut self.members);
        self.step = self.step.max(step);
        self.eval = eval;
        self.finish(
            JobState::Succeeded,
            format!("completed at step {}", self.step),
            now,
        );
        members
    }

    /// The member with this worker id, in the running generation.
    pub fn member(&self, worker_id: &str) -> Option<&MemberRecord> {
        self.members.iter().find(|m| m.worker_id == worker_id)
    }

    pub fn to_proto(&self) -> v1::Job {
        v1::Job {
            id: self.id.clone(),
            name: self.name.clone(),
            spec_toml: self.spec_toml.clone(),
            state: self.state.to_proto() as i32,
            generation: self.generation,
            restarts: self.restarts,
            step: self.step,
            total_steps: self.total_steps,
            loss: self.loss,
            latest_checkpoint: self.checkpoint.clone(),
            members: self.members.iter().map(MemberRecord::to_proto).collect(),
            message: self.message.clone(),
            eval: self.eval,
            created_unix_ms: self.created_unix_ms,
            updated_unix_ms: self.updated_unix_ms,
            finished_unix_ms: self.finished_unix_ms,
            checkpoint_failure: self
                .checkpoint_failure
                .as_ref()
                .map(CheckpointFailure::to_proto),
            world_size: self.members.len() as u32,
            dp: if self.members.is_empty() {
                0
            } else {
                self.members.len() as u32 / self.policy.tp.max(1)
            },
            tp: if self.members.is_empty() {
                0
            } else {
                self.policy.tp
            },
            resizes: self.resizes,
            max_workers: self.policy.max_workers,
            eval_examples: self.eval_examples.clone(),
            ranks: self.placements(),
        }
    }

    /// Where each rank of the running generation runs, and its place in
    /// the grid (`tp_rank = rank % tp`, as the process groups number it).
    fn placements(&self) -> Vec<v1::RankPlacement> {
        let tp = self.policy.tp.max(1);
        let mut on_node: HashMap<&str, u32> = HashMap::new();
        self.members
            .iter()
            .map(|m| {
                let node = m.node();
                let local = on_node.entry(node).or_default();
                let local_rank = *local;
                *local += 1;
                v1::RankPlacement {
                    rank: m.rank,
                    worker_id: m.worker_id.clone(),
                    node: node.to_owned(),
                    local_rank,
                    dp_rank: m.rank / tp,
                    tp_rank: m.rank % tp,
                }
            })
            .collect()
    }
}

impl MemberRecord {
    /// Its node: as the worker registered it, else its advertised host.
    pub fn node(&self) -> &str {
        crate::records::node_or_host(&self.node, &self.advertise)
    }

    pub fn to_proto(&self) -> v1::Member {
        v1::Member {
            worker_id: self.worker_id.clone(),
            name: self.name.clone(),
            advertise: self.advertise.clone(),
            rank: self.rank,
            step: 0,
            last_report_unix_ms: None,
            compute_s: 0.0,
            comm_s: 0.0,
            data_s: 0.0,
            straggler: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(max_restarts: u32) -> JobRecord {
        let text = format!(
            "name = \"t\"\n[model]\npath = \"m\"\n[data]\ntrain = \"d\"\n[checkpoint]\nurl = \"file:///c\"\n[restart]\nmax_restarts = {max_restarts}\n"
        );
        let spec = JobSpec::from_toml(&text, None).unwrap();
        JobRecord::new("t-1".into(), &spec, text, 1)
    }

    fn member(id: &str, rank: u32) -> MemberRecord {
        MemberRecord {
            worker_id: id.into(),
            name: id.into(),
            advertise: format!("127.0.0.1:{}", 5000 + rank),
            rank,
            node: String::new(),
        }
    }

    #[test]
    fn restarts_are_counted_until_max_restarts_then_the_job_fails() {
        let mut j = job(1);
        j.form(vec![member("a", 0), member("b", 1)], "s".into(), 2);
        assert_eq!(j.state, JobState::Running);
        let end = j.end_generation("b lost its lease", 3);
        assert_eq!(
            (end.ended_generation, end.failed, end.members.len()),
            (0, false, 2)
        );
        assert_eq!(
            (j.state, j.generation, j.restarts),
            (JobState::Restarting, 1, 1)
        );
        assert!(j.members.is_empty());
        j.form(vec![member("a", 0)], "s".into(), 4);
        let end = j.end_generation("peer closed the connection", 5);
        assert!(end.failed);
        assert_eq!(
            (j.state, j.generation, j.restarts),
            (JobState::Failed, 2, 1)
        );
        assert!(j.message.contains("max_restarts (1)"), "{}", j.message);
        assert!(j.message.contains("peer closed the connection"));
        assert_eq!(j.finished_unix_ms, Some(5));
    }

    #[test]
    fn success_keeps_scores_and_cancel_keeps_the_checkpoint() {
        let mut j = job(3);
        j.form(vec![member("a", 0)], "s".into(), 2);
        let eval = Some(Scores {
            rouge: 0.0,
            cider: 0.5,
            bleu4: 0.0,
        });
        let told = j.succeed(100, eval, 3);
        assert_eq!(told.len(), 1);
        assert_eq!(
            (j.state, j.step, &j.eval),
            (JobState::Succeeded, 100, &eval)
        );

        let mut j = job(3);
        j.checkpoint = Some(Checkpoint {
            step: 10,
            url: "file:///c/step-10".into(),
        });
        j.form(vec![member("a", 0)], "s".into(), 2);
        let end = j.cancel(3);
        assert_eq!((end.ended_generation, end.members.len()), (0, 1));
        assert_eq!((j.state, j.generation), (JobState::Cancelled, 1));
        assert_eq!(j.checkpoint.as_ref().unwrap().step, 10);
    }
}
