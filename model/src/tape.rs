//! The backward pass in segments, for the two things libtorch's one-call
//! `backward` cannot do from Rust:
//!
//! - **Tensor parallelism.** Megatron's `f` all-reduces a gradient in the
//!   middle of backward, and a collective cannot run from Rust inside
//!   libtorch's autograd. The tape cuts the graph at each `f` and all-reduces
//!   the gradient that reaches the cut.
//! - **Activation checkpointing.** A block (a ViT, Q-Former or LLM layer) runs
//!   forward without keeping its graph; only its input and output are kept.
//!   In backward the tape runs the block again, this time with its graph, and
//!   back-propagates through it. tch has no `checkpoint` function; this is
//!   PyTorch's `torch.utils.checkpoint` written as a tape.
//!
//! The tape records, in forward order, where the graph is cut. `backward`
//! first runs libtorch's backward from the loss, which stops at the leaves of
//! the cuts; then it walks the record in reverse: each entry turns the
//! gradient that reached its leaf into gradients of what came before it.
//! Every segment of the graph is walked once, so the backward pass costs what
//! an uncut one does, plus the all-reduces and, for checkpointed blocks, one
//! more forward of each block.
//!
//! The rule that keeps a segment walked once: a tensor with a graph behind it
//! that feeds more than one checkpointed block (the Q-Former's image features,
//! its query embeddings) is first cut with [`GradTape::share`].

use samtrain_comm::Collective;
use tch::Tensor;

/// A block the tape can run again: its input, and the tape of its own
/// backward (for the tensor-parallel cuts inside it), to its output.
pub type Block<'a> = Box<dyn Fn(&Tensor, Option<&mut GradTape<'a>>) -> Tensor + 'a>;

enum CutKind {
    /// The gradient that reaches the leaf is complete on every rank.
    Whole,
    /// The input of a column-parallel branch: its gradient is a partial sum
    /// over the tensor-parallel ranks.
    Branch,
}

enum Entry<'a> {
    Cut {
        kind: CutKind,
        attached: Tensor,
        leaf: Tensor,
    },
    Recompute {
        input: Tensor,
        output: Tensor,
        block: Block<'a>,
    },
}

/// The record of one forward pass, for its segmented backward pass (see the
/// module docs). `'a` is the model the recorded blocks borrow.
#[derive(Default)]
pub struct GradTape<'a> {
    entries: Vec<Entry<'a>>,
    /// Replicated parameters whose gradient is a partial sum over the ranks.
    partial: Vec<Tensor>,
    checkpointing: bool,
}

impl<'a> GradTape<'a> {
    /// A tape that only cuts (tensor parallelism).
    pub fn new() -> Self {
        Self::default()
    }

    /// A tape that also checkpoints the blocks offered to [`Self::checkpoint`]
    /// when `on`.
    pub fn with_checkpointing(on: bool) -> Self {
        Self {
            checkpointing: on,
            ..Self::default()
        }
    }

    /// Cuts the residual stream; returns the leaf the forward pass goes on with.
    pub fn cut(&mut self, h: Tensor) -> Tensor {
        self.record(CutKind::Whole, h)
    }

    /// Cuts at Megatron's `f`, before a column-parallel branch.
    pub fn branch(&mut self, x: Tensor) -> Tensor {
        self.record(CutKind::Branch, x)
    }

    /// Cuts `x` when checkpointing, because more than one checkpointed block
    /// reads it: each block's recomputation back-propagates into its inputs,
    /// and a graph behind `x` must be walked once, not once per block.
    pub fn share(&mut self, x: Tensor) -> Tensor {
        if self.checkpointing {
            self.cut(x)
        } else {
            x
        }
    }

