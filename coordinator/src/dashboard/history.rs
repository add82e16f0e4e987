//! What the dashboard remembers of each job beyond its record: the loss
//! rank 0 reported at each step (the curve) and the job's newest events.
//! Fed from the leader's job event stream and held in its memory, bounded
//! in every direction (points per job, events per job, jobs), so a long
//! run or many jobs cost a fixed amount. A coordinator that takes over the
//! leadership starts its curves there; TensorBoard keeps a run's whole
//! curve.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use samtrain_proto::v1;
use serde_json::Value;

use crate::json::event_json;

/// Points kept per job: past it, every other point goes and the curve
/// keeps one point every 2, 4, 8... steps.
const MAX_POINTS: usize = 1024;
/// Events kept per job, newest last.
const MAX_EVENTS: usize = 100;
/// Jobs followed; past it, the one heard from longest ago is forgotten.
const MAX_JOBS: usize = 256;

/// The loss curves and recent events of the jobs, by job id.
#[derive(Default)]
pub(crate) struct JobHistory {
    tracks: Mutex<Tracks>,
}

#[derive(Default)]
struct Tracks {
    jobs: HashMap<String, Track>,
    /// Counts records, to find the job heard from longest ago.
    clock: u64,
}

#[derive(Default)]
struct Track {
    /// `(step, loss)`, steps increasing.
    points: Vec<(u64, f64)>,
    /// Only steps that are multiples of this are kept (besides the newest).
    stride: u64,
    events: VecDeque<Value>,
    heard: u64,
}

impl Track {
    fn add_point(&mut self, step: u64, loss: f64) {
        self.stride = self.stride.max(1);
        // A generation that resumed from an earlier checkpoint trains those
        // steps again: the curve follows the run that went on.
        while self.points.last().is_some_and(|&(s, _)| s >= step) {
            self.points.pop();
        }
        // The newest point is kept off the stride until the next arrives.
        if self
            .points
            .last()
            .is_some_and(|&(s, _)| s % self.stride != 0)
        {
            self.points.pop();
        }
        self.points.push((step, loss));
        if self.points.len() > MAX_POINTS {
            self.stride *= 2;
            let stride = self.stride;
            let newest = step;
            self.points.retain(|&(s, _)| s % stride == 0 || s == newest);
        }
    }

    fn add_event(&mut self, event: Value) {
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }
}

impl JobHistory {
    /// Takes one event of the stream: progress adds to the loss curve,
    /// anything else to the events.
    pub(crate) fn record(&self, e: &v1::JobEvent) {
        let mut tracks = self.tracks.lock().expect("history lock");
        tracks.clock += 1;
        let heard = tracks.clock;
        let jobs = &mut tracks.jobs;
        if !jobs.contains_key(&e.job_id) && jobs.len() >= MAX_JOBS {
            if let Some(oldest) = jobs
                .iter()
                .min_by_key(|(_, t)| t.heard)
                .map(|(id, _)| id.clone())
            {
                jobs.remove(&oldest);
            }
        }
        let track = jobs.entry(e.job_id.clone()).or_default();
        track.heard = heard;
        match &e.event {
            Some(v1::job_event::Event::Progress(p)) => {
                if p.loss.is_finite() {
                    track.add_point(p.step, p.loss);
                }
            }
            Some(v1::job_event::Event::Snapshot(_)) | None => {}
            Some(_) => track.add_event(event_json(e)),
        }
    }

    /// The job's loss curve, `(step, loss)` by step.
    pub(crate) fn loss(&self, job_id: &str) -> Vec<(u64, f64)> {
        let tracks = self.tracks.lock().expect("history lock");
        tracks
            .jobs
            .get(job_id)
            .map(|t| t.points.clone())
            .unwrap_or_default()
    }

    /// The job's newest events, oldest first.
    pub(crate) fn events(&self, job_id: &str) -> Vec<Value> {
        let tracks = self.tracks.lock().expect("history lock");
        tracks
            .jobs
            .get(job_id)
            .map(|t| t.events.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(job: &str, step: u64, loss: f64) -> v1::JobEvent {
        v1::JobEvent {
            job_id: job.to_owned(),
            unix_ms: 0,
            event: Some(v1::job_event::Event::Progress(v1::Progress {
                step,
                loss,
                ..v1::Progress::default()
            })),
        }
    }

    #[test]
    fn a_long_curve_thins_to_a_bounded_number_of_points_and_keeps_the_newest() {
        let h = JobHistory::default();
        for step in 1..=10_000 {
            h.record(&progress("j", step, 1.0 / step as f64));
        }
        let points = h.loss("j");
        assert!(points.len() <= MAX_POINTS, "{}", points.len());
        assert!(points.len() > MAX_POINTS / 4, "{}", points.len());
        assert_eq!(points.last().unwrap().0, 10_000);
        assert!(points.windows(2).all(|w| w[0].0 < w[1].0));
        // Evenly spread: one stride between kept points.
        let stride = points[1].0 - points[0].0;
        assert!(points[..points.len() - 1]
            .windows(2)
            .all(|w| w[1].0 - w[0].0 == stride));
    }

    #[test]
    fn a_resumed_generation_replaces_the_steps_it_trains_again() {
        let h = JobHistory::default();
        for step in 1..=14 {
            h.record(&progress("j", step, 2.0));
        }
        for step in 11..=12 {
            h.record(&progress("j", step, 1.0));
        }
        let points = h.loss("j");
        assert_eq!(points.last(), Some(&(12, 1.0)));
        assert_eq!(points.len(), 12);
        assert_eq!(points[9], (10, 2.0));
    }

    #[test]
    fn events_and_jobs_are_bounded() {
        let h = JobHistory::default();
        let committed = |job: &str, step| v1::JobEvent {
            job_id: job.to_owned(),
            unix_ms: 0,
            event: Some(v1::job_event::Event::CheckpointCommitted(v1::Checkpoint {
                step,
                url: "file:///c".into(),
            })),
        };
        for step in 0..(MAX_EVENTS as u64 + 5) {
            h.record(&committed("j", step));
        }
        let events = h.events("j");
        assert_eq!(events.len(), MAX_EVENTS);
        assert_eq!(events[0]["event"]["checkpoint"]["step"], 5);
        for i in 0..MAX_JOBS {
            h.record(&committed(&format!("other-{i}"), 1));
        }
        assert!(
            h.events("j").is_empty(),
            "the job heard from longest ago stays"
        );
        assert_eq!(h.events(&format!("other-{}", MAX_JOBS - 1)).len(), 1);
    }
}
