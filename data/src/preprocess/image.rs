//! One image as SAM's vision encoder takes it: RGB, `size` x `size` pixels,
//! channels first, normalised with the BLIP/CLIP mean and standard deviation.
//!
//! In evaluation SAM stretches the image to `size` x `size` (LAVIS's
//! `blip_image_eval`: `Resize((size, size))`, bicubic); in training it takes
//! a random crop of 50-100% of the area at an aspect ratio between 3/4 and
//! 4/3, resizes it to `size` x `size` and flips it horizontally half the time
//! (`blip2_image_train`: `RandomResizedCrop` + `RandomHorizontalFlip`, with
//! torchvision's sampling of the crop). samtrain draws the crop and the flip
//! from a seed of (job seed, epoch, sample, image), never from a shared
//! generator, so a resumed job sees the same pixels it would have seen.

use std::path::Path;

use image::{imageops::FilterType, DynamicImage};

use crate::limits::{self, DecodeError, InputLimits};
use serde::{Deserialize, Serialize};

use super::PreprocessError;
use crate::mmlink::RecordId;
use crate::rng::SplitMix64;

/// BLIP/CLIP per-channel mean (RGB), as LAVIS's `BlipImageBaseProcessor`.
pub const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// BLIP/CLIP per-channel standard deviation (RGB): 0.26862954, 0.26130258,
/// 0.27577711, written with the digits an f32 holds.
pub const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// How a non-square image becomes square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Both sides to `size`, as SAM's evaluation processor does (LAVIS's
    /// `blip_image_eval`, `Resize((size, size))`): distorts, but sees the
    /// whole image.
    #[default]
    Stretch,
    /// Shorter side to `size`, then the centre square: keeps the aspect.
    ShorterSideCrop,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Side of the square model input; 224 for EVA-CLIP ViT-g/14.
    pub size: u32,
    /// How an image is squared without augmentation (evaluation, and
    /// training when `augment` is `None`).
    #[serde(default)]
    pub resize: ResizeMode,
    /// Training's random crop and flip; `None` trains on the evaluation
    /// transform.
    #[serde(default)]
    pub augment: Option<Augment>,
    /// Images with more pixels are refused from their header
    /// (`[data] max_image_pixels`).
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
}

fn default_max_pixels() -> u64 {
    InputLimits::default().max_image_pixels
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            size: 224,
            resize: ResizeMode::default(),
            augment: None,
            max_pixels: default_max_pixels(),
        }
    }
}

/// SAM's training augmentation: a random resized crop whose area is
/// `min_scale..max_scale` of the image's, then a horizontal flip with
/// probability 1/2.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Augment {
    pub min_scale: f64,
    pub max_scale: f64,
    /// The job's seed: each draw mixes it with the epoch, sample and image.
    pub seed: u64,
}

impl Augment {
    /// SAM's settings (`min_scale` 0.5, `max_scale` 1.0).
    pub fn sam(seed: u64) -> Self {
        Augment {
            min_scale: 0.5,
            max_scale: 1.0,
            seed,
        }
    }

    /// The generator of one image of one visit of a sample.
    fn draws(&self, draw: Draw) -> SplitMix64 {
        let mut mix = SplitMix64::new(self.seed);
        let mut z = mix.next_u64();
        for part in [draw.epoch, draw.sample, draw.image] {
            z = SplitMix64::new(z ^ part.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64();
        }
        SplitMix64::new(z)
    }
}

/// Which visit of which image an augmentation draws for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draw {
    pub epoch: u64,
    /// The sample's index in the dataset.
    pub sample: u64,
    /// The image's position in the sample.
    pub image: u64,
}

/// A crop: left, top, width, height, in pixels of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crop {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
}

/// What augmentation does to one image: its crop and whether it is flipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drawn {
    pub crop: Crop,
    pub flip: bool,
}

