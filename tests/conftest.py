"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and one Ray instance."""

from __future__ import annotations

import os

# Read by Ray at import: every Ray process of the tests binds to 127.0.0.1.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# What workers.models.pin_kernels sets in a worker, set here before any test computes (MKL reads it once).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import shutil
from pathlib import Path

import pytest

CRASH_NEEDLE = "CRASH-THE-WORKER"
HANG_NEEDLE = "bulkscore-test-hang"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def embedded_folder() -> Path:
    """The embedded SmolLM2 converted to safetensors (once per cache; ~30 s the first time)."""
    from bulkscore.workers.embedded import embedded_gguf, prepare_gguf

    return prepare_gguf(embedded_gguf())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, embedded_folder) -> Path:
    """A 2-layer Llama with random weights and SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    for name in TOKENIZER_FILES:
        if (embedded_folder / name).exists():
            shutil.copy(embedded_folder / name, folder / name)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        # Wide weights give peaked logits, so greedy choices are never near-ties.
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def ray_instance():
    """One private Ray instance for the tests that run jobs in-process (the CLI reuses it)."""
    import ray

    from bulkscore.workers.faults import CRASH_ON_QUESTION, HANG_ON_QUESTION

    # Ray's processes inherit these: a worker given a question holding one dies by SIGKILL, or hangs.
    os.environ[CRASH_ON_QUESTION] = CRASH_NEEDLE
    os.environ[HANG_ON_QUESTION] = HANG_NEEDLE
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()
