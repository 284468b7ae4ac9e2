"""What the GPU benchmark runs (:class:`GpuBenchConfig`, full and dry-run presets) and the
device helpers its parts share (:class:`Device`, :class:`Clock`)."""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass, field
from typing import Any

import torch

#: the parts ``--only`` accepts
PARTS = ("vision", "llm")
#: the dtypes ``--dtypes`` accepts
DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class VitSpec:
    """A timm ViT architecture with random weights (speed does not depend on their values).

    Attributes:
        label: the name in the report (``"ViT-B/16"``).
        arch: the ``timm.create_model`` name.
        budgets: ToMe's constant ``r`` per block.
        overrides: keyword arguments for ``create_model`` (the dry run's tiny sizes).
    """

    label: str
    arch: str
    budgets: tuple[int, ...]
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LMSpec:
    """A decoder LLM built from its published config with random weights.

    Attributes:
        label: the name in the report (``"SmolLM2-135M"``).
        config: the transformers config class (``"LlamaConfig"``, ``"Qwen2Config"``).
        model: the transformers model class (``"LlamaForCausalLM"``, ...).
        params: the config's fields (the published ``config.json``'s architecture part).
    """

    label: str
    config: str
    model: str
    params: dict[str, Any]


@dataclass(frozen=True)
class KVSpec:
    """A KV method at the benchmark's compression (``ratio`` comes from the config)."""

    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)


# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json; the offline zoo's GGUF gives the same)
SMOLLM2_135M = LMSpec(
    "SmolLM2-135M",
    "LlamaConfig",
    "LlamaForCausalLM",
    dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        hidden_act="silu",
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=0,
        eos_token_id=0,
    ),
)
# Qwen2.5-0.5B (Qwen/Qwen2.5-0.5B config.json): no sliding window, q/k/v biases built in
QWEN25_05B = LMSpec(
    "Qwen2.5-0.5B",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=24,
        bos_token_id=151643,
        eos_token_id=151643,
    ),
)
#: the dry run's sizes, over the published configs (same classes, same code)
TINY_LM = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=0,
    eos_token_id=0,
)

#: the KV methods: each runs in one prefill (KVzip's reconstruction forwards run inside it)
KV_METHODS = (
    KVSpec("StreamingLLM", "streaming_llm"),
    KVSpec("SnapKV", "snapkv"),
    KVSpec("PyramidKV", "snapkv", {"layer_budget": "pyramid"}),
    KVSpec("H2O", "h2o"),
    KVSpec("TOVA", "tova"),
    KVSpec("KVzip", "kvzip"),
)

VITS = (
    VitSpec("ViT-B/16", "vit_base_patch16_224", (8, 12, 16)),
    # 24 blocks: r = 4, 6, 8 remove the share of the 196 patches that 8, 12, 16 do in 12
    VitSpec("ViT-L/16", "vit_large_patch16_224", (4, 6, 8)),
)
_TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=4)
TINY_VITS = (
    VitSpec("ViT-B/16 (tiny)", "vit_base_patch16_224", (1, 2, 3), {**_TINY_VIT, "depth": 4}),
    VitSpec("ViT-L/16 (tiny)", "vit_large_patch16_224", (1, 2), {**_TINY_VIT, "depth": 6}),
)


@dataclass(frozen=True)
class GpuBenchConfig:
    """One run of the GPU benchmark (:func:`full` and :func:`dry` are the two presets)."""

    device: str = "cuda"
    dry_run: bool = False
    parts: tuple[str, ...] = PARTS
    seed: int = 0
    #: stop starting new configurations after this many minutes (None: no limit)
    max_minutes: float | None = 7.5
    # -- vision speed
    vits: tuple[VitSpec, ...] = VITS
    dtypes: tuple[str, ...] = ("float16", "bfloat16")
    batch_size: int = 256
    timing_runs: int = 10
    timing_warmup: int = 3
    autotune_targets: tuple[float, ...] = (1.5, 2.0)
    autotune_time: float = 8.0
    autotune_images: int = 32
    # -- vision fidelity (DINOv2-S, real weights)
    fidelity_images: int = 48
    #: input side for DINOv2-S (None: its own 224 px, 257 tokens)
    fidelity_size: int | None = None
    fidelity_budgets: tuple[int, ...] = (8, 12, 16)
    # -- LLM KV methods
    lms: tuple[LMSpec, ...] = (SMOLLM2_135M, QWEN25_05B)
    lm_overrides: dict[str, Any] = field(default_factory=dict)
    llm_dtype: str = "bfloat16"
    contexts: tuple[int, ...] = (8192, 32768)
    kv_methods: tuple[KVSpec, ...] = KV_METHODS
    kv_ratio: float = 0.75
    decode_tokens: int = 64
    llm_runs: int = 3
    llm_warmup: int = 1

    def replace(self, **kw: Any) -> GpuBenchConfig:
        return dataclasses.replace(self, **kw)


def full(device: str = "cuda") -> GpuBenchConfig:
    """The benchmark as published: ViT-B/L at batch 256, LLMs at 8k and 32k tokens."""
    return GpuBenchConfig(device=device)


def dry(device: str = "cpu") -> GpuBenchConfig:
    """The same code on tiny models (seconds on a CPU): a smoke test of every code path."""
    half = torch.device(device).type == "cuda"
    return GpuBenchConfig(
        device=device,
        dry_run=True,
        max_minutes=None,
        vits=TINY_VITS,
        dtypes=("float16", "bfloat16") if half else ("float32",),
        batch_size=4,
        timing_runs=2,
        timing_warmup=1,
        autotune_time=0.5,
        autotune_images=16,
        fidelity_images=3,
        fidelity_size=112,  # 8x8 + 1 tokens
        fidelity_budgets=(2, 3, 4),
        lm_overrides=TINY_LM,
        llm_dtype="bfloat16" if half else "float32",
        contexts=(256, 512),
        decode_tokens=4,
        llm_runs=2,
        llm_warmup=0,
    )


class Device:
    """The device the benchmark runs on; every CUDA call is guarded by its type."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.torch = torch.device(name)
        self.cuda = self.torch.type == "cuda"

    def sync(self) -> None:
        """Wait for the device's queued work (a CUDA call returns before its kernels end)."""
        if self.cuda:
            torch.cuda.synchronize(self.torch)

    def start_peak(self) -> int | None:
        """Reset the peak-memory counter; the bytes allocated now (``None`` off CUDA)."""
        if not self.cuda:
            return None
        torch.cuda.reset_peak_memory_stats(self.torch)
        return torch.cuda.memory_allocated(self.torch)

    def peak(self) -> int | None:
        """The most bytes allocated since :meth:`start_peak` (``None`` off CUDA)."""
        return torch.cuda.max_memory_allocated(self.torch) if self.cuda else None

    def free(self) -> None:
        """Drop unreferenced tensors and hand the cached blocks back."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def describe(self) -> str:
        if not self.cuda:
            return self.name
        return f"{self.name} ({torch.cuda.get_device_name(self.torch)})"


class Clock:
    """Seconds since the run started, and whether its ``max_minutes`` are spent."""

    def __init__(self, max_minutes: float | None) -> None:
        self.t0 = time.monotonic()
        self.limit = None if max_minutes is None else 60.0 * max_minutes

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def spent(self) -> bool:
        return self.limit is not None and self.elapsed() >= self.limit


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)
