//! The vision encoder: InstructBLIP's ViT (EVA-CLIP ViT-g/14 at full size).
//!
//! Tensor names follow transformers' `InstructBlipVisionModel`:
//! `vision_model.embeddings.*`, `vision_model.encoder.layers.N.*`,
//! `vision_model.post_layernorm.*`. The post layernorm is SAM's `ln_vision`.

use tch::nn::{Init, Path};
use tch::Tensor;

use crate::config::VisionConfig;
use crate::nn::{attention, cast, gelu, merge_heads, normal_var, var, LayerNorm, Linear};
use crate::tape::{self, GradTape};

#[derive(Debug)]
struct Embeddings {
    class_embedding: Tensor,
    patch_weight: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    patch_size: i64,
}

#[derive(Debug)]
struct Attention {
    qkv: Linear,
    projection: Linear,
    heads: i64,
}

impl Attention {
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, s, d) = x.size3().expect("vision hidden states are 3-d");
        let qkv = self
            .qkv
            .forward(x)
            .view([b, s, 3, self.heads, d / self.heads])
            .permute([2, 0, 3, 1, 4]);
        let out = attention(&qkv.get(0), &qkv.get(1), &qkv.get(2), None);
        self.projection.forward(&merge_heads(&out))
    }
}

#[derive(Debug)]
struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
}

impl EncoderLayer {
    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x));
        let h = self
            .fc2
            .forward(&gelu(&self.fc1.forward(&self.layer_norm2.forward(&x))));
        x + h
    }
}

/// Images `[n, 3, H, W]` to patch features `[n, 1 + patches, width]`.
#[derive(Debug)]
pub struct VisionModel {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
}

impl VisionModel {
    pub fn new(p: &Path, c: &VisionConfig) -> Self {
        let d = c.hidden_size;
        let e = p / "embeddings";
        let embeddings = Embeddings {
            class_embedding: normal_var(&e, "class_embedding", &[1, 1, d]),
            patch_weight: normal_var(
                &(&e / "patch_embedding"),
                "weight",
                &[d, 3, c.patch_size, c.patch_size],
            ),
            patch_bias: var(&(&e / "patch_embedding"), "bias", &[d], Init::Const(0.0)),
            position_embedding: normal_var(&e, "position_embedding", &[1, c.num_positions(), d]),
            patch_size: c.patch_size,
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = p / "encoder" / "layers" / i;
                let a = &l / "self_attn";
                EncoderLayer {
                    self_attn: Attention {
                        qkv: Linear::new(&(&a / "qkv"), d, 3 * d, c.qkv_bias),
                        projection: Linear::new(&(&a / "projection"), d, d, true),
                        heads: c.num_attention_heads,
                    },
                    layer_norm1: LayerNorm::new(&(&l / "layer_norm1"), d, c.layer_norm_eps),
                    fc1: Linear::new(&(&l / "mlp" / "fc1"), d, c.intermediate_size, true),
                    fc2: Linear::new(&(&l / "mlp" / "fc2"), c.intermediate_size, d, true),
                    layer_norm2: LayerNorm::new(&(&l / "layer_norm2"), d, c.layer_norm_eps),
                }
            })
            .collect();
        Self {
            embeddings,
            layers,
            post_layernorm: LayerNorm::new(&(p / "post_layernorm"), d, c.layer_norm_eps),
        }
    }

    /// With a tape (training), each layer is offered to it for activation
    /// checkpointing.
    pub fn forward<'a>(
        &'a self,
        pixel_values: &Tensor,
        mut tape: Option<&mut GradTape<'a>>,
    ) -> Tensor {
        let e = &self.embeddings;
        let n = pixel_values.size()[0];
        // The caller picks the compute dtype by the pixels' dtype.
        let kind = pixel_values.kind();
        let patches = pixel_values
            .conv2d(
                &cast(&e.patch_weight, kind),
                Some(&cast(&e.patch_bias, kind)),
                [e.patch_size, e.patch_size],
                [0, 0],
                [1, 1],
                1,
            )
            .flatten(2, -1)
            .transpose(1, 2);
        let class = cast(&e.class_embedding, kind).expand([n, 1, -1], false);
        let mut x = Tensor::cat(&[class, patches], 1) + cast(&e.position_embedding, kind);
        for layer in &self.layers {
            x = tape::checkpoint(&mut tape, x, move |x, _| layer.forward(x));
        }
        self.post_layernorm.forward(&x)
    }
}
