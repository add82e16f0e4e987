//! Synthetic MmLINK datasets: procedural scenes drawn into real PNG files
//! and MmLINK-style instructions and answers, for the two tasks SAM trains
//! on, plus a word-level `tokenizer.json` covering the generator's whole
//! vocabulary. MmLINK itself is distributed on request only; this gives
//! tests, demos and benchmarks data in the very same format.
//!
//! - **Group captioning**: K images share one object (shape and colour)
//!   among 1-3 distractors; the shared object is the largest of about a
//!   third of the images, so naming the most salient object of one image
//!   is seldom the answer: it takes every image.
//! - **Storytelling**: one object moves, grows or shrinks, or changes
//!   colour from image to image; the captions of the first K-1 images are
//!   in the instruction (SAM's prompt) and the answer describes the last.
//!
//! Output is a pure function of the options: same seed, same bytes.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use image::{ImageFormat, Rgb, RgbImage};
use serde_json::{json, Value};
use thiserror::Error;

use super::record::{Record, RecordId};
use crate::rng::SplitMix64;

/// Side of every image, in pixels.
pub const IMAGE_SIZE: u32 = 96;

/// The special tokens and their ids in `tokenizer.json`. The tokenizer's
/// post-processor wraps every sequence as `<s> ... </s>` when asked to add
/// special tokens; `<pad>` pads batches and `<unk>` is never produced for
/// the generator's own text.
pub const SPECIAL_TOKENS: [&str; 4] = ["<pad>", "<s>", "</s>", "<unk>"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Group,
    Story,
}

#[derive(Debug, Clone, Copy)]
pub struct SynthOptions {
    pub task: Task,
    pub samples: usize,
    /// Images per sample (K), at least 2.
    pub images: usize,
    /// When between 2 and `images`, each sample has a number of images
    /// drawn between this and `images` (a mixed set, as MmLINK's are);
    /// else every sample has `images`.
    pub min_images: usize,
    /// Group captioning: each image has between 1 and this many
    /// distractors besides the shared object (1 to 3).
    pub max_distractors: usize,
    pub seed: u64,
}

/// The distractors per group-captioning image, at most: one per free
/// quarter of the image.
pub const MAX_DISTRACTORS: usize = 3;

/// What [`synth`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synthesized {
    pub records: usize,
    pub images: usize,
    /// Tokens in `tokenizer.json`, special ones included.
    pub vocabulary: usize,
}

#[derive(Debug, Error)]
pub enum SynthError {
    #[error("invalid synthesis options: {0}")]
    Options(String),
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot encode {}: {source}", path.display())]
    Encode {
        path: PathBuf,
        source: image::ImageError,
    },
    #[error("{}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
}

/// The crate's SplitMix64 with the draws scenes need.
struct Rng(SplitMix64);

impl Rng {
    /// Uniform in `0..n` (`n > 0`); the modulo bias is below 2^-50 here.
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: i32, hi: i32) -> i32 {
        lo + self.below((hi - lo + 1) as usize) as i32
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Cross,
    Diamond,
}

const SHAPES: [Shape; 6] = [
    Shape::Circle,
    Shape::Square,
    Shape::Triangle,
    Shape::Star,
    Shape::Cross,
    Shape::Diamond,
];

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Cross => "cross",
            Shape::Diamond => "diamond",
        }
    }

    /// Whether the offset `(x, y)`, in units of the radius, is inside.
    /// Polygons use fixed vertices and only `+ * <`, never trigonometry,
    /// so that pixels are the same on every platform.
    fn contains(self, x: f32, y: f32) -> bool {
        match self {
            Shape::Circle => x * x + y * y <= 1.0,
            Shape::Square => x.abs() <= 0.8 && y.abs() <= 0.8,
            Shape::Diamond => x.abs() + y.abs() <= 1.0,
            Shape::Cross => {
                (x.abs() <= 0.33 && y.abs() <= 1.0) || (y.abs() <= 0.33 && x.abs() <= 1.0)
            }
            Shape::Triangle => in_polygon(&[(0.0, -1.0), (0.95, 0.7), (-0.95, 0.7)], x, y),
            Shape::Star => in_polygon(&STAR, x, y),
        }
    }
}

