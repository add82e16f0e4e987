//! samtrain's API: the job spec users submit ([`spec`]) and the gRPC
//! services between the command line, the coordinator and the workers
//! ([`v1`], generated from `proto/samtrain.proto`).

pub mod spec;

/// The `samtrain.v1` gRPC package: messages, `jobs_client`/`jobs_server`
/// and `workers_client`/`workers_server`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("samtrain.v1");
}

/// A committed checkpoint: its step and the URL of its folder.
pub use v1::Checkpoint;
/// SAM's evaluation scores (ROUGE-L, CIDEr, BLEU-4).
pub use v1::Scores;

impl Scores {
    /// `bleu4 B, cider C, rouge R` with `decimals` digits, for people.
    pub fn describe(&self, decimals: usize) -> String {
        format!(
            "bleu4 {:.decimals$}, cider {:.decimals$}, rouge {:.decimals$}",
            self.bleu4, self.cider, self.rouge
        )
    }
}
