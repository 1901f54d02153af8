"""Prompt formats.

`raw` is the question unchanged; `chat` wraps it in the tokenizer's chat template; `cot` is `chat`
with an instruction as the system message and worked examples as earlier turns of the conversation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bulkscore.workers.contract import PromptSettings

PROMPT_FORMATS = ("raw", "chat", "cot")
# cot's system message unless --system replaces it; tuned with the bundled examples on the bundled set.
COT_INSTRUCTION = (
    "Solve the unit conversion. Reason in one short line, then give the final number inside "
    "<answer></answer>. Be concise."
)


def chat_messages(question: str, settings: PromptSettings) -> list[dict[str, str]]:
    messages = [] if settings.system is None else [{"role": "system", "content": settings.system}]
    for example_question, example_answer in settings.examples:
        messages += [{"role": "user", "content": example_question}, {"role": "assistant", "content": example_answer}]
    return messages + [{"role": "user", "content": question}]


def format_prompt(tokenizer: Any, question: str, settings: PromptSettings) -> str:
    if settings.format == "raw":
        return question
    if settings.format in ("chat", "cot"):
        messages = chat_messages(question, settings)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt format {settings.format!r}; choose one of {PROMPT_FORMATS}")


def encode_texts(tokenizer: Any, texts: Sequence[str], settings: PromptSettings) -> list[list[int]]:
    """Token ids of prompts (or prompt + continuation) in `settings.format`, in one call.

    A chat template already writes its special tokens as text, so only `raw` prompts get the
    tokenizer's own (a BOS token, for tokenizers that add one).
    """
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=settings.format == "raw")["input_ids"]


def shared_start(tokenizer: Any, settings: PromptSettings) -> list[int]:
    """The tokens every prompt of this format starts with, whatever the question (a chat template's
    system turn, cot's instruction and examples): the common start of the prompts of unlike probe
    questions. It depends on the settings alone, never on the rows being scored."""
    probes = encode_texts(tokenizer, [format_prompt(tokenizer, q, settings) for q in ("a", "7", "Z?")], settings)
    n = 0
    while all(len(p) > n for p in probes) and len({p[n] for p in probes}) == 1:
        n += 1
    return probes[0][:n]
