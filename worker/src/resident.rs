//! The model a worker keeps loaded between generations of a job.
//!
//! A restart re-forms the process groups, but the frozen weights (almost all
//! of a 7 B model: SAM trains about 1.18 M parameters) are the same as
//! before. So a worker process keeps the model it last trained in
//! [`ResidentModels`], and the next generation takes it back when it names the
//! same thing: the same model folder with the same [`weights::fingerprint`]
//! (config, file sizes, modification times and safetensors headers), dtype,
//! device and tensor-parallel slice. The trainable tensors are reset to the
//! folder's values (a CPU copy taken at load); the trainer then restores them
//! and the optimizer from the newest checkpoint as after a cold load.
//!
//! A generation holds the model through a [`ModelLease`], which puts it back
//! when dropped, however the generation ends (an error or a peer's failure
//! unwinding); frozen weights are never written, so what comes back is
//! intact. A lease is only handed out once a load has fully succeeded.

use std::path::Path;
use std::sync::{Arc, Mutex};

use samtrain_model::parallel::TensorParallel;
use samtrain_model::{trainable, weights, LoadedModel, ModelError};
use tch::{Device, Kind, Tensor};

/// What a resident model must match to be reused.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelKey {
    pub path: String,
    pub fingerprint: String,
    pub dtype: Kind,
    pub device: Device,
    /// `(rank, size)` of the tensor-parallel group: which slice is loaded.
    pub tp: (i64, i64),
}

impl ModelKey {
    /// The key of the model folder `path` as it is on disk now.
    pub fn of(path: &str, dtype: Kind, device: Device, tp: (i64, i64)) -> Result<Self, ModelError> {
        Ok(Self {
            path: path.to_owned(),
            fingerprint: weights::fingerprint(Path::new(path))?,
            dtype,
            device,
            tp,
        })
    }
}

struct Resident {
    key: ModelKey,
    loaded: LoadedModel,
    /// The trainable tensors' values right after loading, on the CPU.
    initial: Vec<(String, Tensor)>,
}

/// The slot of a worker process's resident model; clones share it.
#[derive(Clone, Default)]
pub struct ResidentModels {
    slot: Arc<Mutex<Option<Resident>>>,
    loads: Arc<std::sync::atomic::AtomicUsize>,
}

/// A generation's hold on the model; returns it to the slot when dropped.
pub struct ModelLease {
    slot: Arc<Mutex<Option<Resident>>>,
    resident: Option<Resident>,
    /// Whether the model was already loaded (no weights were read).
    pub reused: bool,
}

impl ResidentModels {
    /// The resident model if it matches `key` (its trainable tensors reset
    /// and `tp` bound to it), else the model `load` returns. A resident model
    /// that does not match is dropped before loading, so two never coexist.
    pub fn lease(
        &self,
        key: ModelKey,
        tp: Option<TensorParallel>,
        load: impl FnOnce(Option<TensorParallel>) -> Result<LoadedModel, ModelError>,
    ) -> Result<ModelLease, ModelError> {
        let held = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut resident) = held.filter(|r| r.key == key) {
            resident.loaded.model.rebind_tensor_parallel(tp)?;
            let current =
                trainable::apply(&resident.loaded.vs, &resident.loaded.model.config.samtrain);
            tch::no_grad(|| {
                for ((_, now), (_, initial)) in current.iter().zip(&resident.initial) {
                    now.shallow_clone().copy_(initial);
                    // A generation that ended mid-step may leave gradients.
                    let mut grad = now.grad();
                    if grad.defined() {
                        let _ = grad.zero_();
                    }
                }
            });
            tracing::info!(path = %key.path, fingerprint = %key.fingerprint, "resident model reused");
            return Ok(ModelLease {
                slot: self.slot.clone(),
                resident: Some(resident),
                reused: true,
            });
        }
        let loaded = load(tp)?;
        self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let initial = trainable::apply(&loaded.vs, &loaded.model.config.samtrain)
            .into_iter()
            .map(|(n, t)| (n, t.detach().to_device(Device::Cpu).copy()))
            .collect();
        Ok(ModelLease {
            slot: self.slot.clone(),
            resident: Some(Resident {
                key,
                loaded,
                initial,
            }),
            reused: false,
        })
    }

    /// How many times a model was read from its folder.
    pub fn loads(&self) -> usize {
        self.loads.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl ModelLease {
    pub fn model(&self) -> &LoadedModel {
        &self
            .resident
            .as_ref()
            .expect("a lease holds its model until dropped")
            .loaded
    }
}

impl Drop for ModelLease {
    fn drop(&mut self) {
        if let Some(resident) = self.resident.take() {
            *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(resident);
        }
    }
}