    /// Runs `block` on `x`. When checkpointing and `x` carries a gradient,
    /// the block runs without keeping its graph and is run again in
    /// backward; otherwise it runs as usual, on this tape.
    ///
    /// A block whose input carries no gradient keeps its graph even when its
    /// own weights train (a frozen ViT's first layer has nothing to recompute;
    /// a trainable one's embeddings make its input carry a gradient).
    pub fn checkpoint(
        &mut self,
        x: Tensor,
        block: impl Fn(&Tensor, Option<&mut GradTape<'a>>) -> Tensor + 'a,
    ) -> Tensor {
        if !self.checkpointing || !x.requires_grad() {
            return block(&x, Some(self));
        }
        let output = tch::no_grad(|| block(&x, None))
            .detach()
            .set_requires_grad(true);
        self.entries.push(Entry::Recompute {
            input: x,
            output: output.shallow_clone(),
            block: Box::new(block),
        });
        output
    }

    /// Marks a replicated parameter whose gradient each rank sees only in
    /// part; the backward pass all-reduces it (once, however often marked).
    pub fn reduce_grad_of(&mut self, param: &Tensor) {
        if param.requires_grad()
            && !self
                .partial
                .iter()
                .any(|p| p.data_ptr() == param.data_ptr())
        {
            self.partial.push(param.shallow_clone());
        }
    }

    fn record(&mut self, kind: CutKind, attached: Tensor) -> Tensor {
        if !attached.requires_grad() {
            return attached;
        }
        let leaf = attached.detach().set_requires_grad(true);
        self.entries.push(Entry::Cut {
            kind,
            attached,
            leaf: leaf.shallow_clone(),
        });
        leaf
    }

    /// Backward from `loss`, all-reducing branch gradients over `comm` (the
    /// tensor-parallel group, when there is one). Gradients accumulate into
    /// the parameters as libtorch's backward does.
    pub fn backward(
        self,
        loss: &Tensor,
        comm: Option<&dyn Collective>,
    ) -> samtrain_comm::Result<()> {
        // Gradient accumulation: the partial parameters may already hold the
        // (reduced) gradient of an earlier micro-batch; only what this pass
        // adds is a partial sum.
        let before: Vec<Option<Tensor>> = match comm {
            Some(_) => self
                .partial
                .iter()
                .map(|p| Some(p.grad()).filter(Tensor::defined).map(|g| g.copy()))
                .collect(),
            None => Vec::new(),
        };
        loss.backward();
        for entry in self.entries.into_iter().rev() {
            match entry {
                Entry::Cut {
                    kind,
                    attached,
                    leaf,
                } => {
                    let grad = leaf.grad();
                    if !grad.defined() {
                        continue;
                    }
                    let grad = match (kind, comm) {
                        (CutKind::Branch, Some(comm)) => comm.all_reduce_sum(&grad)?,
                        _ => grad,
                    };
                    propagate(&attached, &grad);
                }
                Entry::Recompute {
                    input,
                    output,
                    block,
                } => {
                    let grad = output.grad();
                    if !grad.defined() {
                        continue;
                    }
                    let input_leaf = input.detach().set_requires_grad(true);
                    let mut inner = GradTape::new();
                    let recomputed = block(&input_leaf, Some(&mut inner));
                    let surrogate = (recomputed * grad).sum(input.kind());
                    inner.backward(&surrogate, comm)?;
                    let input_grad = input_leaf.grad();
                    if input_grad.defined() {
                        propagate(&input, &input_grad);
                    }
                }
            }
        }
        if let Some(comm) = comm {
            for (p, before) in self.partial.iter().zip(before) {
                let mut grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let added = match &before {
                    Some(b) => &grad - b,
                    None => grad.shallow_clone(),
                };
                let summed = comm.all_reduce_sum(&added)?;
                tch::no_grad(|| match before {
                    Some(b) => grad.copy_(&(b + summed)),
                    None => grad.copy_(&summed),
                });
            }
        }
        Ok(())
    }
}

/// Back-propagates `grad`, the gradient of the loss with respect to
/// `attached`, into the graph behind `attached` (or into its own gradient,
/// when it is a leaf).
fn propagate(attached: &Tensor, grad: &Tensor) {
    if attached.requires_grad() {
        (attached * grad).sum(attached.kind()).backward();
    }
}

/// [`GradTape::checkpoint`] on the tape when there is one, else `block`
/// run plainly (inference, and training without a tape).
pub fn checkpoint<'a>(
    tape: &mut Option<&mut GradTape<'a>>,
    x: Tensor,
    block: impl Fn(&Tensor, Option<&mut GradTape<'a>>) -> Tensor + 'a,
) -> Tensor {
    match tape.as_deref_mut() {
        Some(t) => t.checkpoint(x, block),
        None => block(&x, None),
    }
}

/// [`GradTape::share`] on the tape when there is one.
pub fn share(tape: &mut Option<&mut GradTape<'_>>, x: Tensor) -> Tensor {
    match tape.as_deref_mut() {
        Some(t) => t.share(x),
        None => x,
    }
}
