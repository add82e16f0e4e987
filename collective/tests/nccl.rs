//! NCCL on real GPUs: skipped, with a message, where there are none.
#![cfg(feature = "nccl")]

use samtrain_collective::nccl::{nccl_available, NcclCollective, NcclId};
use samtrain_comm::Collective;
use tch::{Device, Kind, Tensor};

#[test]
fn nccl_sums_gathers_and_broadcasts_on_gpus() {
    if !nccl_available() {
        println!("skipped: no CUDA device or libnccl on this machine");
        return;
    }
    // One rank per GPU (NCCL refuses two ranks on one device).
    let world = samtrain_torchext::cuda::device_count().min(4);
    let id = NcclId::from_bytes(NcclId::new().unwrap().as_bytes()).unwrap();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let id = id.clone();
            std::thread::spawn(move || {
                let c = NcclCollective::new(rank, world, rank as usize, &id).unwrap();
                let dev = Device::Cuda(rank as usize);
                let x = Tensor::arange(1001, (Kind::Float, dev)) * (rank + 1);
                let sum = c.all_reduce_sum(&x).unwrap();
                let gathered = c.all_gather(&x).unwrap();
                let b = c.broadcast(&x, world - 1).unwrap();
                c.barrier().unwrap();
                (
                    Vec::<f32>::try_from(sum.to(Device::Cpu)).unwrap(),
                    gathered.len(),
                    Vec::<f32>::try_from(b.to(Device::Cpu)).unwrap(),
                )
            })
        })
        .collect();
    let factor = (world * (world + 1) / 2) as f32;
    for h in handles {
        let (sum, n, b) = h.join().unwrap();
        let expected: Vec<f32> = (0..1001).map(|i| i as f32 * factor).collect();
        assert_eq!(sum, expected);
        assert_eq!(n as i64, world);
        assert_eq!(b, (0..1001).map(|i| (i * world) as f32).collect::<Vec<_>>());
    }
}
