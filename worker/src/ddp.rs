//! Data-parallel gradient averaging: the trainable gradients, flattened into
//! buckets of about 25 MB in a fixed order (the parameters sorted by name,
//! the same on every rank), each all-reduced in place over the
//! data-parallel group and copied back. Each bucket's flat buffer is
//! allocated on the first step and reused by every later one, so a step
//! neither allocates nor faults in fresh pages for its buckets.
//!
//! The buckets are reduced after the whole backward pass, not overlapped
//! with it as torch's DDP does: DDP starts a bucket's all-reduce from
//! autograd hooks as its last gradient is produced, and tch exposes no
//! autograd hooks (nor can a Rust collective run inside libtorch's backward
//! engine). Bucketing still pays: one message per ~25 MB instead of one per
//! tensor, which is what dominates with many small LoRA or bias tensors.
//!
//! The buckets are *summed*, not divided by the group size: the trainer
//! scales each rank's loss by its share of the global batch's answer tokens
//! (see `trainer`), so the sum is already the gradient of the global batch's
//! mean loss, also when ranks hold different numbers of tokens, where
//! dividing by the group size would weigh every rank alike.

use std::sync::Mutex;

use samtrain_comm::Collective;
use samtrain_comm::CollectiveError;
use tch::{Kind, Tensor};

/// torch DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// The bucket plan over a list of parameters, and its flat buffers.
#[derive(Debug)]
pub struct GradBuckets {
    /// Indices into the parameter list, in order; each bucket holds one dtype.
    buckets: Vec<Vec<usize>>,
    /// One flat buffer per bucket, made on first use (its size, dtype and
    /// device are the gradients'), then reused.
    flats: Mutex<Vec<Option<Tensor>>>,
}

impl Clone for GradBuckets {
    /// The same plan with buffers of its own.
    fn clone(&self) -> Self {
        Self::from_plan(self.buckets.clone())
    }
}

impl PartialEq for GradBuckets {
    /// Plans are equal when they bucket the same parameters alike.
    fn eq(&self, other: &Self) -> bool {
        self.buckets == other.buckets
    }
}

impl Eq for GradBuckets {}

impl GradBuckets {
    /// Consecutive parameters fill a bucket until it holds at least
    /// `bucket_bytes`; a change of dtype starts a new one.
    pub fn new(params: &[(String, Tensor)], bucket_bytes: usize) -> Self {
        let mut buckets: Vec<Vec<usize>> = Vec::new();
        let mut bytes = 0usize;
        let mut kind: Option<Kind> = None;
        for (i, (_, p)) in params.iter().enumerate() {
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
        Self::from_plan(buckets)
    }

    fn from_plan(buckets: Vec<Vec<usize>>) -> Self {
        let flats = Mutex::new((0..buckets.len()).map(|_| None).collect());
        GradBuckets { buckets, flats }
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Sums the gradients of `params` (the list the plan was made for) over
    /// `comm`, in place. Every parameter must have a gradient buffer (see
    /// `trainer`, which allocates them once), so that every rank sends
    /// buckets of the same size.
    pub fn all_reduce(
        &self,
        params: &[(String, Tensor)],
        comm: &dyn Collective,
    ) -> Result<(), CollectiveError> {
        if comm.world_size() <= 1 {
            return Ok(());
        }
        let torch = |source| CollectiveError::Torch {
            op: "all_reduce",
            source,
        };
        // The buffers are scratch, fully rewritten by every call: a panic
        // in an earlier one leaves nothing to distrust.
        let mut flats = self.flats.lock().unwrap_or_else(|e| e.into_inner());
        for (bucket, slot) in self.buckets.iter().zip(flats.iter_mut()) {
            let grads: Vec<Tensor> = bucket.iter().map(|&i| params[i].1.grad()).collect();
            if let Some(i) = bucket.iter().zip(&grads).find(|(_, g)| !g.defined()) {
                return Err(CollectiveError::Invalid {
                    op: "all_reduce",
                    message: format!("parameter {} has no gradient buffer", params[*i.0].0),
                });
            }
            let numel: usize = grads.iter().map(Tensor::numel).sum();
            let (kind, device) = (grads[0].kind(), grads[0].device());
            let fits = |t: &Tensor| t.numel() == numel && t.kind() == kind && t.device() == device;
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
                for mut g in grads {
                    let n = g.numel() as i64;
                    g.f_copy_(&flat.f_narrow(0, offset, n)?.f_view_as(&g)?)?;
                    offset += n;
                }
                Ok(())
            })
            .map_err(torch)?;
        }
        Ok(())
    }
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
        assert_eq!(plan.buckets, vec![vec![0, 1], vec![2, 3, 4], vec![5]]);
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
                        let flats = plan.flats.lock().unwrap();
                        flats
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
}
