"""Load a causal LM and its tokenizer once per actor: embedded default, folder, `.gguf` or hub id."""

from __future__ import annotations

import ctypes
import inspect
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bulkscore.workers.attention import use_tile_attention
from bulkscore.workers.contract import ModelSpec
from bulkscore.workers.embedded import embedded_gguf, prepare_gguf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    context_length: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    load_s: float
    # Where load_s went, in seconds: transformers' import, finding the files, the tokenizer, the model,
    # its packing.
    load_pieces: dict[str, float] = field(default_factory=dict)
    cache_argument: str = "cache"  # the forward's name for the KV cache (transformers < 5: past_key_values)
    keeps_logits: bool = True  # the forward takes logits_to_keep (logits of the last positions only)
    tile_scale: int = 1  # its tiles have this many times the rows of workers.tiles' (tile_scale())
    # Whether every matrix product of its layers runs at one height whatever a call's rows
    # (PackedLinear): decode tiles may then be of several heights (workers.tiles.decode_heights).
    fixed_products: bool = False


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device here")
    return torch.device(device)


# CPU features whose matrix units make bfloat16 faster than float32. Without them (AVX2 and plain
# AVX-512), torch converts bfloat16 in software: 4.5x slower than float32 on this project's CPUs.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:  # not Linux: no flags known, so no bfloat16 by default
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def resolve_dtype(dtype: str, device: torch.device, flags: frozenset[str] | None = None) -> torch.dtype:
    """`auto`: bfloat16 where the hardware computes in it natively (GPUs with bf16, CPUs with
    AVX512-BF16 or AMX), float16 on older GPUs, float32 on other CPUs."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags):
        return torch.bfloat16
    return torch.float32


def model_folder(spec: ModelSpec) -> str:
    """A path or hub id that `from_pretrained` can read; GGUF files are converted once and cached."""
    if spec.kind == "embedded":
        return str(prepare_gguf(embedded_gguf()))
    if spec.kind == "gguf":
        return str(prepare_gguf(Path(spec.source)))
    return spec.source


def eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids = model.generation_config.eos_token_id
    if ids is None:
        ids = tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return tuple(sorted(set(ids)))


def apply_adapter(model: Any, adapter: str) -> Any:
    """The LoRA adapter merged into the weights (one matmul per layer, as fast as the base model).

    The adapter is applied to the model given, whatever base model its own config names.
    """
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def pin_kernels() -> None:
    """Ask MKL (torch's float32 matrix products on x86 CPUs) for bitwise reproducible results
    whatever the thread count and the memory alignment: its Conditional Numerical Reproducibility
    in strict mode, on the best code path for this CPU. Without it, a product computed by the second
    of two threads can differ in the last bits from the same product on the first, so a row's
    numbers would depend on its slot in a tile (measured: attention of slot 40 of 64 differs from
    slot 0). MKL reads the setting at its first call, so this runs before the process computes
    anything; a value the user set is kept."""
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def skip_unused_imports() -> None:
    """Before transformers' first import in a worker: tell it that scipy is absent, as on installs
    without it. transformers imports scipy.optimize with its loss functions (so with any model's
    code), for object detection's matching alone, which a causal LM never runs. Measured on a 2-core
    AMX Xeon (transformers 5.24, scipy present through lm-eval's dependencies): the model's load
    1.55 -> 0.9 s; the job's start-up 6.0 -> 5.3 s. (Telling it torch.distributed is absent too saves
    nothing: torch._dynamo, which transformers' masks import, imports torch.distributed.tensor
    anyway.) Too late once transformers' losses are imported (this process loaded a model before):
    then nothing changes."""
    import sys

    if "transformers.loss" in sys.modules or "scipy.optimize" in sys.modules:
        return
    import transformers.utils

    transformers.utils.is_scipy_available = lambda: False


def kernels_pinned(device: torch.device) -> bool:
    """Whether a row's results depend on the row alone here: fixed shapes (workers.tiles) always, and
    on CPUs with MKL its strict reproducible mode (pin_kernels; a user's MKL_CBWR may turn it off)."""
    if device.type != "cpu" or not torch.backends.mkl.is_available():
        return True
    return "STRICT" in os.environ.get("MKL_CBWR", "").upper()


PACK_ROWS = 128  # the rows oneDNN lays weights out for, and every packed product's (x models.tile_scale)


class PackedLinear(torch.nn.Module):
    """A bias-or-not Linear whose weight oneDNN laid out once, in its own blocked format, instead of
    at every call: bfloat16 products of a decode tile's shape take ~25% less time (measured, [64, 576]
    x [576, 1536]: 0.28 ms against 0.36); float32 ones ~20% less than MKL's in its reproducible mode,
    and half on the vocabulary projection. The kernels are oneDNN's, as for torch's own bfloat16
    products on CPUs. At a tile's shape each output row depends on its input row alone, bitwise,
    whatever the other rows and the row's place (tested on AVX-512 and, through ONEDNN_MAX_CPU_ISA,
    on the AVX2 kernels), so the tiles keep a row's numbers its own.

    Every product runs at `rows` rows ([rows, in]): fewer are padded with zero rows, more are cut into
    pieces of `rows`. oneDNN's kernels choose their arithmetic by the rows they are given (measured on
    AMX in bfloat16: products of 16 and 32 rows differ from those of 128 in the last bits), so a
    decode call of any tile height (workers.tiles.decode_heights) meets the same products. Where
    `heights` holds more than `rows` (the load's check found each row's bits the same at each of them
    on this CPU, row_invariant_heights), fewer rows are padded only to the next of them."""

    def __init__(self, linear: torch.nn.Linear, keep_weight: bool, rows: int = PACK_ROWS) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rows = linear.in_features, linear.out_features, rows
        self.heights: tuple[int, ...] = (rows,)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS)
        self.bias = linear.bias
        # The output layer keeps its weight for losses.fused_nll where that scores (half precision; no
        # copy where it is tied to the embeddings, as in SmolLM2; an untied one is held twice).
        self.weight = linear.weight if keep_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        flat = x.reshape(-1, self.in_features)  # [M, in]
        count = flat.shape[0]
        height = next(h for h in self.heights if h >= count) if count < self.rows else self.rows
        if count != height:
            flat = torch.nn.functional.pad(flat, (0, 0, 0, -count % height))  # [height x pieces, in]
        out = (
            torch.cat([self.product(piece) for piece in flat.split(self.rows)])
            if count > self.rows
            else self.product(flat)
        )
        return out[:count].view(*x.shape[:-1], self.out_features)

    def product(self, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
        """The product at x's own rows: for calls whose rows are fixed by design whatever the batch
        (a prefill tile's last tokens, [16 rows, hidden]), which need no padding to 128."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def row_invariant_heights(model: torch.nn.Module, heights: Sequence[int]) -> bool:
    """Whether each of the model's packed products gives every row the same bits at each of `heights`
    rows as at its full rows, on this CPU's kernels at this thread count (random inputs in the model's
    dtype). oneDNN chooses its arithmetic by the rows it is given, and that choice differs by CPU:
    measured in bfloat16, AMX's products of 16 and 32 rows differ from those of 128 in the last bits,
    AVX512-BF16's without AMX (an AMD EPYC) do not, and run ~5x faster at 16 rows."""
    generator = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    shapes = {}
    for module in model.modules():
        if isinstance(module, PackedLinear):
            shapes.setdefault((module.in_features, module.out_features, module.rows), module)
    for module in shapes.values():
        x = torch.randn(module.rows, module.in_features, generator=generator).to(dtype)
        full = module.product(x)  # [rows, out]
        for height in heights:
            if height < module.rows and not torch.equal(module.product(x[:height].contiguous()), full[:height]):
                return False
    return True


def packs_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this model's products run on oneDNN with packed weights: float32 on x86 CPUs (where
    the packed products' row-invariance is tested), and bfloat16 on a CPU that oneDNN computes
    bfloat16 on (elsewhere torch converts it in software)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return platform.machine().lower() in X86_MACHINES
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


X86_MACHINES = frozenset({"x86_64", "amd64"})


def pack_weights(model: torch.nn.Module, keep_head: bool, pack_head: bool = True, rows: int = PACK_ROWS) -> None:
    """Swap every nn.Linear of the model for a PackedLinear (packs_weights says where that pays), its
    products `rows` rows each; `keep_head`: the output layer keeps its plain weight too
    (losses.fused_nll reads it); not `pack_head`: the output layer stays as it is."""
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and (pack_head or child is not head):
                setattr(parent, name, PackedLinear(child, keep_weight=keep_head and child is head, rows=rows))
    release_freed_memory()


def unpacked_products(model: torch.nn.Module) -> list[str]:
    """The modules whose matrix products did not become PackedLinear ones: those that hold a matrix
    weight, embeddings aside (a plain output layer, GPT-2's Conv1D)."""
    return [
        name
        for name, module in model.named_modules()
        if not isinstance(module, (PackedLinear, torch.nn.Embedding))
        and any(p.dim() == 2 for p in module.parameters(recurse=False))
    ]


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system, where glibc allows: it keeps them otherwise, and
    the weights packing replaced would stay in the worker's memory (measured, SmolLM2: 927 MiB
    resident after packing, 726 MiB after this, 665 MiB unpacked)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


