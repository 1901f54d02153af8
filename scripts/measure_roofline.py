"""How far a finished job is from this CPU's matrix roofline (issue 25's moonshot: 50% of it).

    python scripts/measure_roofline.py answers.summary.json [--model DIR] [--dtype bfloat16]

Measures the machine's peak for the job's dtype: square matrix products (2048^3, then 4096^3) on
as many threads as there are CPUs, the best of a few, in GFLOP/s. Then the job's end-to-end rate:
tokens it ran through the model (prompt + completion, and for prompts other than raw the `loss`
pass's question + completion again, read from the summary's token counts) per second of its
`elapsed_s`, times the model's FLOPs per token (2 per weight of its linear layers, the output head
included; attention's own products are left out, a few percent at these lengths). Prints both and
their ratio, and the same over the workers' model time alone. Run nothing beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def peak_gflops(dtype: torch.dtype, sizes=(2048, 4096), repeats: int = 5) -> float:
    """The best GFLOP/s of square products of these sizes in `dtype`."""
    torch.set_num_threads(os.cpu_count() or 1)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)  # warm: kernels chosen, weights packed
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - started) / 1e9)
    return best


def flops_per_token(model_dir: Path) -> float:
    """2 per weight of the linear layers (attention and MLP projections, and the output head)."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim", hidden // heads)
    attention = hidden * head_dim * (2 * heads + 2 * kv)  # q and o, k and v
    mlp = 3 * hidden * inner  # gate, up, down
    return 2 * (layers * (attention + mlp) + hidden * config["vocab_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summary", type=Path, help="a finished job's OUTPUT.summary.json")
    parser.add_argument("--model", type=Path, help="its model folder [default: the embedded model's cache folder]")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--raw", action="store_true", help="the job ran raw prompts (its loss took no pass)")
    args = parser.parse_args()
    summary = json.loads(args.summary.read_text())
    if args.model is None:
        from bulkscore.workers.embedded import embedded_gguf, prepare_gguf

        args.model = prepare_gguf(embedded_gguf())
    prompt, completion = summary["prompt_tokens"], summary["completion_tokens"]
    # The loss pass scores question + completion; the question is about the prompt's size for raw
    # prompts, and its own tokens (less than the prompt) for chat: counted as the completion alone
    # plus the prompt, an upper bound on the work, so the ratio below is generous.
    tokens = prompt + completion + (0 if args.raw else prompt + completion)
    per_token = flops_per_token(args.model)
    achieved = tokens * per_token / summary["elapsed_s"] / 1e9
    peak = peak_gflops(getattr(torch, args.dtype))
    print(f"model: {per_token / 1e9:.3f} GFLOP per token; job: {tokens:,} tokens in {summary['elapsed_s']:.1f} s")
    print(f"end to end: {achieved:.1f} GFLOP/s; {args.dtype} matrix peak here: {peak:.1f} GFLOP/s")
    print(f"fraction of the roofline: {achieved / peak:.1%} (the moonshot: 50%)")
    timings = summary.get("timings") or {}
    model_s = sum(timings.get(k) or 0.0 for k in ("generate_s", "loss_s", "score_s"))
    if model_s:
        in_model = tokens * per_token / model_s / 1e9
        print(f"in the model's own time ({model_s:.1f} s, start-up and the driver left out): {in_model / peak:.1%}")


if __name__ == "__main__":
    main()
