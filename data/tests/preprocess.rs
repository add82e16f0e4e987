//! Preprocessing against known values: image normalisation and shapes, the
//! prompt/answer label mask and SAM's truncation, collation of uneven
//! samples, and the loader's order and error reporting.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::{Rgb, RgbImage};
use samtrain_data::mmlink::{Record, RecordId};
use samtrain_data::preprocess::{
    self, collate, image::MEAN, image::STD, ImageConfig, LoaderConfig, PreprocessError,
    Preprocessor, ResizeMode, Sample, TextConfig, TextSample,
};
use samtrain_data::sampler::{Position, Sampler, SamplerConfig, TailPolicy};
use tch::Kind;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::Tokenizer;

const SPECIALS: [&str; 6] = ["<s>", "</s>", "<unk>", "[PAD]", "[CLS]", "[SEP]"];

/// A word-level tokenizer: the specials take ids 0..6, word `wK` takes
/// `6 + K`. With `cls_sep` it wraps single inputs in `[CLS] .. [SEP]` as
/// BERT's does.
fn write_tokenizer(dir: &Path, name: &str, cls_sep: bool) -> PathBuf {
    let mut vocab = serde_json::Map::new();
    for (i, s) in SPECIALS.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
    }
    for k in 0..50 {
        vocab.insert(format!("w{k}"), (6 + k).into());
    }
    let vocab_path = dir.join(format!("{name}.vocab.json"));
    std::fs::write(&vocab_path, serde_json::to_string(&vocab).unwrap()).unwrap();
    let model = WordLevel::from_file(vocab_path.to_str().unwrap(), "<unk>".into()).unwrap();
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(WhitespaceSplit));
    if cls_sep {
        let template = TemplateProcessing::builder()
            .try_single("[CLS] $A [SEP]")
            .unwrap()
            .special_tokens(vec![("[CLS]", 4), ("[SEP]", 5)])
            .build()
            .unwrap();
        tokenizer.with_post_processor(Some(template));
    }
    let path = dir.join(format!("{name}.json"));
    tokenizer.save(&path, false).unwrap();
    path
}

fn words(range: std::ops::Range<usize>) -> String {
    range.map(|k| format!("w{k}")).collect::<Vec<_>>().join(" ")
}

fn ids(range: std::ops::Range<usize>) -> Vec<i64> {
    range.map(|k| 6 + k as i64).collect()
}

fn record(id: i64, images: &[&str], instruction: &str, output: &str) -> Record {
    Record {
        id: RecordId::Int(id),
        img_list: images.iter().map(|s| s.to_string()).collect(),
        instruction: instruction.into(),
        output: output.into(),
    }
}

fn text_config(dir: &Path) -> TextConfig {
    let mut config = TextConfig::new(
        write_tokenizer(dir, "llm", false),
        write_tokenizer(dir, "qformer", true),
    );
    config.pad_token = "[PAD]".into();
    config
}

fn to_vec_f32(t: &tch::Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

fn to_vec_i64(t: &tch::Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.flatten(0, -1)).unwrap()
}

#[test]
fn solid_colour_normalises_exactly() {
    let colour = [200u8, 30, 117];
    let img = image::DynamicImage::ImageRgb8(RgbImage::from_pixel(97, 61, Rgb(colour)));
    for resize in [ResizeMode::ShorterSideCrop, ResizeMode::Stretch] {
        let out = preprocess::image::to_chw(
            &img,
            &ImageConfig {
                size: 32,
                resize,
                augment: None,
                ..ImageConfig::default()
            },
        );
        assert_eq!(out.len(), 3 * 32 * 32);
        for c in 0..3 {
            let want = (f32::from(colour[c]) / 255.0 - MEAN[c]) / STD[c];
            assert!(out[c * 1024..(c + 1) * 1024].iter().all(|&v| v == want));
        }
    }
}

#[test]
fn resize_keeps_the_centre_square() {
    // A wide image whose left and right thirds are black and middle white:
    // after shorter side to 30 and the centre crop only white is left.
    let mut img = RgbImage::from_pixel(300, 100, Rgb([0, 0, 0]));
    for x in 100..200 {
        for y in 0..100 {
            img.put_pixel(x, y, Rgb([255, 255, 255]));
        }
    }
    let config = ImageConfig {
        size: 30,
        resize: ResizeMode::ShorterSideCrop,
        augment: None,
        ..ImageConfig::default()
    };
    let out = preprocess::image::to_chw(&image::DynamicImage::ImageRgb8(img), &config);
    assert_eq!(out.len(), 3 * 30 * 30);
    let white = (1.0 - MEAN[0]) / STD[0];
    // Catmull–Rom rings only near the edges; the inner columns are white.
    for y in 0..30 {
        for x in 3..27 {
            assert!((out[y * 30 + x] - white).abs() < 1e-6, "({x},{y})");
        }
    }
    // Tall input, odd sizes: still size x size.
    let tall = image::DynamicImage::ImageRgb8(RgbImage::new(7, 41));
    assert_eq!(preprocess::image::to_chw(&tall, &config).len(), 3 * 30 * 30);
}

