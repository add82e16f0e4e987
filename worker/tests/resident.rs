//! A worker keeps its model loaded between generations of a job: a restart
//! re-forms the groups, rebinds tensor parallelism and restores only the
//! trainable tensors, and ends where a cold restart (or no restart) ends. A
//! changed model folder is loaded again.

mod common;

use common::{final_weights, fixture, max_diff, resident_models, run_threads, run_threads_with};
use samtrain_model::{rng, weights, LoadedModel, SamConfig};
use samtrain_worker::TrainError;
use tch::Device;

const TOL: f64 = 1e-5;

fn expect_abort(outcomes: Vec<Result<samtrain_worker::TrainOutcome, TrainError>>, step: u64) {
    for o in outcomes {
        match o {
            Err(TrainError::Aborted { step: s }) if s == step => {}
            other => panic!("expected an abort before step {step}, got {other:?}"),
        }
    }
}

#[test]
fn a_restart_under_tensor_parallelism_reuses_the_resident_models() {
    let f = fixture(24);
    let parallel = "[parallel]\ntp = 2\nmin_workers = 4\nmax_workers = 4";
    let straight = f.spec("straight", "steps = 8\nbatch_size = 2", parallel);
    run_threads(&straight, 2, 2, None);

    let models = resident_models(4);
    let restarted = f.spec("restarted", "steps = 8\nbatch_size = 2", parallel);
    // Stopped after the step-5 checkpoint, then a new generation.
    expect_abort(run_threads_with(&restarted, 2, 2, Some(5), &models), 6);
    for o in run_threads_with(&restarted, 2, 2, None, &models) {
        assert_eq!(o.unwrap().resumed_from, Some(5));
    }
    for m in &models {
        assert_eq!(m.loads(), 1, "each rank read the model folder once");
    }
    let d = max_diff(
        &final_weights(&f.ckpt("straight")),
        &final_weights(&f.ckpt("restarted")),
    );
    assert!(d < TOL, "the restart on resident models differs by {d}");
}

#[test]
fn a_restart_before_any_checkpoint_starts_from_the_folders_values() {
    let f = fixture(16);
    let straight = f.spec("straight", "steps = 6\nbatch_size = 4", "");
    run_threads(&straight, 1, 1, None).remove(0).unwrap();

    let models = resident_models(1);
    let restarted = f.spec("restarted", "steps = 6\nbatch_size = 4", "");
    // Three steps trained the resident tensors, and nothing was committed.
    expect_abort(run_threads_with(&restarted, 1, 1, Some(3), &models), 4);
    let out = run_threads_with(&restarted, 1, 1, None, &models)
        .remove(0)
        .unwrap();
    assert_eq!(out.resumed_from, None);
    assert_eq!(models[0].loads(), 1);
    let d = max_diff(
        &final_weights(&f.ckpt("straight")),
        &final_weights(&f.ckpt("restarted")),
    );
    assert!(d < TOL, "trainable tensors were not reset: differs by {d}");
}

#[test]
fn a_changed_model_folder_is_loaded_again() {
    let f = fixture(8);
    let spec = f.spec("a", "steps = 2\nbatch_size = 4", "");
    let models = resident_models(1);
    run_threads_with(&spec, 1, 1, None, &models)
        .remove(0)
        .unwrap();
    run_threads_with(
        &f.spec("b", "steps = 2\nbatch_size = 4", ""),
        1,
        1,
        None,
        &models,
    )
    .remove(0)
    .unwrap();
    assert_eq!(models[0].loads(), 1, "the same folder is not read twice");

    // New weights in the same folder, same names and shapes.
    let config = SamConfig::from_file(&f.model.join("config.json")).unwrap();
    let m = LoadedModel::load(&f.model, Device::Cpu, None).unwrap();
    tch::no_grad(|| {
        for (name, t) in m.vs.variables() {
            let values = rng::normal(rng::derive_named(12, &name), &t.size(), t.device());
            t.shallow_clone().copy_(&(values * 0.02));
        }
    });
    weights::save(&m.vs, &config, &f.model).unwrap();
    run_threads_with(
        &f.spec("c", "steps = 2\nbatch_size = 4", ""),
        1,
        1,
        None,
        &models,
    )
    .remove(0)
    .unwrap();
    assert_eq!(models[0].loads(), 2, "a changed folder is read again");
}
