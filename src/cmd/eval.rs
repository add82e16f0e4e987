//! `samtrain eval`: SAM's evaluation protocol on a `pred.json` (ROUGE-L,
//! CIDEr-D, BLEU-4, equal to SAM's `evaluate_score.py`), writing
//! `eval.json` and `eval_score.json`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use samtrain_data::eval;

#[derive(Args)]
pub struct EvalArgs {
    /// A JSON list of {"sample_id", "pred_response", "gt_response"} records.
    #[arg(long)]
    pred: PathBuf,
    /// Folder for eval.json and eval_score.json [default: pred.json's folder, as SAM].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print eval.json's object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let out = args.out.unwrap_or_else(|| match args.pred.parent() {
        Some(dir) if dir != Path::new("") => dir.to_path_buf(),
        _ => PathBuf::from("."),
    });
    let evaluation = eval::run(&args.pred, &out)?;
    let summary = evaluation.summary;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("samples  {}", evaluation.samples.len());
        println!("ROUGE-L  {:.2}", summary.rouge);
        println!("CIDEr    {:.2}", summary.cider);
        println!("BLEU-4   {:.2}", summary.bleu4);
    }
    Ok(())
}
