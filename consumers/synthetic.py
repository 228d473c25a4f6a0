"""The built-in models, built in code rather than downloaded: `tiny` and `sd15-random`.

- `tiny`: a Stable Diffusion pipeline a few MB in size, seeded, so every worker that builds it
  renders the same images. Built once into a cache directory and loaded from there.
- `sd15-random`: Stable Diffusion 1.5's architecture with random weights: the compute of the
  released model without its download, for benchmarks. Built afresh on every load.

Both carry a small byte-level BPE tokenizer written here, so neither needs the hub.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, cast

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

# From its own module: diffusers' lazy `__init__` type-checks as a placeholder class.
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from imagegen.schemas.errors import ConfigError

BUILTIN_MODELS = ("tiny", "sd15-random")

# Stable Diffusion 1.5's noise schedule, shared by both built-ins.
_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

# Two downsampling steps in the VAE and one in the UNet: any side that is a multiple of 8 gives
# a latent side that is a multiple of 2, which the UNet halves cleanly. The VAE's second step
# quarters the UNet's work: a 64x64 image takes a 16x16 latent.
_TINY_UNET: dict[str, Any] = {
    "sample_size": 32,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
}
_TINY_VAE: dict[str, Any] = {
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "latent_channels": 4,
}
_TINY_TEXT: dict[str, Any] = {
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}

# Stable Diffusion 1.5's architecture: same shapes, so the same compute, as the released model.
_SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
_SD15_VAE: dict[str, Any] = {
    "sample_size": 512,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
}
_SD15_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
}

# A few merges so the tokenizer really does byte-pair encoding; the byte symbols alone
# already spell any text.
_MERGES = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("o", "n</w>"),
    ("e", "r</w>"),
)
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_MAX_TOKENS = 77

# The tiny model is seeded through torch's process-wide generator: one build at a time.
_SEEDED_BUILD = threading.Lock()
_TINY_SEED = 0


def tiny_dir(cache_dir: Path) -> Path:
    """Where `tiny` is cached under `cache_dir`.

    The name carries a digest of tiny's definition and of the libraries that build it (their
    initialisation decides the weights), so a change to either is built anew instead of
    loading an older tiny from the cache.
    """
    definition = json.dumps(
        [
            *(_TINY_UNET, _TINY_VAE, _TINY_TEXT, _SCHEDULER, _TINY_SEED),
            *(_MERGES, _SPECIAL_TOKENS, _MAX_TOKENS),
            *(torch.__version__, diffusers.__version__, transformers.__version__),
        ]
    )
    return cache_dir / f"tiny-{hashlib.sha256(definition.encode()).hexdigest()[:12]}"


def cached_tiny(cache_dir: Path) -> Path:
    """Where `tiny` is cached under `cache_dir`, built there first if it is not yet."""
    target = tiny_dir(cache_dir)
    if (target / "model_index.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed into place, so a process starting beside this one sees either
    # no model or a whole one.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=cache_dir))
    try:
        _tiny(staging / "tokenizer").save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise ConfigError(
                    f"{target} exists but holds no model_index.json; delete it and the tiny "
                    "model is built again"
                ) from None
            # Another process got there first with the same model: keep its copy.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _tiny(tokenizer_dir: Path) -> DiffusionPipeline:
    tokenizer = _tokenizer(tokenizer_dir)
    # Seeded, so that every worker that builds it gets the same weights, hence the same images.
    with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        unet = UNet2DConditionModel(**_TINY_UNET)
        vae = AutoencoderKL(**_TINY_VAE)
        text_encoder = CLIPTextModel(_text_config(tokenizer, _TINY_TEXT))
    return _stable_diffusion(unet, vae, text_encoder, tokenizer)


def sd15_random(device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    """Stable Diffusion 1.5 with random weights, on `device` in `dtype`."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _tokenizer(Path(scratch))
    # Initialised where it will run: random init of ~1.1B weights is quick on a GPU, slow on a
    # CPU. The weights' values do not change the compute, so they are not seeded.
    with torch.device(device):
        unet = UNet2DConditionModel(**_SD15_UNET)
        vae = AutoencoderKL(**_SD15_VAE)
        text_encoder = CLIPTextModel(_text_config(tokenizer, _SD15_TEXT))
    for module in (unet, vae, text_encoder):
        # torch's own `to`: diffusers 0.39's `ModelMixin.to` warns on every dtype cast that
        # some modules should stay float32, even when the model has none.
        torch.nn.Module.to(module, dtype=dtype)  # type: ignore[type-var]  # placeholder types
    return _stable_diffusion(unet, vae, text_encoder, tokenizer)


def _text_config(tokenizer: CLIPTokenizer, size: dict[str, Any]) -> CLIPTextConfig:
    # The pooled output looks for the end-of-text id, so it has to be the tokenizer's.
    return CLIPTextConfig(
        **size,
        max_position_embeddings=_MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _stable_diffusion(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
) -> DiffusionPipeline:
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Type-checked, diffusers' top-level names are placeholders: this is a DiffusionPipeline.
    return cast(DiffusionPipeline, pipeline)


def _tokenizer(directory: Path) -> CLIPTokenizer:
    """A CLIP-style byte-level BPE tokenizer, written into `directory` and loaded from there."""
    symbols = _byte_symbols()
    tokens = [
        *symbols,
        *(symbol + "</w>" for symbol in symbols),
        *("".join(pair) for pair in _MERGES),
        *_SPECIAL_TOKENS,
    ]
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "".join(f"{left} {right}\n" for left, right in _MERGES)
    (directory / "merges.txt").write_text(f"#version: 0.2\n{merges}", encoding="utf-8")
    tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(
        directory, model_max_length=_MAX_TOKENS
    )
    return tokenizer


def _byte_symbols() -> list[str]:
    """The 256 characters that byte-level BPE writes for the bytes 0-255, in byte order."""
    # Printable Latin-1 bytes stand for themselves; the rest (controls, space, no-break space,
    # soft hyphen) take the characters from U+0100 on, so no symbol is whitespace or invisible.
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    symbols: list[str] = []
    shifted = 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols
