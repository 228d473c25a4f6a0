"""The model registry: built-in models, devices and dtypes, `--model` options, load errors."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from imagegen.consumers import synthetic
from imagegen.consumers.devices import resolve_device, resolve_dtype
from imagegen.consumers.models import ModelRegistry, UnknownModel, load_pipeline, parse_model_option
from imagegen.consumers.synthetic import tiny_dir
from imagegen.schemas.errors import ConfigError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny(cache_dir: Path) -> DiffusionPipeline:
    return load_pipeline("tiny", CPU, torch.float32, cache_dir)


def same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    one, other = first.state_dict(), second.state_dict()
    return one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)


def test_tiny_is_built_once_then_loaded_from_the_cache(
    cache_dir: Path, tiny: DiffusionPipeline
) -> None:
    index = tiny_dir(cache_dir) / "model_index.json"
    built_at = index.stat().st_mtime_ns
    again = load_pipeline("tiny", CPU, torch.float32, cache_dir)
    assert index.stat().st_mtime_ns == built_at
    # No staging directory left behind.
    assert [entry.name for entry in cache_dir.iterdir()] == [tiny_dir(cache_dir).name]
    assert same_weights(again.unet, tiny.unet)
    assert same_weights(again.text_encoder, tiny.text_encoder)


def test_tiny_is_ready_for_inference_on_the_device_and_dtype(tiny: DiffusionPipeline) -> None:
    for module in (tiny.unet, tiny.vae, tiny.text_encoder):
        assert (module.device, module.dtype, module.training) == (CPU, torch.float32, False)
        assert not any(parameter.requires_grad for parameter in module.parameters())


def test_builds_racing_into_one_cache_all_get_the_same_whole_model(
    tmp_path: Path, tiny: DiffusionPipeline
) -> None:
    start = threading.Barrier(3)

    def load(_: int) -> DiffusionPipeline:
        start.wait()
        return load_pipeline("tiny", CPU, torch.float32, tmp_path)

    with ThreadPoolExecutor(max_workers=3) as pool:
        loaded = list(pool.map(load, range(3)))
    assert [entry.name for entry in tmp_path.iterdir()] == [tiny_dir(tmp_path).name]
    for pipeline in loaded:
        for name in ("unet", "vae", "text_encoder"):
            assert same_weights(getattr(pipeline, name), getattr(tiny, name)), name


def test_a_changed_tiny_definition_is_cached_apart_from_the_old_one(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = tiny_dir(cache_dir)
    monkeypatch.setattr(synthetic, "_TINY_TEXT", {**synthetic._TINY_TEXT, "num_hidden_layers": 1})
    assert tiny_dir(cache_dir) != before


def test_building_tiny_leaves_the_callers_random_stream_alone(tmp_path: Path) -> None:
    caller_rng = torch.random.get_rng_state()
    load_pipeline("tiny", CPU, torch.float32, tmp_path)
    assert torch.equal(torch.random.get_rng_state(), caller_rng)


def test_tiny_tokenizer_spells_any_text_in_byte_level_bpe(tiny: DiffusionPipeline) -> None:
    tokenizer = tiny.tokenizer
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) <= tiny.text_encoder.config.vocab_size
    ids = tokenizer("The fox and the 🦊, café").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    # Every byte has a symbol, so nothing falls back to the unknown token (the end-of-text id).
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.convert_ids_to_tokens(ids[1]) == "the</w>"  # a merge applied
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the fox and the 🦊, café"


def test_a_foreign_directory_in_the_tiny_cache_is_named(tmp_path: Path) -> None:
    foreign = tiny_dir(tmp_path)
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError, match=r"holds no model_index\.json; delete it"):
        load_pipeline("tiny", CPU, torch.float32, tmp_path)
    assert [entry.name for entry in tmp_path.iterdir()] == [foreign.name]


def test_sd15_random_has_the_stable_diffusion_15_architecture(tmp_path: Path) -> None:
    # On the meta device: the full shapes without allocating or initialising ~1 GB of weights.
    pipeline = load_pipeline("sd15-random", torch.device("meta"), torch.float16, tmp_path)
    counts = {
        name: sum(parameter.numel() for parameter in getattr(pipeline, name).parameters())
        for name in ("unet", "vae", "text_encoder")
    }
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert pipeline.unet.dtype == pipeline.vae.dtype == pipeline.text_encoder.dtype == torch.float16
    assert pipeline.vae_scale_factor == 8
    assert len(pipeline.tokenizer) <= pipeline.text_encoder.config.vocab_size
    assert not list(tmp_path.iterdir())  # never cached on disk


def test_a_missing_local_directory_is_an_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(UnknownModel, match="no such directory; pass a directory holding"):
        load_pipeline(str(tmp_path / "sd15"), CPU, torch.float32, tmp_path)


def test_a_directory_without_a_pipeline_is_an_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(UnknownModel, match=r"model_index\.json") as caught:
        load_pipeline(str(tmp_path), CPU, torch.float32, tmp_path)
    assert isinstance(caught.value.__cause__, OSError)
    assert "tiny, sd15-random" in str(caught.value)


def test_a_malformed_hub_id_is_an_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(UnknownModel, match="could not be loaded"):
        load_pipeline("not a repo id", CPU, torch.float32, tmp_path)


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("tiny", ("tiny", "tiny")),
        ("stabilityai/sd-turbo", ("stabilityai/sd-turbo", "stabilityai/sd-turbo")),
        ("sd15=/models/stable-diffusion-v1-5", ("sd15", "/models/stable-diffusion-v1-5")),
        ("fast=tiny", ("fast", "tiny")),
        ("odd=/models/a=b", ("odd", "/models/a=b")),
    ],
)
def test_model_options(option: str, expected: tuple[str, str]) -> None:
    assert parse_model_option(option) == expected


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("/models/stable-diffusion-v1-5", "serve it under another name with NAME=SOURCE"),
        ("a/../b=tiny", "cannot be a model name"),
        ("-x=tiny", "cannot be a model name"),
        ("=tiny", "cannot be a model name"),
        ("sd15=", "has no source after '='"),
    ],
)
def test_bad_model_options(option: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_model_option(option)


def test_registry_serves_its_models_by_name(cache_dir: Path, tiny: DiffusionPipeline) -> None:
    registry = ModelRegistry.load(["tiny", "small=tiny"], CPU, torch.float32, cache_dir)
    assert registry.names == ["small", "tiny"]
    assert same_weights(registry.get("small").unet, tiny.unet)
    with pytest.raises(UnknownModel, match=r"'sd15' is not served by this worker.*: small, tiny"):
        registry.get("sd15")


@pytest.mark.parametrize(
    ("options", "message"),
    [([], "no --model given"), (["tiny", "tiny=/models/other"], "names 'tiny' twice")],
)
def test_registry_refuses_bad_option_sets(
    cache_dir: Path, options: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelRegistry.load(options, CPU, torch.float32, cache_dir)


def test_auto_device_is_the_best_one_available() -> None:
    if torch.cuda.is_available():
        expected = "cuda"
    elif torch.backends.mps.is_available():
        expected = "mps"
    else:
        expected = "cpu"
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device("cpu") == CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_says_what_to_choose() -> None:
    with pytest.raises(ConfigError, match=r"'cuda' is not available.*choose auto.*or cpu"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available here")
def test_mps_without_mps_says_what_to_choose() -> None:
    with pytest.raises(ConfigError, match=r"'mps' is not available.*Apple silicon"):
        resolve_device("mps")


def test_unknown_device_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="auto, cuda, mps, cpu"):
        resolve_device("tpu")


@pytest.mark.parametrize(
    ("choice", "device", "expected"),
    [
        ("auto", "cpu", torch.float32),
        ("auto", "cuda", torch.float16),
        ("auto", "mps", torch.float16),
        ("bfloat16", "cpu", torch.bfloat16),
        ("float32", "cuda", torch.float32),
        ("float16", "cuda", torch.float16),
    ],
)
def test_dtypes(choice: str, device: str, expected: torch.dtype) -> None:
    assert resolve_dtype(choice, torch.device(device)) == expected


def test_float16_on_cpu_says_what_to_use_instead() -> None:
    with pytest.raises(ConfigError, match="choose float32, or bfloat16"):
        resolve_dtype("float16", CPU)


def test_unknown_dtype_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="auto, float16, bfloat16, float32"):
        resolve_dtype("fp8", CPU)


def test_a_fixed_cost_model_takes_its_cost_per_call_and_draws_by_seed(cache_dir: Path) -> None:
    from imagegen.consumers.rendering import Renderer
    from imagegen.schemas import GenerationRequest

    registry = ModelRegistry.load(["tiny=fixed:300ms"], CPU, torch.float32, cache_dir)
    renderer = Renderer(registry.get("tiny"), CPU)
    requests = [
        GenerationRequest.new(user_id="ann", prompt=f"p{i}", width=64, height=64, steps=3, seed=i)
        for i in range(4)
    ]
    steps: list[tuple[int, int]] = []
    started = time.monotonic()
    batch = renderer.render(requests, on_step=lambda done, total: steps.append((done, total)))
    took_s = time.monotonic() - started
    # The cost is per call: four images take as long as one, and the steps are reported.
    assert took_s >= 0.3
    assert steps == [(1, 3), (2, 3), (3, 3)]
    alone = renderer.render(requests[1:2])
    assert [image.size for image in batch] == [(64, 64)] * 4
    assert batch[1].tobytes() == alone[0].tobytes()
    assert batch[0].tobytes() != batch[1].tobytes()


@pytest.mark.parametrize("source", ["fixed:", "fixed:0ms", "fixed:2min", "fixed:61s", "fixed:-1s"])
def test_a_fixed_cost_must_be_a_duration(source: str, cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match="fixed:<number>ms or fixed:<number>s"):
        load_pipeline(source, CPU, torch.float32, cache_dir)
