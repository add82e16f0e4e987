//! `samtrain model ...` and the interim `samtrain demo`: create a model
//! folder, run it on tensors from a safetensors file, generate, inspect.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use samtrain_model::generation::{generate, GenerationConfig, PenaltyScope};
use samtrain_model::{trainable, weights, LoadedModel, SamConfig, SamInputs};
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Writes a randomly initialised model folder from a config.json.
    Init {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Overrides `samtrain.init_seed` of the config.
        #[arg(long)]
        seed: Option<i64>,
    },
    /// Runs the model on tensors read from a safetensors file and writes
    /// `logits` (float32, every position).
    Forward(RunArgs),
    /// Generates answers; writes `sequences` (int64, padded with -1) and `lengths`.
    Generate {
        #[command(flatten)]
        run: RunArgs,
        #[arg(long, default_value_t = 5)]
        num_beams: i64,
        #[arg(long, default_value_t = 256)]
        max_new_tokens: i64,
        #[arg(long, default_value_t = 1.5)]
        repetition_penalty: f64,
        #[arg(long, default_value_t = 1.0)]
        length_penalty: f64,
        /// `prompt`: penalise prompt ids too, as transformers' generate;
        /// `generated`: only generated tokens, as SAM's own code.
        #[arg(long, default_value = "prompt")]
        penalty_scope: String,
    },
    /// Prints parameter counts, total and trainable, per component.
    Inspect {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// A model folder, an input file and an output file.
#[derive(Args)]
pub struct RunArgs {
    #[arg(long)]
    model: PathBuf,
    /// Safetensors with `pixel_values` [B,N,3,H,W], `image_mask` [B,N]
    /// (optional), `qformer_input_ids`, `qformer_attention_mask` (optional),
    /// `input_ids`, `attention_mask` (optional).
    #[arg(long)]
    inputs: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl RunArgs {
    fn load(&self) -> Result<(LoadedModel, SamInputs)> {
        let device = parse_device(&self.device)?;
        let model = LoadedModel::load(&self.model, device, None)?;
        Ok((model, read_inputs(&self.inputs, device)?))
    }
}

pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Init { config, out, seed } => {
            let mut cfg = SamConfig::from_file(&config)?;
            if let Some(seed) = seed {
                cfg.samtrain.init_seed = seed;
            }
            let m = LoadedModel::init(&cfg, Device::Cpu, None)?;
            weights::save(&m.vs, &cfg, &out)?;
            tracing::info!(out = %out.display(), "model written");
            Ok(())
        }
        ModelCommand::Forward(run) => {
            let (m, inputs) = run.load()?;
            let logits = tch::no_grad(|| m.model.forward(&inputs))?;
            write_tensors(&run.out, &[("logits", logits.to_kind(Kind::Float))])
        }
        ModelCommand::Generate {
            run,
            num_beams,
            max_new_tokens,
            repetition_penalty,
            length_penalty,
            penalty_scope,
        } => {
            let penalty_scope = match penalty_scope.as_str() {
                "prompt" => PenaltyScope::Prompt,
                "generated" => PenaltyScope::Generated,
                other => bail!("--penalty-scope {other:?}: expected prompt or generated"),
            };
            let (m, inputs) = run.load()?;
            let config = GenerationConfig {
                max_new_tokens,
                num_beams,
                repetition_penalty,
                length_penalty,
                eos_token_ids: Vec::new(),
                penalty_scope,
            };
            let answers = tch::no_grad(|| generate(&m.model, &inputs, &config))?;
            let (sequences, lengths) = pad_answers(&answers, max_new_tokens);
            write_tensors(&run.out, &[("sequences", sequences), ("lengths", lengths)])
        }
        ModelCommand::Inspect { model, json } => inspect(&model, json),
    }
}

fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::cuda_if_available()),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Device::Cuda(i)),
            _ => bail!("unknown device {other:?}: expected cpu, cuda or cuda:N"),
        },
    }
}

