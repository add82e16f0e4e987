//! Rendezvous: which waiting workers form a job's next generation, and in
//! what rank order. Pure functions of the waiting pool, so the policy is
//! testable on its own: at least `min_workers` must be placeable; then the
//! job gives stragglers `last_call_s` (or forms at once at `max_workers`)
//! and takes the largest multiple of `tp` it can place.
//!
//! Placement follows the machines: each tensor-parallel group (`tp`
//! consecutive ranks) sits inside one node, where its two all-reduces per
//! layer stay on NVLink or shared memory, and data parallelism crosses
//! nodes. Ranks are numbered node-major (a node's ranks are consecutive),
//! so rings follow the topology too. A node offers as many ranks as it has
//! workers waiting; only whole groups of `tp` of them are used, unless the
//! job allows groups across nodes (`parallel.tp_across_nodes`).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::jobs::Policy;

/// A waiting worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub worker_id: String,
    pub name: String,
    pub advertise: String,
    /// The machine it runs on (workers of one node share fast links).
    pub node: String,
    /// Orders workers that joined earlier first.
    pub registered_unix_ms: i64,
}

/// What to do for one job now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not enough workers can be placed; why, when workers do wait but
    /// the placement is what stops them.
    Wait(Option<String>),
    /// Enough wait; the last call runs until this instant.
    LastCall(Instant),
    /// Form a generation with these workers, in rank order.
    Form(Vec<Candidate>),
}

/// The workers of `offered` the job may use, node by node in rank order
/// (nodes by their earliest worker, then name; workers by registration),
/// each node's count cut to whole tensor-parallel groups.
fn placeable(policy: &Policy, offered: &[Candidate]) -> Vec<Vec<Candidate>> {
    let mut nodes: BTreeMap<&str, Vec<Candidate>> = BTreeMap::new();
    for c in offered {
        nodes.entry(c.node.as_str()).or_default().push(c.clone());
    }
    let mut nodes: Vec<Vec<Candidate>> = nodes.into_values().collect();
    for workers in &mut nodes {
        rank_order(workers);
    }
    nodes.sort_by(|a, b| {
        let first = |n: &[Candidate]| (n[0].registered_unix_ms, n[0].node.clone());
        first(a).cmp(&first(b))
    });
    if !policy.tp_across_nodes {
        let tp = policy.tp.max(1) as usize;
        for workers in &mut nodes {
            workers.truncate(workers.len() - workers.len() % tp);
        }
        nodes.retain(|n| !n.is_empty());
    }
    nodes
}

/// The generation size for these placeable nodes: the largest multiple of
/// `tp` at most `min(placeable workers, max_workers)`, or `None` when that
/// is below `min_workers`.
fn size_of(policy: &Policy, nodes: &[Vec<Candidate>]) -> Option<u32> {
    let placeable: usize = nodes.iter().map(Vec::len).sum();
    let cap = (placeable as u32).min(policy.max_workers);
    let n = cap - cap % policy.tp.max(1);
    (n >= policy.min_workers.max(1)).then_some(n)
}

/// The generation size `offered` allows (see [`size_of`]).
pub fn size(policy: &Policy, offered: &[Candidate]) -> Option<u32> {
    size_of(policy, &placeable(policy, offered))
}