/// A five-pointed star, outer radius 1, inner 0.4, point up.
const STAR: [(f32, f32); 10] = [
    (0.0, -1.0),
    (0.2351, -0.3236),
    (0.9511, -0.3090),
    (0.3804, 0.1236),
    (0.5878, 0.8090),
    (0.0, 0.4),
    (-0.5878, 0.8090),
    (-0.3804, 0.1236),
    (-0.9511, -0.3090),
    (-0.2351, -0.3236),
];

/// Even-odd rule.
fn in_polygon(vertices: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut inside = false;
    let mut j = vertices.len() - 1;
    for (i, &(xi, yi)) in vertices.iter().enumerate() {
        let (xj, yj) = vertices[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Saturated colours, all far from the light backgrounds.
const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [210, 35, 35]),
    ("green", [30, 150, 50]),
    ("blue", [35, 70, 210]),
    ("yellow", [235, 190, 20]),
    ("purple", [130, 45, 170]),
    ("black", [25, 25, 25]),
];

#[derive(Debug, Clone, Copy, PartialEq)]
struct Object {
    shape: Shape,
    colour: usize,
    x: i32,
    y: i32,
    r: i32,
}

impl Object {
    fn kind(&self) -> (Shape, usize) {
        (self.shape, self.colour)
    }

    /// Pixels covered: what "largest" means for salience.
    fn area(&self) -> usize {
        pixels(self.shape, self.r).count()
    }
}

/// The pixel offsets `(dx, dy)` from the centre pixel covered by `shape`
/// at radius `r`.
fn pixels(shape: Shape, r: i32) -> impl Iterator<Item = (i32, i32)> {
    (-r..=r).flat_map(move |dy| {
        (-r..=r).filter_map(move |dx| {
            let inside = shape.contains(dx as f32 / r as f32, dy as f32 / r as f32);
            inside.then_some((dx, dy))
        })
    })
}

/// A near-white two-colour gradient with a little noise, different per
/// image, so that backgrounds vary without competing with the objects. On
/// darker, more saturated backgrounds an edge's contrast changes sign with
/// the object's colour, and a ViT trained from scratch learns shapes far
/// later (docs/PERFORMANCE.md).
fn background(rng: &mut Rng) -> RgbImage {
    let mut light = || [0; 3].map(|_| rng.range(225, 245) as u8);
    let (top, bottom) = (light(), light());
    let mut img = RgbImage::new(IMAGE_SIZE, IMAGE_SIZE);
    let last = (IMAGE_SIZE - 1) as i32;
    for y in 0..IMAGE_SIZE {
        for x in 0..IMAGE_SIZE {
            let t = y as i32;
            let noise = rng.range(-6, 6);
            let px = [0, 1, 2].map(|c| {
                let v = (top[c] as i32 * (last - t) + bottom[c] as i32 * t) / last + noise;
                v.clamp(0, 255) as u8
            });
            img.put_pixel(x, y, Rgb(px));
        }
    }
    img
}

fn draw(img: &mut RgbImage, object: &Object) {
    let colour = Rgb(COLOURS[object.colour].1);
    for (dx, dy) in pixels(object.shape, object.r) {
        let (x, y) = (object.x + dx, object.y + dy);
        if (0..IMAGE_SIZE as i32).contains(&x) && (0..IMAGE_SIZE as i32).contains(&y) {
            img.put_pixel(x as u32, y as u32, colour);
        }
    }
}

fn render(rng: &mut Rng, objects: &[Object]) -> RgbImage {
    let mut img = background(rng);
    for object in objects {
        draw(&mut img, object);
    }
    img
}

/// Words for K in instructions, as MmLINK writes them ("these five pictures").
fn count_word(k: usize) -> String {
    const WORDS: [&str; 9] = [
        "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    ];
    match k.checked_sub(2).and_then(|i| WORDS.get(i)) {
        Some(word) => (*word).to_owned(),
        None => k.to_string(),
    }
}

const GROUP_INSTRUCTIONS: [&str; 2] = [
    "Sum up the common factor in these {n} pictures in a single statement.",
    "What do these {n} pictures have in common? Answer in one sentence.",
];
const GROUP_ANSWERS: [&str; 3] = [
    "every picture shows a {c} {s}.",
    "they all contain a {c} {s}.",
    "a {c} {s} appears in each image.",
];
const STORY_PROMPT: &str = "With the narratives paired with the initial images, how would you conclude the story using the last picture?";
const STORY_START: &str = "a {c} {s} is in the {r}.";
const STORY_START_SIZED: &str = "a {z} {c} {s} is in the {r}.";
const STORY_MOVE: &str = "the {c} {s} moves to the {r}.";
const STORY_SIZE: &str = "the {c} {s} is now {z}.";
const STORY_RECOLOUR: &str = "the {s} turns {c}.";

const REGIONS: [&str; 9] = [
    "top left corner",
    "top",
    "top right corner",
    "left side",
    "centre",
    "right side",
    "bottom left corner",
    "bottom",
    "bottom right corner",
];
const SIZES: [&str; 5] = ["tiny", "small", "medium", "big", "huge"];

fn fill(template: &str, slots: &[(&str, &str)]) -> String {
    slots.iter().fold(template.to_owned(), |t, (slot, value)| {
        t.replace(slot, value)
    })
}

fn region(x: i32, y: i32) -> &'static str {
    let band = |v: i32| (v * 3 / IMAGE_SIZE as i32).clamp(0, 2) as usize;
    REGIONS[band(y) * 3 + band(x)]
}

fn size_word(r: i32) -> &'static str {
    match r {
        ..=8 => SIZES[0],
        9..=12 => SIZES[1],
        13..=16 => SIZES[2],
        17..=20 => SIZES[3],
        _ => SIZES[4],
    }
}

