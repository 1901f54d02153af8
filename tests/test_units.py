"""Small units of both sides, without a model or a Ray instance: shard plan, tile chunks, answer
parsing and grading, joining Ray."""

import os
import re
import time

import pytest

from bulkscore.jobs.cluster import ray_session
from bulkscore.jobs.errors import JobError
from bulkscore.jobs.shards import Shard, auto_shard_size, plan_shards
from bulkscore.workers.answers import grade, is_close, parse_answer, parse_number
from bulkscore.workers.contract import DEFAULT_ANSWER_REGEX
from bulkscore.workers.tiles import cache_length, chunks, tile_rows


def test_shards_are_contiguous_and_cover_every_row():
    assert plan_shards(10, 4) == [Shard(0, 0, 4), Shard(1, 4, 8), Shard(2, 8, 10)]
    assert plan_shards(0, 4) == []
    assert plan_shards(3, 64) == [Shard(0, 0, 3)]


def test_auto_shards_grow_with_the_job_to_at_most_512():
    sizes = {rows: auto_shard_size(rows) for rows in (1, 32_768, 32_769, 100_000, 10**6, 10**7, 10**9)}
    assert sizes == {1: 64, 32_768: 64, 32_769: 128, 100_000: 256, 10**6: 2048, 10**7: 16384, 10**9: 16384}
    assert all(-(-rows // size) <= 512 for rows, size in sizes.items() if size < 16384)
    assert plan_shards(100_000, None) == plan_shards(100_000, 256)  # None: auto


def test_a_rows_chunks_and_cache_length_come_from_its_own_length():
    tokens = list(range(100, 170))  # 70 tokens from position 5
    pieces = chunks(tokens, 5, 32)
    assert [(len(t), first) for t, first in pieces] == [(6, 5), (32, 11), (32, 43)]  # cut from the end
    assert [t for piece, _ in pieces for t in piece] == tokens
    assert chunks([7], 0, 32) == [([7], 0)]
    assert [cache_length(n) for n in (1, 128, 129, 193, 300, 385, 5000)] == [128, 128, 192, 256, 384, 512, 6144]
    assert [tile_rows(64, n) for n in (128, 512, 768, 1024, 65536)] == [64, 64, 42, 32, 1]


def test_answer_extraction_and_numbers():
    pattern = re.compile(DEFAULT_ANSWER_REGEX, re.DOTALL)
    assert parse_answer("so <answer>6,000</answer> grams", pattern) == "6,000"
    assert parse_answer("no tags here", pattern) is None
    assert parse_answer("<answer>1</answer><answer>2</answer>", pattern) == "1"
    # Without tags, the default reads the last number (what a plain chat answer ends with).
    assert parse_answer("So 5 kg is 5,000 grams.\nThat is all.", pattern) == "5,000"
    assert parse_answer("5 kg = <answer>5000</answer> g, about 11 lb", pattern) == "5000"
    assert parse_answer("It is -0.75 liter", pattern) == "-0.75"
    assert parse_answer("Paris is the capital.", re.compile("(Paris)|(Rome)")) == "Paris"
    assert parse_answer("Rome, of course", re.compile("(Paris)|(Rome)")) == "Rome"
    assert parse_number("6,000") == 6000.0
    assert parse_number(" 0.75 ") == 0.75
    assert parse_number("six") is None
    assert parse_number("nan") is None


@pytest.mark.parametrize(
    "answer, reference, expected",
    [
        ("6000", "6000", True),
        ("6299", "6000", True),  # within 5%
        ("6300", "6000", False),  # exactly 5% is not within
        ("0.0004", "0.0003", False),  # rounded to 3 decimals: 0 vs 0
        (None, "6000", False),
        ("6000", None, None),
        (" Paris ", "paris", True),
        ("Lyon", "Paris", False),
        ("about 6000", "6000", False),
    ],
)
def test_grade_follows_the_homework_rule(answer, reference, expected):
    assert grade(answer, reference, 0.05) is expected


def test_is_close_rounds_to_three_decimals():
    assert is_close(1.0004, 1.0, 0.0001) is True  # both round to 1.0: difference 0 < 0.0001
    assert is_close(1.0006, 1.0, 0.0001) is False


def fake_ray_init(monkeypatch, errors: list[Exception]) -> list[str]:
    """ray.init raising each of `errors` in turn, then connecting; returns the addresses it was given."""
    import ray

    calls = []

    def init(address=None, **kwargs):
        calls.append(address)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    # ray_session turns on token mode for a cluster when a token exists: not for this process's later tests.
    monkeypatch.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "disabled"))
    return calls


def test_a_client_server_that_fails_to_start_is_tried_again(monkeypatch):
    flaky = ConnectionError("Initialization failure from server:\nRuntimeError: Starting Ray client server failed.")
    calls = fake_ray_init(monkeypatch, [flaky, flaky])
    with ray_session("ray://127.0.0.1:10001") as where:
        assert where == "the Ray cluster at ray://127.0.0.1:10001"
    assert calls == ["ray://127.0.0.1:10001"] * 3


def test_other_connection_errors_and_a_third_failure_are_reported_at_once(monkeypatch):
    calls = fake_ray_init(monkeypatch, [ConnectionError("no route to host")])
    with pytest.raises(JobError, match="cannot start or join Ray at ray://h:1: no route to host"):
        with ray_session("ray://h:1"):
            pass
    assert len(calls) == 1
    flaky = ConnectionError("Initialization failure from server:\npsutil.ZombieProcess: PID still exists")
    calls = fake_ray_init(monkeypatch, [flaky] * 3)
    with pytest.raises(JobError, match="ZombieProcess"):
        with ray_session("ray://h:1"):
            pass
    assert len(calls) == 3
