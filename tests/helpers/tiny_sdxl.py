"""Tiny random-weight SDXL inpainting components, built from configs and saved like a user's model folder.

Sizes follow diffusers' own `get_dummy_components` for the SDXL pipelines. The tokenizers get a byte-level
vocabulary (every byte, with and without the end-of-word marker, no merges): a real CLIP BPE tokenizer, just
a tiny one, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _tiny_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    for ch in chars:
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", model_max_length=77)


def build_tiny_sdxl(folder: Path, *, in_channels: int = 9, seed: int = 0) -> Path:
    """Save a tiny StableDiffusionXLInpaintPipeline (9-channel inpainting or 4-channel base UNet) to `folder`."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids × 8 + 32 (pooled text)
        cross_attention_dim=64, norm_num_groups=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=128,
                        force_upcast=False)
    tokenizer = _tiny_tokenizer()
    # as in real SDXL, the embedding table has exactly one row per token (textual inversion resizes it to that)
    text_config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, hidden_size=32, intermediate_size=37,
                                 layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5, pad_token_id=1,
                                 vocab_size=len(tokenizer), hidden_act="gelu", projection_dim=32)
    pipe = StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config), text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(str(folder))
    return folder


def build_tiny_safety_checker(folder: Path, *, flag_everything: bool) -> Path:
    """A tiny StableDiffusionSafetyChecker whose concept thresholds flag every image, or none."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 37, "num_attention_heads": 2, "num_hidden_layers": 1,
                     "vocab_size": 1000, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 37, "num_attention_heads": 2, "num_hidden_layers": 1,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        # flagged when cos(image, concept) - threshold > 0; cosine is within [-1, 1]
        threshold = -2.0 if flag_everything else 2.0
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    checker.save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


def save_tiny_lora(model: Path, folder: Path) -> Path:
    """A LoRA for the tiny UNet in `model` with random (non-zero) weights, saved as diffusers saves LoRAs to
    `folder / "style"`; returns `folder`."""
    from diffusers import StableDiffusionXLInpaintPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(str(model), local_files_only=True)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionXLInpaintPipeline.save_lora_weights(str(folder / "style"), unet_lora_layers=layers)
    return folder
