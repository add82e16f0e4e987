//! The Rust model against transformers on the same weights: logits for one
//! and several images per sample (SAM at initialisation is InstructBLIP per
//! image), SAM's guidance with non-zero weights against a Python reference
//! built from transformers' modules, and the loss and its gradients against
//! PyTorch autograd.

mod common;

use samtrain_model::config::Trainable;
use samtrain_model::{trainable, LoadedModel};
use tch::Device;

/// Builds a tiny checkpoint and inputs with the reference, runs both models,
/// returns the largest logit difference over the real positions.
fn forward_case(variant: &str, guidance: &str, images: &str, seed: u32) -> f64 {
    let f = common::Fixture::new(common::Spec {
        variant,
        guidance,
        images,
        seed,
        ..Default::default()
    });
    let reference = f.reference("forward", &[]);
    let loaded = LoadedModel::load(&f.model, Device::Cpu, None).unwrap();
    let logits = tch::no_grad(|| loaded.model.forward(&common::inputs_from(&f.batch()))).unwrap();
    common::max_diff_where(&logits, &reference["logits"], &reference["valid"])
}

const TOLERANCE: f64 = 1e-4;

#[test]
fn one_image_matches_transformers_mha() {
    let d = forward_case("mha", "zero", "1", 11);
    assert!(d < TOLERANCE, "max |diff| {d}");
}

#[test]
fn one_image_matches_transformers_gqa() {
    let d = forward_case("gqa", "zero", "1", 12);
    assert!(d < TOLERANCE, "max |diff| {d}");
}

#[test]
fn several_images_match_per_image_instructblip() {
    // Sample 0 has 3 images, sample 1 has 2 and a padded slot.
    for variant in ["mha", "gqa"] {
        let d = forward_case(variant, "zero", "3,2", 13);
        assert!(d < TOLERANCE, "{variant}: max |diff| {d}");
    }
}

#[test]
fn guidance_matches_reference() {
    for (variant, images) in [("mha", "3,2"), ("gqa", "2,2"), ("gqa", "1")] {
        let d = forward_case(variant, "random", images, 14);
        assert!(d < TOLERANCE, "{variant} {images}: max |diff| {d}");
    }
}

/// Loss and gradients of the trainable tensors against PyTorch autograd.
fn gradient_case(variant: &str, all: bool) {
    let f = common::Fixture::new(common::Spec {
        variant,
        seed: 21,
        guidance: "random",
        images: "3,2",
        text_len: 10,
        qformer_len: 5,
        ..Default::default()
    });
    let scope = if all { "all" } else { "sam" };
    let reference = f.reference("loss-grad", &["--trainable", scope]);
    let loaded = LoadedModel::load(&f.model, Device::Cpu, None).unwrap();
    let mut options = loaded.model.config.samtrain.clone();
    options.trainable = Trainable {
        all,
        ..Trainable::default()
    };
    let params = trainable::apply(&loaded.vs, &options);
    let batch = f.batch();
    let losses = loaded
        .model
        .loss(&common::inputs_from(&batch), &batch["labels"], None)
        .unwrap();
    losses.total.backward();
    let loss_diff = (losses.total.double_value(&[]) - reference["loss"].double_value(&[0])).abs();
    assert!(loss_diff < 1e-5, "loss differs by {loss_diff}");

    let expected_names = if all { reference.len() - 1 } else { 6 };
    assert_eq!(params.len(), expected_names, "trainable tensors");
    for (name, p) in &params {
        let want = reference
            .get(name)
            .unwrap_or_else(|| panic!("reference has no gradient for {name}"));
        let got = p.grad();
        assert!(got.defined(), "{name} has no gradient");
        let scale = want.abs().max().double_value(&[]).max(1.0);
        let d = common::max_diff(&got, want);
        assert!(d < 1e-5 * scale, "{name}: max |diff| {d} (scale {scale})");
    }
}

#[test]
fn sam_gradients_match_autograd() {
    gradient_case("mha", false);
}

#[test]
fn all_gradients_match_autograd() {
    gradient_case("gqa", true);
}

#[test]
fn exchange_weights_change_the_output() {
    // The guidance test is only meaningful if guidance changes the logits.
    let f = common::Fixture::new(common::Spec {
        guidance: "random",
        images: "3,2",
        seed: 15,
        ..Default::default()
    });
    let guided = logits_with_guidance(&f, true);
    let plain = logits_with_guidance(&f, false);
    let d = common::max_diff(&guided, &plain);
    assert!(d > 1e-3, "guidance changed the logits by only {d}");
}

fn logits_with_guidance(f: &common::Fixture, guidance: bool) -> tch::Tensor {
    let mut config = samtrain_model::SamConfig::from_file(&f.model.join("config.json")).unwrap();
    config.samtrain.guidance = guidance;
    let loaded = LoadedModel::init(&config, Device::Cpu, None).unwrap();
    samtrain_model::weights::load(&loaded.vs, &f.model, None).unwrap();
    tch::no_grad(|| loaded.model.forward(&common::inputs_from(&f.batch()))).unwrap()
}
