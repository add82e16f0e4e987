//! The chunk plan of one operation: how the buffer is cut into chunks, which
//! chunks a rank sends first, and what each receive step does (reduce or
//! copy, forward or keep), for the ring's all-reduce (reduce-scatter then
//! all-gather), all-gather and broadcast.

use std::ops::Range;

/// One receive step of a plan.
#[derive(Debug)]
pub(super) struct Step {
    pub(super) chunk: usize,
    /// Add the received piece into the buffer (else copy it there).
    pub(super) reduce: bool,
    /// Queue the piece for the next rank once it is in the buffer.
    pub(super) forward: bool,
    /// Data bytes this rank must have sent before the step may write into
    /// its chunk: the last queued send of that chunk must have left.
    pub(super) wait_sent: usize,
}

/// What one operation sends and receives, over a buffer cut into chunks.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) chunks: Vec<Range<usize>>,
    /// Chunks sent before anything is received.
    pub(super) initial: Vec<usize>,
    pub(super) steps: Vec<Step>,
}

impl Plan {
    /// Fills in `wait_sent` by replaying the send order.
    pub(super) fn new(
        chunks: Vec<Range<usize>>,
        initial: Vec<usize>,
        mut steps: Vec<Step>,
    ) -> Plan {
        let mut pos = 0;
        let mut sends: Vec<(usize, usize)> = Vec::new();
        for &c in &initial {
            pos += chunks[c].len();
            sends.push((c, pos));
        }
        for step in &mut steps {
            step.wait_sent = sends
                .iter()
                .rev()
                .find(|(c, _)| *c == step.chunk)
                .map_or(0, |(_, end)| *end);
            if step.forward {
                pos += chunks[step.chunk].len();
                sends.push((step.chunk, pos));
            }
        }
        Plan {
            chunks,
            initial,
            steps,
        }
    }

    /// `n` chunks of whole elements, sizes differing by at most one element.
    pub(super) fn split(numel: usize, n: usize, elem: usize) -> Vec<Range<usize>> {
        let (base, extra) = (numel / n, numel % n);
        let mut start = 0;
        (0..n)
            .map(|i| {
                let len = (base + usize::from(i < extra)) * elem;
                let r = start..start + len;
                start += len;
                r
            })
            .collect()
    }

    pub(super) fn all_reduce(n: usize, r: usize, numel: usize, elem: usize) -> Plan {
        let chunk = |back: usize| (r + n - back % n) % n;
        let mut steps = Vec::with_capacity(2 * (n - 1));
        // Reduce-scatter: at step s receive chunk r-s-1 and add to it; after
        // n-1 steps this rank holds the full sum of chunk r+1.
        for s in 0..n - 1 {
            steps.push(Step {
                chunk: chunk(s + 1),
                reduce: true,
                forward: true,
                wait_sent: 0,
            });
        }
        // All-gather: at step t receive the final chunk r-t.
        for t in 0..n - 1 {
            steps.push(Step {
                chunk: chunk(t),
                reduce: false,
                forward: t + 2 < n,
                wait_sent: 0,
            });
        }
        Plan::new(Plan::split(numel, n, elem), vec![r], steps)
    }

    /// Chunk `i` is rank `i`'s contribution, `bytes` long.
    pub(super) fn all_gather(n: usize, r: usize, bytes: usize) -> Plan {
        let chunks = (0..n).map(|i| i * bytes..(i + 1) * bytes).collect();
        let steps = (0..n - 1)
            .map(|t| Step {
                chunk: (r + n - t - 1) % n,
                reduce: false,
                forward: t + 2 < n,
                wait_sent: 0,
            })
            .collect();
        Plan::new(chunks, vec![r], steps)
    }

    /// A pipelined chain from the root along the ring.
    pub(super) fn broadcast(n: usize, r: usize, root: usize, bytes: usize) -> Plan {
        // One chunk: the whole buffer (a one-element Vec of a Range is
        // what it looks like, not a mistaken `vec![a..b]` for a list).
        #[allow(clippy::single_range_in_vec_init)]
        let chunks = vec![0..bytes];
        if r == root {
            return Plan::new(chunks, vec![0], Vec::new());
        }
        let step = Step {
            chunk: 0,
            reduce: false,
            forward: (r + 1) % n != root,
            wait_sent: 0,
        };
        Plan::new(chunks, Vec::new(), vec![step])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_plan_ends_with_every_chunk() {
        for n in 2..6 {
            for r in 0..n {
                let plan = Plan::all_reduce(n, r, 10, 4);
                let mut have: Vec<usize> = plan.steps[n - 1..].iter().map(|s| s.chunk).collect();
                // The owned chunk (r+1) arrives by reduction, the rest by copy.
                have.push(plan.steps[n - 2].chunk);
                have.sort();
                assert_eq!(have, (0..n).collect::<Vec<_>>());
                assert_eq!(plan.steps[n - 2].chunk, (r + 1) % n);
            }
        }
    }

    #[test]
    fn all_gather_steps_wait_for_nothing_and_reduce_waits_are_reached() {
        let plan = Plan::all_gather(4, 1, 8);
        assert!(plan.steps.iter().all(|s| s.wait_sent == 0));
        // In an all-reduce each all-gather step overwrites a chunk this rank
        // sent during the reduce-scatter, never one still to be forwarded.
        let plan = Plan::all_reduce(3, 0, 9, 4);
        let waits: Vec<usize> = plan.steps.iter().map(|s| s.wait_sent).collect();
        assert_eq!(waits, vec![0, 0, 12, 24]);
    }
}