#[test]
fn a_pad_token_the_tokenizer_lacks_is_added_as_sam_does() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = text_config(dir.path());
    config.pad_token = "[NEWPAD]".into();
    let tok = preprocess::Tokenizers::load(&config).unwrap();
    // The next id after the 6 specials and 50 words; the LLM's embedding
    // table needs a row for it, the Q-Former's does not.
    assert_eq!(tok.pad_id(), 56);
    assert_eq!(tok.id_limits(), (57, 56));
    // Prediction's prompt is BOS and the whole instruction, uncut.
    let long = record(3, &[], &words(0..10), "w1");
    let mut want = vec![1];
    want.extend(ids(0..10));
    assert_eq!(tok.prompt(&long).unwrap(), want);
}

#[test]
fn text_masks_the_prompt_and_truncates_like_sam() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = text_config(dir.path());
    config.max_txt_len = 5;
    config.max_output_txt_len = 4;
    let tok = preprocess::Tokenizers::load(&config).unwrap();

    // Short texts: nothing cut; BOS = EOS = 1 (`</s>`, as SAM sets them).
    let t = tok.encode(&record(1, &[], "w0 w1", "w2")).unwrap();
    assert_eq!(t.input_ids, [1, 6, 7, 8, 1]);
    assert_eq!(t.labels, [-100, -100, -100, 8, 1]);
    assert_eq!(t.qformer_input_ids, [4, 6, 7, 5]);

    // Long texts: the instruction keeps its last 4 tokens after BOS, the
    // answer its first 3 tokens (EOS cut), the Q-Former its last 3 words
    // inside [CLS] .. [SEP] (SAM's left truncation).
    let t = tok
        .encode(&record(2, &[], &words(0..10), &words(20..30)))
        .unwrap();
    let mut want = vec![1];
    want.extend(ids(6..10));
    want.extend(ids(20..23));
    assert_eq!(t.input_ids, want);
    let mut want_labels = vec![-100; 5];
    want_labels.extend(ids(20..23));
    assert_eq!(t.labels, want_labels);
    assert_eq!(t.qformer_input_ids, [4, 13, 14, 15, 5]);
    let mut right = config.clone();
    right.qformer_truncation = preprocess::Side::Right;
    let t = preprocess::Tokenizers::load(&right)
        .unwrap()
        .encode(&record(2, &[], &words(0..10), &words(20..30)))
        .unwrap();
    assert_eq!(t.qformer_input_ids, [4, 6, 7, 8, 5]);

    // Unknown special token: an error naming the setting and the file.
    config.eos_token = "<eos>".into();
    let err = match preprocess::Tokenizers::load(&config) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a missing EOS must fail"),
    };
    assert!(
        err.contains("eos_token") && err.contains("llm.json"),
        "{err}"
    );
}

#[test]
fn collation_pads_images_and_text() {
    let side = 2u32;
    let per = 3 * 4;
    let image = |v: f32| vec![v; per];
    let three = Sample {
        id: RecordId::Int(7),
        images: vec![image(1.0), image(2.0), image(3.0)],
        augmented: vec![None; 3],
        text: TextSample {
            qformer_input_ids: vec![4, 6, 5],
            input_ids: vec![0, 6, 8, 1],
            labels: vec![-100, -100, 8, 1],
        },
    };
    let one = Sample {
        id: RecordId::Str("x".into()),
        images: vec![image(9.0)],
        augmented: vec![None],
        text: TextSample {
            qformer_input_ids: vec![4, 6, 7, 9, 5],
            input_ids: vec![0, 9, 1],
            labels: vec![-100, 9, 1],
        },
    };
    let b = collate(&[three, one], side, 3, 3).unwrap();
    assert_eq!(b.ids, [RecordId::Int(7), RecordId::Str("x".into())]);
    assert_eq!(b.pixel_values.size(), [2, 3, 3, 2, 2]);
    assert_eq!(b.pixel_values.kind(), Kind::Float);
    let px = to_vec_f32(&b.pixel_values);
    for (slot, want) in [1.0, 2.0, 3.0, 9.0, 0.0, 0.0].into_iter().enumerate() {
        assert!(px[slot * per..(slot + 1) * per].iter().all(|&v| v == want));
    }
    assert_eq!(b.image_mask.kind(), Kind::Int64);
    assert_eq!(to_vec_i64(&b.image_mask), [1, 1, 1, 1, 0, 0]);
    assert_eq!(b.qformer_input_ids.size(), [2, 5]);
    assert_eq!(
        to_vec_i64(&b.qformer_input_ids),
        [4, 6, 5, 3, 3, 4, 6, 7, 9, 5]
    );
    assert_eq!(
        to_vec_i64(&b.qformer_attention_mask),
        [1, 1, 1, 0, 0, 1, 1, 1, 1, 1]
    );
    assert_eq!(b.input_ids.size(), [2, 4]);
    assert_eq!(to_vec_i64(&b.input_ids), [0, 6, 8, 1, 0, 9, 1, 3]);
    assert_eq!(to_vec_i64(&b.attention_mask), [1, 1, 1, 1, 1, 1, 1, 0]);
    assert_eq!(to_vec_i64(&b.labels), [-100, -100, 8, 1, -100, 9, 1, -100]);
}

