"""The model registry: which pipelines a render worker serves, and where each one comes from.

A `--model` option is `SOURCE` or `NAME=SOURCE`. A source is a built-in (`tiny`, `sd15-random`),
a local directory holding a diffusers pipeline, or a Hugging Face hub id.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from pydantic import TypeAdapter, ValidationError
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from imagegen.schemas.errors import ConfigError, ImagegenError
from imagegen.schemas.fields import ModelName

BUILTIN_MODELS = ("tiny", "sd15-random")
_SOURCE_HELP = (
    "; pass a directory holding a diffusers pipeline (with model_index.json), the id of a hub "
    f"model that is cached or reachable, or a built-in: {', '.join(BUILTIN_MODELS)}"
)

_MODEL_NAME = TypeAdapter(ModelName)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

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


class UnknownModel(ImagegenError):
    """A model name this worker does not serve, or a source that holds no loadable pipeline."""


def resolve_device(choice: str) -> torch.device:
    """The device for `choice`: auto (cuda, else mps, else cpu), cuda, mps or cpu."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if choice == "auto":
        return torch.device(next(kind for kind, usable in available.items() if usable))
    if choice not in available:
        raise ConfigError(f"device {choice!r} is not one of auto, cuda, mps, cpu")
    if not available[choice]:
        raise ConfigError(
            f"device {choice!r} is not available here ({_why_unavailable(choice)}); "
            "choose auto to take the best device there is, or cpu"
        )
    return torch.device(choice)


def _why_unavailable(kind: str) -> str:
    if kind == "mps":
        return "MPS needs Apple silicon and a torch build with MPS support"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    return "no CUDA GPU is visible; check the driver and CUDA_VISIBLE_DEVICES"


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for `choice`: auto (float16 on GPUs, float32 on cpu) or a dtype name."""
    if choice == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if choice not in _DTYPES:
        raise ConfigError(f"dtype {choice!r} is not one of auto, {', '.join(_DTYPES)}")
    if choice == "float16" and device.type == "cpu":
        raise ConfigError(
            "float16 on cpu is far slower than float32 and some operators lack it; "
            "choose float32, or bfloat16 to halve the memory"
        )
    return _DTYPES[choice]


def parse_model_option(value: str) -> tuple[str, str]:
    """Split a `--model` option, `SOURCE` or `NAME=SOURCE`, into (name, source)."""
    name, sep, source = value.partition("=")
    if not sep:
        source = name
    if not source:
        raise ConfigError(f"--model {value!r} has no source after '='; give NAME=SOURCE")
    try:
        _MODEL_NAME.validate_python(name)
    except ValidationError:
        raise ConfigError(
            f"--model {value!r}: {name!r} cannot be a model name, which requests spell with "
            "1-128 letters, digits, '.', '_', '/' or '-', starting with a letter or digit and "
            "without '..' segments; serve it under another name with NAME=SOURCE, for example "
            "sd15=/models/stable-diffusion-v1-5"
        ) from None
    return name, source


def load_pipeline(
    source: str, device: torch.device, dtype: torch.dtype, cache_dir: Path
) -> DiffusionPipeline:
    """The pipeline `source` names, on `device` in `dtype`, ready for inference.

    `tiny` is built once into `cache_dir` and loaded from there afterwards. Raises
    `UnknownModel` when `source` is neither a built-in nor a loadable directory or hub id.
    """
    if source == "sd15-random":
        pipeline = _sd15_random(device, dtype)
    else:
        location = _cached_tiny(cache_dir) if source == "tiny" else source
        pipeline = _from_pretrained(location, dtype).to(device)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class ModelRegistry:
    """The pipelines one worker serves, under the names that requests use for them."""

    def __init__(self, pipelines: Mapping[str, DiffusionPipeline]) -> None:
        self._pipelines = dict(pipelines)

    @classmethod
    def load(
        cls, options: Iterable[str], device: torch.device, dtype: torch.dtype, cache_dir: Path
    ) -> ModelRegistry:
        """Load the pipeline of every `--model` option."""
        pipelines: dict[str, DiffusionPipeline] = {}
        for option in options:
            name, source = parse_model_option(option)
            if name in pipelines:
                raise ConfigError(
                    f"--model names {name!r} twice; give each source its own name with NAME=SOURCE"
                )
            pipelines[name] = load_pipeline(source, device, dtype, cache_dir)
        if not pipelines:
            raise ConfigError(f"no --model given; serve at least one, such as {BUILTIN_MODELS[0]}")
        return cls(pipelines)

    @property
    def names(self) -> list[str]:
        return sorted(self._pipelines)

    def get(self, name: str) -> DiffusionPipeline:
        """The pipeline served as `name`; `UnknownModel` when this worker does not serve it."""
        try:
            return self._pipelines[name]
        except KeyError:
            raise UnknownModel(
                f"model {name!r} is not served by this worker, which serves: "
                f"{', '.join(self.names)}"
            ) from None


def _from_pretrained(source: str | Path, dtype: torch.dtype) -> DiffusionPipeline:
    local = Path(source).expanduser()
    # Paths never fall through to the hub: a typo'd directory must not become a download.
    if not local.is_dir() and (local.is_absolute() or str(source).startswith((".", "~"))):
        raise UnknownModel(f"model source {str(source)!r}: no such directory{_SOURCE_HELP}")
    try:
        return DiffusionPipeline.from_pretrained(
            str(local) if local.is_dir() else source, torch_dtype=dtype
        )
    except (OSError, ValueError) as exc:
        raise UnknownModel(
            f"model source {str(source)!r} could not be loaded ({exc}){_SOURCE_HELP}"
        ) from exc


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


def _cached_tiny(cache_dir: Path) -> Path:
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


def _tiny(tokenizer_dir: Path) -> StableDiffusionPipeline:
    tokenizer = _tokenizer(tokenizer_dir)
    # Seeded, so that every worker that builds it gets the same weights, hence the same images.
    with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        unet = UNet2DConditionModel(**_TINY_UNET)
        vae = AutoencoderKL(**_TINY_VAE)
        text_encoder = CLIPTextModel(_text_config(tokenizer, _TINY_TEXT))
    return _stable_diffusion(unet, vae, text_encoder, tokenizer)


def _sd15_random(device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
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
        torch.nn.Module.to(module, dtype=dtype)
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
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


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
    return CLIPTokenizer.from_pretrained(directory, model_max_length=_MAX_TOKENS)


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