/// The colour and shape words: what names an object.
pub(crate) fn object_words() -> Vec<&'static str> {
    let shapes = SHAPES.iter().map(|s| s.name());
    COLOURS.iter().map(|(c, _)| *c).chain(shapes).collect()
}

/// Every content word or phrase the generator writes: colours, shapes,
/// regions and sizes.
pub(crate) fn content_vocabulary() -> Vec<&'static str> {
    let mut words = object_words();
    words.extend(REGIONS);
    words.extend(SIZES);
    words
}

/// One sample: its images and texts.
struct Sample {
    images: Vec<RgbImage>,
    instruction: String,
    output: String,
}

/// The centre of quarter `cell` (0-3, row-major) of an image. Each object
/// of a group-captioning image fills the middle of its own quarter: the
/// quarters keep objects apart, and they are the demo model's image
/// patches (48 px input, 24 px patches), so its ViT, trained from scratch
/// for a few minutes, sees a whole shape in one patch embedding. Shapes
/// that straddle patches take a from-scratch ViT more than twice as many
/// steps to tell apart (docs/PERFORMANCE.md).
fn cell_centre(cell: usize) -> (i32, i32) {
    let half = IMAGE_SIZE as i32 / 2;
    let (cx, cy) = ((cell % 2) as i32 * half, (cell / 2) as i32 * half);
    (cx + half / 2, cy + half / 2)
}

/// The shapes and colours a shared object is drawn from: the four shapes
/// that differ most at low resolution and the four first colours.
/// Distractors use all six of each.
const SHARED_SHAPES: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Cross];
const SHARED_COLOURS: usize = 4;

/// A shared object's kind.
fn shared_kind(rng: &mut Rng) -> (Shape, usize) {
    (*rng.pick(&SHARED_SHAPES), rng.below(SHARED_COLOURS))
}

