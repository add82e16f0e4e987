//! Compiles `csrc/torchext.cpp` against the libtorch that tch links (the
//! `LIBTORCH` folder, as torch-sys finds it), with the same C++ standard and
//! ABI, so that its `at::Tensor` is the one behind a tch `Tensor`.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/torchext.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let libtorch = PathBuf::from(
        env::var("LIBTORCH")
            .expect("LIBTORCH names the libtorch folder (.cargo/config.toml sets it)"),
    );
    let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/torchext.cpp")
        .compile("samtrain_torchext");
}
