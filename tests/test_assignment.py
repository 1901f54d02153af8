"""The course assignment's workflows as jobs: cot prompts, LoRA adapters, exporting rft.json."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from bulkscore.jobs.cli import cli
from bulkscore.jobs.questions import bundled_examples, load_examples
from bulkscore.workers.contract import PromptSettings
from bulkscore.workers.prompts import COT_INSTRUCTION, format_prompt
from tests.helpers import QUESTIONS, write_jsonl


def bulkscore(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


@pytest.fixture
def questions(tmp_path) -> Path:
    return write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)


# --- cot ---------------------------------------------------------------------------------------


def test_cot_prompt_is_the_instruction_then_the_worked_examples_then_the_question(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = (("How many meter are in 2 km?", "1 km = 1000 m, so 2 km = 2000 m.\n<answer>2000</answer>"),)
    prompt = format_prompt(tokenizer, "Convert 3 kg to g.", PromptSettings("cot", "Be brief.", examples))
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHow many meter are in 2 km?<|im_end|>\n"
        "<|im_start|>assistant\n1 km = 1000 m, so 2 km = 2000 m.\n<answer>2000</answer><|im_end|>\n"
        "<|im_start|>user\nConvert 3 kg to g.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_bundled_examples_answer_in_the_tags_the_instruction_asks_for():
    examples = load_examples(bundled_examples())
    assert 1 <= len(examples) <= 3
    assert all("<answer>" in answer and answer.rstrip().endswith("</answer>") for _, answer in examples)
    assert "<answer></answer>" in COT_INSTRUCTION


@pytest.mark.usefixtures("ray_instance")
def test_cot_job_records_its_instruction_and_examples(tiny_model, questions, tmp_path):
    examples = write_jsonl(tmp_path / "examples.jsonl", [{"question": "1 m in cm?", "answer": "<answer>100</answer>"}])
    output = tmp_path / "cot.parquet"
    result = bulkscore(
        "run",
        questions,
        "--model",
        tiny_model,
        "-o",
        output,
        "--max-new-tokens",
        "4",
        "--quiet",
        "--prompt-format",
        "cot",
        "--examples",
        examples,
        "--system",
        "Answer in tags.",
    )
    assert result.exit_code == 0, result.output
    prompt = json.loads(pq.read_schema(output).metadata[b"bulkscore.settings"])["scoring"]["prompt"]
    assert prompt == {
        "format": "cot",
        "system": "Answer in tags.",
        "examples": [["1 m in cm?", "<answer>100</answer>"]],
    }
    chat = tmp_path / "chat.parquet"
    assert (
        bulkscore("run", questions, "--model", tiny_model, "-o", chat, "--max-new-tokens", "4", "--quiet").exit_code
        == 0
    )
    cot_tokens = pq.read_table(output).column("num_prompt_tokens").to_pylist()
    chat_tokens = pq.read_table(chat).column("num_prompt_tokens").to_pylist()
    assert all(c > p for c, p in zip(cot_tokens, chat_tokens))  # the example turn is in every prompt


@pytest.mark.parametrize(
    "args, hint, message",
    [
        (["--examples", "{examples}"], "--examples", "worked examples are shown only in the cot format, not chat"),
        (["--prompt-format", "raw", "--system", "x"], "--system", "the raw format sends the question alone"),
    ],
)
def test_prompt_options_that_do_nothing_are_refused(questions, tmp_path, args, hint, message):
    examples = write_jsonl(tmp_path / "examples.jsonl", [{"question": "q", "answer": "a"}])
    result = bulkscore("run", questions, "-o", tmp_path / "a.parquet", *[a.format(examples=examples) for a in args])
    assert result.exit_code == 2
    assert f"Invalid value for {hint}: {message}" in result.stderr


def test_examples_without_answers_are_refused(questions, tmp_path):
    examples = write_jsonl(tmp_path / "examples.jsonl", [{"question": "q", "answer": "a"}, {"question": "q2"}])
    result = bulkscore("run", questions, "-o", tmp_path / "a.parquet", "--prompt-format", "cot", "--examples", examples)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {examples}: example 2 needs both a question and an answer text\n"


# --- adapters ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter with random (non-zero) weights whose config names another base model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("lora")
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder)
    settings = json.loads((folder / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = "someone/a-model-that-is-not-here"
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


def peft_greedy(tiny_model: Path, adapter: Path, questions: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy float32 completions from transformers + peft directly, one question at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    completions = []
    for q in questions:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": q["question"]}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.inference_mode():
            out = model.generate(
                **prompt, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2, eos_token_id=2
            )
        new = out[0, prompt["input_ids"].shape[1] :].tolist()
        completions.append(tokenizer.decode(new[: new.index(2)] if 2 in new else new, skip_special_tokens=True))
    return completions


@pytest.mark.usefixtures("ray_instance")
def test_adapter_results_equal_transformers_with_peft(tiny_model, adapter, questions, tmp_path):
    output, base = tmp_path / "lora.parquet", tmp_path / "base.parquet"
    common = ("--model", tiny_model, "--max-new-tokens", "10", "--dtype", "float32", "--quiet", "--batch-size", "8")
    result = bulkscore("run", questions, "-o", output, "--adapter", adapter, *common)
    assert result.exit_code == 0, result.output
    assert bulkscore("run", questions, "-o", base, *common).exit_code == 0
    ours = pq.read_table(output).column("completion").to_pylist()
    assert ours == peft_greedy(tiny_model, adapter, QUESTIONS, 10)
    assert ours != pq.read_table(base).column("completion").to_pylist()  # the adapter changes the model
    summary = json.loads(output.with_suffix(".summary.json").read_text())
    assert summary["adapter"] == str(adapter.resolve())


def test_a_folder_that_is_not_a_lora_adapter_is_refused(questions, tmp_path, tiny_model):
    (tmp_path / "prefix").mkdir()
    (tmp_path / "prefix" / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    cases = [
        (tmp_path / "missing", "no such folder"),
        (tiny_model, "not a PEFT adapter folder (no adapter_config.json)"),
        (tmp_path / "prefix", "a PREFIX_TUNING adapter; bulkscore applies LoRA adapters"),
    ]
    for folder, message in cases:
        result = bulkscore("run", questions, "-o", tmp_path / "a.parquet", "--adapter", folder)
        assert (result.exit_code, result.stderr) == (1, f"Error: --adapter {folder}: {message}\n")


# --- export ------------------------------------------------------------------------------------


def answers_file(path: Path) -> Path:
    """An output with three questions x three samples: q0 has two correct samples, q1 none, q2 one."""
    rows = [
        (0, 0, "6 kg in g?", "6000", "6 * 1000 = 6000 g. <answer>6000</answer>", True),
        (0, 1, "6 kg in g?", "6000", "<answer>6000</answer>", True),
        (0, 2, "6 kg in g?", "6000", "<answer>60</answer>", False),
        (1, 0, "2 h in min?", "120", "<answer>12</answer>", False),
        (1, 1, "2 h in min?", "120", "no idea", False),
        (1, 2, "2 h in min?", "120", None, None),  # an error row
        (2, 0, "1 km in m?", "1,000", "<answer>7</answer>", False),
        (2, 1, "1 km in m?", "1,000", "1 km is 1000 m. <answer>1000</answer>", True),
        (2, 2, "1 km in m?", "1,000", "<answer>1</answer>", False),
    ]
    names = ["id", "sample", "question", "reference", "completion", "is_correct"]
    table = pa.table({name: [r[i] for r in rows] for i, name in enumerate(names)})
    pq.write_table(table.append_column("answer", pa.array([None] * len(rows), pa.float64())), path)
    return path


def test_export_rft_json_keeps_the_shortest_correct_completion_per_question(tmp_path):
    out = tmp_path / "rft.json"
    result = bulkscore("export", answers_file(tmp_path / "a.parquet"), "--format", "rft-json", "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Kept 2 of 3 questions (those with a correct sample) in {out}\n"
    assert json.loads(out.read_text()) == [
        ["6 kg in g?", 6000.0, "<answer>6000</answer>"],
        ["1 km in m?", 1000.0, "1 km is 1000 m. <answer>1000</answer>"],
    ]


def test_export_jsonl_writes_every_row_or_the_correct_ones(tmp_path):
    answers = answers_file(tmp_path / "a.parquet")
    every = bulkscore("export", answers, "-o", tmp_path / "all.jsonl")
    assert every.stdout == f"Wrote 9 of 9 rows to {tmp_path / 'all.jsonl'}\n"
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in rows] == [(i, s) for i in range(3) for s in range(3)]
    correct = bulkscore("export", answers, "--correct-only", "-o", tmp_path / "ok.jsonl")
    assert correct.stdout == f"Wrote 3 of 9 rows to {tmp_path / 'ok.jsonl'}\n"
    kept = [json.loads(line) for line in (tmp_path / "ok.jsonl").read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in kept] == [(0, 0), (0, 1), (2, 1)]


def test_export_refuses_a_file_that_is_not_an_output(tmp_path, questions):
    pq.write_table(pa.table({"question": ["a"]}), tmp_path / "q.parquet")
    result = bulkscore("export", tmp_path / "q.parquet", "-o", tmp_path / "x.json")
    assert (result.exit_code, result.stderr) == (
        1,
        f"Error: {tmp_path / 'q.parquet'}: not a bulkscore output (no id, sample, reference, completion, is_correct column)\n",
    )
    result = bulkscore("export", questions, "-o", tmp_path / "x.json")
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: {questions}: cannot read it as Parquet")


@pytest.mark.usefixtures("ray_instance")
def test_sampled_job_exports_to_rft_json(tiny_model, questions, tmp_path):
    """run --num-samples then export: the real output's columns are what export reads."""
    output = tmp_path / "samples.parquet"
    result = bulkscore(
        "run",
        questions,
        "--model",
        tiny_model,
        "-o",
        output,
        "--max-new-tokens",
        "4",
        "--quiet",
        "--temperature",
        "1",
        "--num-samples",
        "2",
        "--answer-regex",
        r"(\S+)",
    )
    assert result.exit_code == 0, result.output
    exported = bulkscore("export", output, "-o", tmp_path / "all.jsonl")
    assert exported.stdout == f"Wrote 16 of 16 rows to {tmp_path / 'all.jsonl'}\n"
    rft = bulkscore("export", output, "--format", "rft-json", "-o", tmp_path / "rft.json")
    assert rft.exit_code == 0 and rft.stdout.startswith("Kept ") and " of 8 questions" in rft.stdout
    assert isinstance(json.loads((tmp_path / "rft.json").read_text()), list)
