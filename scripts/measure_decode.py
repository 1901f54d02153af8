"""What rows leaving the batch buys: transformers `generate` against bulkscore's decode loop.

    python scripts/measure_decode.py [--format cot] [--rows 64] [--max-new-tokens 96] [--repeat 2]

Same prompts, one batch, greedy, float32, embedded SmolLM2-135M, in one process. `generate` carries
every row to the longest row's end; bulkscore's loop drops a row the step it ends. Prints each
one's time, the tokens generated and whether the completions are the same token for token.
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
    args = parser.parse_args()

    import torch

    from jobs.questions import bundled_questions, read_jsonl
    from jobs.settings import prompt_settings
    from workers.contract import GenerationSettings, ModelSpec
    from workers.generation import generate_batch, trim_completion
    from workers.models import load_model
    from workers.padding import pad_batch
    from workers.prompts import encode_text, format_prompt

    lm = load_model(ModelSpec("embedded", "embedded", "float32", "cpu"))
    settings = prompt_settings(args.format, None, None)
    questions = [row["question"] for row in read_jsonl(bundled_questions())[: args.rows]]
    prompts = [encode_text(lm.tokenizer, format_prompt(lm.tokenizer, q, settings), settings) for q in questions]
    gen = GenerationSettings(max_new_tokens=args.max_new_tokens)

    def transformers_generate() -> list[tuple[int, ...]]:
        ids, mask = pad_batch(prompts, lm.pad_token_id, "left", lm.device)
        out = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                do_sample=False, eos_token_id=list(lm.eos_token_ids), pad_token_id=lm.pad_token_id)
        return [trim_completion(row, lm, gen).token_ids for row in out[:, ids.shape[1]:].tolist()]

    def bulkscore_decode() -> list[tuple[int, ...]]:
        return [g.token_ids for g in generate_batch(lm, prompts, gen)]

    times: dict[str, list[float]] = {"transformers generate": [], "bulkscore decode loop": []}
    results = {}
    with torch.inference_mode():
        for _ in range(args.repeat):
            for name, fn in zip(times, (transformers_generate, bulkscore_decode)):
                started = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - started)
    tokens = [len(t) for t in results["bulkscore decode loop"]]
    print(f"{args.rows} {args.format} prompts x up to {args.max_new_tokens} new tokens: {sum(tokens)} tokens, "
          f"{sum(n < args.max_new_tokens for n in tokens)} rows ended early")
    for name, seconds in times.items():
        print(f"  {name}: {' '.join(f'{s:.1f}' for s in seconds)} s (best {min(seconds):.1f})")
    same = results["transformers generate"] == results["bulkscore decode loop"]
    print(f"  speed-up {min(times['transformers generate']) / min(times['bulkscore decode loop']):.2f}x; "
          f"same completions: {same}")
    print(json.dumps({k: min(v) for k, v in times.items()}))


if __name__ == "__main__":
    main()
