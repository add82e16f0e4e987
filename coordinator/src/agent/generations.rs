//! The generations the worker is in, as the leader tells them. The
//! subscription to the leader survives failovers: on each reconnect the
//! agent names the generation it believes it is in, so the new leader can
//! keep it (training goes on) or end it. Assignments go to the trainer;
//! each carries a flag the agent raises when the leader ends that
//! generation, so the trainer can stop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use samtrain_proto::spec::JobSpec;
use samtrain_proto::v1;
use tokio::sync::mpsc;

use super::{backoff, AgentError, Assignment, Shared};

/// What the agent hands [`super::Agent::next_assignment`].
pub(super) enum Incoming {
    Assignment(Box<Assignment>),
    /// An assignment this worker cannot take (its spec does not parse
    /// here): reported as a permanent failure, so the coordinator is not
    /// left waiting for it.
    Unusable {
        current: Current,
        message: String,
    },
    Idle,
}

/// The generation the worker is in, as the coordinator should know it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Current {
    pub(super) job_id: String,
    pub(super) generation: u64,
    pub(super) rank: u32,
}

impl Current {
    /// The span of one report about the generation: its log lines name
    /// the job, generation and rank, and a trace shows it in the
    /// generation's.
    pub(super) fn report_span(&self) -> tracing::Span {
        tracing::info_span!("report", job = %self.job_id, generation = self.generation, rank = self.rank)
    }
}

/// The generation the worker is in and the end flags of those it was
/// assigned.
#[derive(Default)]
pub(super) struct Generations {
    current: Mutex<Option<Current>>,
    ended: Mutex<HashMap<(String, u64), Arc<AtomicBool>>>,
}

impl Generations {
    pub(super) fn current(&self) -> Option<Current> {
        self.current.lock().expect("agent lock").clone()
    }

    /// The worker joins a generation; the flag its end will raise.
    fn join(&self, current: Current) -> Arc<AtomicBool> {
        let ended = Arc::new(AtomicBool::new(false));
        self.ended
            .lock()
            .expect("agent lock")
            .insert((current.job_id.clone(), current.generation), ended.clone());
        *self.current.lock().expect("agent lock") = Some(current);
        ended
    }

    /// The leader ended a generation: its trainer is told to stop. The
    /// worker stays in it until its outcome is acknowledged, so that a new
    /// leader hears it is still finishing.
    fn end(&self, job_id: &str, generation: u64) {
        if let Some(flag) = self
            .ended
            .lock()
            .expect("agent lock")
            .remove(&(job_id.to_owned(), generation))
        {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// The worker's lease was lost: the coordinator counts it dead and
    /// ends its generation, so the trainer stops now rather than train on
    /// alone.
    pub(super) fn end_current(&self, reason: &str) {
        if let Some(c) = self.current() {
            tracing::warn!(job = %c.job_id, generation = c.generation, %reason, "ending the generation");
            self.end(&c.job_id, c.generation);
        }
    }

    /// The worker is done with a generation (ended, or its outcome
    /// acknowledged), unless it already moved on to another.
    pub(super) fn leave(&self, job_id: &str, generation: u64) {
        let mut current = self.current.lock().expect("agent lock");
        if current
            .as_ref()
            .is_some_and(|c| c.job_id == job_id && c.generation == generation)
        {
            *current = None;
        }
    }
}

/// Holds the subscription: connects to the leader, names the generation
/// the worker is in, and forwards what arrives. Reconnects on any break.
pub(super) async fn subscription(shared: Arc<Shared>, incoming: mpsc::Sender<Incoming>) {
    let mut attempt = 0;
    loop {
        let request = v1::SubscribeRequest {
            worker_id: shared.worker_id.clone(),
            current: shared.generations.current().map(|c| v1::CurrentGeneration {
                job_id: c.job_id,
                generation: c.generation,
            }),
        };
        let opened = shared
            .call(|mut c| {
                let request = request.clone();
                async move { c.subscribe(request).await }
            })
            .await;
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) => {
                // NOT_FOUND: the lease lapsed; the keep-alive registers again.
                tracing::debug!(error = %e, "subscription not open yet; retrying");
                tokio::time::sleep(backoff(attempt)).await;
                attempt = (attempt + 1).min(3);
                continue;
            }
        };
        attempt = 0;
        tracing::info!(worker = %shared.worker_id, "subscribed to the leader");
        loop {
            match stream.message().await {
                Ok(Some(event)) => {
                    if !handle(&shared, &incoming, event).await {
                        return;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::info!(
                        reason = status.message(),
                        "subscription broke; looking for the leader"
                    );
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Handles one event; false once the agent is gone.
async fn handle(
    shared: &Shared,
    incoming: &mpsc::Sender<Incoming>,
    event: v1::WorkerEvent,
) -> bool {
    match event.event {
        Some(v1::worker_event::Event::Assignment(a)) => {
            incoming.send(assignment(shared, a)).await.is_ok()
        }
        Some(v1::worker_event::Event::GenerationEnded(g)) => {
            tracing::info!(job = %g.job_id, generation = g.generation, reason = %g.reason, "generation ended");
            shared.generations.end(&g.job_id, g.generation);
            true
        }
        Some(v1::worker_event::Event::Idle(_)) => incoming.send(Incoming::Idle).await.is_ok(),
        None => true,
    }
}

/// Joins the generation an assignment names; [`Incoming::Unusable`]
/// when its spec is unreadable here, which no retry would mend.
fn assignment(shared: &Shared, a: v1::Assignment) -> Incoming {
    let current = Current {
        job_id: a.job_id.clone(),
        generation: a.generation,
        rank: a.rank,
    };
    let ended = shared.generations.join(current.clone());
    let spec = match JobSpec::from_toml(&a.spec_toml, None) {
        Ok(s) => s,
        Err(e) => {
            let e = AgentError::InvalidAssignment {
                job_id: a.job_id.clone(),
                message: e.to_string(),
            };
            tracing::error!(error = %e, "assignment refused");
            return Incoming::Unusable {
                current,
                message: e.to_string(),
            };
        }
    };
    tracing::info!(job = %a.job_id, generation = a.generation, rank = a.rank, world = a.world_size, "assigned");
    Incoming::Assignment(Box::new(Assignment {
        job_id: a.job_id,
        generation: a.generation,
        rank: a.rank,
        world_size: a.world_size,
        tp: a.tp,
        peers: a.peers,
        spec,
        resume_checkpoint: a.resume_checkpoint.map(|c| c.url),
        ring_secret: a.ring_secret,
        ended,
    }))
}
