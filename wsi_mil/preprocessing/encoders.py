"""Tile encoders as data: an `EncoderCfg` registry, one timm builder, weight resolution and the
tile transform (resize, centre-crop, normalise) each encoder was trained with.

Weights are resolved in a fixed order: an explicit file (`--weights PATH`), then
`$WSI_MIL_WEIGHTS_DIR/<encoder name>/`, then the Hugging Face hub through timm. Random weights
only come from `weights="random"`, and they are recorded as such in every feature file.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import os
import shutil
import time
import warnings
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from wsi_mil.errors import UnknownEncoderError, WeightsNotFoundError, WsiMilError

OutputMode = Literal["pooled", "cls", "cls+mean_patch", "layer3_avgpool"]
Precision = Literal["fp16", "bf16", "fp32"]
Interpolation = Literal["bilinear", "bicubic"]

WEIGHTS_DIR_ENV = "WSI_MIL_WEIGHTS_DIR"
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
STATE_DICT_PREFIXES = ("module.", "model.", "trunk.", "encoder.", "backbone.")
RANDOM_WEIGHTS_SEED = 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

#: torch.compile pays off for resnet50-trunc on CPU from about this many tiles: compiling takes ~30-45 s
#: with a cold kernel cache (less when warm) and saves up to ~20 % of the forward on top of jemalloc
#: (docs/benchmarks.md), so even a first, cold run breaks even here
CPU_COMPILE_MIN_TILES_RESNET50 = 10_000
#: where torch.compile keeps its compiled kernels between runs (unless TORCHINDUCTOR_CACHE_DIR is set)
INDUCTOR_CACHE_SUBDIR = Path("wsi-mil") / "inductor"

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}
_PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class EncoderCfg:
    """Everything needed to build an encoder, feed it tiles and record what was done.

    `resize_size` is the side a tile is resized to before a centre crop to `img_size`
    (GigaPath: 256 -> 224); it equals `img_size` for a plain resize. `cpu_precision` is what
    `precision="auto"` uses on CPU: bf16 only where its features were measured within cosine
    0.999 of fp32. `ignore_unexpected_keys` are checkpoint key prefixes the trunk does not use
    (a classifier head, ResNet's layer4). `cpu_compile_min_tiles`: `compile="auto"` compiles the
    model with torch.compile on CPU for a slide of at least this many tiles, where its compile
    time was measured to pay off (None: never by default).
    """

    name: str
    timm_name: str
    hf_hub_id: str | None
    embed_dim: int
    img_size: int
    resize_size: int
    interpolation: Interpolation
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    output: OutputMode = "pooled"
    num_prefix_tokens: int = 1
    gpu_precision: Precision = "fp32"
    cpu_precision: Precision = "fp32"
    channels_last: bool = False
    gated: bool = False
    license: str = ""
    ignore_unexpected_keys: tuple[str, ...] = ("head.", "fc.", "classifier.")
    summary: str = ""
    cpu_compile_min_tiles: int | None = None


_REGISTRY: dict[str, EncoderCfg] = {}


def register_encoder(cfg: EncoderCfg) -> EncoderCfg:
    """Add `cfg` to the registry under `cfg.name`; a second registration warns and wins."""
    if cfg.resize_size < cfg.img_size:
        raise ValueError(f"encoder {cfg.name!r}: resize_size must be >= img_size")
    if cfg.name in _REGISTRY:
        warnings.warn(f"encoder {cfg.name!r} registered twice; the later one wins", stacklevel=2)
    _REGISTRY[cfg.name] = cfg
    return cfg


def list_encoders(pattern: str = "*") -> list[str]:
    """Registered encoder names matching an fnmatch pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def encoder_cfg(name: str) -> EncoderCfg:
    """The registered config of `name` (underscores are read as hyphens, case is ignored)."""
    key = name.strip().lower().replace("_", "-")
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownEncoderError(
        f"unknown encoder {name!r}.{hint} Known encoders (--encoder): {', '.join(list_encoders())}"
    )


_SWIGLU_VIT = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU}

