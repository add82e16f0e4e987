//! Samples with different numbers of images and text lengths padded into one
//! batch of tensors laid out as the model's `SamInputs` (plus labels): real
//! images first then zero images, text padded on the right.

use tch::Tensor;

use super::image::Drawn;
use super::{PreprocessError, TextSample};
use crate::mmlink::RecordId;

/// The label that carries no loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One record preprocessed, not yet padded.
#[derive(Debug, Clone)]
pub struct Sample {
    pub id: RecordId,
    /// Each image as `3 * size * size` floats, channels first.
    pub images: Vec<Vec<f32>>,
    /// What augmentation drew for each image, when it ran.
    pub augmented: Vec<Option<Drawn>>,
    pub text: TextSample,
}

/// A padded batch. `B` samples, `N` the most images of any sample, `Tq` and
/// `T` the longest Q-Former and LLM texts.
#[derive(Debug)]
pub struct Batch {
    /// The samples' record ids, in batch order.
    pub ids: Vec<RecordId>,
    /// `[B, N, 3, H, W]` f32; padding images are zeros.
    pub pixel_values: Tensor,
    /// `[B, N]` i64, 1 for a real image.
    pub image_mask: Tensor,
    /// `[B, Tq]` i64, padded with the Q-Former's pad id.
    pub qformer_input_ids: Tensor,
    /// `[B, Tq]` i64.
    pub qformer_attention_mask: Tensor,
    /// `[B, T]` i64, padded on the right with the LLM's pad id.
    pub input_ids: Tensor,
    /// `[B, T]` i64.
    pub attention_mask: Tensor,
    /// `[B, T]` i64, [`IGNORE_INDEX`] on the prompt and the padding.
    pub labels: Tensor,
}

/// Right-pads rows to the longest; returns the ids and the mask, `[B, T]`.
fn pad_rows<'a>(
    rows: impl Iterator<Item = &'a [i64]> + Clone,
    pad: i64,
) -> Result<(Tensor, Tensor), PreprocessError> {
    let b = rows.clone().count();
    let t = rows.clone().map(<[i64]>::len).max().unwrap_or(0);
    let mut ids = vec![pad; b * t];
    let mut mask = vec![0i64; b * t];
    for (i, row) in rows.enumerate() {
        ids[i * t..i * t + row.len()].copy_from_slice(row);
        mask[i * t..i * t + row.len()].fill(1);
    }
    let shape = [b as i64, t as i64];
    Ok((
        Tensor::f_from_slice(&ids)?.f_view(shape)?,
        Tensor::f_from_slice(&mask)?.f_view(shape)?,
    ))
}

/// Pads `samples` into one [`Batch`]; `image_size` is the side of each image.
pub fn collate(
    samples: &[Sample],
    image_size: u32,
    pad_id: i64,
    qformer_pad_id: i64,
) -> Result<Batch, PreprocessError> {
    let b = samples.len();
    let n = samples.iter().map(|s| s.images.len()).max().unwrap_or(0);
    let side = image_size as usize;
    let per_image = 3 * side * side;
    if let Some(bad) = samples
        .iter()
        .find(|s| s.images.iter().any(|im| im.len() != per_image))
    {
        return Err(PreprocessError::Config {
            setting: "image.size",
            message: format!(
                "record {}: an image does not have 3 x {image_size} x {image_size} values",
                bad.id
            ),
        });
    }
    let mut pixels = vec![0f32; b * n * per_image];
    let mut image_mask = vec![0i64; b * n];
    for (i, sample) in samples.iter().enumerate() {
        for (j, image) in sample.images.iter().enumerate() {
            let at = (i * n + j) * per_image;
            pixels[at..at + per_image].copy_from_slice(image);
            image_mask[i * n + j] = 1;
        }
    }
    let (qformer_input_ids, qformer_attention_mask) = pad_rows(
        samples.iter().map(|s| s.text.qformer_input_ids.as_slice()),
        qformer_pad_id,
    )?;
    let (input_ids, attention_mask) =
        pad_rows(samples.iter().map(|s| s.text.input_ids.as_slice()), pad_id)?;
    let (labels, _) = pad_rows(
        samples.iter().map(|s| s.text.labels.as_slice()),
        IGNORE_INDEX,
    )?;
    let (bi, ni, si) = (b as i64, n as i64, side as i64);
    Ok(Batch {
        ids: samples.iter().map(|s| s.id.clone()).collect(),
        pixel_values: Tensor::f_from_slice(&pixels)?.f_view([bi, ni, 3, si, si])?,
        image_mask: Tensor::f_from_slice(&image_mask)?.f_view([bi, ni])?,
        qformer_input_ids,
        qformer_attention_mask,
        input_ids,
        attention_mask,
        labels,
    })
}
