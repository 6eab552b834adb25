"""The embedded tiny Stable-Diffusion pipeline: real diffusers/transformers classes, built offline.

`UNet2DConditionModel` (cross-attention on text), `AutoencoderKL` (a factor-4 VAE: 32x32 images,
8x8x4 latents), `CLIPTextModel` and a word-level tokenizer in CLIP's format
(`<|startoftext|> words <|endoftext|>`, padded with `<|endoftext|>` to `model_max_length`), with a
`DDIMScheduler` in Stable Diffusion's configuration. Saved with `StableDiffusionPipeline.save_pretrained`
and loaded back with `from_pretrained`, exactly like a downloaded checkpoint.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_tokenizer(words: list[str], max_length: int = 8) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `words` (lower-cased), CLIP's special tokens and framing."""
    vocab = {t: i for i, t in enumerate([EOS, BOS] + sorted({w.lower() for w in words}))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}",
                                                       special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS,
                                   model_max_length=max_length, padding_side="right")


def build_text_encoder(tokenizer, dim: int = 32, layers: int = 2, heads: int = 2) -> CLIPTextModel:
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, projection_dim=dim)
    return CLIPTextModel(cfg)


def build_vae(channels: tuple[int, ...] = (16, 32, 32), latent_channels: int = 4, image_size: int = 32):
    """AutoencoderKL that downsamples by 2**(len(channels) - 1)."""
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=channels, layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=16, sample_size=image_size)


def build_unet(latent_size: int, cross_attention_dim: int = 32, channels: tuple[int, int] = (32, 64),
               latent_channels: int = 4):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
                                block_out_channels=channels, layers_per_block=1, norm_num_groups=16,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=cross_attention_dim, attention_head_dim=8)


def build_scheduler(step: str = "ddim"):
    """DDIM in Stable Diffusion v1's configuration (scaled-linear betas, leading spacing, offset 1), or for
    `step="flow_sde"` the flow-matching Euler scheduler (sigma from 1 to 0, no shift; timestep = 1000 sigma)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if step == "flow_sde":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def build_pipeline(words: list[str], image_size: int = 32, unet_channels: tuple[int, int] = (32, 64),
                   text_dim: int = 32, step: str = "ddim"):
    """A fresh (untrained) StableDiffusionPipeline of the tiny architecture; its UNet is trained to predict
    noise (step "ddim") or the flow velocity (step "flow_sde"), as its scheduler says."""
    from diffusers import StableDiffusionPipeline

    tok = build_tokenizer(words)
    vae = build_vae(image_size=image_size)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=build_text_encoder(tok, dim=text_dim), tokenizer=tok,
        unet=build_unet(image_size // factor, cross_attention_dim=text_dim, channels=unet_channels),
        scheduler=build_scheduler(step), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
