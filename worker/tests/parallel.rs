//! Training on threads with the in-process collective: data parallelism,
//! tensor x data parallelism and gradient accumulation give the weights of
//! one process with the same global batch; a job resumes at another
//! data-parallel size with the samples it consumed counted right.

mod common;

use common::{final_weights, fixture, max_diff, moved, run_threads};
use samtrain_worker::TrainError;

const TOL: f64 = 1e-5;

#[test]
fn data_parallel_equals_one_process() {
    let f = fixture(24);
    let single = f.spec("single", "steps = 10\nbatch_size = 4", "");
    let out = run_threads(&single, 1, 1, None).remove(0).unwrap();
    assert_eq!((out.final_step, out.samples_consumed), (10, 40));
    assert_eq!(out.checkpoint.as_ref().unwrap().step, 10);

    let dp = f.spec("dp", "steps = 10\nbatch_size = 2", "");
    let outs = run_threads(&dp, 2, 1, None);
    for o in &outs {
        let o = o.as_ref().unwrap();
        assert_eq!((o.final_step, o.samples_consumed), (10, 40));
        // Every rank learns the commit that only rank 0 makes.
        assert_eq!(o.checkpoint.as_ref().unwrap().step, 10);
    }
    let (a, b) = (
        final_weights(&f.ckpt("single")),
        final_weights(&f.ckpt("dp")),
    );
    let d = max_diff(&a, &b);
    let m = moved(&f.model, &a);
    eprintln!("dp=2 vs one process: max diff {d:e}, weights moved {m:e}");
    assert!(d < TOL, "dp=2 differs from one process by {d}");
    assert!(m > 1e-3, "training moved the weights by only {m}");
}

#[test]
fn tensor_and_data_parallel_equal_one_process() {
    let f = fixture(24);
    let single = f.spec("single", "steps = 6\nbatch_size = 4", "");
    run_threads(&single, 1, 1, None).remove(0).unwrap();
    let grid = f.spec(
        "grid",
        "steps = 6\nbatch_size = 2",
        "[parallel]\ntp = 2\nmin_workers = 4\nmax_workers = 4",
    );
    for o in run_threads(&grid, 2, 2, None) {
        let o = o.unwrap();
        assert_eq!((o.final_step, o.samples_consumed), (6, 24));
    }
    let single = final_weights(&f.ckpt("single"));
    let d = max_diff(&single, &final_weights(&f.ckpt("grid")));
    let m = moved(&f.model, &single);
    eprintln!("2 x 2 vs one process: max diff {d:e}, weights moved {m:e}");
    assert!(d < TOL, "2 x 2 differs from one process by {d}");
    assert!(m > 1e-3, "training moved the weights by only {m}");
}

#[test]
fn accumulation_equals_a_larger_batch() {
    let f = fixture(16);
    run_threads(&f.spec("big", "steps = 6\nbatch_size = 4", ""), 1, 1, None)
        .remove(0)
        .unwrap();
    let acc = run_threads(
        &f.spec("acc", "steps = 6\nbatch_size = 2\ngrad_accum = 2", ""),
        1,
        1,
        None,
    )
    .remove(0)
    .unwrap();
    assert_eq!(acc.samples_consumed, 24);
    let d = max_diff(
        &final_weights(&f.ckpt("big")),
        &final_weights(&f.ckpt("acc")),
    );
    assert!(d < TOL, "grad_accum = 2 differs from a batch of 4 by {d}");
}

#[test]
fn resumes_at_another_data_parallel_size() {
    let f = fixture(24);
    let straight = f.spec("straight", "steps = 10\nbatch_size = 4", "");
    run_threads(&straight, 1, 1, None).remove(0).unwrap();

    // Two ranks of 2 samples, stopped after the step-5 checkpoint...
    let first = f.spec("resumed", "steps = 10\nbatch_size = 2", "");
    for o in run_threads(&first, 2, 1, Some(5)) {
        match o {
            Err(e @ TrainError::Aborted { step: 6 }) => assert!(e.retriable()),
            other => panic!("expected an abort before step 6, got {other:?}"),
        }
    }
    // ...then one rank of 4: the same global batch, the rest of the epoch re-sharded.
    let second = f.spec("resumed", "steps = 10\nbatch_size = 4", "");
    let out = run_threads(&second, 1, 1, None).remove(0).unwrap();
    assert_eq!(out.resumed_from, Some(5));
    assert_eq!((out.final_step, out.samples_consumed), (10, 40));
    let d = max_diff(
        &final_weights(&f.ckpt("straight")),
        &final_weights(&f.ckpt("resumed")),
    );
    assert!(
        d < TOL,
        "the resumed job differs from the straight one by {d}"
    );
}

#[test]
fn a_layout_that_does_not_match_the_spec_is_permanent() {
    let f = fixture(8);
    let spec = f.spec(
        "x",
        "steps = 2\nbatch_size = 2",
        "[parallel]\ntp = 2\nmin_workers = 2\nmax_workers = 2",
    );
    let err = run_threads(&spec, 2, 1, None).remove(0).unwrap_err();
    assert!(!err.retriable());
    assert!(err.to_string().contains("parallel.tp"), "{err}");
}
