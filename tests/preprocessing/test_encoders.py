"""Encoder registry, architectures, weight resolution and the tile transform."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

from wsi_mil.errors import UnknownEncoderError, WeightsNotFoundError, WsiMilError
from wsi_mil.preprocessing import encoders
from wsi_mil.preprocessing.encoders import (
    create_encoder_model,
    encoder_cfg,
    list_encoders,
    load_encoder,
    preprocess_tile,
    register_encoder,
    resolve_precision,
)

# Published parameter counts (model cards / papers), in millions.
PUBLISHED_PARAMS_M = {
    "uni": 303,
    "uni2-h": 681,
    "virchow2": 632,
    "prov-gigapath": 1134,
    "h-optimus-0": 1134,
    "h-optimus-1": 1134,
    "resnet50-trunc": 8.5,
    "vit-s": 21.7,
}


def random_uint8_tiles(n: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(encoders.WEIGHTS_DIR_ENV, raising=False)


def test_registry_holds_the_required_encoders() -> None:
    assert set(list_encoders()) >= {
        "resnet50-trunc",
        "vit-s",
        "uni",
        "uni2-h",
        "virchow2",
        "prov-gigapath",
        "h-optimus-0",
        "h-optimus-1",
        "test-encoder",
    }
    assert list_encoders("h-optimus-*") == ["h-optimus-0", "h-optimus-1"]


def test_unknown_encoder_names_the_known_ones() -> None:
    with pytest.raises(UnknownEncoderError, match=r"Did you mean resnet50-trunc") as info:
        encoder_cfg("resnet50-trunk")
    assert "--encoder" in str(info.value) and "virchow2" in str(info.value)
    assert encoder_cfg("ResNet50_Trunc").name == "resnet50-trunc"


def test_register_encoder_warns_on_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoders, "_REGISTRY", dict(encoders._REGISTRY))
    custom = dataclasses.replace(encoder_cfg("test-encoder"), name="my-encoder")
    register_encoder(custom)
    assert encoder_cfg("my-encoder") is custom
    with pytest.warns(UserWarning, match="registered twice"):
        register_encoder(custom)
    with pytest.raises(ValueError, match="resize_size"):
        register_encoder(dataclasses.replace(custom, name="bad", resize_size=32))


@pytest.mark.parametrize("name", list_encoders())
def test_architecture_gives_embed_dim_and_published_size(name: str) -> None:
    """Every registered architecture, built on the meta device (no memory, no weights)."""
    cfg = encoder_cfg(name)
    with torch.device("meta"):
        model = create_encoder_model(cfg)
        out = model(torch.empty(2, 3, cfg.img_size, cfg.img_size))
    assert tuple(out.shape) == (2, cfg.embed_dim)
    if cfg.output != "pooled" and cfg.output != "layer3_avgpool":
        assert model.trunk.num_prefix_tokens == cfg.num_prefix_tokens
    if name in PUBLISHED_PARAMS_M:
        params_m = sum(p.numel() for p in model.parameters()) / 1e6
        assert params_m == pytest.approx(PUBLISHED_PARAMS_M[name], rel=0.01)


def test_register_tokens_match_the_cards() -> None:
    with torch.device("meta"):
        for name, prefix in (("uni2-h", 9), ("virchow2", 5), ("h-optimus-0", 5), ("uni", 1)):
            trunk = create_encoder_model(encoder_cfg(name)).trunk
            assert trunk.num_prefix_tokens == prefix, name


def test_cls_plus_mean_patch_skips_register_tokens() -> None:
    encoder = load_encoder("test-encoder", weights="random", device="cpu")
    x = encoder.normalize(random_uint8_tiles(3, 64))
    with torch.inference_mode():
        tokens = encoder.model.trunk.forward_features(x)  # [3, 1 + 2 registers + 16, 16]
        out = encoder.model(x)
    assert tokens.shape == (3, 19, 16)
    expected = torch.cat([tokens[:, 0], tokens[:, 3:].mean(dim=1)], dim=-1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with_registers = torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)
    assert not torch.allclose(out, with_registers)


def test_resnet50_trunc_is_layer3_average_pooled() -> None:
    full = timm.create_model("resnet50", pretrained=False).eval()
    encoder = load_encoder("resnet50-trunc", weights="random", device="cpu")
    full.load_state_dict(encoder.model.trunk.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        h = full.maxpool(full.act1(full.bn1(full.conv1(x))))
        expected = full.layer3(full.layer2(full.layer1(h))).mean(dim=(2, 3))
        out = encoder.model(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 1024)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_embed_normalises_uint8_input_like_torchvision() -> None:
    encoder = load_encoder("test-encoder", weights="random", device="cpu")
    images = random_uint8_tiles(4, 64)
    normalise = transforms.Normalize(encoder.cfg.mean, encoder.cfg.std)
    expected_input = torch.stack([normalise(img.float() / 255) for img in images])
    with torch.inference_mode():
        expected = encoder.model(expected_input)
    torch.testing.assert_close(encoder.embed(images, precision="fp32"), expected)
    assert encoder.embed(images).dtype == torch.float32


@pytest.mark.parametrize("name", ["prov-gigapath", "virchow2", "uni"])
def test_preprocess_tile_matches_the_published_transform(name: str) -> None:
    cfg = encoder_cfg(name)
    tile = np.random.default_rng(1).integers(0, 256, size=(300, 300, 3), dtype=np.uint8)
    interpolation = transforms.InterpolationMode(cfg.interpolation)
    reference = transforms.Compose(
        [
            transforms.Resize(cfg.resize_size, interpolation=interpolation),
            transforms.CenterCrop(cfg.img_size),
            transforms.PILToTensor(),
        ]
    )(Image.fromarray(tile))
    out = preprocess_tile(tile, cfg)
    assert out.dtype == torch.uint8 and out.shape == (3, cfg.img_size, cfg.img_size)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_preprocess_tile_passes_an_exact_size_tile_through() -> None:
    cfg = encoder_cfg("test-encoder")
    tile = np.random.default_rng(2).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess_tile(tile, cfg).permute(1, 2, 0).numpy(), tile)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_tile(tile.astype(np.float32), cfg)


def test_random_weights_are_reproducible_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = load_encoder("test-encoder", weights="random", device="cpu")
    assert torch.equal(torch.get_rng_state(), state)
    second = load_encoder("test-encoder", weights="random", device="cpu")
    images = random_uint8_tiles(3, 64)
    torch.testing.assert_close(first.embed(images), second.embed(images), rtol=0, atol=0)


def test_random_weights_are_recorded_as_random() -> None:
    encoder = load_encoder("test-encoder", weights="random", device="cpu")
    assert (encoder.weights, encoder.weights_sha256) == ("random", None)
    assert encoder.device == torch.device("cpu")
    assert not encoder.model.training
    assert encoder.transform_info() == {
        "size": 64,
        "resize": 64,
        "crop": 64,
        "interpolation": "bilinear",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "output": "cls+mean_patch",
    }


@pytest.mark.parametrize("file_name", ["model.safetensors", "ckpt.pth", "pytorch_model.bin"])
def test_local_weights_round_trip(tmp_path: Path, file_name: str) -> None:
    source = load_encoder("test-encoder", weights="random", device="cpu")
    state = source.model.trunk.state_dict()
    path = tmp_path / file_name
    if file_name.endswith(".safetensors"):
        save_file(state, path)
    else:  # DataParallel-style prefixes and a classifier head are tolerated
        wrapped = {f"module.{k}": v for k, v in state.items()}
        wrapped["module.head.weight"] = torch.zeros(10, 32)
        torch.save({"state_dict": wrapped}, path)

    loaded = load_encoder("test-encoder", weights=path, device="cpu")
    images = random_uint8_tiles(5, 64)
    torch.testing.assert_close(loaded.embed(images), source.embed(images), rtol=0, atol=0)
    assert loaded.weights == str(path)
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_weights_dir_env_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = load_encoder("test-encoder", weights="random", device="cpu")
    folder = tmp_path / "test-encoder"
    folder.mkdir()
    save_file(source.model.trunk.state_dict(), folder / "model.safetensors")
    monkeypatch.setenv(encoders.WEIGHTS_DIR_ENV, str(tmp_path))
    loaded = load_encoder("test-encoder", device="cpu")
    assert loaded.weights == str(folder / "model.safetensors")
    images = random_uint8_tiles(2, 64)
    torch.testing.assert_close(loaded.embed(images), source.embed(images), rtol=0, atol=0)


def test_full_resnet50_checkpoint_loads_into_the_truncated_trunk(tmp_path: Path) -> None:
    torch.manual_seed(1)
    full = timm.create_model("resnet50", pretrained=False)
    torch.save(full.state_dict(), tmp_path / "resnet50.pth")
    encoder = load_encoder("resnet50-trunc", weights=tmp_path / "resnet50.pth", device="cpu")
    torch.testing.assert_close(
        encoder.model.trunk.state_dict()["layer3.5.conv3.weight"],
        full.state_dict()["layer3.5.conv3.weight"],
    )


def test_checkpoint_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    state = load_encoder("test-encoder", weights="random", device="cpu").model.trunk.state_dict()
    del state["blocks.1.mlp.fc2.weight"]
    state["blocks.9.attn.qkv.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "other.safetensors")
    with pytest.raises(
        WeightsNotFoundError,
        match=r"1 missing keys.*blocks.1.mlp.fc2.weight.*"
        r"1 unexpected keys.*blocks.9.attn.qkv.weight",
    ):
        load_encoder("test-encoder", weights=tmp_path / "other.safetensors", device="cpu")
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(WeightsNotFoundError, match="unsupported weights file type"):
        load_encoder("test-encoder", weights=tmp_path / "notes.txt", device="cpu")


def test_offline_gated_encoder_explains_every_way_to_get_weights(no_hub: None) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        load_encoder("uni", device="cpu")
    message = str(info.value)
    for needle in (
        "HF_HUB_OFFLINE",
        "--weights PATH",
        "$WSI_MIL_WEIGHTS_DIR/uni/model.safetensors",
        "huggingface-cli login",
        "https://huggingface.co/MahmoodLab/uni",
        "--weights random",
    ):
        assert needle in message


def test_missing_weights_file_and_unpublished_encoder(tmp_path: Path, no_hub: None) -> None:
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_encoder("vit-s", weights=tmp_path / "nope.safetensors", device="cpu")
    with pytest.raises(WeightsNotFoundError, match=r"has no published weights.*--weights random"):
        load_encoder("test-encoder", device="cpu")


def test_resolve_precision() -> None:
    cfg = encoder_cfg("resnet50-trunc")
    assert resolve_precision("auto", cfg, torch.device("cpu")) == "bf16"
    assert resolve_precision("auto", cfg, torch.device("cuda")) == "fp32"
    assert resolve_precision("auto", encoder_cfg("uni2-h"), torch.device("cuda")) == "bf16"
    assert resolve_precision("auto", encoder_cfg("uni"), torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", cfg, torch.device("cpu")) == "fp16"
    with pytest.raises(WsiMilError, match="--precision"):
        resolve_precision("int8", cfg, torch.device("cpu"))


def _real_tiles(slides_dir: Path, cfg: encoders.EncoderCfg, count: int) -> torch.Tensor:
    """`count` decoded, resized tissue tiles of CMU-1-Small-Region as uint8 `[count, 3, S, S]`."""
    from wsi_mil.preprocessing.slide import open_slide
    from wsi_mil.preprocessing.tiling import TilingParams, read_tile, tile_grid
    from wsi_mil.preprocessing.tissue import TissueParams, segment_tissue

    with open_slide(slides_dir / "tissue" / "CMU-1-Small-Region.svs") as slide:
        grid = tile_grid(slide, segment_tissue(slide, TissueParams()), TilingParams())
        return torch.stack([preprocess_tile(read_tile(slide, grid, i), cfg) for i in range(count)])


def _compiled_against_fp32(name: str, slides_dir: Path, *, batch: int, count: int) -> tuple[np.ndarray, encoders.Encoder]:
    encoder = load_encoder(name, weights="random", device="cpu")
    tiles = _real_tiles(slides_dir, encoder.cfg, count)
    fp32 = encoder.embed(tiles, precision="fp32").numpy()
    seconds = encoder.compile(batch_size=batch, precision="bf16")
    assert seconds is not None and encoder.compiled is not None
    compiled = torch.cat([encoder.embed(tiles[i : i + batch], precision="bf16") for i in range(0, count, batch)])
    cos = torch.nn.functional.cosine_similarity(compiled, torch.from_numpy(fp32)).numpy()
    return cos, encoder


@pytest.mark.slow
def test_compiled_encoder_stays_within_the_bf16_tolerance_of_fp32(slides_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The criterion bf16 itself meets (cosine 0.999 to fp32), on real tiles, with a padded last batch.
    Slow (a cold compile: 40 s to minutes on 2 cores): `pytest -m slow tests/preprocessing/test_encoders.py -k compiled`."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    cos, encoder = _compiled_against_fp32("test-encoder", slides_dir, batch=4, count=6)
    assert cos.min() > 0.999
    assert encoder.compiled_batch == 4 and encoder.compiled_precision == "bf16"
    assert any((tmp_path / "inductor").iterdir()), "compiled kernels should be cached in TORCHINDUCTOR_CACHE_DIR"


@pytest.mark.slow
def test_compiled_resnet50_trunc_stays_within_the_bf16_tolerance_of_fp32(slides_dir: Path) -> None:
    """`pytest -m slow tests/preprocessing/test_encoders.py -k compiled_resnet` (compiles for minutes on 2 cores)."""
    cos, _ = _compiled_against_fp32("resnet50-trunc", slides_dir, batch=8, count=12)
    assert cos.min() > 0.999


def test_failed_compile_warns_and_keeps_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "no-such-compiler")))
    encoder = load_encoder("test-encoder", weights="random", device="cpu")
    tiles = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with pytest.warns(UserWarning, match="running eager"):
        assert encoder.compile(batch_size=3) is None
    assert encoder.compiled is None
    assert encoder.embed(tiles).shape == (3, 32)


def test_auto_compiles_only_where_measured_to_pay_off(monkeypatch: pytest.MonkeyPatch) -> None:
    resnet = load_encoder("resnet50-trunc", weights="random", device="cpu")
    threshold = resnet.cfg.cpu_compile_min_tiles
    assert threshold is not None
    assert resnet.should_compile(threshold) and not resnet.should_compile(threshold - 1)
    assert resnet.should_compile(1, "on") and not resnet.should_compile(10**6, "off")
    assert not load_encoder("test-encoder", weights="random", device="cpu").should_compile(10**6)
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert not resnet.should_compile(threshold), "no C++ compiler: torch.compile cannot build kernels"
