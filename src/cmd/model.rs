//! `samtrain model ...`: create a model folder, run it on tensors from a
//! safetensors file, generate, inspect.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Subcommand};
use samtrain_model::generation::{generate, GenerationConfig, PenaltyScope};
use samtrain_model::plan::{self, PlanInput};
use samtrain_model::{weights, LoadedModel, SamConfig, SamInputs};
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
    /// Prints, per tensor-parallel rank, the memory a training job needs:
    /// frozen weights, trainable weights with gradients and AdamW, and an
    /// activation estimate; from the config alone, nothing is allocated.
    Plan(PlanArgs),
    /// Prints parameter counts, total and trainable, per component.
    Inspect {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct PlanArgs {
    /// A model's config.json (or the model folder holding it).
    #[arg(long)]
    config: PathBuf,
    /// Tensor-parallel degree.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..=64))]
    tp: i64,
    /// Samples per rank and step.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..=4096))]
    batch: i64,
    /// Images per sample.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(i64).range(1..=64))]
    images: i64,
    /// Text tokens per sample (instruction plus answer).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(i64).range(1..=65536))]
    text_len: i64,
    /// The frozen weights' dtype: fp32, bf16 or fp16.
    #[arg(long, default_value = "bf16")]
    dtype: samtrain_proto::spec::Dtype,
    /// Plan for `[training] activation_checkpointing = true`.
    #[arg(long)]
    activation_checkpointing: bool,
    #[arg(long)]
    json: bool,
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
        ModelCommand::Plan(args) => print_plan(&args),
        ModelCommand::Inspect { model, json } => inspect(&model, json),
    }
}

fn print_plan(args: &PlanArgs) -> Result<()> {
    let path = if args.config.is_dir() {
        args.config.join(weights::CONFIG_FILE)
    } else {
        args.config.clone()
    };
    let config = SamConfig::from_file(&path)?;
    let t = &config.text_config;
    if t.num_attention_heads % args.tp != 0 || t.intermediate_size % args.tp != 0 {
        bail!(
            "--tp {} must divide the decoder's {} heads and intermediate size {}",
            args.tp,
            t.num_attention_heads,
            t.intermediate_size
        );
    }
    let input = PlanInput {
        tp: args.tp,
        batch: args.batch,
        images: args.images,
        text_len: args.text_len,
        dtype_bytes: args.dtype.bytes(),
        activation_checkpointing: args.activation_checkpointing,
    };
    let p = plan::plan(&config, &input);
    if args.json {
        let out = serde_json::json!({
            "tp": args.tp,
            "dtype": args.dtype.name(),
            "activation_checkpointing": args.activation_checkpointing,
            "frozen_params": p.frozen_params,
            "trainable_params": p.trainable_params,
            "frozen_bytes": p.frozen_bytes,
            "trainable_bytes": p.trainable_bytes,
            "activation_bytes": p.activation_bytes,
            "total_bytes": p.total(),
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "{} ({} frozen parameters per rank, {} trainable), dtype {}, tp {}, batch {} x {} images, {} text tokens{}",
        path.display(),
        p.frozen_params,
        p.trainable_params,
        args.dtype.name(),
        args.tp,
        args.batch,
        args.images,
        args.text_len,
        if args.activation_checkpointing {
            ", activation checkpointing"
        } else {
            ""
        }
    );
    println!(
        "{:<6} {:>16} {:>26} {:>18} {:>12}",
        "rank", "frozen weights", "trainable + grads + AdamW", "activations (est.)", "total"
    );
    for rank in 0..args.tp {
        println!(
            "{rank:<6} {:>16} {:>26} {:>18} {:>12}",
            plan::gib(p.frozen_bytes),
            plan::gib(p.trainable_bytes),
            plan::gib(p.activation_bytes),
            plan::gib(p.total())
        );
    }
    Ok(())
}

fn parse_device(name: &str) -> Result<Device> {
    let index = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => i,
            _ => bail!("unknown device {other:?}: expected cpu, cuda or cuda:N"),
        },
    };
    let gpus = samtrain_torchext::cuda::require().with_context(|| format!("--device {name}"))?;
    ensure!(
        (index as i64) < gpus,
        "--device {name}: libtorch sees {gpus} GPU(s), cuda:0 to cuda:{}",
        gpus - 1
    );
    Ok(Device::Cuda(index))
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
        dropout: None,
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
    // Loading applied the policy already: requires_grad is the trainable set.
    let total: i64 = parts.iter().map(|p| p.1).sum();
    let trained: i64 = parts.iter().map(|p| p.2).sum();
    if json {
        let rows: Vec<_> = parts
            .iter()
            .map(|(c, n, t)| serde_json::json!({"component": c, "parameters": n, "trainable": t}))
            .collect();
        let out = serde_json::json!({
            "parameters": total,
            "trainable": trained,
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
        println!("{:<24} {:>14} {:>14}", "total", total, trained);
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