/// Reads the named input tensors of `samtrain model forward`.
fn read_inputs(path: &Path, device: Device) -> Result<SamInputs> {
    let mut tensors: HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .with_context(|| format!("reading inputs {}", path.display()))?
        .into_iter()
        .collect();
    let mut take = |name: &str, kind: Kind, required: bool| -> Result<Option<Tensor>> {
        match tensors.remove(name) {
            Some(t) => Ok(Some(t.to_kind(kind).to_device(device))),
            None if required => bail!("{}: tensor {name:?} is missing", path.display()),
            None => Ok(None),
        }
    };
    let required = |t: Option<Tensor>| t.expect("required tensors are present");
    Ok(SamInputs {
        pixel_values: required(take("pixel_values", Kind::Float, true)?),
        image_mask: take("image_mask", Kind::Int64, false)?,
        qformer_input_ids: required(take("qformer_input_ids", Kind::Int64, true)?),
        qformer_attention_mask: take("qformer_attention_mask", Kind::Int64, false)?,
        input_ids: required(take("input_ids", Kind::Int64, true)?),
        attention_mask: take("attention_mask", Kind::Int64, false)?,
    })
}

fn write_tensors(path: &Path, tensors: &[(&str, Tensor)]) -> Result<()> {
    let cpu: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (*n, t.to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&cpu, path).with_context(|| format!("writing {}", path.display()))
}

/// `[B, max]` int64 padded with -1, and the lengths.
fn pad_answers(answers: &[Vec<i64>], max: i64) -> (Tensor, Tensor) {
    let mut flat = Vec::with_capacity(answers.len() * max as usize);
    for a in answers {
        flat.extend(a.iter().copied());
        flat.extend(std::iter::repeat_n(-1, max as usize - a.len()));
    }
    let lengths: Vec<i64> = answers.iter().map(|a| a.len() as i64).collect();
    (
        Tensor::from_slice(&flat).view([answers.len() as i64, max]),
        Tensor::from_slice(&lengths),
    )
}

fn inspect(dir: &Path, json: bool) -> Result<()> {
    let m = LoadedModel::load(dir, Device::Cpu, None)?;
    let mut parts: Vec<(String, i64, i64)> = Vec::new();
    for (name, t) in m.vs.variables() {
        let part = component(&name);
        let n = t.numel() as i64;
        let trained = if t.requires_grad() { n } else { 0 };
        match parts.iter_mut().find(|p| p.0 == part) {
            Some(p) => {
                p.1 += n;
                p.2 += trained;
            }
            None => parts.push((part, n, trained)),
        }
    }
    parts.sort();
    let trainable = trainable::apply(&m.vs, &m.model.config.samtrain);
    let total: i64 = parts.iter().map(|p| p.1).sum();
    if json {
        let rows: Vec<_> = parts
            .iter()
            .map(|(c, n, t)| serde_json::json!({"component": c, "parameters": n, "trainable": t}))
            .collect();
        let out = serde_json::json!({
            "parameters": total,
            "trainable": trainable::count(&trainable),
            "components": rows,
        });
        println!("{out}");
    } else {
        println!(
            "{:<24} {:>14} {:>14}",
            "component", "parameters", "trainable"
        );
        for (c, n, t) in &parts {
            println!("{c:<24} {n:>14} {t:>14}");
        }
        println!(
            "{:<24} {:>14} {:>14}",
            "total",
            total,
            trainable::count(&trainable)
        );
    }
    Ok(())
}

/// The component a tensor belongs to, for `inspect`.
fn component(name: &str) -> String {
    if name.contains(".lora_") {
        return "lora".into();
    }
    let mut it = name.split('.');
    match it.next() {
        Some("sam") => format!("sam.{}", it.next().unwrap_or("")),
        Some(first) => first.to_string(),
        None => String::new(),
    }
}

