//! AdamW and gradient clipping against PyTorch (`torch.optim.AdamW`,
//! `torch.nn.utils.clip_grad_norm_`) on the same parameters and gradients,
//! through the venv's python: bit for bit against `fused=True` (the same
//! libtorch kernel), to float rounding against the per-tensor loop; on the
//! CPU, and on a GPU where there is one.

mod common;

use std::process::Command;

use samtrain_worker::optim::{clip_grad_norm, AdamW, AdamWConfig};
use tch::{Device, Kind, Tensor};

const STEPS: usize = 6;

/// The hyperparameters the python side uses too.
const CONFIG: AdamWConfig = AdamWConfig {
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
    weight_decay: 0.1,
};

/// A matrix (decays) and a vector (does not), with gradients that change
/// every step, on `device`.
fn setup(device: Device) -> (Vec<(String, Tensor)>, Vec<Vec<Tensor>>) {
    let opts = (Kind::Float, device);
    let w = (Tensor::arange(12, opts).view([4, 3]) * 0.37).sin();
    let b = (Tensor::arange(3, opts) * 1.3).cos();
    let params = vec![
        ("b".to_string(), b.set_requires_grad(true)),
        ("w".to_string(), w.set_requires_grad(true)),
    ];
    let grads = (0..STEPS)
        .map(|s| {
            params
                .iter()
                .map(|(_, p)| {
                    let n = p.numel() as i64;
                    ((Tensor::arange(n, opts) * (0.7 + s as f64) + s as f64).sin() * 0.3)
                        .view(p.size().as_slice())
                })
                .collect()
        })
        .collect();
    (params, grads)
}

const SCRIPT: &str = r#"
import sys, math, torch
from safetensors.torch import load_file, save_file
t = {k: v.to(sys.argv[4]) for k, v in load_file(sys.argv[1]).items()}
lrs = [float(x) for x in sys.argv[3].split(',')]
def train(**impl):
    w = torch.nn.Parameter(t['w'].clone()); b = torch.nn.Parameter(t['b'].clone())
    opt = torch.optim.AdamW([{'params': [w], 'weight_decay': 0.1}, {'params': [b], 'weight_decay': 0.0}],
                            lr=lrs[0], betas=(0.9, 0.95), eps=1e-8, **impl)
    for s, lr in enumerate(lrs):
        for g in opt.param_groups: g['lr'] = lr
        w.grad = t[f'gw{s}'].clone(); b.grad = t[f'gb{s}'].clone()
        opt.step()
    return w, b, opt.state
w, b, st = train(foreach=False)
out = {'loop_w': w.detach(), 'loop_b': b.detach()}
w, b, st = train(fused=True)
w.grad = t['gw0'].clone(); b.grad = t['gb0'].clone()
out.update({'w': w.detach(), 'b': b.detach(), 'mw': st[w]['exp_avg'], 'vw': st[w]['exp_avg_sq'],
            'mb': st[b]['exp_avg'], 'vb': st[b]['exp_avg_sq']})
norm = torch.nn.utils.clip_grad_norm_([w, b], 0.5)
out['norm'] = norm.reshape(1); out['cw'] = w.grad; out['cb'] = b.grad
save_file({k: v.cpu().contiguous() for k, v in out.items()}, sys.argv[2])
"#;

#[test]
fn adamw_and_clipping_equal_torch() {
    adamw_and_clipping_equal_torch_on(Device::Cpu);
}

/// CUDA's fused AdamW kernel is another kernel than the CPU's: the same
/// check, on the GPU, against torch on the GPU.
#[test]
fn adamw_and_clipping_equal_torch_on_cuda() {
    if !samtrain_torchext::cuda::is_available() {
        eprintln!("skipped: no CUDA device");
        return;
    }
    adamw_and_clipping_equal_torch_on(Device::Cuda(0));
}

