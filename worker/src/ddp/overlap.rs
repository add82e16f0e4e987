//! Reducing buckets while backward runs: gradient-ready hooks count each
//! bucket down, a communication thread reduces the buckets in plan order as
//! they complete.
//!
//! The hooks stay on the parameters and do nothing unless a reduction is
//! armed, so the gradient accumulation of earlier micro-batches, and the
//! buffers' allocation, pass them by. They are not removed when the plan is
//! dropped: a resident model's next generation makes a new plan whose hooks
//! replace them (a parameter holds one), and removing the old ones after
//! that would remove the new ones; until then an orphaned hook costs one
//! uncontended lock per gradient.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use samtrain_comm::{Collective, CollectiveError};
use samtrain_torchext::set_grad_ready_hook;
use tch::Tensor;

use super::{gradients, GradBuckets, Plan};

/// What [`GradBuckets::reduce_during`] gives back.
pub struct Overlapped<T> {
    /// The backward closure's result.
    pub value: T,
    /// How long the step waited for the reduction after backward ended.
    pub tail: Duration,
    pub reduced: Result<(), CollectiveError>,
}

/// What the hooks set on a parameter list report to.
#[derive(Debug)]
pub(super) struct Hooks {
    ready: Arc<Readiness>,
    /// Whether the plan follows the gradients' ready order yet.
    learned: bool,
}

#[derive(Debug, Default)]
struct Readiness {
    state: Mutex<ReadyState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct ReadyState {
    armed: bool,
    /// Backward has returned: every gradient is final.
    ended: bool,
    /// Backward panicked: the reduction stops.
    cancelled: bool,
    /// The bucket of each parameter.
    bucket_of: Vec<usize>,
    /// Gradients each bucket still waits for.
    pending: Vec<usize>,
    /// Parameters in the order their gradients became ready.
    order: Vec<usize>,
}

impl Readiness {
    fn lock(&self) -> MutexGuard<'_, ReadyState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A hook's report: parameter `i`'s gradient is accumulated.
    fn ready(&self, i: usize) {
        let mut s = self.lock();
        if !s.armed {
            return;
        }
        s.order.push(i);
        if let Some(&b) = s.bucket_of.get(i) {
            s.pending[b] = s.pending[b].saturating_sub(1);
            if s.pending[b] == 0 {
                self.changed.notify_all();
            }
        }
    }

    fn arm(&self, plan: &Plan, params: usize) {
        let mut s = self.lock();
        s.bucket_of = vec![0; params];
        for (b, bucket) in plan.buckets.iter().enumerate() {
            for &i in bucket {
                s.bucket_of[i] = b;
            }
        }
        s.pending = plan.buckets.iter().map(Vec::len).collect();
        s.order.clear();
        (s.armed, s.ended, s.cancelled) = (true, false, false);
    }

    /// Ends the armed reduction (`cancelled` when backward did not finish);
    /// returns the order the gradients came in.
    fn end(&self, cancelled: bool) -> Vec<usize> {
        let mut s = self.lock();
        (s.armed, s.ended, s.cancelled) = (false, true, cancelled);
        self.changed.notify_all();
        std::mem::take(&mut s.order)
    }

    /// Waits until bucket `b`'s gradients are final; false when cancelled.
    fn wait_for(&self, b: usize) -> bool {
        let mut s = self.lock();
        while !s.cancelled && !s.ended && s.pending[b] > 0 {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        !s.cancelled
    }
}

/// Ends the armed reduction when dropped, as cancelled unless disarmed
/// first: a panicking backward must not leave the communication thread
/// waiting for gradients that will never come.
struct EndGuard<'a> {
    ready: &'a Readiness,
    done: bool,
}

impl EndGuard<'_> {
    fn finish(mut self) -> Vec<usize> {
        self.done = true;
        self.ready.end(false)
    }
}

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.ready.end(true);
        }
    }
}

