"""scripts/bench.py's `before` peer runs the baseline checkout's code, not the installed one's; the roofline script counts its FLOPs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.bench import baseline_on_path  # noqa: E402


def checkout(root: Path, layout: str) -> Path:
    """A stand-in checkout whose CLI module says where it was imported from."""
    parts = ("bulkscore", "jobs", "workers") if layout == "renamed" else ("jobs", "workers")
    for part in parts:
        (root / part).mkdir(parents=True)
        (root / part / "__init__.py").write_text("")
    (root / "jobs" / "cli.py").write_text("WHERE = __file__\n")
    return root


def test_a_renamed_checkout_is_laid_out_as_its_own_package(tmp_path):
    baseline = checkout(tmp_path / "before", "renamed")
    path, cli = baseline_on_path(baseline, tmp_path / "run")
    assert cli == "bulkscore.jobs.cli"
    code = f"import {cli}, bulkscore.workers; print({cli}.WHERE); print(bulkscore.workers.__file__)"
    env = os.environ | {"PYTHONPATH": str(path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=path)
    # The installed bulkscore.jobs and bulkscore.workers (this checkout's) do not answer for them.
    assert out.stdout.split() == [
        str(path / "bulkscore" / "jobs" / "cli.py"),
        str(path / "bulkscore" / "workers" / "__init__.py"),
    ]
    assert (path / "bulkscore" / "jobs").resolve() == (baseline / "jobs").resolve()


def test_a_checkout_from_before_the_rename_runs_as_it_is(tmp_path):
    baseline = checkout(tmp_path / "before", "plain")
    assert baseline_on_path(baseline, tmp_path / "run") == (baseline, "jobs.cli")


def test_the_roofline_script_counts_two_flops_per_weight_of_every_linear_layer(tiny_model):
    """scripts/measure_roofline.py's model FLOPs per token, against the model's own linear weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from scripts.measure_roofline import flops_per_token

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert flops_per_token(Path(tiny_model)) == 2 * weights
