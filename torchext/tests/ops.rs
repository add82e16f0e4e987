//! The shim's operations against tch's own on the same tensors, its hooks
//! against autograd's order, and its errors.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use samtrain_torchext::{
    clear_grad_ready_hook, foreach_mul_, foreach_norm, fused_adamw_, set_grad_ready_hook,
    AdamWHyper, AdamWTensors, TorchExtError,
};
use tch::{Device, Kind, Tensor};

const HYPER: AdamWHyper = AdamWHyper {
    lr: 0.01,
    beta1: 0.9,
    beta2: 0.999,
    weight_decay: 0.0,
    eps: 1e-8,
};

fn tensors() -> Vec<Tensor> {
    let opts = (Kind::Float, Device::Cpu);
    vec![
        (Tensor::arange(12, opts).view([4, 3]) * 0.37).sin(),
        (Tensor::arange(5, opts) * 1.3).cos(),
        Tensor::from_slice(&[-2.5f32]),
    ]
}

#[test]
fn foreach_norm_and_mul_equal_one_tensor_at_a_time() {
    let ts = tensors();
    let norms = foreach_norm(&ts).unwrap();
    assert_eq!(norms.len(), ts.len());
    for (t, n) in ts.iter().zip(&norms) {
        let want = t.norm().double_value(&[]);
        assert_eq!(n.kind(), Kind::Float);
        assert!(
            (n.double_value(&[]) - want).abs() <= 1e-6 * want,
            "{n} vs {want}"
        );
    }
    let before: Vec<Tensor> = ts.iter().map(|t| t.copy()).collect();
    foreach_mul_(&ts, &Tensor::scalar_tensor(0.5, (Kind::Float, Device::Cpu))).unwrap();
    for (t, b) in ts.iter().zip(&before) {
        assert!(t.equal(&(b * 0.5)));
    }
    assert!(foreach_norm(&[]).unwrap().is_empty());
}

#[test]
fn fused_adamw_moves_parameters_and_moments() {
    let params = tensors();
    let grads: Vec<Tensor> = params.iter().map(|p| p.ones_like() * 0.1).collect();
    let exp_avgs: Vec<Tensor> = params.iter().map(|p| p.zeros_like()).collect();
    let exp_avg_sqs: Vec<Tensor> = params.iter().map(|p| p.zeros_like()).collect();
    let steps: Vec<Tensor> = params.iter().map(|_| Tensor::from_slice(&[1f32])).collect();
    let before: Vec<Tensor> = params.iter().map(|p| p.copy()).collect();
    let t = AdamWTensors {
        params: &params,
        grads: &grads,
        exp_avgs: &exp_avgs,
        exp_avg_sqs: &exp_avg_sqs,
        steps: &steps,
    };
    fused_adamw_(&t, &HYPER).unwrap();
    // The first step moves every element by lr against its gradient's sign
    // (m / sqrt(v) is 1 after bias correction), and the moments hold
    // (1 - beta) of the gradient and of its square.
    for i in 0..params.len() {
        let moved = (&before[i] - &params[i]).abs().max().double_value(&[]);
        assert!((moved - 0.01).abs() < 1e-6, "moved {moved}");
        let m = exp_avgs[i].mean(Kind::Float).double_value(&[]);
        let v = exp_avg_sqs[i].mean(Kind::Float).double_value(&[]);
        assert!(
            (m - 0.01).abs() < 1e-7 && (v - 1e-5).abs() < 1e-9,
            "{m} {v}"
        );
    }
}

