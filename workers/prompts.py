"""Prompt formats: `raw` is the question unchanged; `chat` wraps it in the tokenizer's chat template."""

from __future__ import annotations

from typing import Any

from workers.contract import PromptSettings

PROMPT_FORMATS = ("raw", "chat")


def format_prompt(tokenizer: Any, question: str, settings: PromptSettings) -> str:
    if settings.format == "raw":
        return question
    if settings.format == "chat":
        messages = [{"role": "user", "content": question}]
        if settings.system is not None:
            messages.insert(0, {"role": "system", "content": settings.system})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt format {settings.format!r}; choose one of {PROMPT_FORMATS}")


def encode_text(tokenizer: Any, text: str, settings: PromptSettings) -> list[int]:
    """Token ids of a prompt (or prompt + continuation) in `settings.format`.

    A chat template already writes its special tokens as text, so only `raw` prompts get the
    tokenizer's own (a BOS token, for tokenizers that add one).
    """
    return tokenizer(text, add_special_tokens=settings.format == "raw")["input_ids"]