/// Decides for one job given the workers it may take (`offered`), when
/// its last call started (if it did) and the current time.
pub fn decide(
    policy: &Policy,
    offered: &[Candidate],
    last_call_since: Option<Instant>,
    now: Instant,
) -> Decision {
    let nodes = placeable(policy, offered);
    let Some(n) = size_of(policy, &nodes) else {
        return Decision::Wait(unplaceable(policy, offered, &nodes));
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
    Decision::Form(take(nodes, n))
}

/// The workers a generation formed from `offered` now would take, in rank
/// order (none when too few can be placed).
pub fn placed(policy: &Policy, offered: &[Candidate]) -> Vec<Candidate> {
    let nodes = placeable(policy, offered);
    match size_of(policy, &nodes) {
        Some(n) => take(nodes, n),
        None => Vec::new(),
    }
}

/// Every worker of `offered` that sits in a whole tensor-parallel group of
/// its node (all of them when groups may cross nodes), node-major.
pub fn usable(policy: &Policy, offered: &[Candidate]) -> Vec<Candidate> {
    placeable(policy, offered).into_iter().flatten().collect()
}

/// The first `n` workers node-major: whole nodes first, the last one cut
/// (`n` and every node's count are multiples of `tp`, unless groups may
/// cross nodes).
fn take(nodes: Vec<Vec<Candidate>>, n: u32) -> Vec<Candidate> {
    nodes.into_iter().flatten().take(n as usize).collect()
}

/// How the reason of [`unplaceable`] begins, so that a job's message can
/// be told to be one (and replaced once it no longer holds).
const UNPLACEABLE: &str = "the waiting workers cannot be placed: ";

/// Whether a job's message is the reason of [`unplaceable`].
pub fn is_unplaceable_reason(message: &str) -> bool {
    message.starts_with(UNPLACEABLE)
}

/// Why enough workers wait but cannot be placed, if that is the case.
fn unplaceable(policy: &Policy, offered: &[Candidate], nodes: &[Vec<Candidate>]) -> Option<String> {
    let waiting = offered.len() as u32;
    let placeable: usize = nodes.iter().map(Vec::len).sum();
    if waiting < policy.min_workers.max(1) || placeable as u32 >= waiting {
        return None;
    }
    let mut per_node: BTreeMap<&str, u32> = BTreeMap::new();
    for c in offered {
        *per_node.entry(c.node.as_str()).or_default() += 1;
    }
    let largest = per_node.values().copied().max().unwrap_or(0);
    Some(format!(
        "{UNPLACEABLE}{waiting} workers wait on {} nodes (at most {largest} on one), but each tensor-parallel group of {} ranks must sit inside one node: {placeable} can be placed, fewer than min_workers ({}); run more workers per node, or allow groups across nodes with parallel.tp_across_nodes = true",
        per_node.len(),
        policy.tp,
        policy.min_workers
    ))
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
            tp_across_nodes: false,
        }
    }

    fn workers(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                worker_id: format!("w{i}"),
                name: format!("w{i}"),
                advertise: format!("127.0.0.1:{}", 6000 + i),
                node: "n".into(),
                registered_unix_ms: 100 - i as i64,
            })
            .collect()
    }

    /// Workers on the nodes named, registering in this order.
    fn on_nodes(nodes: &[&str]) -> Vec<Candidate> {
        nodes
            .iter()
            .enumerate()
            .map(|(i, node)| Candidate {
                worker_id: format!("w{i}"),
                name: format!("w{i}"),
                advertise: format!("10.0.0.{i}:6000"),
                node: (*node).to_owned(),
                registered_unix_ms: i as i64,
            })
            .collect()
    }

    fn formed(d: Decision) -> Vec<String> {
        match d {
            Decision::Form(chosen) => chosen.into_iter().map(|c| c.worker_id).collect(),
            other => panic!("expected a generation, got {other:?}"),
        }
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
        assert_eq!(size(&policy(2, 2, 6), &workers(5)), Some(4));
        assert_eq!(size(&policy(2, 2, 6), &workers(9)), Some(6));
        assert_eq!(size(&policy(2, 4, 6), &workers(3)), None);
        assert_eq!(size(&policy(1, 1, 1), &workers(0)), None);
        assert_eq!(size(&policy(2, 3, 4), &workers(3)), None);
    }

    #[test]
    fn last_call_then_form_in_stable_rank_order() {
        let p = policy(1, 2, 4);
        let t0 = Instant::now();
        assert_eq!(decide(&p, &workers(1), None, t0), Decision::Wait(None));
        assert_eq!(decide(&p, &workers(2), None, t0), Decision::LastCall(t0));
        let later = t0 + Duration::from_millis(1100);
        assert_eq!(
            formed(decide(&p, &workers(3), Some(t0), later)),
            ["w2", "w1", "w0"]
        );
        // At max_workers the generation forms without waiting.
        assert_eq!(formed(decide(&p, &workers(5), None, t0)).len(), 4);
    }

    #[test]
    fn tensor_parallel_groups_sit_inside_nodes_and_ranks_go_node_major() {
        let p = policy(2, 4, 4);
        let t0 = Instant::now();
        // Registered a, b, a, b: ranks 0-1 on a, 2-3 on b.
        let chosen = formed(decide(&p, &on_nodes(&["a", "b", "a", "b"]), None, t0));
        assert_eq!(chosen, ["w0", "w2", "w1", "w3"]);
        // Three on a, one on b, one on c: one group of a and none of b or
        // c; with min 4 the job waits and says why.
        let Decision::Wait(Some(why)) = decide(&p, &on_nodes(&["a", "a", "a", "b", "c"]), None, t0)
        else {
            panic!("expected a wait with a reason");
        };
        assert!(
            why.contains("5 workers wait on 3 nodes (at most 3 on one)"),
            "{why}"
        );
        assert!(why.contains("parallel.tp_across_nodes = true"), "{why}");
        assert!(is_unplaceable_reason(&why), "{why}");
        // The same workers with groups across nodes allowed: registration
        // order within node-major numbering.
        let across = Policy {
            tp_across_nodes: true,
            ..p
        };
        let chosen = formed(decide(
            &across,
            &on_nodes(&["a", "a", "a", "b", "c"]),
            None,
            t0,
        ));
        assert_eq!(chosen, ["w0", "w1", "w2", "w3"]);
    }

    #[test]
    fn a_node_gives_only_whole_groups_and_the_rest_go_elsewhere() {
        // tp 2, up to 6 ranks: a has 3 (gives 2), b has 2, c has 2 (c
        // registered before b's first worker).
        let p = policy(2, 2, 6);
        let t0 = Instant::now();
        let offered = on_nodes(&["a", "a", "c", "a", "b", "c", "b"]);
        assert_eq!(size(&p, &offered), Some(6));
        let chosen = formed(decide(&p, &offered, None, t0));
        assert_eq!(chosen, ["w0", "w1", "w2", "w5", "w4", "w6"]);
    }
}
