//! Data-parallel gradient averaging: the trainable gradients, flattened into
//! buckets of about 25 MB in a fixed order (the same on every rank), each
//! all-reduced in place over the data-parallel group and copied back. Each
//! bucket's flat buffer is allocated on the first step and reused by every
//! later one, so a step neither allocates nor faults in fresh pages for its
//! buckets.
//!
//! As torch's DDP does, the reduction overlaps backward ([`overlap`]): a
//! gradient-ready hook on every parameter counts down its bucket, and a
//! communication thread reduces each bucket, in plan order, as soon as its
//! last gradient is accumulated, while autograd computes the rest. The
//! first overlapped step learns the order in which gradients become ready
//! and re-plans the buckets in it (the ranks agree on one order through one
//! all-reduce), so that the first bucket is the first one ready. Where
//! backward is not one autograd call (tensor parallelism and activation
//! checkpointing run it layer by layer through a tape, so a hook cannot
//! tell a gradient's last contribution), the buckets are reduced after it.
//!
//! The buckets are *summed*, not divided by the group size: the trainer
//! scales each rank's loss by its share of the global batch's answer tokens
//! (see `trainer`), so the sum is already the gradient of the global batch's
//! mean loss, also when ranks hold different numbers of tokens, where
//! dividing by the group size would weigh every rank alike.

mod overlap;

use std::sync::Mutex;

use samtrain_comm::Collective;
use samtrain_comm::CollectiveError;
use tch::{Kind, Tensor};

pub use overlap::Overlapped;

/// torch DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// The bucket plan over a list of parameters, its flat buffers, and the
/// hooks that let it reduce during backward.
#[derive(Debug)]
pub struct GradBuckets {
    bucket_bytes: usize,
    plan: Mutex<Plan>,
    overlap: Mutex<Option<overlap::Hooks>>,
}

#[derive(Debug)]
struct Plan {
    /// Indices into the parameter list, in order; each bucket holds one dtype.
    buckets: Vec<Vec<usize>>,
    /// One flat buffer per bucket, made on first use (its size, dtype and
    /// device are the gradients'), then reused.
    flats: Vec<Option<Tensor>>,
}

impl Plan {
    /// Walks `order` (parameter indices): consecutive parameters fill a
    /// bucket until it holds at least `bucket_bytes`; a change of dtype
    /// starts a new one.
    fn new(
        params: &[(String, Tensor)],
        order: impl Iterator<Item = usize>,
        bucket_bytes: usize,
    ) -> Self {
        let mut buckets: Vec<Vec<usize>> = Vec::new();
        let mut bytes = 0usize;
        let mut kind: Option<Kind> = None;
        for i in order {
            let p = &params[i].1;
            let size = p.numel() * p.kind().elt_size_in_bytes();
            let fresh = buckets.is_empty() || bytes >= bucket_bytes || kind != Some(p.kind());
            if fresh {
                buckets.push(Vec::new());
                bytes = 0;
            }
            buckets.last_mut().expect("a bucket was pushed").push(i);
            bytes += size;
            kind = Some(p.kind());
        }
        let flats = (0..buckets.len()).map(|_| None).collect();
        Plan { buckets, flats }
    }

    /// Sums bucket `b`'s gradients (`grads`, indexed as the parameters) over
    /// `comm` through its flat buffer, in place.
    fn reduce(
        &mut self,
        b: usize,
        grads: &[Tensor],
        comm: &dyn Collective,
    ) -> Result<(), CollectiveError> {
        let torch = |source| CollectiveError::Torch {
            op: "all_reduce",
            source,
        };
        let grads: Vec<&Tensor> = self.buckets[b].iter().map(|&i| &grads[i]).collect();
        let numel: usize = grads.iter().map(|g| g.numel()).sum();
        let (kind, device) = (grads[0].kind(), grads[0].device());
        let fits = |t: &Tensor| t.numel() == numel && t.kind() == kind && t.device() == device;
        let slot = &mut self.flats[b];
        // The buffers are scratch, fully rewritten by every call: a panic
        // in an earlier one leaves nothing to distrust.
        let flat = match slot {
            Some(t) if fits(t) => t,
            _ => slot.insert(Tensor::f_empty([numel as i64], (kind, device)).map_err(torch)?),
        };
        let parts: Vec<Tensor> = grads.iter().map(|g| g.reshape([-1])).collect();
        // Returns another handle to `flat`.
        let _filled = tch::no_grad(|| Tensor::f_cat_out(flat, &parts, 0)).map_err(torch)?;
        comm.all_reduce_sum_(flat)?;
        let mut offset = 0;
        tch::no_grad(|| -> Result<(), tch::TchError> {
            for g in grads {
                let n = g.numel() as i64;
                g.shallow_clone()
                    .f_copy_(&flat.f_narrow(0, offset, n)?.f_view_as(g)?)?;
                offset += n;
            }
            Ok(())
        })
        .map_err(torch)
    }
}

