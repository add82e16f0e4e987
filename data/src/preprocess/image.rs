//! One image as SAM's vision encoder takes it: RGB, `size` x `size` pixels,
//! channels first, normalised with the BLIP/CLIP mean and standard deviation.

use std::path::Path;

use image::{imageops::FilterType, DynamicImage, ImageReader};
use serde::{Deserialize, Serialize};

use super::PreprocessError;
use crate::mmlink::RecordId;

/// BLIP/CLIP per-channel mean (RGB), as LAVIS's `BlipImageBaseProcessor`.
pub const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// BLIP/CLIP per-channel standard deviation (RGB): 0.26862954, 0.26130258,
/// 0.27577711, written with the digits an f32 holds.
pub const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// How a non-square image becomes square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Shorter side to `size`, then the centre square: keeps the aspect.
    #[default]
    ShorterSideCrop,
    /// Both sides to `size`, as LAVIS's `blip2_image_eval` processor does
    /// (`Resize((size, size))`): distorts, but sees the whole image.
    Stretch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Side of the square model input; 224 for EVA-CLIP ViT-g/14.
    pub size: u32,
    #[serde(default)]
    pub resize: ResizeMode,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            size: 224,
            resize: ResizeMode::default(),
        }
    }
}

/// Decodes the file at `path` (format from its content, not its name) and
/// returns `3 * size * size` floats, channels first. `record` and `field`
/// only name the source in errors.
pub fn load(
    path: &Path,
    record: &RecordId,
    field: &str,
    config: &ImageConfig,
) -> Result<Vec<f32>, PreprocessError> {
    let image_error = |source: image::ImageError| PreprocessError::Image {
        record: record.clone(),
        field: field.to_string(),
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    let decoded = ImageReader::open(path)
        .map_err(|e| image_error(e.into()))?
        .with_guessed_format()
        .map_err(|e| image_error(e.into()))?
        .decode()
        .map_err(image_error)?;
    if decoded.width() == 0 || decoded.height() == 0 {
        return Err(PreprocessError::EmptyImage {
            record: record.clone(),
            field: field.to_string(),
            path: path.to_path_buf(),
            width: decoded.width(),
            height: decoded.height(),
        });
    }
    Ok(to_chw(&decoded, config))
}

/// Resizes (bicubic, Catmull–Rom), squares and normalises a decoded image
/// with at least one pixel; `3 * size * size` floats, channels first.
pub fn to_chw(image: &DynamicImage, config: &ImageConfig) -> Vec<f32> {
    let rgb = image.to_rgb8();
    let size = config.size;
    let (w, h) = rgb.dimensions();
    let square = match config.resize {
        ResizeMode::Stretch => image::imageops::resize(&rgb, size, size, FilterType::CatmullRom),
        ResizeMode::ShorterSideCrop => {
            // Round the longer side like torchvision's Resize(int), and never
            // below `size`, so the centre crop always fits.
            let scale = |long: u32, short: u32| {
                ((f64::from(long) * f64::from(size) / f64::from(short)).round() as u32).max(size)
            };
            let (rw, rh) = if w <= h {
                (size, scale(h, w))
            } else {
                (scale(w, h), size)
            };
            let resized = if (rw, rh) == (w, h) {
                rgb
            } else {
                image::imageops::resize(&rgb, rw, rh, FilterType::CatmullRom)
            };
            // Centre crop with torchvision's rounding of the offsets.
            let left = ((f64::from(rw - size)) / 2.0).round() as u32;
            let top = ((f64::from(rh - size)) / 2.0).round() as u32;
            image::imageops::crop_imm(&resized, left, top, size, size).to_image()
        }
    };
    let plane = (size * size) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, pixel) in square.pixels().enumerate() {
        for c in 0..3 {
            // As torchvision: ToTensor divides by 255 in f32, then Normalize.
            out[c * plane + i] = (f32::from(pixel[c]) / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}
