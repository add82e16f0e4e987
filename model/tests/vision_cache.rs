//! The frozen vision encoder's outputs, kept in a vision cache: a forward
//! pass that reads them gives what one that encodes the images gives.

mod common;

use std::sync::Arc;

use common::{config, inputs};
use samtrain_model::vision_cache::VisionCache;
use samtrain_model::LoadedModel;
use tch::Device;

#[test]
fn a_frozen_encoder_reads_its_outputs_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let m = LoadedModel::init(&config(), Device::Cpu, None).unwrap();
    let forward = || tch::no_grad(|| m.model.forward(&inputs())).unwrap();
    let plain = forward();
    let cache = Arc::new(VisionCache::open(dir.path(), "digest", u64::MAX).unwrap());
    m.model.set_vision_cache(Some(cache.clone()));
    // Three real images (one padded slot): encoded once, then read.
    assert!(forward().equal(&plain));
    assert_eq!(cache.stats(), (0, 3, 0));
    assert!(forward().equal(&plain));
    assert_eq!(cache.stats(), (3, 3, 0));
    m.model.set_vision_cache(None);
    assert!(forward().equal(&plain));
    assert_eq!(cache.stats(), (3, 3, 0));

    // An encoder that trains never reads the cache.
    let mut all = config();
    all.samtrain.trainable.all = true;
    let trained = LoadedModel::init(&all, Device::Cpu, None).unwrap();
    trained.model.set_vision_cache(Some(cache.clone()));
    let _ = tch::no_grad(|| trained.model.forward(&inputs())).unwrap();
    assert_eq!(cache.stats(), (3, 3, 0));
}
