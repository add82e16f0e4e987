//! The JSON shape of jobs and their events: what `samtrain status --json`,
//! `samtrain watch --json` and the dashboard's API print, in one place so
//! that a script written against one reads the others.

use samtrain_proto::v1;

use crate::records::host_of;
use serde_json::{json, Value};

/// The lower-case name of a `v1::JobState` (as `JobState::name` spells it).
pub fn state_name(state: i32) -> &'static str {
    match v1::JobState::try_from(state).unwrap_or(v1::JobState::Unspecified) {
        v1::JobState::Unspecified => "unknown",
        v1::JobState::Pending => "pending",
        v1::JobState::Rendezvous => "rendezvous",
        v1::JobState::Running => "running",
        v1::JobState::Restarting => "restarting",
        v1::JobState::Succeeded => "succeeded",
        v1::JobState::Failed => "failed",
        v1::JobState::Cancelled => "cancelled",
    }
}

/// A job, as `samtrain status --json` prints it.
pub fn job_json(job: &v1::Job) -> Value {
    json!({
        "id": job.id,
        "name": job.name,
        "state": state_name(job.state),
        "generation": job.generation,
        "restarts": job.restarts,
        "resizes": job.resizes,
        "max_workers": job.max_workers,
        "world_size": job.world_size,
        "dp": job.dp,
        "tp": job.tp,
        "step": job.step,
        "total_steps": job.total_steps,
        "loss": job.loss,
        "latest_checkpoint": job.latest_checkpoint.as_ref().map(|c| json!({"step": c.step, "url": c.url})),
        "checkpoint_failure": job.checkpoint_failure.as_ref().map(failure_json),
        "members": job.members.iter().map(|m| json!({
            "rank": m.rank, "worker_id": m.worker_id, "name": m.name, "advertise": m.advertise,
            "host": host_of(&m.advertise), "step": m.step,
            "last_report_unix_ms": m.last_report_unix_ms,
            "compute_s": m.compute_s, "comm_s": m.comm_s, "data_s": m.data_s,
            "straggler": m.straggler,
        })).collect::<Vec<_>>(),
        "message": job.message,
        "eval": job.eval,
        "ranks": job.ranks.iter().map(|r| json!({
            "rank": r.rank, "worker_id": r.worker_id, "node": r.node,
            "local_rank": r.local_rank, "dp_rank": r.dp_rank, "tp_rank": r.tp_rank,
        })).collect::<Vec<_>>(),
        "eval_examples": job.eval_examples.iter().map(|e| json!({
            "sample_id": e.sample_id, "prediction": e.prediction, "reference": e.reference,
        })).collect::<Vec<_>>(),
        "created_unix_ms": job.created_unix_ms,
        "updated_unix_ms": job.updated_unix_ms,
        "finished_unix_ms": job.finished_unix_ms,
    })
}

fn failure_json(f: &v1::CheckpointFailed) -> Value {
    let checkpoint = f.checkpoint.as_ref();
    json!({"step": checkpoint.map(|c| c.step), "url": checkpoint.map(|c| c.url.as_str()), "reason": f.reason})
}

/// One event of a job's stream, as `samtrain watch --json` prints it.
pub fn event_json(e: &v1::JobEvent) -> Value {
    use v1::job_event::Event;
    let body = match &e.event {
        Some(Event::Snapshot(j)) => json!({"snapshot": job_json(j)}),
        Some(Event::StateChanged(s)) => {
            json!({"state": state_name(s.state), "generation": s.generation, "message": s.message,
            "members": s.members.iter().map(|m| json!({"rank": m.rank, "worker_id": m.worker_id, "advertise": m.advertise})).collect::<Vec<_>>()})
        }
        Some(Event::Progress(p)) => {
            json!({"progress": {"step": p.step, "total_steps": p.total_steps, "loss": p.loss, "lr": p.lr,
            "grad_norm": p.grad_norm, "samples_per_s": p.samples_per_s, "tokens_per_s": p.tokens_per_s}})
        }
        Some(Event::CheckpointCommitted(c)) => {
            json!({"checkpoint": {"step": c.step, "url": c.url}})
        }
        Some(Event::CheckpointFailed(f)) => json!({"checkpoint_failed": failure_json(f)}),
        Some(Event::Straggler(g)) => json!({"straggler": {"rank": g.rank, "worker_id": g.worker_id,
            "compute_s": g.compute_s, "median_compute_s": g.median_compute_s, "steps": g.steps,
            "replace": g.replace}}),
        Some(Event::Restarted(r)) => json!({"restarted": {"ended_generation": r.ended_generation,
            "next_generation": r.next_generation, "restarts": r.restarts, "reason": r.reason,
            "resize": r.resize}}),
        Some(Event::Finished(f)) => {
            json!({"finished": {"state": state_name(f.state), "message": f.message, "step": f.step,
            "eval": f.eval}})
        }
        None => json!({}),
    };
    json!({"job_id": e.job_id, "unix_ms": e.unix_ms, "event": body})
}