/// A dataset of `n` records on disk, each with 1 to 3 small PNGs whose
/// colour encodes the record, plus a preprocessor for it.
fn dataset(dir: &Path, n: usize) -> (Arc<Preprocessor>, Arc<[Record]>) {
    let mut records = Vec::new();
    for i in 0..n {
        let count = 1 + i % 3;
        let mut names = Vec::new();
        for j in 0..count {
            let name = format!("img_{i}_{j}.png");
            RgbImage::from_pixel(20 + j as u32, 16, Rgb([i as u8, j as u8, 0]))
                .save(dir.join(&name))
                .unwrap();
            names.push(name);
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        records.push(record(
            i as i64,
            &names,
            &words(0..(i % 7)),
            &words(1..2 + i % 5),
        ));
    }
    let image = ImageConfig {
        size: 8,
        resize: ResizeMode::ShorterSideCrop,
        augment: None,
        ..ImageConfig::default()
    };
    let pre = Preprocessor::new(dir, image, &text_config(dir)).unwrap();
    (Arc::new(pre), records.into())
}

fn sampler(n: u64, batch: u64) -> Sampler {
    let config = SamplerConfig {
        num_samples: n,
        seed: 5,
        batch_size: batch,
        tail: TailPolicy::Pad,
        balance: false,
    };
    Sampler::new(config, 1, 2, Position::default()).unwrap()
}

#[test]
fn loader_delivers_in_sampler_order() {
    let dir = tempfile::tempdir().unwrap();
    let (pre, records) = dataset(dir.path(), 23);
    for workers in [1, 3] {
        let mut reference = sampler(23, 3);
        let loader = preprocess::Loader::spawn(
            pre.clone(),
            records.clone(),
            sampler(23, 3),
            LoaderConfig { workers, depth: 5 },
        )
        .unwrap();
        // 12 steps cross into the second epoch (4 steps per epoch at 2 x 3).
        for fetched in loader.take(12) {
            let step = reference.next_step();
            assert_eq!(fetched.indices, step.indices);
            assert_eq!(fetched.epoch, step.epoch);
            assert_eq!(fetched.position_after, step.position_after);
            let batch = fetched.batch.unwrap();
            let want: Vec<RecordId> = step
                .indices
                .iter()
                .map(|&i| RecordId::Int(i as i64))
                .collect();
            assert_eq!(batch.ids, want);
            // The first image's red channel carries the record index.
            let px = to_vec_f32(&batch.pixel_values.select(0, 0).select(0, 0));
            let red = (f32::from(step.indices[0] as u8) / 255.0 - MEAN[0]) / STD[0];
            assert!((px[0] - red).abs() < 1e-6);
        }
    }
}

#[test]
fn loader_reports_a_bad_image_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (pre, records) = dataset(dir.path(), 12);
    let mut reference = sampler(12, 2);
    let steps: Vec<_> = (0..6).map(|_| reference.next_step()).collect();
    // Break the second image of a record of the third step.
    let victim = *steps[2]
        .indices
        .iter()
        .find(|&&i| i % 3 != 0)
        .expect("a record with two images");
    let bad = dir.path().join(format!("img_{victim}_1.png"));
    std::fs::write(&bad, b"not a png").unwrap();

    let loader = preprocess::Loader::spawn(
        pre,
        records,
        sampler(12, 2),
        LoaderConfig {
            workers: 3,
            depth: 3,
        },
    )
    .unwrap();
    for (k, fetched) in loader.take(6).enumerate() {
        assert_eq!(fetched.indices, steps[k].indices);
        match (&fetched.batch, steps[k].indices.contains(&victim)) {
            (Ok(_), false) => {}
            (Err(e @ PreprocessError::Image { record, .. }), true) => {
                assert_eq!(*record, RecordId::Int(victim as i64));
                let msg = e.to_string();
                assert!(msg.contains(&format!("img_{victim}_1.png")), "{msg}");
                assert!(msg.contains("img_list[1]"), "{msg}");
            }
            (other, _) => panic!("step {k}: unexpected {other:?}"),
        }
    }
}

#[test]
fn loader_rejects_a_mismatched_sampler() {
    let dir = tempfile::tempdir().unwrap();
    let (pre, records) = dataset(dir.path(), 4);
    let err = preprocess::Loader::spawn(pre, records, sampler(5, 1), LoaderConfig::default())
        .err()
        .expect("sizes differ");
    assert!(matches!(
        err,
        PreprocessError::DatasetSize {
            sampler: 5,
            records: 4
        }
    ));
}
