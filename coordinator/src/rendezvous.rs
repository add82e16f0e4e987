//! Rendezvous: which waiting workers form a job's next generation, and in
//! what rank order. Pure functions of the waiting pool, so the policy is
//! testable on its own: at least `min_workers` must wait; then the job
//! gives stragglers `last_call_s` (or forms at once at `max_workers`) and
//! takes the largest multiple of `tp` it can.

use std::time::Duration;

use tokio::time::Instant;

use crate::jobs::Policy;

/// A waiting worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub worker_id: String,
    pub name: String,
    pub advertise: String,
    /// Orders workers that joined earlier first.
    pub registered_unix_ms: i64,
}

/// What to do for one job now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not enough workers wait.
    Wait,
    /// Enough wait; the last call runs until this instant.
    LastCall(Instant),
    /// Form a generation with these workers, in rank order.
    Form(Vec<Candidate>),
}

/// The generation size for `waiting` workers: the largest multiple of `tp`
/// at most `min(waiting, max_workers)`, or `None` when that is below
/// `min_workers`.
pub fn size(policy: &Policy, waiting: usize) -> Option<u32> {
    let cap = (waiting as u32).min(policy.max_workers);
    let n = cap - cap % policy.tp.max(1);
    (n >= policy.min_workers.max(1)).then_some(n)
}

/// Decides for one job given the workers it may take (`offered`, in pool
/// order), when its last call started (if it did) and the current time.
pub fn decide(
    policy: &Policy,
    offered: &[Candidate],
    last_call_since: Option<Instant>,
    now: Instant,
) -> Decision {
    let Some(n) = size(policy, offered.len()) else {
        return Decision::Wait;
    };
    let since = last_call_since.unwrap_or(now);
    // The spec bounds last_call_s; a stored record from before the bound
    // (or NaN) must still not panic the scheduling loop.
    let wait = Duration::try_from_secs_f64(policy.last_call_s.max(0.0)).unwrap_or(Duration::MAX);
    let deadline = since
        .checked_add(wait)
        .unwrap_or(since + Duration::from_secs(86_400));
    if n < policy.max_workers && now < deadline {
        return Decision::LastCall(since);
    }
    let mut chosen: Vec<Candidate> = offered[..n as usize].to_vec();
    rank_order(&mut chosen);
    Decision::Form(chosen)
}

/// Ranks in a stable order: by registration time, then worker id, so the
/// same workers get the same ranks in every generation.
pub fn rank_order(workers: &mut [Candidate]) {
    workers.sort_by(|a, b| {
        (a.registered_unix_ms, &a.worker_id).cmp(&(b.registered_unix_ms, &b.worker_id))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(tp: u32, min: u32, max: u32) -> Policy {
        Policy {
            tp,
            min_workers: min,
            max_workers: max,
            last_call_s: 1.0,
            max_restarts: 3,
            straggler_factor: 1.5,
            straggler_steps: 50,
            straggler_policy: Default::default(),
        }
    }

    fn workers(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                worker_id: format!("w{i}"),
                name: format!("w{i}"),
                advertise: format!("127.0.0.1:{}", 6000 + i),
                registered_unix_ms: 100 - i as i64,
            })
            .collect()
    }

    #[test]
    fn an_absurd_last_call_waits_without_panicking() {
        let t0 = Instant::now();
        for last_call_s in [1e300, f64::INFINITY, f64::NAN, -5.0] {
            let p = Policy {
                last_call_s,
                ..policy(1, 2, 4)
            };
            let d = decide(&p, &workers(2), Some(t0), t0);
            if last_call_s > 0.0 {
                assert_eq!(d, Decision::LastCall(t0), "{last_call_s}");
            } else {
                assert!(matches!(d, Decision::Form(_)), "{last_call_s}");
            }
        }
    }

    #[test]
    fn sizes_are_multiples_of_tp_within_bounds() {
        assert_eq!(size(&policy(2, 2, 6), 5), Some(4));
        assert_eq!(size(&policy(2, 2, 6), 9), Some(6));
        assert_eq!(size(&policy(2, 4, 6), 3), None);
        assert_eq!(size(&policy(1, 1, 1), 0), None);
        assert_eq!(size(&policy(2, 3, 4), 3), None);
    }

    #[test]
    fn last_call_then_form_in_stable_rank_order() {
        let p = policy(1, 2, 4);
        let t0 = Instant::now();
        assert_eq!(decide(&p, &workers(1), None, t0), Decision::Wait);
        assert_eq!(decide(&p, &workers(2), None, t0), Decision::LastCall(t0));
        let later = t0 + Duration::from_millis(1100);
        let Decision::Form(chosen) = decide(&p, &workers(3), Some(t0), later) else {
            panic!("expected a generation after the last call");
        };
        let ids: Vec<&str> = chosen.iter().map(|c| c.worker_id.as_str()).collect();
        assert_eq!(ids, ["w2", "w1", "w0"]);
        // At max_workers the generation forms without waiting.
        let Decision::Form(chosen) = decide(&p, &workers(5), None, t0) else {
            panic!("expected a generation at max_workers");
        };
        assert_eq!(chosen.len(), 4);
    }
}
