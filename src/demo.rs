//! `samtrain demo`: a small SAM trained from scratch on the CPU, end to end
//! through the model: batches of several images per sample, the LM loss,
//! AdamW, a saved model folder, and beam search on held-out samples.
//!
//! The task needs every image: each image is lighter or darker than average,
//! and the answer (four tokens) encodes the pattern across the sample's
//! three images. Fresh images every step, so the model must learn the rule,
//! and held-out samples measure it against the untrained model.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use samtrain_model::generation::{generate, GenerationConfig};
use samtrain_model::{trainable, weights, LoadedModel, SamConfig, SamInputs, SamModel};
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor};

#[derive(Args)]
pub struct DemoArgs {
    /// Training steps.
    #[arg(long, default_value_t = 300)]
    steps: i64,
    /// Samples per step.
    #[arg(long, default_value_t = 16)]
    batch: i64,
    /// Where the trained model folder goes.
    #[arg(long, default_value = "target/demo/model")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

const IMAGES: i64 = 3;
const ANSWER: i64 = 4;
const PROMPT_TOKEN: i64 = 5;
const EOS: i64 = 2;
const HELD_OUT: i64 = 64;

pub fn run(args: DemoArgs) -> Result<()> {
    let mut config: SamConfig =
        serde_json::from_str(DEMO_CONFIG).context("built-in demo config")?;
    config.samtrain.init_seed = args.seed;
    let m = LoadedModel::init(&config, Device::Cpu, None)?;
    let trainable = trainable::apply(&m.vs, &config.samtrain);
    println!(
        "samtrain demo: SAM with {} parameters, all trainable; {IMAGES} images per sample",
        trainable::count(&trainable)
    );
    tch::manual_seed(args.seed + 1_000);
    let (held_out, held_out_answers) = batch(&config, HELD_OUT);
    let untrained = accuracy(&m.model, &held_out, &held_out_answers)?;

    let mut opt = tch::nn::AdamW::default().build(&m.vs, 2e-3)?;
    let start = Instant::now();
    tch::manual_seed(args.seed);
    let mut losses = Vec::new();
    for step in 1..=args.steps {
        let (inputs, labels) = batch(&config, args.batch);
        let loss = m.model.loss(&inputs, &labels, None, None)?;
        opt.zero_grad();
        loss.total.backward();
        opt.step();
        losses.push(loss.lm.double_value(&[]));
        if step == 1 || step % 25 == 0 || step == args.steps {
            let recent = &losses[losses.len().saturating_sub(25)..];
            println!(
                "step {step:>4}  loss {:.4}  ({:.1} s)",
                recent.iter().sum::<f64>() / recent.len() as f64,
                start.elapsed().as_secs_f64()
            );
        }
    }
    weights::save(&m.vs, &config, &args.out)?;
    let trained = accuracy(&m.model, &held_out, &held_out_answers)?;
    println!(
        "held-out exact answers (beam 5): untrained {:.1}%, trained {:.1}%",
        100.0 * untrained,
        100.0 * trained
    );
    println!("model folder: {}", args.out.display());
    Ok(())
}

/// Samples with fresh images: the inputs (prompt and answer) and the labels.
fn batch(config: &SamConfig, b: i64) -> (SamInputs, Tensor) {
    let s = config.vision_config.image_size;
    let cpu = (Kind::Float, Device::Cpu);
    let bits = Tensor::randint(2, [b, IMAGES], (Kind::Int64, Device::Cpu));
    let offset = (bits.to_kind(Kind::Float) - 0.5).view([b, IMAGES, 1, 1, 1]);
    let pixel_values = Tensor::randn([b, IMAGES, 3, s, s], cpu) + offset;
    let code = (bits.select(1, 0) + bits.select(1, 1) * 2 + bits.select(1, 2) * 4).unsqueeze(1);
    let vocab = config.text_config.vocab_size;
    let answer = (code * 7 + Tensor::arange(ANSWER, (Kind::Int64, Device::Cpu)).unsqueeze(0) * 3)
        .remainder(vocab - 10)
        + 10;
    let prompt = Tensor::full([b, 1], PROMPT_TOKEN, (Kind::Int64, Device::Cpu));
    let eos = Tensor::full([b, 1], EOS, (Kind::Int64, Device::Cpu));
    let input_ids = Tensor::cat(&[&prompt, &answer, &eos], 1);
    let labels = input_ids.copy();
    let _ = labels.narrow(1, 0, 1).fill_(-100);
    let inputs = SamInputs {
        pixel_values,
        image_mask: None,
        qformer_input_ids: Tensor::full([b, 2], 3, (Kind::Int64, Device::Cpu)),
        qformer_attention_mask: None,
        input_ids,
        attention_mask: None,
    };
    (inputs, labels)
}

/// Share of samples whose beam-search answer starts with the right tokens.
fn accuracy(model: &SamModel, inputs: &SamInputs, answers: &Tensor) -> Result<f64> {
    let prompt = SamInputs {
        pixel_values: inputs.pixel_values.shallow_clone(),
        image_mask: None,
        qformer_input_ids: inputs.qformer_input_ids.shallow_clone(),
        qformer_attention_mask: None,
        input_ids: inputs.input_ids.narrow(1, 0, 1),
        attention_mask: None,
    };
    let generated = tch::no_grad(|| {
        generate(
            model,
            &prompt,
            &GenerationConfig {
                max_new_tokens: ANSWER + 1,
                num_beams: 5,
                ..GenerationConfig::default()
            },
        )
    })?;
    let expected = Vec::<Vec<i64>>::try_from(answers.narrow(1, 1, ANSWER))?;
    let correct = generated
        .iter()
        .zip(&expected)
        .filter(|(g, e)| g.starts_with(e))
        .count();
    Ok(correct as f64 / expected.len() as f64)
}

const DEMO_CONFIG: &str = r#"{
  "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
  "qformer_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "encoder_hidden_size": 64, "vocab_size": 64,
                     "max_position_embeddings": 64},
  "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96,
                  "max_position_embeddings": 256},
  "num_query_tokens": 4,
  "samtrain": {"trainable": {"all": true}}
}"#;