/// The objects of one group-captioning image: the shared object and 1-3
/// distractors, the first grown to dominate it where a radius of 21 allows
/// (a star never outgrows a large square); none of the kinds in
/// `avoid` (kinds the other images all have, which would make the answer
/// ambiguous).
fn group_scene(
    rng: &mut Rng,
    shared: (Shape, usize),
    avoid: &HashSet<(Shape, usize)>,
    max_distractors: usize,
) -> Vec<Object> {
    let mut cells = [0, 1, 2, 3];
    for i in (1..4).rev() {
        cells.swap(i, rng.below(i + 1));
    }
    let distractor_kind = |rng: &mut Rng| loop {
        let kind = (*rng.pick(&SHAPES), rng.below(COLOURS.len()));
        if kind != shared && !avoid.contains(&kind) {
            return kind;
        }
    };
    let r = rng.range(16, 20);
    let (x, y) = cell_centre(cells[0]);
    let shared_object = Object {
        shape: shared.0,
        colour: shared.1,
        x,
        y,
        r,
    };
    let mut objects = vec![shared_object];
    let distractors = rng.range(1, max_distractors as i32) as usize;
    for (n, &cell) in cells[1..=distractors].iter().enumerate() {
        let (shape, colour) = distractor_kind(rng);
        let mut r = if n == 0 {
            rng.range(15, 21)
        } else {
            rng.range(7, 18)
        };
        if n == 0 {
            // A star's area is a third of a square's at the same radius:
            // grow until the distractor clearly dominates, up to the
            // largest radius a quarter holds with a margin.
            while r < 21 && pixels(shape, r).count() * 10 <= shared_object.area() * 13 {
                r += 1;
            }
        }
        let (x, y) = cell_centre(cell);
        objects.push(Object {
            shape,
            colour,
            x,
            y,
            r,
        });
    }
    // Drawn in a random order so that the shared object is not always below.
    let place = rng.below(objects.len());
    objects.swap(0, place);
    objects
}

fn group_sample(rng: &mut Rng, k: usize, max_distractors: usize) -> Sample {
    let shared = shared_kind(rng);
    let mut scenes: Vec<Vec<Object>> = Vec::with_capacity(k);
    for i in 0..k {
        let avoid = if i + 1 == k {
            common_kinds(&scenes)
        } else {
            HashSet::new()
        };
        scenes.push(group_scene(rng, shared, &avoid, max_distractors));
    }
    let images = scenes.iter().map(|s| render(rng, s)).collect();
    let n = count_word(k);
    let instruction = rng.pick::<&str>(&GROUP_INSTRUCTIONS);
    let instruction = fill(instruction, &[("{n}", &n)]);
    let answer = rng.pick::<&str>(&GROUP_ANSWERS);
    let output = fill(
        answer,
        &[("{c}", COLOURS[shared.1].0), ("{s}", shared.0.name())],
    );
    Sample {
        images,
        instruction,
        output,
    }
}

/// The object kinds present in every scene.
fn common_kinds(scenes: &[Vec<Object>]) -> HashSet<(Shape, usize)> {
    let mut kinds = scenes
        .iter()
        .map(|s| s.iter().map(Object::kind).collect::<HashSet<_>>());
    let Some(first) = kinds.next() else {
        return HashSet::new();
    };
    kinds.fold(first, |acc, k| acc.intersection(&k).copied().collect())
}