impl GradBuckets {
    /// Consecutive parameters fill a bucket until it holds at least
    /// `bucket_bytes`; a change of dtype starts a new one.
    pub fn new(params: &[(String, Tensor)], bucket_bytes: usize) -> Self {
        GradBuckets {
            bucket_bytes,
            plan: Mutex::new(Plan::new(params, 0..params.len(), bucket_bytes)),
            overlap: Mutex::new(None),
        }
    }

    pub fn len(&self) -> usize {
        self.plan().buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The buckets, as parameter indices.
    pub fn buckets(&self) -> Vec<Vec<usize>> {
        self.plan().buckets.clone()
    }

    fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.plan.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sums the gradients of `params` (the list the plan was made for) over
    /// `comm`, in place, after backward.
    pub fn all_reduce(
        &self,
        params: &[(String, Tensor)],
        comm: &dyn Collective,
    ) -> Result<(), CollectiveError> {
        if comm.world_size() <= 1 {
            return Ok(());
        }
        let grads = gradients(params)?;
        let mut plan = self.plan();
        for b in 0..plan.buckets.len() {
            plan.reduce(b, &grads, comm)?;
        }
        Ok(())
    }
}

/// Every parameter's gradient buffer. Each must have one (see `trainer`,
/// which allocates them once), so that every rank sends buckets of the same
/// size, and autograd accumulates into it in place.
fn gradients(params: &[(String, Tensor)]) -> Result<Vec<Tensor>, CollectiveError> {
    params
        .iter()
        .map(|(name, p)| {
            let g = p.grad();
            if g.defined() {
                Ok(g)
            } else {
                Err(CollectiveError::Invalid {
                    op: "all_reduce",
                    message: format!("parameter {name} has no gradient buffer"),
                })
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use samtrain_comm::LocalCollective;

    fn params(sizes: &[i64]) -> Vec<(String, Tensor)> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                (
                    format!("p{i}"),
                    Tensor::zeros([n], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true),
                )
            })
            .collect()
    }

    #[test]
    fn buckets_fill_to_the_size_in_order() {
        // 4-byte floats: 10 + 10 elements pass 64 bytes only with the third.
        let plan = GradBuckets::new(&params(&[10, 10, 10, 1, 30, 2]), 64);
        assert_eq!(plan.buckets(), vec![vec![0, 1], vec![2, 3, 4], vec![5]]);
    }

    #[test]
    fn sums_every_bucket_over_the_group() {
        let handles: Vec<_> = LocalCollective::group(2)
            .into_iter()
            .map(|comm| {
                std::thread::spawn(move || {
                    let ps = params(&[3, 5, 2]);
                    let r = comm.rank() as f64;
                    for (i, (_, p)) in ps.iter().enumerate() {
                        // A gradient of (rank + 1) * (index + 1) everywhere.
                        (p.sum(Kind::Float) * ((r + 1.0) * (i as f64 + 1.0))).backward();
                    }
                    let plan = GradBuckets::new(&ps, 16);
                    assert_eq!(plan.len(), 2);
                    plan.all_reduce(&ps, &comm).unwrap();
                    let first = ps
                        .iter()
                        .map(|(_, p)| Vec::<f32>::try_from(p.grad()).unwrap())
                        .collect::<Vec<_>>();
                    let buffers = |plan: &GradBuckets| {
                        let p = plan.plan();
                        p.flats
                            .iter()
                            .map(|t| t.as_ref().unwrap().data_ptr() as usize)
                            .collect::<Vec<_>>()
                    };
                    let before = buffers(&plan);
                    // A second step: fresh gradients, the same buffers.
                    for (i, (_, p)) in ps.iter().enumerate() {
                        let _ = p.grad().zero_();
                        (p.sum(Kind::Float) * (10.0 * (r + 1.0) + i as f64)).backward();
                    }
                    plan.all_reduce(&ps, &comm).unwrap();
                    assert_eq!(buffers(&plan), before, "flat buffers are reused");
                    let second = ps
                        .iter()
                        .map(|(_, p)| Vec::<f32>::try_from(p.grad()).unwrap())
                        .collect::<Vec<_>>();
                    (first, second)
                })
            })
            .collect();
        for h in handles {
            let (first, second) = h.join().unwrap();
            for (i, g) in first.iter().enumerate() {
                // (1 + 2) * (i + 1) on both ranks.
                assert!(g.iter().all(|&x| x == 3.0 * (i as f32 + 1.0)), "{i}: {g:?}");
            }
            for (i, g) in second.iter().enumerate() {
                // (10 + i) + (20 + i).
                assert!(g.iter().all(|&x| x == 30.0 + 2.0 * i as f32), "{i}: {g:?}");
            }
        }
    }

    /// A chain `x * p0 * p1 * p2 * p3`, scaled by the rank: backward
    /// produces p3's gradient first and p0's last.
    fn chain_loss(ps: &[(String, Tensor)], rank: f64, step: f64) -> Tensor {
        let mut h = Tensor::arange(4, (Kind::Float, tch::Device::Cpu)) * (0.3 + step) + 1.0;
        for (_, p) in ps {
            h *= p;
        }
        (h.square().sum(Kind::Float)) * (rank + 1.0)
    }

    fn chain_params() -> Vec<(String, Tensor)> {
        (0..4)
            .map(|i| {
                let p = (Tensor::arange(4, (Kind::Float, tch::Device::Cpu)) * 0.1 + 0.5 + i as f64)
                    .set_requires_grad(true);
                (format!("p{i}"), p)
            })
            .collect()
    }

    #[test]
    fn reducing_during_backward_equals_reducing_after_it() {
        let handles: Vec<_> = LocalCollective::group(2)
            .into_iter()
            .map(|comm| {
                std::thread::spawn(move || {
                    let r = comm.rank() as f64;
                    let (during, after) = (chain_params(), chain_params());
                    for ps in [&during, &after] {
                        for (_, p) in ps.iter() {
                            (p.sum(Kind::Float) * 0.0).backward();
                        }
                    }
                    // 16 bytes: one parameter per bucket.
                    let overlapped = GradBuckets::new(&during, 16);
                    let plain = GradBuckets::new(&after, 16);
                    let mut plans = Vec::new();
                    for step in 0..3 {
                        for ps in [&during, &after] {
                            for (_, p) in ps.iter() {
                                let _ = p.grad().zero_();
                            }
                        }
                        let done = overlapped.reduce_during(&during, &comm, || {
                            chain_loss(&during, r, step as f64).backward();
                            7
                        });
                        assert_eq!(done.value, 7);
                        done.reduced.unwrap();
                        chain_loss(&after, r, step as f64).backward();
                        plain.all_reduce(&after, &comm).unwrap();
                        for ((_, a), (_, b)) in during.iter().zip(&after) {
                            assert!(a.grad().equal(&b.grad()), "step {step}");
                        }
                        plans.push(overlapped.buckets());
                    }
                    plans
                })
            })
            .collect();
        for h in handles {
            let plans = h.join().unwrap();
            // The first step learns backward's order, the later ones use it.
            assert_eq!(plans[0], vec![vec![3], vec![2], vec![1], vec![0]]);
            assert_eq!(plans[1], plans[0]);
        }
    }

    #[test]
    fn a_panicking_backward_leaves_no_thread_waiting() {
        let comms = LocalCollective::group(2);
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                std::thread::spawn(move || {
                    let ps = chain_params();
                    for (_, p) in &ps {
                        (p.sum(Kind::Float) * 0.0).backward();
                    }
                    let plan = GradBuckets::new(&ps, 16);
                    // Learn the order first (both ranks), then fail.
                    plan.reduce_during(&ps, &comm, || chain_loss(&ps, 0.0, 0.0).backward())
                        .reduced
                        .unwrap();
                    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        plan.reduce_during(&ps, &comm, || panic!("backward failed"))
                    }));
                    assert!(caught.is_err());
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
}
