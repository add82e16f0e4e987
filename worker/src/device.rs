//! Which device a rank trains on, from the spec's `training.device` and the
//! devices libtorch sees, and the dtype its frozen weights take there.

use samtrain_proto::spec::{DeviceKind, Dtype};
use tch::{Device, Kind};

use crate::error::TrainError;

/// The device of `kind` for this rank: CUDA index `LOCAL_RANK` (torchrun's
/// variable) when set, else the world rank modulo the devices present.
pub fn resolve_device(kind: DeviceKind, rank: u32) -> Result<Device, TrainError> {
    let cuda = || {
        let count = samtrain_torchext::cuda::device_count().max(1) as usize;
        let index = std::env::var("LOCAL_RANK")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(rank as usize);
        Device::Cuda(index % count)
    };
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => match samtrain_torchext::cuda::require() {
            Ok(_) => Ok(cuda()),
            Err(e) => Err(TrainError::config(
                "training.device",
                format!("is `cuda` but {e}"),
            )),
        },
        DeviceKind::Auto if samtrain_torchext::cuda::is_available() => Ok(cuda()),
        DeviceKind::Auto => Ok(Device::Cpu),
    }
}

/// The tch kind of the spec's `[model] dtype`, or the device's default
/// (bf16 on CUDA, fp32 on the CPU) when it names none.
pub fn model_dtype(dtype: Option<Dtype>, device: Device) -> Kind {
    match dtype {
        Some(Dtype::Fp32) => Kind::Float,
        Some(Dtype::Bf16) => Kind::BFloat16,
        Some(Dtype::Fp16) => Kind::Half,
        None => samtrain_model::default_dtype(device),
    }
}
