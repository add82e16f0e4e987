//! A process group whose ranks are threads of one process: for tests, and
//! for one-process runs that need no network. Results are summed in rank
//! order, so every rank gets bit-identical values.

use std::sync::{Arc, Barrier, Mutex};

use tch::Tensor;

use crate::collective::Collective;
use crate::error::{CollectiveError, Result};

/// Shared state of an in-process group: one slot per rank.
struct LocalShared {
    slots: Mutex<Vec<Option<Tensor>>>,
    barrier: Barrier,
}

/// A collective over threads of one process: for tests and for single-host
/// runs that need no network. Results are summed in rank order, so every
/// rank gets bit-identical values.
#[derive(Clone)]
pub struct LocalCollective {
    rank: i64,
    world: i64,
    shared: Arc<LocalShared>,
}

impl LocalCollective {
    /// One handle per rank of a new group of `world` ranks.
    pub fn group(world: i64) -> Vec<LocalCollective> {
        let shared = Arc::new(LocalShared {
            slots: Mutex::new((0..world).map(|_| None).collect()),
            barrier: Barrier::new(world as usize),
        });
        (0..world)
            .map(|rank| LocalCollective {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Publishes this rank's tensor, waits for all, reads every slot.
    fn exchange(&self, tensor: &Tensor, op: &'static str) -> Result<Vec<Tensor>> {
        let poisoned = |_| CollectiveError::Broken {
            op,
            group: "local",
            first: "a rank panicked while holding the group".into(),
        };
        self.shared.slots.lock().map_err(poisoned)?[self.rank as usize] = Some(tensor.copy());
        self.shared.barrier.wait();
        let all = self
            .shared
            .slots
            .lock()
            .map_err(poisoned)?
            .iter()
            .map(|t| t.as_ref().map(Tensor::copy).expect("every rank published"))
            .collect();
        // Nobody may overwrite a slot before everybody has read it.
        self.shared.barrier.wait();
        Ok(all)
    }
}

impl Collective for LocalCollective {
    fn rank(&self) -> i64 {
        self.rank
    }

    fn world_size(&self) -> i64 {
        self.world
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let all = self.exchange(tensor, "all_reduce")?;
        let mut sum = all[0].copy();
        for t in &all[1..] {
            sum += t;
        }
        Ok(sum)
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        self.exchange(tensor, "all_gather")
    }

    fn broadcast(&self, tensor: &Tensor, root: i64) -> Result<Tensor> {
        let mut all = self.exchange(tensor, "broadcast")?;
        Ok(all.swap_remove(root as usize))
    }

    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_group_sums_in_rank_order() {
        let handles: Vec<_> = LocalCollective::group(3)
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let t = Tensor::from_slice(&[c.rank() as f32, 1.0]);
                    let sum = c.all_reduce_sum(&t).unwrap();
                    let gathered = c.all_gather(&t).unwrap();
                    let root = c.broadcast(&t, 2).unwrap();
                    (
                        Vec::<f32>::try_from(sum).unwrap(),
                        gathered.len(),
                        Vec::<f32>::try_from(root).unwrap(),
                    )
                })
            })
            .collect();
        for h in handles {
            let (sum, n, root) = h.join().unwrap();
            assert_eq!(sum, vec![3.0, 3.0]);
            assert_eq!(n, 3);
            assert_eq!(root, vec![2.0, 1.0]);
        }
    }
}