#[derive(Args)]
pub struct DemoArgs {
    /// Training steps.
    #[arg(long, default_value_t = 60)]
    steps: i64,
    /// Where the trained model folder goes.
    #[arg(long, default_value = "target/demo/model")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

/// A small SAM trained from scratch on a fixed synthetic batch (each sample's
/// answer is determined by its images), to show the whole model learning.
pub fn demo(args: DemoArgs) -> Result<()> {
    let config: SamConfig = serde_json::from_str(DEMO_CONFIG).context("built-in demo config")?;
    let mut config = config;
    config.samtrain.init_seed = args.seed;
    let m = LoadedModel::init(&config, Device::Cpu, None)?;
    let trainable = trainable::apply(&m.vs, &config.samtrain);
    println!(
        "samtrain demo: SAM with {} parameters ({} trainable)",
        m.vs.variables()
            .values()
            .map(|t| t.numel() as i64)
            .sum::<i64>(),
        trainable::count(&trainable)
    );
    let (inputs, labels) = demo_batch(&config, args.seed);
    let mut opt = tch::nn::AdamW::default().build(&m.vs, 3e-3)?;
    let start = Instant::now();
    let mut first = None;
    let mut last = 0.0;
    for step in 1..=args.steps {
        let losses = m.model.loss(&inputs, &labels, None, None)?;
        opt.zero_grad();
        losses.total.backward();
        opt.step();
        last = losses.lm.double_value(&[]);
        first.get_or_insert(last);
        if step % 10 == 0 || step == 1 {
            println!(
                "step {step:>4}  loss {last:.4}  ({:.1} s)",
                start.elapsed().as_secs_f64()
            );
        }
    }
    let first = first.unwrap_or(last);
    weights::save(&m.vs, &config, &args.out)?;
    let prompt = SamInputs {
        input_ids: inputs.input_ids.narrow(1, 0, 1),
        attention_mask: None,
        ..inputs
    };
    let answers = tch::no_grad(|| {
        generate(
            &m.model,
            &prompt,
            &GenerationConfig {
                max_new_tokens: 6,
                num_beams: 5,
                ..GenerationConfig::default()
            },
        )
    })?;
    let expected: Vec<Vec<i64>> = (0..labels.size()[0])
        .map(|b| Vec::<i64>::try_from(labels.get(b).narrow(0, 1, 4)).unwrap_or_default())
        .collect();
    let correct = answers
        .iter()
        .zip(&expected)
        .filter(|(a, e)| a.starts_with(e))
        .count();
    println!(
        "loss {first:.4} -> {last:.4}; beam search reproduces {correct}/{} answers",
        expected.len()
    );
    println!("model folder: {}", args.out.display());
    Ok(())
}

/// Random images; the answer tokens are a function of each sample's mean
/// pixel per image, so the model must read every image to answer.
fn demo_batch(config: &SamConfig, seed: i64) -> (SamInputs, Tensor) {
    tch::manual_seed(seed + 1);
    let (b, n, s) = (8, 3, config.vision_config.image_size);
    let pixel_values = Tensor::randn([b, n, 3, s, s], (Kind::Float, Device::Cpu));
    let vocab = config.text_config.vocab_size;
    // Answer token k of sample i: derived from the sign pattern of its images.
    let signs = pixel_values
        .mean_dim(&[2i64, 3, 4][..], false, Kind::Float)
        .gt(0.0)
        .to_kind(Kind::Int64);
    let code = (signs.select(1, 0) + signs.select(1, 1) * 2 + signs.select(1, 2) * 4).unsqueeze(1);
    let answer = (code * 7 + Tensor::arange(4, (Kind::Int64, Device::Cpu)).unsqueeze(0) * 3)
        .remainder(vocab - 10)
        + 10;
    let prompt = Tensor::full([b, 1], 5, (Kind::Int64, Device::Cpu));
    let eos = Tensor::full([b, 1], 2, (Kind::Int64, Device::Cpu));
    let input_ids = Tensor::cat(&[&prompt, &answer, &eos], 1);
    let labels = input_ids.copy();
    let _ = labels.narrow(1, 0, 1).fill_(-100);
    let qformer_input_ids = Tensor::full([b, 2], 3, (Kind::Int64, Device::Cpu));
    (
        SamInputs {
            pixel_values,
            image_mask: None,
            qformer_input_ids,
            qformer_attention_mask: None,
            input_ids,
            attention_mask: None,
        },
        labels,
    )
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