fn story_sample(rng: &mut Rng, k: usize) -> Sample {
    let shape = *rng.pick(&SHAPES);
    let colour = rng.below(COLOURS.len());
    // A static distractor of another kind, so the scene is not a lone shape.
    let distractor = Object {
        shape: *rng.pick(&SHAPES),
        colour: (colour + 1 + rng.below(COLOURS.len() - 1)) % COLOURS.len(),
        x: rng.range(10, 86),
        y: rng.range(10, 86),
        r: rng.range(5, 8),
    };
    let centres = [16, 48, 80];
    let mut states: Vec<Object> = Vec::with_capacity(k);
    let mut captions = Vec::with_capacity(k);
    let last = (k - 1) as i32;
    match rng.below(3) {
        0 => {
            // Moves in a straight line between two of the nine regions.
            let from = rng.below(9);
            let to = (from + 1 + rng.below(8)) % 9;
            let (x0, y0) = (centres[from % 3], centres[from / 3]);
            let (x1, y1) = (centres[to % 3], centres[to / 3]);
            let r = rng.range(9, 13);
            for i in 0..=last {
                let (x, y) = (x0 + (x1 - x0) * i / last, y0 + (y1 - y0) * i / last);
                states.push(Object {
                    shape,
                    colour,
                    x,
                    y,
                    r,
                });
                let template = if i == 0 { STORY_START } else { STORY_MOVE };
                captions.push(fill(
                    template,
                    &[
                        ("{c}", COLOURS[colour].0),
                        ("{s}", shape.name()),
                        ("{r}", region(x, y)),
                    ],
                ));
            }
        }
        1 => {
            // Grows or shrinks where it stands.
            let (small, large) = (rng.range(5, 8), rng.range(21, 23));
            let (r0, r1) = if rng.below(2) == 0 {
                (small, large)
            } else {
                (large, small)
            };
            let (x, y) = (rng.range(42, 54), rng.range(42, 54));
            for i in 0..=last {
                let r = r0 + (r1 - r0) * i / last;
                states.push(Object {
                    shape,
                    colour,
                    x,
                    y,
                    r,
                });
                let template = if i == 0 {
                    STORY_START_SIZED
                } else {
                    STORY_SIZE
                };
                captions.push(fill(
                    template,
                    &[
                        ("{c}", COLOURS[colour].0),
                        ("{s}", shape.name()),
                        ("{r}", region(x, y)),
                        ("{z}", size_word(r)),
                    ],
                ));
            }
        }
        _ => {
            // Changes colour at every step.
            let cell = rng.below(9);
            let (x, y) = (centres[cell % 3], centres[cell / 3]);
            let r = rng.range(9, 13);
            let mut c = colour;
            for i in 0..=last {
                if i > 0 {
                    c = (c + 1 + rng.below(COLOURS.len() - 1)) % COLOURS.len();
                }
                states.push(Object {
                    shape,
                    colour: c,
                    x,
                    y,
                    r,
                });
                let template = if i == 0 { STORY_START } else { STORY_RECOLOUR };
                captions.push(fill(
                    template,
                    &[
                        ("{c}", COLOURS[c].0),
                        ("{s}", shape.name()),
                        ("{r}", region(x, y)),
                    ],
                ));
            }
        }
    }
    let images = states
        .iter()
        .map(|s| render(rng, &[distractor, *s]))
        .collect();
    let mut instruction = STORY_PROMPT.to_owned();
    for (i, caption) in captions.iter().enumerate() {
        instruction.push_str(&format!("{{image#{}}}Caption#{}:", i + 1, i + 1));
        if i + 1 < k {
            instruction.push_str(caption);
        }
    }
    let output = captions.pop().unwrap_or_default();
    Sample {
        images,
        instruction,
        output,
    }
}

/// Splits text as `tokenizer.json`'s normaliser and pre-tokenizer do:
/// lowercase, split on whitespace, each punctuation mark and each digit a
/// token of its own.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for chunk in text.to_lowercase().split_whitespace() {
        let mut word = String::new();
        for ch in chunk.chars() {
            if ch.is_ascii_punctuation() || ch.is_ascii_digit() {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
                out.push(ch.to_string());
            } else {
                word.push(ch);
            }
        }
        if !word.is_empty() {
            out.push(word);
        }
    }
    out
}

/// Every word the generator can write: the templates with their slots
/// emptied, every slot value, and the digits (for K above ten and image
/// numbers).
fn vocabulary() -> BTreeSet<String> {
    let slots = [
        ("{n}", ""),
        ("{c}", ""),
        ("{s}", ""),
        ("{r}", ""),
        ("{z}", ""),
    ];
    let templates = GROUP_INSTRUCTIONS
        .iter()
        .chain(&GROUP_ANSWERS)
        .chain(&[
            STORY_PROMPT,
            "{image#1}Caption#1:",
            STORY_START,
            STORY_START_SIZED,
            STORY_MOVE,
            STORY_SIZE,
            STORY_RECOLOUR,
        ])
        .map(|t| fill(t, &slots));
    let values = (2..=10)
        .map(count_word)
        .chain(COLOURS.iter().map(|c| c.0.to_owned()))
        .chain(SHAPES.iter().map(|s| s.name().to_owned()))
        .chain(REGIONS.iter().chain(&SIZES).map(|s| (*s).to_owned()))
        .chain((0..10).map(|d| d.to_string()));
    templates
        .chain(values)
        .flat_map(|text| words(&text))
        .collect()
}

