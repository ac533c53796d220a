"""MHIM-MIL, masked hard instance mining (Tang et al.; ICCV 2023 "v1", IJCV 2025 "v2").

A teacher (an EMA copy of the model, no gradient) sees the full bag and scores every instance;
the student (the model being trained) sees the bag with its most salient instances masked, so it
has to learn from the harder ones, and a consistency loss pulls the student's bag embedding
towards the teacher's. Only the student is evaluated and served.

Composition with any model that follows the `MILModel` contract:
- masking goes through the padding mask: a masked instance keeps its slot with `mask=False` and
  zeroed features (per bag; padded slots are never chosen); the remaining instances keep their
  order, and v2's recycled tokens are appended as extra valid slots after the last slot;
- the teacher's instance saliency is `MILOutput.attention` (v1, and v2 with
  `instance_score="attention"`) or a class-aware probability (v2 default, see
  `class_aware_scores`), both read from the one train-mode teacher pass that also gives the
  consistency target, as officially; the consistency loss uses `MILOutput.embedding`, so a model
  without an embedding is refused at `attach`.

Deviations from the official code (DearCaat/MHIM-MIL):
- the global recycle network works on the model's input features `[B, N, D]` and its tokens are
  appended to the input, since the model is a black box here; the official network works inside
  the model on the 512-d projected features;
- the class-aware score reads `MILOutput.instance_contributions` `W (a_n h_n)` of the teacher's
  pass, which every attention-pooling model of the zoo returns (the official formula adds `b_0`
  to every class, which cancels in the softmax); TransMIL's comes from its first layer's exact
  class-token attention where the official one uses the Nyström approximation of that row, and
  leaves out the output projection's dropout. Models with `instance_logits` and no contributions
  (DSMIL) use `max_c instance_logits`, as the official DSMIL baseline does; a model with neither
  is refused at `attach` (use `instance_score="attention"`);
- multi-head models are scored by their canonical (head-averaged) attention, not by the
  official per-head vote; batches of several bags are supported (per-bag counts and random
  draws), the recycle queries move towards the mean of the batch's tokens;
- bags with fewer than `min_bag_size` instances are not masked, and at least one instance of
  every bag stays visible to the student.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from wsi_mil.errors import TrainingConfigError
from wsi_mil.models.base import MILModel, MILOutput
from wsi_mil.models.layers import masked_softmax, xavier_init_
from wsi_mil.training.methods.base import Batch, StepResult, TrainingMethod, probe_output
from wsi_mil.training.methods.registry import register_method

log = logging.getLogger(__name__)

Version = Literal["v1", "v2"]
InstanceScore = Literal["attention", "class_aware"]
Schedule = Literal["constant", "cosine"]

#: official EMA momentum of the teacher per version (`--mm`)
DEFAULT_MOMENTUM = {"v1": 0.9999, "v2": 0.9997}


def cosine_progress(progress: float) -> float:
    """Half-cosine factor going from 1 at `progress = 0` to 0 at `progress = 1`."""
    progress = min(max(progress, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def ceil_count(sizes: torch.Tensor, ratio: float) -> torch.Tensor:
    """`ceil(n · ratio)` per bag, in float64 like the official `np.ceil(ps * ratio)`."""
    return torch.ceil(sizes.double() * ratio).long()


def floor_count(sizes: torch.Tensor, ratio: float) -> torch.Tensor:
    """`floor(n · ratio)` per bag, in float64 like the official `int(L * ratio)`."""
    return torch.floor(sizes.double() * ratio).long()


def select_ranked(keys: torch.Tensor, eligible: torch.Tensor, counts: torch.Tensor, *, largest: bool = True) -> torch.Tensor:
    """Per bag, the `counts[b]` eligible positions with the largest (or smallest) `keys`.

    `keys` and `eligible` are `[B, N]`, `counts` is `[B]`; returns a bool mask `[B, N]` that is
    never True outside `eligible`. Ties keep the lower index first.
    """
    num = keys.shape[1]
    fill = float("-inf") if largest else float("inf")
    ordered = keys.float().masked_fill(~eligible, fill).argsort(dim=1, descending=largest, stable=True)
    positions = torch.arange(num, device=keys.device).expand_as(ordered)
    ranks = torch.empty_like(ordered).scatter_(1, ordered, positions)  # [B, N] rank of each slot
    return eligible & (ranks < counts.to(keys.device).unsqueeze(1))


def random_subset(eligible: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per bag, `counts[b]` eligible positions drawn uniformly at random (torch's global RNG)."""
    keys = torch.rand(eligible.shape, device=eligible.device)
    return select_ranked(keys, eligible, counts)


