//! Data-parallel gradient averaging: the trainable gradients, flattened into
//! buckets of about 25 MB in a fixed order (the parameters sorted by name,
//! the same on every rank), each all-reduced over the data-parallel group
//! and copied back.
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

use samtrain_model::parallel::Collective;
use samtrain_model::ModelError;
use tch::{Kind, Tensor};

/// torch DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// The bucket plan over a list of parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GradBuckets {
    /// Indices into the parameter list, in order; each bucket holds one dtype.
    buckets: Vec<Vec<usize>>,
}

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
        GradBuckets { buckets }
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
    ) -> Result<(), ModelError> {
        if comm.world_size() <= 1 {
            return Ok(());
        }
        for bucket in &self.buckets {
            let grads: Vec<Tensor> = bucket.iter().map(|&i| params[i].1.grad()).collect();
            if let Some(i) = bucket.iter().zip(&grads).find(|(_, g)| !g.defined()) {
                return Err(ModelError::Input {
                    name: params[*i.0].0.clone(),
                    message: "has no gradient buffer to all-reduce".into(),
                });
            }
            let flat = Tensor::cat(
                &grads.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(),
                0,
            );
            let summed = comm.all_reduce_sum(&flat)?;
            let mut offset = 0;
            tch::no_grad(|| {
                for mut g in grads {
                    let n = g.numel() as i64;
                    let part = summed.narrow(0, offset, n).view_as(&g);
                    g.copy_(&part);
                    offset += n;
                }
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use samtrain_model::parallel::LocalCollective;

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
                    ps.iter()
                        .map(|(_, p)| Vec::<f32>::try_from(p.grad()).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            let grads = h.join().unwrap();
            for (i, g) in grads.iter().enumerate() {
                // (1 + 2) * (i + 1) on both ranks.
                assert!(g.iter().all(|&x| x == 3.0 * (i as f32 + 1.0)), "{i}: {g:?}");
            }
        }
    }
}