SMALL_MODEL = 2**20  # parameters: below this, a call's own Python costs more than its arithmetic
MAX_TILE_SCALE = 8


def tile_scale(model: torch.nn.Module) -> int:
    """How many times the tiles' usual rows this model's calls take: 1 for any model of a million
    parameters or more, up to MAX_TILE_SCALE (a power of two) for smaller ones. A 128-row decode
    call of a 20,000-parameter model does ~2.6 M multiply-adds, far less than the ~1 ms of Python
    every call costs, so such a model's rate is set by its number of calls. The scale depends on the
    model alone, so its tiles are as fixed as any other's."""
    parameters = sum(p.numel() for p in model.parameters())
    scale = 1
    while scale < MAX_TILE_SCALE and parameters * scale * 2 <= SMALL_MODEL:
        scale *= 2
    return scale


def load_model(spec: ModelSpec, plain_float32_head: bool = False) -> LoadedModel:
    """`plain_float32_head`: in float32, the output layer's product stays on torch's own kernel (MKL,
    as transformers and lm-evaluation-harness run it) while the other layers are packed: the
    likelihood tasks' log-probs then agree with lm-eval's. Measured on SmolLM2-135M, 60 4-choice
    rows, largest difference from lm-eval's log-probs: 1.0e-4 all packed, 6.0e-5 with the head
    plain (4.2e-5 with nothing packed, at twice the time: MKL's strict mode is slow on the layers'
    shapes; lm-eval against itself at batch 1 and 32: 2.7e-5); the time was the same or less."""
    started = time.perf_counter()
    pieces, clock = {}, [started]

    def done(piece: str) -> None:
        now = time.perf_counter()
        pieces[piece] = round(now - clock[0], 3)
        clock[0] = now

    pin_kernels()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    done("imports_s")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    source = model_folder(spec)
    done("source_s")  # the model's files found (a GGUF file converted on its first use)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code)
    done("tokenizer_s")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=spec.trust_remote_code)
    if spec.adapter:
        model = apply_adapter(model, spec.adapter)
    model = model.to(device).eval()
    use_tile_attention(model)
    done("model_s")
    scale = tile_scale(model)  # from its parameters, before packing hides them
    packed = packs_weights(device, dtype)
    if packed:
        plain_head = plain_float32_head and dtype == torch.float32
        pack_weights(model, keep_head=dtype != torch.float32, pack_head=not plain_head, rows=PACK_ROWS * scale)
        from bulkscore.workers.tiles import decode_heights  # tiles imports this module

        heights = decode_heights(PACK_ROWS * scale, scale, fixed_products=True)
        if row_invariant_heights(model, heights):
            for module in model.modules():
                if isinstance(module, PackedLinear):
                    module.heights = heights
    done("pack_s")
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    forward = inspect.signature(model.forward).parameters
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        context_length=int(context),
        eos_token_ids=eos,
        pad_token_id=int(pad),
        load_s=time.perf_counter() - started,
        load_pieces=pieces,
        cache_argument="cache" if "cache" in forward else "past_key_values",
        keeps_logits="logits_to_keep" in forward,
        tile_scale=scale,
        fixed_products=packed and not unpacked_products(model),
    )