/// A uniform float in `[0, 1)` from 53 bits.
fn unit(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// torchvision's `RandomResizedCrop.get_params` for a `width` x `height`
/// image, then `RandomHorizontalFlip`'s coin: ten tries at a crop of
/// random area and log-uniform aspect ratio in `[3/4, 4/3]` that fits,
/// else the centre crop with the ratio clamped into that range.
pub fn draw(augment: &Augment, width: u32, height: u32, draw: Draw) -> Drawn {
    let mut rng = augment.draws(draw);
    let (w, h) = (f64::from(width), f64::from(height));
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    let mut crop = None;
    for _ in 0..10 {
        let area =
            w * h * (augment.min_scale + unit(&mut rng) * (augment.max_scale - augment.min_scale));
        let ratio = (lo + unit(&mut rng) * (hi - lo)).exp();
        let cw = (area * ratio).sqrt().round();
        let ch = (area / ratio).sqrt().round();
        if cw > 0.0 && cw <= w && ch > 0.0 && ch <= h {
            let (cw, ch) = (cw as u32, ch as u32);
            let top = rng.below(u64::from(height - ch) + 1) as u32;
            let left = rng.below(u64::from(width - cw) + 1) as u32;
            crop = Some(Crop {
                left,
                top,
                width: cw,
                height: ch,
            });
            break;
        }
    }
    let crop = crop.unwrap_or_else(|| {
        let ratio = w / h;
        let (cw, ch) = if ratio < 3.0 / 4.0 {
            (width, (w / (3.0 / 4.0)).round() as u32)
        } else if ratio > 4.0 / 3.0 {
            ((h * (4.0 / 3.0)).round() as u32, height)
        } else {
            (width, height)
        };
        let (cw, ch) = (cw.min(width), ch.min(height));
        Crop {
            left: (width - cw) / 2,
            top: (height - ch) / 2,
            width: cw,
            height: ch,
        }
    });
    Drawn {
        crop,
        flip: unit(&mut rng) < 0.5,
    }
}

/// Decodes the file at `path` (format from its content, not its name) and
/// returns `3 * size * size` floats, channels first. `record` and `field`
/// only name the source in errors.
/// `visit` is set in training: with `config.augment` it selects the image's
/// crop and flip, which are returned beside the pixels.
pub fn load(
    path: &Path,
    record: &RecordId,
    field: &str,
    config: &ImageConfig,
    visit: Option<Draw>,
) -> Result<(Vec<f32>, Option<Drawn>), PreprocessError> {
    let image_error = |source: image::ImageError| PreprocessError::Image {
        record: record.clone(),
        field: field.to_string(),
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    let bytes = std::fs::read(path).map_err(|e| image_error(e.into()))?;
    let decoded = limits::decode(&bytes, config.max_pixels).map_err(|e| match e {
        DecodeError::Image(e) => image_error(e),
        DecodeError::TooLarge { .. } => PreprocessError::ImageTooLarge {
            record: record.clone(),
            field: field.to_string(),
            path: path.to_path_buf(),
            message: e.to_string(),
        },
    })?;
    if decoded.width() == 0 || decoded.height() == 0 {
        return Err(PreprocessError::EmptyImage {
            record: record.clone(),
            field: field.to_string(),
            path: path.to_path_buf(),
            width: decoded.width(),
            height: decoded.height(),
        });
    }
    match (config.augment, visit) {
        (Some(augment), Some(visit)) => {
            let drawn = draw(&augment, decoded.width(), decoded.height(), visit);
            Ok((augmented_chw(&decoded, config.size, drawn), Some(drawn)))
        }
        _ => Ok((to_chw(&decoded, config), None)),
    }
}

/// The crop of `drawn`, resized (bicubic) to `size` x `size`, flipped when
/// drawn so, and normalised.
pub fn augmented_chw(image: &DynamicImage, size: u32, drawn: Drawn) -> Vec<f32> {
    let rgb = image.to_rgb8();
    let Crop {
        left,
        top,
        width,
        height,
    } = drawn.crop;
    let crop = image::imageops::crop_imm(&rgb, left, top, width, height).to_image();
    let mut square = image::imageops::resize(&crop, size, size, FilterType::CatmullRom);
    if drawn.flip {
        image::imageops::flip_horizontal_in_place(&mut square);
    }
    normalise(&square)
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
    normalise(&square)
}

/// A square RGB image as `3 * size * size` normalised floats, channels
/// first.
fn normalise(square: &image::RgbImage) -> Vec<f32> {
    let plane = (square.width() * square.height()) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, pixel) in square.pixels().enumerate() {
        for c in 0..3 {
            // As torchvision: ToTensor divides by 255 in f32, then Normalize.
            out[c * plane + i] = (f32::from(pixel[c]) / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}