impl GradBuckets {
    /// Runs `backward` (one autograd call: the step's last, or only,
    /// micro-batch) and sums the gradients of `params` over `comm` while it
    /// runs. Gradients must have their buffers already (autograd then
    /// accumulates into them in place, where the communication thread reads
    /// and writes them). Falls back to reducing after backward where the
    /// hooks cannot be set.
    pub fn reduce_during<T>(
        &self,
        params: &[(String, Tensor)],
        comm: &dyn Collective,
        backward: impl FnOnce() -> T,
    ) -> Overlapped<T> {
        let after = |value: T| {
            let started = Instant::now();
            let reduced = self.all_reduce(params, comm);
            Overlapped {
                value,
                tail: started.elapsed(),
                reduced,
            }
        };
        if comm.world_size() <= 1 {
            return after(backward());
        }
        let (ready, learned) = match self.hooks(params) {
            Ok(hooks) => hooks,
            Err(e) => {
                tracing::warn!(error = %e, "no gradient-ready hooks; reducing after backward");
                return after(backward());
            }
        };
        let grads = match gradients(params) {
            Ok(grads) => grads,
            Err(e) => {
                return Overlapped {
                    value: backward(),
                    tail: Duration::ZERO,
                    reduced: Err(e),
                }
            }
        };
        let mut plan = self.plan();
        ready.arm(&plan, params.len());
        if !learned {
            // The first step only watches the order gradients come in.
            let guard = EndGuard {
                ready: &ready,
                done: false,
            };
            let value = backward();
            let order = guard.finish();
            let started = Instant::now();
            let reduced = self
                .learn_order(&mut plan, params, &order, comm)
                .and_then(|()| {
                    (0..plan.buckets.len()).try_for_each(|b| plan.reduce(b, &grads, comm))
                });
            return Overlapped {
                value,
                tail: started.elapsed(),
                reduced,
            };
        }
        let plan = &mut *plan;
        std::thread::scope(|scope| {
            let grads = &grads;
            let ready = &*ready;
            // Tensor handles are not Sync: the thread gets its own.
            let own: Vec<Tensor> = grads.iter().map(Tensor::shallow_clone).collect();
            let worker = scope.spawn(move || -> Result<(), CollectiveError> {
                for b in 0..plan.buckets.len() {
                    if !ready.wait_for(b) {
                        return Err(CollectiveError::Invalid {
                            op: "all_reduce",
                            message: "backward failed before the gradients were ready".into(),
                        });
                    }
                    plan.reduce(b, &own, comm)?;
                }
                Ok(())
            });
            let guard = EndGuard { ready, done: false };
            let value = backward();
            guard.finish();
            let started = Instant::now();
            let reduced = worker
                .join()
                .unwrap_or_else(|_| {
                    Err(CollectiveError::Invalid {
                        op: "all_reduce",
                        message: "the gradient reduction thread panicked".into(),
                    })
                })
                .and_then(|()| unchanged(params, grads));
            Overlapped {
                value,
                tail: started.elapsed(),
                reduced,
            }
        })
    }

    /// The readiness the hooks report to, setting them on first use, and
    /// whether the plan has learnt the ready order.
    fn hooks(
        &self,
        params: &[(String, Tensor)],
    ) -> Result<(Arc<Readiness>, bool), samtrain_torchext::TorchExtError> {
        let mut slot = self.overlap.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = slot.as_ref() {
            return Ok((h.ready.clone(), h.learned));
        }
        let ready = Arc::new(Readiness::default());
        for (i, (_, p)) in params.iter().enumerate() {
            let report = ready.clone();
            set_grad_ready_hook(p, move || report.ready(i))?;
        }
        *slot = Some(Hooks {
            ready: ready.clone(),
            learned: false,
        });
        Ok((ready, false))
    }

    /// Re-plans the buckets in the order gradients became ready: each
    /// parameter's position summed over the group (one all-reduce), so
    /// that every rank gets the same plan; parameters without a gradient go
    /// last.
    fn learn_order(
        &self,
        plan: &mut Plan,
        params: &[(String, Tensor)],
        order: &[usize],
        comm: &dyn Collective,
    ) -> Result<(), CollectiveError> {
        let n = params.len();
        let mut position = vec![n as i64; n];
        for (at, &i) in order.iter().enumerate() {
            if position[i] == n as i64 {
                position[i] = at as i64;
            }
        }
        let summed = Vec::<i64>::try_from(comm.all_reduce_sum(&Tensor::from_slice(&position))?)
            .map_err(|source| CollectiveError::Torch {
                op: "all_reduce",
                source,
            })?;
        let mut by_readiness: Vec<usize> = (0..n).collect();
        by_readiness.sort_by_key(|&i| (summed[i], i));
        *plan = Plan::new(params, by_readiness.into_iter(), self.bucket_bytes);
        if let Some(h) = self
            .overlap
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            h.learned = true;
        }
        tracing::debug!(
            buckets = plan.buckets.len(),
            "gradient buckets follow the backward order"
        );
        Ok(())
    }
}

/// Checks that autograd accumulated into the buffers the reduction wrote
/// (it replaces a buffer only in cases the trainer avoids, such as a
/// gradient of another layout), so a reduced gradient is never lost.
fn unchanged(params: &[(String, Tensor)], grads: &[Tensor]) -> Result<(), CollectiveError> {
    for ((name, p), g) in params.iter().zip(grads) {
        if p.grad().data_ptr() != g.data_ptr() {
            return Err(CollectiveError::Invalid {
                op: "all_reduce",
                message: format!("autograd replaced the gradient buffer of {name} during backward"),
            });
        }
    }
    Ok(())
}