def high_score_mask(
    scores: torch.Tensor,
    mask: torch.Tensor,
    ratio: float,
    *,
    candidate_fraction: float = 1.0,
    min_bag_size: int = 3,
) -> torch.Tensor:
    """Masked slots `[B, N]` of high-score masking: the top `ceil(N · ratio)` instances by score.

    With `candidate_fraction = q < 1` (`--mask_ratio_hr`), the top `ceil(N · ratio / q)` are
    candidates and a random `ceil(candidates · q)` of them are masked (if `ratio / q > 1`: all
    instances are candidates and `ceil(N · ratio)` are masked), as in the official code. Bags
    with fewer than `min_bag_size` instances are not masked and one instance always stays.
    """
    sizes = mask.sum(dim=1)
    top_ratio, pick_ratio = ratio / candidate_fraction, candidate_fraction
    if top_ratio > 1.0:
        top_ratio, pick_ratio = 1.0, ratio
    num_candidates = ceil_count(sizes, top_ratio)
    num_masked = ceil_count(num_candidates, pick_ratio) if pick_ratio < 1.0 else num_candidates
    num_masked = torch.minimum(num_masked, sizes - 1).masked_fill(sizes < min_bag_size, 0)
    if pick_ratio < 1.0:
        candidates = select_ranked(scores, mask, num_candidates)
        return random_subset(candidates, num_masked)
    return select_ranked(scores, mask, num_masked)


def class_aware_scores(output: MILOutput, mask: torch.Tensor) -> torch.Tensor:
    """Class-aware instance probability `[B, N]` (MHIM-v2 `--attn2score`), zero on padding.

    Read from the pass that made `output`, so no second forward runs: with
    `output.instance_contributions` `c_n` `[B, N, C]`, `s_n = max_c softmax_c(c_n)`; otherwise
    (DSMIL) `s_n = max_c instance_logits_n`.
    """
    if output.instance_contributions is not None:
        scores = torch.softmax(output.instance_contributions.float(), dim=-1).amax(dim=-1)
    elif output.instance_logits is not None:
        scores = output.instance_logits.float().amax(dim=-1)
    else:
        raise TrainingConfigError(
            "MHIM instance_score 'class_aware' needs MILOutput.instance_contributions or "
            "instance_logits from the model; set method_kwargs.instance_score: attention"
        )
    return scores.masked_fill(~mask, 0.0)


def consistency_loss(student: torch.Tensor, teacher: torch.Tensor, *, teacher_temperature: float, student_temperature: float) -> torch.Tensor:
    """Soft cross-entropy over the embedding dimension: `−Σ_d softmax(z_t/τ_t) log softmax(z_s/τ_s)`.

    `student` and `teacher` are bag embeddings `[B, E]`; the teacher side is detached; mean over bags.
    """
    target = torch.softmax(teacher.detach().float() / teacher_temperature, dim=-1)
    log_probs = torch.log_softmax(student.float() / student_temperature, dim=-1)
    return torch.sum(-target * log_probs, dim=-1).mean()


