"""A job's settings as one frozen value, checked before any work, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from bulkscore.jobs.errors import JobError
from bulkscore.jobs.questions import bundled_examples, load_examples
from bulkscore.jobs.storage import Location
from bulkscore.workers.contract import ModelSpec, PromptSettings, ScoringSettings
from bulkscore.workers.embedded import EMBEDDED_NAME, EmbeddedModelMissing, embedded_gguf
from bulkscore.workers.prompts import COT_INSTRUCTION


@dataclass(frozen=True)
class JobSpec:
    inputs: tuple[str, ...]
    output: Location | None  # None: in memory, nothing written
    model: ModelSpec
    scoring: ScoringSettings
    shard_size: int | None  # None: auto (shards.auto_shard_size)
    limit: int | None

    def settings(self) -> dict:
        """What the job computes, as JSON-ready data: what resume compares and the output records."""
        return {
            "inputs": list(self.inputs),
            "model": asdict(self.model) | {"threads": None},
            "scoring": scoring_settings(self.scoring),
            "shard_size": self.shard_size,
            "limit": self.limit,
        }

    @property
    def model_name(self) -> str:
        return EMBEDDED_NAME if self.model.kind == "embedded" else self.model.source


def scoring_settings(scoring: ScoringSettings) -> dict:
    """The scoring settings as data; generate's without the other tasks' fields, so that its
    fingerprint, and so the resume of an output from before the tasks, is what it was."""
    data = asdict(scoring)
    if scoring.task == "generate":
        del data["task"], data["choice_delimiter"]
    return data


def resolve_model(text: str | None) -> tuple[str, str]:
    """(source, kind) for --model: the embedded default, a folder, a .gguf file or a hub id."""
    if text is None:
        try:
            embedded_gguf()
        except EmbeddedModelMissing as error:
            raise JobError(str(error)) from None
        return "", "embedded"
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise JobError(f"--model {text}: the folder has no config.json; is it a Hugging Face model folder?")
        return str(path.resolve()), "folder"
    if path.suffix == ".gguf":
        if not path.is_file():
            raise JobError(f"--model {text}: no such .gguf file")
        return str(path.resolve()), "gguf"
    if path.exists():
        raise JobError(f"--model {text}: not a model folder or a .gguf file")
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise JobError(f"--model {text}: no such folder or file")
    return text, "hub"


def resolve_adapter(text: str | None) -> str | None:
    """--adapter: a PEFT LoRA adapter folder (adapter_config.json beside its weights)."""
    if text is None:
        return None
    path = Path(text).expanduser()
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        what = "no such folder" if not path.exists() else "not a PEFT adapter folder (no adapter_config.json)"
        raise JobError(f"--adapter {text}: {what}")
    try:
        peft_type = json.loads(config_file.read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError) as error:
        raise JobError(f"--adapter {text}: cannot read adapter_config.json ({error})") from None
    if peft_type != "LORA":
        raise JobError(f"--adapter {text}: a {peft_type} adapter; bulkscore applies LoRA adapters")
    return str(path.resolve())


def prompt_settings(prompt_format: str, system: str | None, examples: Path | None) -> PromptSettings:
    """cot gets its instruction and worked examples spelled out, so that they reach the fingerprint."""
    if prompt_format != "cot":
        return PromptSettings(prompt_format, system)
    return PromptSettings(
        "cot", COT_INSTRUCTION if system is None else system, load_examples(examples or bundled_examples())
    )


def check_remote_code(source: str, kind: str, trust_remote_code: bool) -> None:
    """A model folder that carries its own code is refused unless --trust-remote-code."""
    if kind != "folder" or trust_remote_code:
        return
    config = json.loads((Path(source) / "config.json").read_text())
    if "auto_map" in config:
        raise JobError(
            f"--model {source}: the model's config asks to run code shipped with it (auto_map); "
            "bulkscore does not run it unless you pass --trust-remote-code"
        )


def fingerprint(spec: JobSpec, questions: pa.Table) -> str:
    """Same job, same fingerprint: the rows' content and every setting that changes results."""
    # Where the rows came from does not matter, only what they hold.
    settings = {k: v for k, v in spec.settings().items() if k != "inputs"}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    # The rows as an Arrow stream of fixed-size batches, hashed as it is written: the same rows give
    # the same bytes however they were chunked, and only one batch is copied at a time.
    with pa.ipc.new_stream(pa.PythonFile(Digest(digest), mode="w"), questions.schema) as writer:
        for start in range(0, questions.num_rows, FINGERPRINT_ROWS):
            writer.write_table(questions.slice(start, FINGERPRINT_ROWS).combine_chunks())
    return digest.hexdigest()[:16]


FINGERPRINT_ROWS = 65_536


class Digest:
    """A file-like sink that feeds what is written to a hash."""

    def __init__(self, digest) -> None:
        self.digest = digest
        self.closed = False

    def write(self, data) -> int:
        self.digest.update(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