register_encoder(
    EncoderCfg(
        name="resnet50-trunc",
        timm_name="resnet50.tv_in1k",
        hf_hub_id="timm/resnet50.tv_in1k",
        embed_dim=1024,
        img_size=224,
        resize_size=224,
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        timm_kwargs={"features_only": True, "out_indices": (3,)},
        output="layer3_avgpool",
        gpu_precision="fp32",
        cpu_precision="bf16",
        channels_last=True,
        license="BSD-3-Clause (torchvision weights)",
        ignore_unexpected_keys=("layer4.", "fc."),
        summary="CLAM's truncated ImageNet ResNet-50: layer3 + global average pool",
        cpu_compile_min_tiles=CPU_COMPILE_MIN_TILES_RESNET50,
    )
)
register_encoder(
    EncoderCfg(
        name="vit-s",
        timm_name="vit_small_patch16_224.dino",
        hf_hub_id="timm/vit_small_patch16_224.dino",
        embed_dim=384,
        img_size=224,
        resize_size=224,
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        timm_kwargs={"num_classes": 0},
        output="cls",
        gpu_precision="fp32",
        cpu_precision="bf16",
        license="Apache-2.0",
        summary="ViT-S/16 self-supervised with DINO on ImageNet (CLS token)",
    )
)
register_encoder(
    EncoderCfg(
        name="uni",
        timm_name="vit_large_patch16_224",
        hf_hub_id="MahmoodLab/uni",
        embed_dim=1024,
        img_size=224,
        resize_size=224,
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        timm_kwargs={
            "img_size": 224,
            "patch_size": 16,
            "init_values": 1e-5,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        gpu_precision="fp16",
        gated=True,
        license="CC-BY-NC-ND-4.0",
        summary="UNI (ViT-L/16), Mahmood Lab",
    )
)
register_encoder(
    EncoderCfg(
        name="uni2-h",
        timm_name="vit_giant_patch14_224",
        hf_hub_id="MahmoodLab/UNI2-h",
        embed_dim=1536,
        img_size=224,
        resize_size=224,
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        timm_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
            **_SWIGLU_VIT,
        },
        num_prefix_tokens=9,
        gpu_precision="bf16",
        gated=True,
        license="CC-BY-NC-ND-4.0",
        summary="UNI2-h (ViT-H/14, 8 registers; CLS token), Mahmood Lab",
    )
)
register_encoder(
    EncoderCfg(
        name="virchow2",
        timm_name="vit_huge_patch14_224",
        hf_hub_id="paige-ai/Virchow2",
        embed_dim=2560,
        img_size=224,
        resize_size=224,
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            **_SWIGLU_VIT,
        },
        output="cls+mean_patch",
        num_prefix_tokens=5,
        gpu_precision="fp16",
        gated=True,
        license="CC-BY-NC-ND-4.0",
        summary="Virchow2 (ViT-H/14, 4 registers): concat(CLS, mean of patch tokens), Paige",
    )
)
register_encoder(
    EncoderCfg(
        name="prov-gigapath",
        timm_name="vit_giant_patch14_dinov2",
        hf_hub_id="prov-gigapath/prov-gigapath",
        embed_dim=1536,
        img_size=224,
        resize_size=256,
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        timm_kwargs={
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
        },
        gpu_precision="fp16",
        gated=True,
        license="Apache-2.0 (gated)",
        summary="Prov-GigaPath tile encoder (ViT-g/16; CLS token), Microsoft/Providence",
    )
)
for _hoptimus_name, _hoptimus_id, _hoptimus_gated, _hoptimus_license in (
    ("h-optimus-0", "bioptimus/H-optimus-0", False, "Apache-2.0"),
    ("h-optimus-1", "bioptimus/H-optimus-1", True, "see the model card (gated)"),
):
    register_encoder(
        EncoderCfg(
            name=_hoptimus_name,
            timm_name="vit_giant_patch14_reg4_dinov2",
            hf_hub_id=_hoptimus_id,
            embed_dim=1536,
            img_size=224,
            resize_size=224,
            interpolation="bilinear",
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            timm_kwargs={
                "img_size": 224,
                "num_classes": 0,
                "global_pool": "token",
                "init_values": 1e-5,
                "dynamic_img_size": False,
            },
            num_prefix_tokens=5,
            gpu_precision="fp16",
            gated=_hoptimus_gated,
            license=_hoptimus_license,
            summary=f"{_hoptimus_id.split('/')[1]} (ViT-g/14, 4 registers; CLS token), Bioptimus",
        )
    )