class RecycleNetwork(nn.Module):
    """MHIM-v2 global recycle network: `k` global queries cross-attend to the randomly masked instances.

    LayerNorm (shared by instances and queries), `heads × head_dim` multi-head cross-attention
    with attention dropout, output Linear + Dropout back to the feature dimension. The queries
    are a buffer, not trained by gradient: after every training forward they move towards the
    output tokens, `q ← μ q + (1 − μ) mean_b tokens_b`.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_tokens: int = 1,
        heads: int = 8,
        head_dim: int = 64,
        dropout: float = 0.1,
        momentum: float = 0.9998,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.momentum = momentum
        self.scale = head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.attention_dropout = nn.Dropout(dropout)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        xavier_init_(self)
        bound = math.sqrt(6.0 / (3 * 16 * 16 + dim))  # the official (VPT) query init
        self.register_buffer("queries", torch.empty(num_tokens, dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Summarise the instances of `x [B, N, D]` where `source [B, N]` is True into `[B, k, D]` tokens."""
        batch, num, _ = x.shape
        queries = self.queries.clone()  # the in-place EMA below must not touch tensors saved for backward
        q = self.to_q(self.norm(queries))  # [k, H·d]
        k, v = self.to_kv(self.norm(x)).chunk(2, dim=-1)  # [B, N, H·d] each
        q = q.view(1, -1, self.heads, q.shape[-1] // self.heads).transpose(1, 2)  # [1, H, k, d]
        k = k.reshape(batch, num, self.heads, -1).transpose(1, 2)  # [B, H, N, d]
        v = v.reshape(batch, num, self.heads, -1).transpose(1, 2)  # [B, H, N, d]
        dots = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # [B, H, k, N]
        weights = self.attention_dropout(masked_softmax(dots, source[:, None, None, :]))
        tokens = torch.matmul(weights.to(v.dtype), v).transpose(1, 2).reshape(batch, queries.shape[0], -1)
        tokens = self.to_out(tokens)  # [B, k, D]
        if self.training:
            with torch.no_grad():
                self.queries.mul_(self.momentum).add_(tokens.detach().float().mean(dim=0), alpha=1.0 - self.momentum)
        return tokens


def load_teacher_weights(teacher: nn.Module, path: Path | str) -> None:
    """Load a baseline's `.safetensors` into `teacher`, failing on any missing, unexpected or mis-shaped key."""
    path = Path(path)
    if "{fold}" in str(path):
        raise TrainingConfigError(
            f"MHIM teacher_init {path} still holds a {{fold}} placeholder; the run must fill it per fold "
            "(method_kwargs.teacher_init), or give the path of one baseline model.safetensors"
        )
    if not path.is_file():
        raise TrainingConfigError(
            f"MHIM teacher_init {path} does not exist; set method_kwargs.teacher_init to the "
            "model.safetensors of a baseline trained with the same model, or to null"
        )
    try:
        state = load_file(str(path), device="cpu")
    except (OSError, SafetensorError) as err:
        raise TrainingConfigError(f"MHIM teacher_init {path} is not a readable safetensors file (method_kwargs.teacher_init)") from err
    expected = teacher.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise TrainingConfigError(
            f"MHIM teacher_init {path} does not match the model: missing keys {missing}, unexpected keys "
            f"{unexpected}, shape mismatches {mismatched}; method_kwargs.teacher_init must come from a "
            "baseline trained with the same --model and model_kwargs"
        )
    teacher.load_state_dict(state, strict=True)


def copy_prefixed_weights(student: nn.Module, path: Path | str, prefixes: list[str]) -> list[str]:
    """Copy the tensors of `path` whose names start with one of `prefixes` into `student`; returns the names.

    Every prefix must match at least one tensor of the student (MHIM-v1 `--init_stu_type fc`
    initialises the student's projection from the baseline).
    """
    state = load_file(str(path), device="cpu")
    own = student.state_dict()
    chosen = {k: v for k, v in state.items() if k in own and any(k.startswith(p) for p in prefixes)}
    unmatched = [p for p in prefixes if not any(k.startswith(p) for k in chosen)]
    if unmatched:
        raise TrainingConfigError(
            f"MHIM student_init_prefixes {unmatched} match no weight shared by the model and {path}; "
            f"the model's weights start with {sorted({k.split('.')[0] for k in own})} (method_kwargs.student_init_prefixes)"
        )
    student.load_state_dict(chosen, strict=False)
    return sorted(chosen)


class MHIMMethod(TrainingMethod):
    """MHIM-MIL v1/v2 around any attention model: EMA teacher, masked student, consistency loss.

    v1: masks = union of random (`random_mask_ratio`), low-score (`low_mask_ratio`) and
    high-score (`high_mask_ratio`) instances, scored by the teacher's attention. v2: high-score
    masking by the class-aware probability, then a random `random_keep_ratio` of the rest stays
    and the randomly dropped instances are summarised into `recycle_tokens` tokens by the
    `RecycleNetwork` (`recycle_tokens=0`: no recycling). Loss: bag CE (+ the model's aux losses)
    + `consistency_weight · L_cons`. The teacher follows the student by EMA after every step.
    """

    name = "mhim"

    def __init__(
        self,
        version: Version = "v2",
        *,
        high_mask_ratio: float = 0.01,
        high_mask_candidates: float = 1.0,
        high_mask_schedule: Schedule = "constant",
        random_mask_ratio: float = 0.0,
        low_mask_ratio: float = 0.0,
        instance_score: InstanceScore | None = None,
        random_keep_ratio: float | None = None,
        recycle_tokens: int | None = None,
        recycle_momentum: float | None = None,
        consistency_weight: float = 0.5,
        teacher_temperature: float = 0.1,
        student_temperature: float = 1.0,
        momentum: float | None = None,
        momentum_schedule: Schedule = "constant",
        teacher_init: str | None = None,
        student_init_prefixes: list[str] | None = None,
        teacher_dropout: bool = True,
        min_bag_size: int = 3,
        aux_weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__(aux_weights=aux_weights)
        if version not in ("v1", "v2"):
            raise TrainingConfigError(f"MHIM version must be 'v1' or 'v2', got {version!r} (method_kwargs.version)")
        for option, value in (("high_mask_ratio", high_mask_ratio), ("random_mask_ratio", random_mask_ratio),
                              ("low_mask_ratio", low_mask_ratio)):
            if not 0.0 <= value < 1.0:
                raise TrainingConfigError(f"MHIM {option} must be in [0, 1), got {value} (method_kwargs.{option})")
        if not 0.0 < high_mask_candidates <= 1.0:
            raise TrainingConfigError(
                f"MHIM high_mask_candidates must be in (0, 1], got {high_mask_candidates} (method_kwargs.high_mask_candidates)"
            )
        for option, value in (("high_mask_schedule", high_mask_schedule), ("momentum_schedule", momentum_schedule)):
            if value not in ("constant", "cosine"):
                raise TrainingConfigError(f"MHIM {option} must be 'constant' or 'cosine', got {value!r} (method_kwargs.{option})")
        if instance_score not in (None, "attention", "class_aware"):
            raise TrainingConfigError(
                f"MHIM instance_score must be 'attention' or 'class_aware', got {instance_score!r} (method_kwargs.instance_score)"
            )
        if version == "v1":
            given = [n for n, v in (("random_keep_ratio", random_keep_ratio), ("recycle_tokens", recycle_tokens),
                                    ("recycle_momentum", recycle_momentum)) if v is not None]
            if given:
                raise TrainingConfigError(f"MHIM {', '.join(given)} belong to v2; set method_kwargs.version: v2 or drop them")
        elif random_mask_ratio > 0 or low_mask_ratio > 0:
            raise TrainingConfigError(
                "MHIM random_mask_ratio and low_mask_ratio belong to v1 (v2 uses random_keep_ratio + recycling); "
                "set method_kwargs.version: v1 or drop them"
            )
        self.random_keep_ratio = 0.2 if random_keep_ratio is None else random_keep_ratio
        self.recycle_tokens = 1 if recycle_tokens is None else recycle_tokens
        self.recycle_momentum = 0.9998 if recycle_momentum is None else recycle_momentum
        if not 0.0 < self.random_keep_ratio <= 1.0:
            raise TrainingConfigError(f"MHIM random_keep_ratio must be in (0, 1], got {random_keep_ratio} (method_kwargs.random_keep_ratio)")
        if self.recycle_tokens < 0:
            raise TrainingConfigError(f"MHIM recycle_tokens must be ≥ 0, got {recycle_tokens} (method_kwargs.recycle_tokens)")
        self.momentum = DEFAULT_MOMENTUM[version] if momentum is None else momentum
        for option, value in (("momentum", self.momentum), ("recycle_momentum", self.recycle_momentum)):
            if not 0.0 <= value <= 1.0:
                raise TrainingConfigError(f"MHIM {option} must be in [0, 1], got {value} (method_kwargs.{option})")
        if consistency_weight < 0 or teacher_temperature <= 0 or student_temperature <= 0:
            raise TrainingConfigError(
                "MHIM consistency_weight must be ≥ 0 and the temperatures > 0 "
                "(method_kwargs.consistency_weight, teacher_temperature, student_temperature)"
            )
        if student_init_prefixes and teacher_init is None:
            raise TrainingConfigError("MHIM student_init_prefixes needs a checkpoint; set method_kwargs.teacher_init")
        self.version = version
        self.high_mask_ratio = high_mask_ratio
        self.high_mask_candidates = high_mask_candidates
        self.high_mask_schedule = high_mask_schedule
        self.random_mask_ratio = random_mask_ratio
        self.low_mask_ratio = low_mask_ratio
        self.instance_score: InstanceScore = instance_score or ("class_aware" if version == "v2" else "attention")
        self.consistency_weight = consistency_weight
        self.teacher_temperature = teacher_temperature
        self.student_temperature = student_temperature
        self.momentum_schedule = momentum_schedule
        self.teacher_init = teacher_init
        self.student_init_prefixes = list(student_init_prefixes or [])
        self.teacher_dropout = teacher_dropout
        self.min_bag_size = min_bag_size
        self.teacher: MILModel | None = None
        self.recycle: RecycleNetwork | None = None

    # -- set-up ----------------------------------------------------------------------------------

    def attach(self, model: MILModel, *, total_steps: int) -> None:
        """Check the model's output, build the teacher (deep copy or `teacher_init`) and the recycle network."""
        probe = probe_output(model)
        if probe.embedding is None:
            raise TrainingConfigError(
                f"MHIM needs a bag embedding for its consistency loss, but {type(model).__name__} returns "
                "MILOutput.embedding = None; choose a --model that returns one (abmil, acmil, dsmil, transmil, ...)"
            )
        if probe.attention.shape != (1, 2):
            raise TrainingConfigError(
                f"MHIM needs per-instance attention [B, N] from the model, {type(model).__name__} returned "
                f"{tuple(probe.attention.shape)}; choose another --model"
            )
        if self.instance_score == "class_aware" and probe.instance_contributions is None and probe.instance_logits is None:
            raise TrainingConfigError(
                f"MHIM instance_score 'class_aware' (the v2 default) reads per-instance class evidence from the "
                f"teacher's pass, but {type(model).__name__} returns neither MILOutput.instance_contributions nor "
                "instance_logits; set method_kwargs.instance_score: attention, or choose another --model"
            )
        teacher = copy.deepcopy(model)
        teacher.requires_grad_(False)
        if self.teacher_init is not None:
            load_teacher_weights(teacher, self.teacher_init)
            if self.student_init_prefixes:
                copied = copy_prefixed_weights(model, self.teacher_init, self.student_init_prefixes)
                log.info("MHIM: student weights %s initialised from %s", copied, self.teacher_init)
        self.teacher = teacher
        if self.teacher_dropout:
            log.info("MHIM: the teacher runs in train mode (dropout active), as the official code; "
                     "set method_kwargs.teacher_dropout: false for an eval-mode teacher")
        if self.version == "v2" and self.recycle_tokens > 0:
            device = next(model.parameters()).device
            self.recycle = RecycleNetwork(model.in_dim, num_tokens=self.recycle_tokens, momentum=self.recycle_momentum).to(device)

    def extra_modules(self) -> list[nn.Module]:
        return [self.recycle] if self.recycle is not None else []

    # -- one step --------------------------------------------------------------------------------

    def high_mask_ratio_at(self, progress: float) -> float:
        """r_h at a training progress: constant, or cosine decay to 0 (`--mrh_sche`)."""
        if self.high_mask_schedule == "constant":
            return self.high_mask_ratio
        return self.high_mask_ratio * cosine_progress(progress)

    def momentum_at(self, progress: float) -> float:
        """EMA momentum m at a training progress: constant, or cosine from m to 1 (`--mm_sche`)."""
        if self.momentum_schedule == "constant":
            return self.momentum
        return 1.0 - (1.0 - self.momentum) * cosine_progress(progress)

    def instance_scores(self, mask: torch.Tensor, teacher_output: MILOutput) -> torch.Tensor:
        """The teacher's saliency `[B, N]` of each instance (attention or class-aware probability),
        read from its output: a function of that one pass."""
        if self.instance_score == "attention":
            return teacher_output.attention.float().masked_fill(~mask, 0.0)
        return class_aware_scores(teacher_output, mask)

    def visible_mask(self, scores: torch.Tensor, mask: torch.Tensor, *, progress: float) -> torch.Tensor:
        """The instances `[B, N]` left after hard-instance masking (v1: union of random, low, high)."""
        masked = high_score_mask(
            scores, mask, self.high_mask_ratio_at(progress),
            candidate_fraction=self.high_mask_candidates, min_bag_size=self.min_bag_size,
        )
        if self.version == "v1":
            sizes = mask.sum(dim=1)
            maskable = mask & (sizes >= self.min_bag_size).unsqueeze(1)
            masked = masked | random_subset(maskable, ceil_count(sizes, self.random_mask_ratio))
            masked = masked | select_ranked(scores, maskable, ceil_count(sizes, self.low_mask_ratio), largest=False)
            emptied = (mask & ~masked).sum(dim=1) == 0
            lowest = select_ranked(scores, mask, torch.ones_like(sizes), largest=False)
            masked = masked & ~(lowest & emptied.unsqueeze(1))
        return mask & ~masked

    def student_input(self, features: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Student features and mask: v2 keeps a random `random_keep_ratio` of the visible instances
        and appends the recycled tokens; masked slots are zeroed and get `mask=False`.

        Returns `features [B, N + k, D]` and `mask [B, N + k]` (k = 0 for v1 or without recycling).
        """
        kept = visible
        if self.version == "v2":
            num_keep = floor_count(visible.sum(dim=1), self.random_keep_ratio)
            if self.recycle is None:
                num_keep = num_keep.clamp_min(1)
            kept = random_subset(visible, num_keep)
        student_features = features * kept.unsqueeze(-1).to(features.dtype)
        if self.recycle is None:
            return student_features, kept
        dropped = visible & ~kept
        source = torch.where(dropped.any(dim=1, keepdim=True), dropped, visible)  # bags that dropped none recycle all
        tokens = self.recycle(features, source).to(features.dtype)  # [B, k, D]
        token_mask = kept.new_ones(tokens.shape[:2])
        return torch.cat([student_features, tokens], dim=1), torch.cat([kept, token_mask], dim=1)

    def compute_loss(self, model: MILModel, batch: Batch, *, progress: float) -> StepResult:
        teacher = self._teacher()
        teacher.train(self.teacher_dropout)
        with torch.no_grad():
            teacher_output = teacher(batch.features, batch.mask)
            scores = self.instance_scores(batch.mask, teacher_output)
        visible = self.visible_mask(scores, batch.mask, progress=progress)
        features, mask = self.student_input(batch.features, visible)
        output = model(features, mask)
        extra: dict[str, torch.Tensor] = {}
        if self.consistency_weight > 0:
            if output.embedding is None or teacher_output.embedding is None:
                raise TrainingConfigError(f"MHIM: {type(model).__name__} returned no embedding; choose another --model")
            cons = consistency_loss(
                output.embedding, teacher_output.embedding,
                teacher_temperature=self.teacher_temperature, student_temperature=self.student_temperature,
            )
            extra["consistency"] = self.consistency_weight * cons
        result = self.supervised_loss(model, output, batch, extra)
        result.terms["masked_fraction"] = float(1.0 - visible.sum() / batch.mask.sum())
        result.terms["student_instances"] = float(mask.sum(dim=1).double().mean())
        result.terms["high_mask_ratio"] = self.high_mask_ratio_at(progress)
        return result

    def after_optimizer_step(self, model: MILModel, *, progress: float) -> None:
        """EMA of the teacher towards the student: `θ_t ← m θ_t + (1 − m) θ_s`; buffers are copied."""
        teacher = self._teacher()
        m = self.momentum_at(progress)
        with torch.no_grad():
            for teacher_param, student_param in zip(teacher.parameters(), model.parameters(), strict=True):
                teacher_param.mul_(m).add_(student_param.detach(), alpha=1.0 - m)
            for teacher_buffer, student_buffer in zip(teacher.buffers(), model.buffers(), strict=True):
                teacher_buffer.copy_(student_buffer)

    def inference_model(self, model: MILModel) -> MILModel:
        """The student alone (no teacher, no masking, no recycling)."""
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self._teacher().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._teacher().load_state_dict(state["teacher"])

    def _teacher(self) -> MILModel:
        if self.teacher is None:
            raise TrainingConfigError("MHIM: attach(model) must run before training (the trainer calls it)")
        return self.teacher


register_method("mhim")(MHIMMethod)