/// `tokenizer.json` for the `tokenizers` crate (and Hugging Face's): a
/// WordLevel model over [`vocabulary`], lowercase normaliser, whitespace +
/// punctuation + digit pre-tokenizer, and `<s> A </s>` post-processing.
fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for (id, token) in SPECIAL_TOKENS
        .iter()
        .map(|s| (*s).to_owned())
        .chain(vocabulary())
        .enumerate()
    {
        vocab.insert(token, json!(id));
    }
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, t)| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let special = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"},
            {"type": "Punctuation", "behavior": "Isolated"},
            {"type": "Digits", "individual_digits": true}
        ]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special("<s>"), seq("A", 0), special("</s>")],
            "pair": [special("<s>"), seq("A", 0), special("</s>"), seq("B", 1), special("</s>")],
            "special_tokens": {
                "<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}
            }
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), SynthError> {
    fs::write(path, bytes).map_err(|source| SynthError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Writes a dataset to `out`: `annotations.json`, `images/*.png` and
/// `tokenizer.json`, then loads the tokenizer back and checks that it
/// knows every word of every instruction and answer.
pub fn synth(out: &Path, options: &SynthOptions) -> Result<Synthesized, SynthError> {
    if options.images < 2 {
        return Err(SynthError::Options(format!(
            "--images must be at least 2 (a multi-image sample), got {}",
            options.images
        )));
    }
    if options.min_images != 0 && !(2..=options.images).contains(&options.min_images) {
        return Err(SynthError::Options(format!(
            "--min-images must be 0 (every sample has --images) or from 2 to --images ({}), got {}",
            options.images, options.min_images
        )));
    }
    if options.samples == 0 {
        return Err(SynthError::Options("--samples must be at least 1".into()));
    }
    if !(1..=MAX_DISTRACTORS).contains(&options.max_distractors) {
        return Err(SynthError::Options(format!(
            "max_distractors must be between 1 and {MAX_DISTRACTORS}, got {}",
            options.max_distractors
        )));
    }
    let images_dir = out.join("images");
    fs::create_dir_all(&images_dir).map_err(|source| SynthError::Write {
        path: images_dir.clone(),
        source,
    })?;
    let mut rng = Rng(SplitMix64::new(options.seed));
    let mut records = Vec::with_capacity(options.samples);
    for index in 0..options.samples {
        // Drawn only for a mixed set, so that fixed-size sets stay as they were.
        let images = match options.min_images {
            min if (2..options.images).contains(&min) => min + rng.below(options.images - min + 1),
            _ => options.images,
        };
        let sample = match options.task {
            Task::Group => group_sample(&mut rng, images, options.max_distractors),
            Task::Story => story_sample(&mut rng, images),
        };
        let mut img_list = Vec::with_capacity(sample.images.len());
        for (k, img) in sample.images.iter().enumerate() {
            let name = format!("images/{index:06}_{k}.png");
            let path = out.join(&name);
            let mut bytes = io::Cursor::new(Vec::new());
            img.write_to(&mut bytes, ImageFormat::Png)
                .map_err(|source| SynthError::Encode {
                    path: path.clone(),
                    source,
                })?;
            write(&path, bytes.get_ref())?;
            img_list.push(name);
        }
        records.push(Record {
            id: RecordId::Int(index as i64),
            img_list,
            instruction: sample.instruction,
            output: sample.output,
        });
    }
    let annotations = out.join("annotations.json");
    let json = serde_json::to_vec_pretty(&records).map_err(|e| SynthError::Write {
        path: annotations.clone(),
        source: e.into(),
    })?;
    write(&annotations, &json)?;

    let tokenizer_path = out.join("tokenizer.json");
    let tokenizer = tokenizer_json();
    let vocabulary = tokenizer["model"]["vocab"]
        .as_object()
        .map_or(0, |v| v.len());
    let json = serde_json::to_vec_pretty(&tokenizer).map_err(|e| SynthError::Write {
        path: tokenizer_path.clone(),
        source: e.into(),
    })?;
    write(&tokenizer_path, &json)?;
    check_tokenizer(&tokenizer_path, &records)?;

    tracing::info!(
        out = %out.display(),
        records = records.len(),
        images = records.iter().map(|r| r.img_list.len()).sum::<usize>(),
        vocabulary,
        "synthetic dataset written"
    );
    Ok(Synthesized {
        records: records.len(),
        images: records.iter().map(|r| r.img_list.len()).sum(),
        vocabulary,
    })
}

/// Loads `tokenizer.json` as training will, and checks that no word of the
/// dataset is unknown to it: an `<unk>` would silently teach the model a
/// different text.
fn check_tokenizer(path: &Path, records: &[Record]) -> Result<(), SynthError> {
    let fail = |message: String| SynthError::Tokenizer {
        path: path.to_owned(),
        message,
    };
    let tokenizer = tokenizers::Tokenizer::from_file(path).map_err(|e| fail(e.to_string()))?;
    let unk = tokenizer
        .token_to_id("<unk>")
        .ok_or_else(|| fail("has no <unk> token".into()))?;
    for record in records {
        for text in [&record.instruction, &record.output] {
            let encoding = tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| fail(e.to_string()))?;
            if encoding.get_ids().contains(&unk) {
                return Err(fail(format!(
                    "record {} has words outside the vocabulary: {text:?}",
                    record.id
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_object_is_mostly_not_the_largest() {
        let mut rng = Rng(SplitMix64::new(7));
        let mut largest_shared = 0;
        for _ in 0..500 {
            let shared = shared_kind(&mut rng);
            let scene = group_scene(&mut rng, shared, &HashSet::new(), MAX_DISTRACTORS);
            let shared_obj = scene.iter().find(|o| o.kind() == shared).unwrap();
            let largest = scene.iter().map(Object::area).max().unwrap();
            largest_shared += usize::from(shared_obj.area() >= largest);
            assert!((2..=4).contains(&scene.len()));
            assert_eq!(scene.iter().filter(|o| o.kind() == shared).count(), 1);
        }
        assert!(largest_shared < 200, "{largest_shared} of 500");
    }

    #[test]
    fn only_the_shared_kind_is_in_every_image() {
        let mut rng = Rng(SplitMix64::new(11));
        for k in 2..6 {
            for _ in 0..200 {
                let shared = shared_kind(&mut rng);
                let mut scenes: Vec<Vec<Object>> = Vec::new();
                for i in 0..k {
                    let avoid = if i + 1 == k {
                        common_kinds(&scenes)
                    } else {
                        HashSet::new()
                    };
                    scenes.push(group_scene(&mut rng, shared, &avoid, MAX_DISTRACTORS));
                }
                assert_eq!(common_kinds(&scenes), HashSet::from([shared]));
            }
        }
    }

    #[test]
    fn objects_stay_inside_the_image() {
        let mut rng = Rng(SplitMix64::new(3));
        for _ in 0..300 {
            for o in group_scene(&mut rng, (Shape::Star, 0), &HashSet::new(), MAX_DISTRACTORS) {
                assert!(o.x - o.r >= 0 && o.x + o.r < IMAGE_SIZE as i32, "{o:?}");
                assert!(o.y - o.r >= 0 && o.y + o.r < IMAGE_SIZE as i32, "{o:?}");
            }
        }
    }

    #[test]
    fn story_prompt_follows_sam() {
        let mut rng = Rng(SplitMix64::new(5));
        let s = story_sample(&mut rng, 3);
        assert!(s.instruction.starts_with(STORY_PROMPT));
        assert!(s.instruction.ends_with("{image#3}Caption#3:"));
        assert!(s.instruction.contains("{image#2}Caption#2:the "));
        assert!(!s.output.is_empty());
        assert_eq!(s.images.len(), 3);
    }

    #[test]
    fn words_split_like_the_pre_tokenizer() {
        assert_eq!(
            words("Picture?{image#12}Caption#1:a Red"),
            [
                "picture", "?", "{", "image", "#", "1", "2", "}", "caption", "#", "1", ":", "a",
                "red"
            ]
        );
    }

    #[test]
    fn count_words() {
        assert_eq!(count_word(2), "two");
        assert_eq!(count_word(10), "ten");
        assert_eq!(count_word(12), "12");
    }
}