#[test]
fn bad_arguments_are_errors_naming_the_operation() {
    let params = tensors();
    let short = &params[..1];
    let t = AdamWTensors {
        params: &params,
        grads: short,
        exp_avgs: &params,
        exp_avg_sqs: &params,
        steps: &params,
    };
    let err = fused_adamw_(&t, &HYPER).unwrap_err();
    assert!(matches!(err, TorchExtError::Arguments { .. }), "{err}");
    assert!(
        err.to_string().contains("3 parameters but 1 gradients"),
        "{err}"
    );

    // libtorch's own check (a gradient of another shape) comes back as text.
    let wrong: Vec<Tensor> = params
        .iter()
        .map(|_| Tensor::ones([7], (Kind::Float, Device::Cpu)))
        .collect();
    let steps: Vec<Tensor> = params.iter().map(|_| Tensor::from_slice(&[1f32])).collect();
    let t = AdamWTensors {
        params: &params,
        grads: &wrong,
        exp_avgs: &wrong,
        exp_avg_sqs: &wrong,
        steps: &steps,
    };
    let err = fused_adamw_(&t, &HYPER).unwrap_err();
    assert!(
        matches!(
            err,
            TorchExtError::Torch {
                op: "fused_adamw_",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("tensor 0: its gradient is Float[7]"),
        "{err}"
    );
    assert!(!err.to_string().contains("frame #"), "a backtrace in {err}");

    let not_leaf = params[0].set_requires_grad(true) * 2.0;
    let err = set_grad_ready_hook(&not_leaf, || {}).unwrap_err();
    assert!(err.to_string().contains("leaf tensor"), "{err}");
}

/// Counts the closures alive, to check the shim drops each one once.
struct Alive(Arc<AtomicUsize>);
impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The first GPU, or `None` with a message saying the test is skipped.
fn cuda() -> Option<Device> {
    if samtrain_torchext::cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        eprintln!("skipped: no CUDA device");
        None
    }
}

#[test]
fn grad_ready_hooks_run_after_accumulation_in_backward_order() {
    grad_ready_hooks_on(Device::Cpu);
}

/// On CUDA the hooks run on autograd's thread for the device, not the
/// caller's: the same order and the same gradients all the same.
#[test]
fn grad_ready_hooks_run_after_accumulation_in_backward_order_on_cuda() {
    if let Some(device) = cuda() {
        grad_ready_hooks_on(device);
    }
}

fn grad_ready_hooks_on(device: Device) {
    let opts = (Kind::Float, device);
    let a = Tensor::ones([3], opts).set_requires_grad(true);
    let b = Tensor::ones([3], opts).set_requires_grad(true);
    let seen: Arc<Mutex<Vec<(&'static str, f64)>>> = Arc::default();
    let alive = Arc::new(AtomicUsize::new(0));
    for (name, leaf) in [("a", &a), ("b", &b)] {
        let seen = seen.clone();
        let probe = leaf.shallow_clone();
        alive.fetch_add(1, Ordering::SeqCst);
        let guard = Alive(alive.clone());
        set_grad_ready_hook(leaf, move || {
            let _ = &guard;
            // The gradient is already in `.grad` when the hook runs.
            seen.lock()
                .unwrap()
                .push((name, probe.grad().sum(Kind::Float).double_value(&[])));
        })
        .unwrap();
    }
    // b is used last in forward, so its gradient is ready first.
    let y = (&a * 2.0).sin().sum(Kind::Float) + (&b * 3.0).sum(Kind::Float);
    y.backward();
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0], ("b", 9.0));
        assert_eq!(seen[1].0, "a");
        assert!((seen[1].1 - 6.0 * 2f64.cos()).abs() < 1e-5, "{:?}", seen[1]);
    }
    // A second backward accumulates and fires again.
    ((&b * 3.0).sum(Kind::Float)).backward();
    assert_eq!(seen.lock().unwrap().last().unwrap(), &("b", 18.0));

    clear_grad_ready_hook(&a).unwrap();
    assert_eq!(alive.load(Ordering::SeqCst), 1);
    (&a * 1.0).sum(Kind::Float).backward();
    assert_eq!(seen.lock().unwrap().len(), 3, "a cleared hook ran");
    // Replacing b's hook drops the old closure.
    set_grad_ready_hook(&b, || {}).unwrap();
    assert_eq!(alive.load(Ordering::SeqCst), 0);
}

/// A dropped gradient is unset, and the next backward gives the leaf its
/// incoming gradient, not that plus the old one.
#[test]
fn a_dropped_gradient_is_unset_and_not_accumulated_into() {
    let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
    (&w * &w).sum(Kind::Float).backward();
    assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), [2.0, 4.0, 6.0]);
    samtrain_torchext::drop_grad(&w).unwrap();
    assert!(!w.grad().defined());
    (&w * 3.0).sum(Kind::Float).backward();
    assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), [3.0, 3.0, 3.0]);
    // A tensor without a gradient: nothing to drop, no error.
    let plain = Tensor::from_slice(&[1.0f32]);
    samtrain_torchext::drop_grad(&plain).unwrap();
    assert!(!plain.grad().defined());
}

#[test]
fn autocast_computes_in_the_chosen_dtype_and_restores() {
    autocast_on(Device::Cpu);
}

/// CUDA's autocast has a dtype of its own (float16 unless set): bf16 must
/// be bf16 there too.
#[test]
fn autocast_computes_in_the_chosen_dtype_and_restores_on_cuda() {
    if let Some(device) = cuda() {
        autocast_on(device);
    }
}

fn autocast_on(device: Device) {
    let opts = (Kind::Float, device);
    let a = Tensor::ones([4, 4], opts);
    for kind in [Kind::BFloat16, Kind::Half] {
        let inner = samtrain_torchext::autocast(device, kind, || {
            // Nested: the inner region's exit must not end the outer one.
            let nested =
                samtrain_torchext::autocast(device, Kind::BFloat16, || a.matmul(&a).kind())
                    .unwrap();
            assert_eq!(nested, Kind::BFloat16);
            a.matmul(&a).kind()
        })
        .unwrap();
        assert_eq!(inner, kind);
        assert_eq!(a.matmul(&a).kind(), Kind::Float, "autocast left on");
    }
    // A panic inside leaves autocast off.
    let caught = std::panic::catch_unwind(|| {
        samtrain_torchext::autocast(device, Kind::BFloat16, || panic!("inside")).unwrap()
    });
    assert!(caught.is_err());
    assert_eq!(
        a.matmul(&a).kind(),
        Kind::Float,
        "autocast left on after a panic"
    );
    let err = samtrain_torchext::autocast(device, Kind::Float, || ()).unwrap_err();
    assert!(err.to_string().contains("not a reduced precision"), "{err}");
}
