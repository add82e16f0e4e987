//! Loading libtorch's CUDA backend at run time: the library this test's
//! binary was linked without is mapped afterwards, and a request for a GPU
//! on a machine without one is an error that says so.

use std::path::PathBuf;

/// The folder of the libtorch this process runs, from its own mappings.
fn mapped(name: &str) -> Option<PathBuf> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(PathBuf::from)
        .find(|p| p.file_name().is_some_and(|f| f == name))
}

#[test]
fn the_cuda_backend_loads_from_libtorchs_folder() {
    // Touch libtorch first, so that its CPU library is mapped.
    let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
    let cpu = mapped("libtorch_cpu.so").expect("libtorch_cpu.so is mapped");
    let folder = cpu.parent().unwrap();
    let has_cuda_build = folder.join("libtorch_cuda.so").exists();
    assert!(
        mapped("libtorch_cuda.so").is_none(),
        "the linker kept libtorch_cuda.so: loading it at run time is no longer needed"
    );

    let loaded = samtrain_torchext::cuda::load().unwrap();
    assert_eq!(loaded, has_cuda_build);
    if has_cuda_build {
        assert_eq!(
            mapped("libtorch_cuda.so").unwrap(),
            folder.join("libtorch_cuda.so")
        );
    }
    // Once: the second call answers the same without loading again.
    assert_eq!(samtrain_torchext::cuda::load().unwrap(), loaded);

    let gpus = samtrain_torchext::cuda::device_count();
    match samtrain_torchext::cuda::require() {
        Ok(n) => assert_eq!(n, gpus),
        Err(e) => {
            assert_eq!(gpus, 0);
            let text = e.to_string();
            assert!(
                text == "cuda: libtorch sees no CUDA device here"
                    || text == "cuda: this libtorch is built without CUDA",
                "{text}"
            );
            eprintln!("no GPU here: {text}");
        }
    }
}
