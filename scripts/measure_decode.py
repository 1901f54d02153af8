"""transformers `generate` against bulkscore's generation engine (fixed-shape tiles, continuous batching).

    python scripts/measure_decode.py [--format cot] [--rows 64] [--max-new-tokens 96] [--repeat 2] [--dtype float32]

Same prompts, greedy, embedded SmolLM2-135M, in one process. `generate` runs them as one left-padded
batch and carries every row to the longest row's end; bulkscore's engine runs its tiles (tiles.py),
refilling a slot the step its row ends. Prints each one's time, the tokens generated and how many
completions are the same token for token (the two add in different orders, so near-ties may differ).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="cot", choices=["raw", "chat", "cot"])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    import torch

    from bulkscore.jobs.questions import bundled_questions, load_questions
    from bulkscore.jobs.settings import prompt_settings
    from bulkscore.workers.contract import GenerationSettings, ModelSpec
    from bulkscore.workers.generation import Request, generate, trim_completion
    from bulkscore.workers.models import load_model
    from bulkscore.workers.prompts import encode_texts, format_prompt, shared_start

    lm = load_model(ModelSpec("embedded", "embedded", args.dtype, "cpu"))
    settings = prompt_settings(args.format, None, None)
    questions = load_questions([bundled_questions()], limit=args.rows).column("question").to_pylist()
    prompts = encode_texts(lm.tokenizer, [format_prompt(lm.tokenizer, q, settings) for q in questions], settings)
    gen = GenerationSettings(max_new_tokens=args.max_new_tokens)

    width = max(map(len, prompts))
    ids = torch.tensor([[lm.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    prefix = shared_start(lm.tokenizer, settings)

    def transformers_generate() -> list[tuple[int, ...]]:
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            eos_token_id=list(lm.eos_token_ids),
            pad_token_id=lm.pad_token_id,
        )
        return [trim_completion(row, lm, gen).token_ids for row in out[:, ids.shape[1] :].tolist()]

    def bulkscore_decode() -> list[tuple[int, ...]]:
        return [g.token_ids for g in generate(lm, [Request(tuple(p)) for p in prompts], gen, prefix)]

    times: dict[str, list[float]] = {"transformers generate": [], "bulkscore engine": []}
    results = {}
    with torch.inference_mode():
        for _ in range(args.repeat):
            for name, fn in zip(times, (transformers_generate, bulkscore_decode)):
                started = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - started)
    tokens = [len(t) for t in results["bulkscore engine"]]
    print(
        f"{args.rows} {args.format} prompts x up to {args.max_new_tokens} new tokens: {sum(tokens)} tokens, "
        f"{sum(n < args.max_new_tokens for n in tokens)} rows ended early"
    )
    for name, seconds in times.items():
        print(f"  {name}: {' '.join(f'{s:.1f}' for s in seconds)} s (best {min(seconds):.1f})")
    same = sum(a == b for a, b in zip(results["transformers generate"], results["bulkscore engine"]))
    print(
        f"  speed-up {min(times['transformers generate']) / min(times['bulkscore engine']):.2f}x; "
        f"same completions: {same} of {args.rows}"
    )
    print(json.dumps({k: min(v) for k, v in times.items()}))


if __name__ == "__main__":
    main()
