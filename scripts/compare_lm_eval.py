"""bulkscore's likelihood tasks against lm-evaluation-harness itself, on the same requests.

    python scripts/compare_lm_eval.py [--model FOLDER] [--rows 200] [--dtype float32]

The requests come from the bundled unit-conversion set (lm_eval_rows): choice rows (the reference
answer among three wrong numbers, answer as an index), loglikelihood rows (question -> " " + the
reference), perplexity rows (each question, and texts of many questions joined). bulkscore runs them
as jobs (`bulkscore.run`, a private Ray instance); lm-eval's Hugging Face backend (HFLM, the same
model folder, batch size 32, no network) runs the same (context, continuation) requests. Printed per
task: the largest |difference| of log-probs, how many pred, pred_norm and is_greedy differ, and both
sides' acc / acc_norm / word perplexity; with --self-check, lm-eval at batch 1 against itself at
batch 32, for scale. Model: the embedded SmolLM2-135M-Instruct (its converted
folder) unless --model. Needs `pip install lm-eval` (the bench extras).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bundled() -> list[dict]:
    return [json.loads(line) for line in (ROOT / "jobs/data/unit_conversions.jsonl").open()]


def wrong_numbers(answer: float, pick: random.Random) -> list[str]:
    """Three plausible wrong answers: the right one off by a factor of ten, or a little."""
    out: list[str] = []
    for factor in pick.sample([10, 0.1, 1000, 0.001, 2, 0.5, 3, 1.5], 8):
        text = number_text(answer * factor)
        if text != number_text(answer) and text not in out:
            out.append(text)
        if len(out) == 3:
            return out
    return out


def number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:.6g}"


def lm_eval_rows(rows: int, seed: int = 0) -> dict[str, list[dict]]:
    """The three tasks' input rows, drawn from the bundled set."""
    pick = random.Random(seed)
    questions = bundled()
    choice, loglikelihood = [], []
    for i in range(rows):
        q = questions[i % len(questions)]
        right = number_text(float(q["answer"]))
        choices = wrong_numbers(float(q["answer"]), pick) + [right]
        pick.shuffle(choices)
        context = f"Question: {q['question']}\nAnswer:"
        choice.append({"id": i, "question": context, "choices": choices, "answer": choices.index(right)})
        loglikelihood.append({"id": i, "context": context, "continuation": " " + right})
    texts = [q["question"] for q in questions[: max(1, rows // 4)]]
    texts += [" ".join(q["question"] for q in pick.sample(questions, 60)) for _ in range(max(1, rows // 50))]
    return {
        "choice": choice,
        "loglikelihood": loglikelihood,
        "perplexity": [{"id": i, "text": t} for i, t in enumerate(texts)],
    }


def harness_requests(task: str, rows: list[dict]) -> list[tuple]:
    """The (context, continuation) or (text,) arguments lm-eval's requests carry for these rows."""
    if task == "choice":
        return [(r["question"], " " + c) for r in rows for c in r["choices"]]
    if task == "loglikelihood":
        return [(r["context"], r["continuation"]) for r in rows]
    return [(r["text"],) for r in rows]


def run_harness(model: str, task: str, rows: list[dict], batch_size, dtype: str = "float32"):
    """lm-eval's HFLM on the rows' requests: [(logprob, is_greedy)], or [logprob] for perplexity."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, device="cpu", batch_size=batch_size, dtype=dtype)
    kind = "loglikelihood_rolling" if task == "perplexity" else "loglikelihood"
    requests = [Instance(kind, {}, args, i) for i, args in enumerate(harness_requests(task, rows))]
    run = lm.loglikelihood_rolling if task == "perplexity" else lm.loglikelihood
    return run(requests, disable_tqdm=True)


def harness_choice_figures(rows: list[dict], results: list[tuple]) -> list[dict]:
    """lm-eval's multiple-choice process_results, row by row: pred, pred_norm, greedy flags."""
    import numpy as np

    out, at = [], 0
    for row in rows:
        found = results[at : at + len(row["choices"])]
        at += len(row["choices"])
        lls = np.array([ll for ll, _ in found])
        lengths = np.array([float(len(c)) for c in row["choices"]])
        out.append(
            {
                "logprobs": list(lls),
                "greedy": [g for _, g in found],
                "pred": int(np.argmax(lls)),
                "pred_norm": int(np.argmax(lls / lengths)),
            }
        )
    return out


def model_folder(given: str | None) -> str:
    if given:
        return given
    sys.path.insert(0, str(ROOT))
    from bulkscore.workers.embedded import embedded_gguf, prepare_gguf

    return str(prepare_gguf(embedded_gguf()))


def compare(model: str, task: str, rows: list[dict], dtype: str, self_check: bool = False) -> dict:
    import bulkscore

    started = time.perf_counter()
    ours = bulkscore.run(rows, task=task, model=model, dtype=dtype, quiet=True)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    theirs = run_harness(model, task, rows, 32, dtype)
    theirs_s = time.perf_counter() - started
    table = ours.table.to_pylist()
    found = {"task": task, "rows": len(rows), "bulkscore_s": round(ours_s, 1), "lm_eval_s": round(theirs_s, 1)}
    if self_check and task != "perplexity":
        alone = run_harness(model, task, rows, 1, dtype)  # lm-eval against itself: batch 1 vs 32
        found["lm_eval_batch_1_vs_32_max_abs_diff"] = max(abs(a[0] - b[0]) for a, b in zip(alone, theirs))
    if task == "choice":
        expected = harness_choice_figures(rows, theirs)
        diffs = [abs(a - b) for r, e in zip(table, expected) for a, b in zip(r["choice_logprobs"], e["logprobs"])]
        found |= {
            "max_abs_logprob_diff": max(diffs),
            "pred_differs": sum(r["pred"] != e["pred"] for r, e in zip(table, expected)),
            "pred_norm_differs": sum(r["pred_norm"] != e["pred_norm"] for r, e in zip(table, expected)),
            "is_greedy_differs": sum(r["choice_is_greedy"] != e["greedy"] for r, e in zip(table, expected)),
            "acc": [ours.summary["acc"], sum(e["pred"] == r["answer"] for e, r in zip(expected, rows)) / len(rows)],
            "acc_norm": [
                ours.summary["acc_norm"],
                sum(e["pred_norm"] == r["answer"] for e, r in zip(expected, rows)) / len(rows),
            ],
        }
    elif task == "loglikelihood":
        found |= {
            "max_abs_logprob_diff": max(abs(r["logprob"] - ll) for r, (ll, _) in zip(table, theirs)),
            "is_greedy_differs": sum(r["is_greedy"] != g for r, (_, g) in zip(table, theirs)),
            "acc": [ours.summary["acc"], sum(g for _, g in theirs) / len(theirs)],
        }
    else:
        words = sum(len(re.split(r"\s+", r["text"])) for r in rows)
        found |= {
            "max_abs_logprob_diff": max(abs(r["logprob"] - ll) for r, ll in zip(table, theirs)),
            "max_rel_logprob_diff": max(abs(r["logprob"] - ll) / abs(ll) for r, ll in zip(table, theirs)),
            "word_perplexity": [ours.summary["word_perplexity"], math.exp(-sum(theirs) / words)],
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder [default: the embedded SmolLM2-135M-Instruct, converted]")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tasks", default="choice,loglikelihood,perplexity", type=lambda s: s.split(","))
    parser.add_argument("--self-check", action="store_true", help="also lm-eval at batch 1 against itself at 32")
    args = parser.parse_args()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    model = model_folder(args.model)
    rows = lm_eval_rows(args.rows)
    print(f"model {model}, {args.dtype}, lm-eval HFLM batch 32; {os.cpu_count()} CPUs", flush=True)
    for task in args.tasks:
        print(json.dumps(compare(model, task, rows[task], args.dtype, args.self_check)), flush=True)


if __name__ == "__main__":
    main()