fn adamw_and_clipping_equal_torch_on(device: Device) {
    let dir = tempfile::tempdir().unwrap();
    let (params, grads) = setup(device);
    let cpu = |t: &Tensor| t.detach().to_device(Device::Cpu);
    let lrs: Vec<f64> = (0..STEPS).map(|s| 1e-2 * (1.0 + s as f64) / 3.0).collect();
    let mut inputs: Vec<(String, Tensor)> =
        params.iter().map(|(n, p)| (n.clone(), cpu(p))).collect();
    for (s, g) in grads.iter().enumerate() {
        inputs.push((format!("gb{s}"), cpu(&g[0])));
        inputs.push((format!("gw{s}"), cpu(&g[1])));
    }
    let input = dir.path().join("in.safetensors");
    let output = dir.path().join("out.safetensors");
    Tensor::write_safetensors(&inputs, &input).unwrap();
    let lr_arg = lrs
        .iter()
        .map(|l| format!("{l:e}"))
        .collect::<Vec<_>>()
        .join(",");
    let run = Command::new(samtrain_testkit::python())
        .args(["-c", SCRIPT])
        .arg(&input)
        .arg(&output)
        .arg(&lr_arg)
        .arg(if device.is_cuda() { "cuda" } else { "cpu" })
        .output()
        .expect("run the venv's python");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let want: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&output)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.to_device(device)))
        .collect();

    let mut opt = AdamW::new(&params, CONFIG);
    for (s, lr) in lrs.iter().enumerate() {
        for ((_, p), g) in params.iter().zip(&grads[s]) {
            let mut grad = p.grad();
            if grad.defined() {
                grad.copy_(g);
            } else {
                (p * g).sum(Kind::Float).backward();
            }
        }
        opt.step(*lr).unwrap();
    }
    assert_eq!(opt.steps(), STEPS as u64);
    let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    // Bit for bit with torch's fused AdamW.
    assert!(
        params[1].1.equal(&want["w"]),
        "w differs by {}",
        diff(&params[1].1, &want["w"])
    );
    assert!(
        params[0].1.equal(&want["b"]),
        "b differs by {}",
        diff(&params[0].1, &want["b"])
    );
    let state: std::collections::HashMap<String, Tensor> = opt.state().into_iter().collect();
    for (ours, theirs) in [
        ("exp_avg.w", "mw"),
        ("exp_avg_sq.w", "vw"),
        ("exp_avg.b", "mb"),
        ("exp_avg_sq.b", "vb"),
    ] {
        assert!(
            state[ours].equal(&want[theirs]),
            "{ours} differs by {}",
            diff(&state[ours], &want[theirs])
        );
    }
    // To float rounding with its per-tensor loop.
    assert!(diff(&params[1].1, &want["loop_w"]) < 1e-6);
    assert!(diff(&params[0].1, &want["loop_b"]) < 1e-6);

    // A restored optimizer continues exactly as the original: one more
    // step of each, from the same gradients, lands on the same bits.
    let twin: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, p)| (n.clone(), p.detach().copy().set_requires_grad(true)))
        .collect();
    let mut copy = AdamW::new(&twin, CONFIG);
    copy.load_state(
        opt.state()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect(),
        opt.steps(),
    )
    .unwrap();
    assert_eq!(copy.steps(), STEPS as u64);
    for (((_, p), (_, q)), g) in params.iter().zip(&twin).zip(&grads[1]) {
        p.grad().copy_(g);
        (q * g).sum(Kind::Float).backward();
    }
    opt.step(1e-3).unwrap();
    copy.step(1e-3).unwrap();
    for ((_, p), (_, q)) in params.iter().zip(&twin) {
        assert!(p.equal(q), "a restored optimizer took another step");
    }

    // Clipping: the gradients of step 0, clipped to a norm of 0.5.
    for ((_, p), g) in params.iter().zip(&grads[0]) {
        p.grad().copy_(g);
    }
    let norm = clip_grad_norm(&params, 0.5, None).unwrap();
    let want_norm = want["norm"].double_value(&[0]);
    assert!(
        (norm - want_norm).abs() < 1e-6,
        "norm {norm} vs {want_norm}"
    );
    assert!(norm > 0.5, "the test must clip");
    assert!(diff(&params[1].1.grad(), &want["cw"]) < 1e-7);
    assert!(diff(&params[0].1.grad(), &want["cb"]) < 1e-7);
}

/// A save that reads the parameters and moments in place, lent to the
/// optimizer, holds what they were when it was called, though the update
/// runs right after: the update settles the loan before it writes.
#[test]
fn an_update_right_after_a_lending_save_leaves_the_save_as_it_was_called() {
    use samtrain_checkpoint::{CheckpointOptions, Checkpointer, SaveStatus, ShardState};

    let opts = (Kind::Float, Device::Cpu);
    // 16 MiB matrices: lent, and read by the upload for longer than the
    // update takes to start.
    let params: Vec<(String, Tensor)> = (0..3)
        .map(|i| {
            let p = (Tensor::arange(1 << 22, opts) * (0.1 + i as f64)).sin();
            (
                format!("w{i}"),
                p.view([1024, 4096]).set_requires_grad(true),
            )
        })
        .collect();
    let mut opt = AdamW::new(&params, CONFIG);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = Checkpointer::open(CheckpointOptions::new(
        dir.path().join("ckpt").display().to_string(),
    ))
    .unwrap();
    let raw = |t: &Tensor| {
        let mut v = vec![0u8; t.numel() * 4];
        t.copy_data_u8(&mut v, t.numel());
        v
    };
    for step in 1..=3u64 {
        for (_, p) in &params {
            (p * (0.01 * step as f64)).sum(Kind::Float).backward();
        }
        opt.step(1e-2).unwrap();
        let tensors: Vec<(String, Tensor)> = params
            .iter()
            .map(|(n, p)| (n.clone(), p.detach()))
            .collect();
        let expected: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, t)| t)
            .chain(opt.state().iter().map(|(_, t)| t))
            .map(|t| raw(&t.shallow_clone()))
            .collect();
        let (ticket, loan) = ckpt
            .save_lending(ShardState {
                step,
                tp_rank: 0,
                tp_size: 1,
                writer: true,
                tensors,
                optimizer: opt.state(),
                meta: serde_json::json!({ "step": step }),
            })
            .unwrap();
        assert!(loan.bytes() >= 9 << 24, "parameters and moments lent");
        opt.lend(loan);
        // The next update at once, while the upload reads.
        opt.step(1e-2).unwrap();
        opt.drop_grads().unwrap();
        assert_eq!(ticket.wait().status, SaveStatus::Committed);
        let info = ckpt.latest().unwrap().unwrap();
        let saved = ckpt.load(&info, 0, 1).unwrap();
        let found: Vec<Vec<u8>> = saved
            .tensors
            .iter()
            .chain(&saved.optimizer)
            .map(|(_, t)| raw(t))
            .collect();
        assert_eq!(found.len(), expected.len());
        for (i, (f, e)) in found.iter().zip(&expected).enumerate() {
            assert!(
                f == e,
                "step {step}: tensor {i} holds values of a later update"
            );
        }
    }
}
