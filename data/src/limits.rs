//! Bounds on what one record may ask of a worker's memory. A 3 MB PNG can
//! decode to gigabytes, and a record can list any number of images; both
//! limits are checked before anything large is allocated, and a record over
//! them is a bad record like any other (named, with its field).

use std::io::Cursor;

use image::{DynamicImage, ImageReader};

/// The limits of one job (`[data] max_images_per_record`,
/// `max_image_pixels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    pub max_images_per_record: usize,
    pub max_image_pixels: u64,
}

impl Default for InputLimits {
    /// The job spec's defaults.
    fn default() -> Self {
        InputLimits {
            max_images_per_record: 64,
            max_image_pixels: 50_000_000,
        }
    }
}

/// Why an image was not decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error("is {width} x {height} = {pixels} pixels, more than the limit of {limit} (data.max_image_pixels)")]
    TooLarge {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
}

/// Decodes an encoded image whose header says it has at most `max_pixels`
/// pixels; the header is read first, so an oversized one costs nothing.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, DecodeError> {
    let (width, height) = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(image::ImageError::from)?
        .into_dimensions()?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(DecodeError::TooLarge {
            width,
            height,
            pixels,
            limit: max_pixels,
        });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(image::ImageError::from)?;
    // The header's size bounds the decoder too (RGBA at 16 bits a channel).
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(pixels.saturating_mul(8).max(1 << 20));
    reader.limits(limits);
    Ok(reader.decode()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::GrayImage::new(width, height)
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn an_image_over_the_limit_is_refused_from_its_header() {
        // 10000 x 10000 grey: 100 MB decoded from a few hundred KB of PNG.
        let bomb = png(10_000, 10_000);
        let started = std::time::Instant::now();
        let err = decode(&bomb, 50_000_000).unwrap_err().to_string();
        assert!(
            err.contains("10000 x 10000 = 100000000 pixels") && err.contains("max_image_pixels"),
            "{err}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let small = decode(&png(30, 20), 600).unwrap();
        assert_eq!((small.width(), small.height()), (30, 20));
    }
}