register_encoder(
    EncoderCfg(
        name="test-encoder",
        timm_name="vit_tiny_patch16_224",
        hf_hub_id=None,
        embed_dim=32,
        img_size=64,
        resize_size=64,
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        timm_kwargs={
            "img_size": 64,
            "patch_size": 16,
            "embed_dim": 16,
            "depth": 2,
            "num_heads": 2,
            "reg_tokens": 2,
            "num_classes": 0,
        },
        output="cls+mean_patch",
        num_prefix_tokens=3,
        license="none (random weights only)",
        summary="tiny random ViT (64 px, 2 registers, CLS + mean patch = 32-d) for fast tests",
    )
)


class EncoderNet(nn.Module):
    """A timm trunk plus the output assembly its cfg names: normalised `[B, 3, S, S]` -> `[B, D]`."""

    def __init__(self, trunk: nn.Module, *, output: OutputMode, num_prefix_tokens: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.output = output
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output == "pooled":
            return self.trunk(x)
        if self.output == "layer3_avgpool":
            (layer3,) = self.trunk(x)  # [B, 1024, S/16, S/16]
            return layer3.mean(dim=(2, 3))
        tokens = self.trunk.forward_features(x)  # [B, prefix + patches, E]
        cls_token = tokens[:, 0]
        if self.output == "cls":
            return cls_token
        patch_mean = tokens[:, self.num_prefix_tokens :].mean(dim=1)
        return torch.cat([cls_token, patch_mean], dim=-1)  # [B, 2E]


def create_encoder_model(cfg: EncoderCfg) -> EncoderNet:
    """Build the architecture of `cfg` with random weights (never downloads anything)."""
    trunk = timm.create_model(cfg.timm_name, pretrained=False, **cfg.timm_kwargs)
    return EncoderNet(trunk, output=cfg.output, num_prefix_tokens=cfg.num_prefix_tokens)


def sha256_of_file(path: Path, *, chunk_bytes: int = 8 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-GB checkpoints stay out of memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors`, `.bin`, `.pth` or `.pt` checkpoint, unwrapped from
    `{"state_dict": ...}` / `{"model": ...}` and stripped of `module.`-style prefixes."""
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise WeightsNotFoundError(
            f"{path}: unsupported weights file type {suffix!r}; --weights takes one of "
            f"{', '.join(WEIGHT_SUFFIXES)}"
        )
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise WeightsNotFoundError(
            f"{path}: could not read the weights file ({err}); pass a valid --weights PATH"
        ) from err
    for wrapper_key in ("state_dict", "model", "teacher"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper_key), Mapping):
            loaded = loaded[wrapper_key]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise WeightsNotFoundError(
            f"{path}: expected a state dict of tensors, got {type(loaded).__name__}; "
            "save the model with torch.save(model.state_dict(), PATH)"
        )
    state = dict(loaded)
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in STATE_DICT_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                stripped = True
    return state


def load_weights_into(model: EncoderNet, cfg: EncoderCfg, path: Path) -> None:
    """Load a checkpoint into the trunk; missing keys, or unexpected ones other than the cfg's
    ignorable prefixes, raise `WeightsNotFoundError` naming a few of them."""
    state = read_state_dict(path)
    expected = model.trunk.state_dict()
    unexpected = [
        k for k in state if k not in expected and not k.startswith(cfg.ignore_unexpected_keys)
    ]
    missing = [k for k in expected if k not in state]
    if missing or unexpected:
        raise WeightsNotFoundError(
            f"{path} does not fit encoder {cfg.name!r} ({cfg.timm_name}): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}. Check that --weights points at this encoder's checkpoint."
        )
    mismatched = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if mismatched:
        key = mismatched[0]
        raise WeightsNotFoundError(
            f"{path} does not fit encoder {cfg.name!r}: {len(mismatched)} tensors differ in shape, "
            f"e.g. {key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        )
    model.trunk.load_state_dict({k: state[k] for k in expected}, strict=True)


def find_weights_in_dir(folder: Path) -> Path | None:
    """The weights file in `folder`: the first of `WEIGHT_FILE_NAMES`, else a single file with a
    weights suffix; None when there is none."""
    for file_name in WEIGHT_FILE_NAMES:
        if (folder / file_name).is_file():
            return folder / file_name
    candidates = sorted(p for p in folder.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES)
    if len(candidates) > 1:
        raise WeightsNotFoundError(
            f"{folder} holds several weights files ({', '.join(p.name for p in candidates)}); "
            f"keep one, name one {WEIGHT_FILE_NAMES[0]}, or pass --weights PATH"
        )
    return candidates[0] if candidates else None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _how_to_provide(cfg: EncoderCfg) -> str:
    steps = [
        "pass --weights PATH (a .safetensors/.bin/.pth/.pt state dict)",
        f"or put the file at ${WEIGHTS_DIR_ENV}/{cfg.name}/{WEIGHT_FILE_NAMES[0]}",
    ]
    if cfg.hf_hub_id:
        access = (
            f"request access at https://huggingface.co/{cfg.hf_hub_id}, then " if cfg.gated else ""
        )
        steps.append(f"or {access}run `huggingface-cli login` and go online (unset HF_HUB_OFFLINE)")
    steps.append("or use --weights random for a test run (features are then meaningless)")
    return "; ".join(steps)


def _cached_hub_weights(hf_hub_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for file_name in WEIGHT_FILE_NAMES[:2]:
        cached = try_to_load_from_cache(hf_hub_id, file_name)
        if isinstance(cached, str):
            return Path(cached)
    return None


def _load_from_hub(cfg: EncoderCfg, hf_hub_id: str) -> tuple[EncoderNet, str | None]:
    try:
        trunk = timm.create_model(f"hf-hub:{hf_hub_id}", pretrained=True, **cfg.timm_kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        raise WeightsNotFoundError(
            f"could not download weights for encoder {cfg.name!r} from the Hugging Face hub "
            f"({hf_hub_id}): {err}. To fix: {_how_to_provide(cfg)}"
        ) from err
    model = EncoderNet(trunk, output=cfg.output, num_prefix_tokens=cfg.num_prefix_tokens)
    cached = _cached_hub_weights(hf_hub_id)
    return model, sha256_of_file(cached) if cached else None


def resolve_precision(precision: str, cfg: EncoderCfg, device: torch.device) -> Precision:
    """The precision a run uses: `auto` is the cfg's GPU precision on CUDA, its measured CPU
    precision on CPU, fp32 elsewhere; explicit values are checked and passed through."""
    if precision == "auto":
        if device.type == "cuda":
            return cfg.gpu_precision
        return cfg.cpu_precision if device.type == "cpu" else "fp32"
    if precision not in _TORCH_DTYPES:
        raise WsiMilError(
            f"unknown precision {precision!r}; --precision takes auto, fp32, bf16 or fp16"
        )
    return precision  # type: ignore[return-value]


class _UnderAutocast(nn.Module):
    """`model` run under autocast to `dtype`, so torch.compile traces the precision with the graph."""

    def __init__(self, model: nn.Module, device_type: str, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model = model
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return self.model(x)
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(x)


def inductor_cache_dir() -> Path:
    """The user's cache folder for compiled kernels: `$XDG_CACHE_HOME/wsi-mil/inductor`
    (default `~/.cache/wsi-mil/inductor`)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / INDUCTOR_CACHE_SUBDIR


@dataclass
class Encoder:
    """A loaded encoder: `model` maps normalised `[B, 3, S, S]` float input to `[B, embed_dim]`.

    After `compile`, batches of at most `compiled_batch` tiles in `compiled_precision` run through
    the compiled model (smaller batches are padded to its fixed shape); anything else runs eager.
    """

    cfg: EncoderCfg
    model: nn.Module
    weights: str
    weights_sha256: str | None
    device: torch.device
    compiled: nn.Module | None = None
    compiled_batch: int = 0
    compiled_precision: Precision | None = None

    def transform_info(self) -> dict[str, Any]:
        """The tile transform, for provenance: resize, centre crop, interpolation, mean, std."""
        return {
            "size": self.cfg.img_size,
            "resize": self.cfg.resize_size,
            "crop": self.cfg.img_size,
            "interpolation": self.cfg.interpolation,
            "mean": list(self.cfg.mean),
            "std": list(self.cfg.std),
            "output": self.cfg.output,
        }

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, 3, S, S]` (any device) -> float32 normalised on `self.device`."""
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        mean = torch.tensor(self.cfg.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.std, device=self.device).view(1, 3, 1, 1)
        x = x.sub_(mean).div_(std)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self, precision: Precision) -> AbstractContextManager[Any]:
        """The autocast context for `precision` on this encoder's device (none for fp32)."""
        if precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=_TORCH_DTYPES[precision])

    @torch.inference_mode()
    def embed(self, images: torch.Tensor, *, precision: str = "auto") -> torch.Tensor:
        """Features float32 `[B, D]` (on `self.device`) of uint8 tiles `[B, 3, S, S]` that are
        already resized and cropped to the encoder input."""
        resolved = resolve_precision(precision, self.cfg, self.device)
        count = images.shape[0]
        if self.compiled is not None and resolved == self.compiled_precision and count <= self.compiled_batch:
            if count < self.compiled_batch:  # one fixed shape: no recompilation for the last batch
                padding = images.new_zeros((self.compiled_batch - count, *images.shape[1:]))
                images = torch.cat([images, padding])
            return self.compiled(self.normalize(images))[:count].float()
        x = self.normalize(images)
        with self.autocast(resolved):
            features = self.model(x)
        return features.float()

    def compile(self, *, batch_size: int, precision: str = "auto") -> float | None:
        """Compile the model with torch.compile (inductor, weights frozen) for batches of
        `batch_size` in `precision`, compiling once now on a blank batch; returns the seconds that
        took. Kernels are cached under `inductor_cache_dir()`, so later runs compile faster. Where
        compiling fails (no C++ compiler, an unsupported op) it warns and returns None: eager stays."""
        resolved = resolve_precision(precision, self.cfg, self.device)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
        dtype = None if resolved == "fp32" else _TORCH_DTYPES[resolved]
        started = time.perf_counter()
        try:
            compiled = torch.compile(_UnderAutocast(self.model, self.device.type, dtype), options={"freezing": True})
            blank = torch.zeros((batch_size, 3, self.cfg.img_size, self.cfg.img_size), dtype=torch.uint8)
            with torch.inference_mode():
                compiled(self.normalize(blank))
        except Exception as err:  # torch.compile raises many types; eager is always a correct fallback
            warnings.warn(f"torch.compile of encoder {self.cfg.name!r} failed, running eager: {err}", stacklevel=2)
            return None
        self.compiled, self.compiled_batch, self.compiled_precision = compiled, batch_size, resolved
        return time.perf_counter() - started

    def should_compile(self, tiles: int, mode: str = "auto") -> bool:
        """Whether `compile` pays off for `tiles` tiles: always for mode `on`, never for `off`; for
        `auto`, on CPU when the cfg's measured `cpu_compile_min_tiles` is reached and a C++
        compiler is there. False once compiled."""
        if self.compiled is not None or mode == "off":
            return False
        if mode == "on":
            return True
        threshold = self.cfg.cpu_compile_min_tiles
        return (
            self.device.type == "cpu"
            and threshold is not None
            and tiles >= threshold
            and shutil.which(os.environ.get("CXX", "g++")) is not None
        )


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_encoder(
    name: str,
    *,
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
) -> Encoder:
    """Build encoder `name` and load its weights: an explicit path, else
    `$WSI_MIL_WEIGHTS_DIR/<name>/`, else the Hugging Face hub. `weights="random"` (tests, demos)
    initialises with the fixed seed `RANDOM_WEIGHTS_SEED`, so every run gets the same weights."""
    cfg = encoder_cfg(name)
    target = torch.device(device) if device is not None else default_device()
    weights_label: str
    weights_sha256: str | None
    if isinstance(weights, str) and weights == "random":
        with torch.random.fork_rng(devices=[]):  # reproducible, and the caller's RNG is untouched
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = create_encoder_model(cfg)
        weights_label, weights_sha256 = "random", None
    else:
        weights_path = _resolve_local_weights(cfg, weights)
        if weights_path is not None:
            model = create_encoder_model(cfg)
            load_weights_into(model, cfg, weights_path)
            weights_label, weights_sha256 = str(weights_path), sha256_of_file(weights_path)
        elif cfg.hf_hub_id is None:
            raise WeightsNotFoundError(
                f"encoder {cfg.name!r} has no published weights. To fix: {_how_to_provide(cfg)}"
            )
        elif _hub_offline():
            raise WeightsNotFoundError(
                f"no local weights for encoder {cfg.name!r} and HF_HUB_OFFLINE is set, so "
                f"{cfg.hf_hub_id} cannot be downloaded. To fix: {_how_to_provide(cfg)}"
            )
        else:
            model, weights_sha256 = _load_from_hub(cfg, cfg.hf_hub_id)
            weights_label = f"hub:{cfg.hf_hub_id}"
    model = model.eval().requires_grad_(False).to(target)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Encoder(cfg, model, weights_label, weights_sha256, target)


def _resolve_local_weights(cfg: EncoderCfg, weights: str | Path | None) -> Path | None:
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            found = find_weights_in_dir(path)
            if found is None:
                raise WeightsNotFoundError(
                    f"--weights {path} is a folder without a weights file "
                    f"({', '.join(WEIGHT_FILE_NAMES)})"
                )
            return found
        if not path.is_file():
            raise WeightsNotFoundError(
                f"--weights {path} does not exist. To fix: {_how_to_provide(cfg)}"
            )
        return path
    root = os.environ.get(WEIGHTS_DIR_ENV)
    if not root:
        return None
    folder = Path(root).expanduser() / cfg.name
    return find_weights_in_dir(folder) if folder.is_dir() else None


def preprocess_tile(tile: np.ndarray, cfg: EncoderCfg) -> torch.Tensor:
    """uint8 tile `[H, W, 3]` -> uint8 `[3, img_size, img_size]`: resize to `resize_size` with
    the cfg's interpolation (PIL, antialiased like torchvision on PIL images), then centre crop."""
    if tile.dtype != np.uint8 or tile.ndim != 3 or tile.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] tile, got {tile.dtype} {tile.shape}")
    height, width = tile.shape[:2]
    side = cfg.resize_size
    if (height, width) != (side, side):
        image = Image.fromarray(tile).resize((side, side), _PIL_FILTERS[cfg.interpolation])
        tile = np.asarray(image)
    if side != cfg.img_size:
        top = round((side - cfg.img_size) / 2.0)
        tile = tile[top : top + cfg.img_size, top : top + cfg.img_size]
    return torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1)))
