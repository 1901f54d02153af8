"""One self-contained HTML page about one or more `bulkscore run` outputs, compared side by side.

No network: the styles are inline and the charts are SVG drawn here. Every text that comes from the
data (questions, completions, settings, column values) is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bulkscore.jobs.errors import InputError
from bulkscore.jobs.gather import Tally, error_kind, not_parquet, read_finished, tally_for
from bulkscore.jobs.storage import Location

DEFAULT_BY = "category"
COLOURS = ("#3366cc", "#dc7633", "#2e9e5b", "#a33ea1", "#b8a200", "#17a2b8", "#6c757d", "#d63384")
NEEDED = (
    "id",
    "question",
    "reference",
    "completion",
    "answer_text",
    "is_correct",
    "loss",
    "num_prompt_tokens",
    "num_completion_tokens",
    "error",
)
# What a likelihood task's page reads of its output.
TASK_NEEDED = {
    "choice": (
        "id",
        "question",
        "choice_logprobs",
        "pred",
        "gold",
        "is_correct",
        "is_correct_norm",
        "num_prompt_tokens",
        "error",
    ),
    "loglikelihood": (
        "id",
        "question",
        "logprob",
        "is_greedy",
        "num_prompt_tokens",
        "num_continuation_tokens",
        "error",
    ),
    "perplexity": ("id", "question", "logprob", "num_tokens", "num_words", "num_bytes", "error"),
}
TOP_ROWS = 10  # rows shown per run in the highest-loss and wrong-answer lists
MAX_GROUPS = 40  # --by values shown; the rest are summed into one line
BINS = 20


@dataclass
class Run:
    """What the page shows of one output, gathered in one pass over its record batches: figures,
    the values the charts bin, and the few rows it lists. The output itself is never held whole."""

    name: str
    columns: list[str]
    settings: dict
    summary: dict  # as the job wrote it (elapsed time, throughput, model, versions)
    task: str = "generate"
    tally: Tally = field(default_factory=Tally)
    groups: dict[str, Tally] = field(default_factory=dict)  # --by value -> its figures, first seen first
    losses: list[pa.Array] = field(default_factory=list)  # every non-null loss
    tokens: list[pa.Array] = field(default_factory=list)  # num_completion_tokens of rows without error
    error_rows: dict[str, list[dict]] = field(default_factory=dict)  # kind -> its first TOP_ROWS rows
    worst: pa.Table | None = None  # the TOP_ROWS highest-loss rows
    wrong: list[dict] = field(default_factory=list)  # the first TOP_ROWS wrong answers

    def add(self, batch: pa.Table, by: str | None) -> None:
        self.tally.add(batch)
        if by is not None:
            add_groups(self.groups, batch, by, self.task)
        self.add_errors(batch)
        if self.task != "generate":
            self.losses.append(task_values(batch, self.task))
            self.add_task_rows(batch)
            return
        self.losses.append(batch.column("loss").drop_null().combine_chunks())
        ok = pc.is_null(batch.column("error"))
        self.tokens.append(batch.column("num_completion_tokens").filter(ok).combine_chunks())
        scored = batch.filter(pc.is_valid(batch.column("loss"))).select(WORST_COLUMNS)
        # sort_by is stable and the rows seen so far come first: ties keep input order.
        both = scored if self.worst is None else pa.concat_tables([self.worst, scored])
        self.worst = both.sort_by([("loss", "descending")]).slice(0, TOP_ROWS)
        if len(self.wrong) < TOP_ROWS:
            wrong = batch.filter(pc.equal(pc.fill_null(batch.column("is_correct"), True), False))
            self.wrong += wrong.slice(0, TOP_ROWS - len(self.wrong)).select(WRONG_COLUMNS).to_pylist()

    def add_errors(self, batch: pa.Table) -> None:
        """The first TOP_ROWS rows of each error kind."""
        for row in batch.filter(pc.is_valid(batch.column("error"))).select(["id", "question", "error"]).to_pylist():
            listed = self.error_rows.setdefault(error_kind(row["error"]), [])
            if len(listed) < TOP_ROWS:
                listed.append(row)

    def add_task_rows(self, batch: pa.Table) -> None:
        """A likelihood task's rows to look at: choice's first wrong picks; the others' least likely rows."""
        if self.task == "choice":
            if len(self.wrong) < TOP_ROWS:
                wrong = batch.filter(pc.equal(pc.fill_null(batch.column("is_correct"), True), False))
                self.wrong += wrong.slice(0, TOP_ROWS - len(self.wrong)).select(CHOICE_WRONG_COLUMNS).to_pylist()
            return
        scored = batch.filter(pc.is_valid(batch.column("logprob"))).select(["id", "logprob", "question"])
        both = scored if self.worst is None else pa.concat_tables([self.worst, scored])
        self.worst = both.sort_by([("logprob", "ascending")]).slice(0, TOP_ROWS)


def task_values(batch: pa.Table, task: str) -> pa.Array:
    """What a task's histogram shows of each scored row: choice, the chosen choice's margin over the
    next best (nats); loglikelihood, the continuation's log-prob; perplexity, the row's perplexity
    per token."""
    if task == "choice":
        margins = []
        for logprobs in batch.column("choice_logprobs").to_pylist():
            if logprobs and len(logprobs) > 1:
                best, second = sorted(logprobs, reverse=True)[:2]
                margins.append(best - second)
        return pa.array(margins, pa.float64())
    logprob = batch.column("logprob")
    if task == "loglikelihood":
        return logprob.drop_null().combine_chunks()
    scored = pc.is_valid(logprob)
    per_token = pc.divide(
        pc.negate(logprob.filter(scored)), batch.column("num_tokens").filter(scored).cast(pa.float64())
    )
    return pc.exp(per_token).combine_chunks()


CHOICE_WRONG_COLUMNS = ["id", "question", "gold", "pred"]
WORST_COLUMNS = ["id", "loss", "question", "reference", "completion"]
WRONG_COLUMNS = ["id", "question", "reference", "answer_text", "completion"]
BATCH_ROWS = 65_536


def output_files(location: Location) -> list[Location]:
    """A file output, or a folder output's Parquet files in order (what pyarrow would read)."""
    if location.kind() != pafs.FileType.Directory:
        return [location]
    return [location.child(n) for n in location.names() if n.endswith(".parquet") and n[0] not in "._"]


def open_run(location: Location, name: str) -> tuple[Run, list[pq.ParquetFile]]:
    """The run's settings, summary and columns, and its files opened for reading."""
    try:
        files = [pq.ParquetFile(f.fs.open_input_file(f.path)) for f in output_files(location)]
    except (OSError, pa.ArrowException) as error:
        raise InputError(not_parquet(location, error)) from None
    if not files:
        raise InputError(f"{location}: no Parquet files in the folder")
    columns = files[0].schema_arrow.names
    settings, summary = read_finished(location) or ({}, {})
    task = settings.get("scoring", {}).get("task", "generate")
    missing = [c for c in needed(task) if c not in columns]
    if missing:
        raise InputError(f"{location}: not a bulkscore output (no {', '.join(missing)} column)")
    return Run(name, columns, settings, summary, task, tally_for(task)), files


def needed(task: str) -> tuple[str, ...]:
    return TASK_NEEDED.get(task, NEEDED)


def read_run(location: Location, by: str | None, files: list[pq.ParquetFile], run: Run) -> Run:
    """Stream the run's rows by record batches into `run`."""
    wanted = list(needed(run.task)) + ([by] if by is not None and by not in needed(run.task) else [])
    try:
        for file in files:
            for batch in file.iter_batches(BATCH_ROWS, columns=wanted):
                run.add(pa.Table.from_batches([batch]), by)
    except (OSError, pa.ArrowException) as error:
        raise InputError(not_parquet(location, error)) from None
    return run


def run_names(locations: Sequence[Location]) -> list[str]:
    """Each file's name without `.parquet`; the whole path where two names are the same."""
    stems = [loc.name.removesuffix(".parquet") for loc in locations]
    return [s if stems.count(s) == 1 else str(loc) for s, loc in zip(stems, locations)]


def percent(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def number(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def swatch(i: int) -> str:
    return f'<span class="swatch" style="background:{COLOURS[i % len(COLOURS)]}"></span>'


def run_heads(runs: Sequence[Run], first: str) -> str:
    cells = "".join(f"<th>{swatch(i)}{esc(r.name)}</th>" for i, r in enumerate(runs))
    return f"<tr><th>{esc(first)}</th>{cells}</tr>"


def summary_section(runs: Sequence[Run]) -> str:
    stats = [r.tally.figures() for r in runs]
    lines = [
        ("rows", "rows", [f"{f['samples']:,}" for f in stats]),
        ("errors", "errors", [f"{f['errors']:,}" for f in stats]),
        (
            "accuracy",
            "accuracy",
            [f"{percent(f['accuracy'])} ({f['correct']:,} of {f['with_reference']:,})" for f in stats],
        ),
        ("answer_rate", "answer rate", [f"{percent(f['answer_rate'])} ({f['answered']:,})" for f in stats]),
        ("mean_loss", "mean loss", [number(f["mean_loss"]) for f in stats]),
        ("prompt_tokens", "prompt tokens", [f"{f['prompt_tokens']:,}" for f in stats]),
        ("completion_tokens", "completion tokens", [f"{f['completion_tokens']:,}" for f in stats]),
        ("elapsed_s", "elapsed", [f"{number(r.summary.get('elapsed_s'), 1)} s" for r in runs]),
        ("rows_per_s", "rows/s", [number(r.summary.get("rows_per_s"), 2) for r in runs]),
        ("tokens_per_s", "tokens/s", [number(r.summary.get("tokens_per_s"), 1) for r in runs]),
        ("model", "model", [esc(r.summary.get("model") or r.settings.get("model", {}).get("source")) for r in runs]),
        ("adapter", "adapter", [esc(r.summary.get("adapter")) or "–" for r in runs]),
    ]
    return figures_section(runs, "Summary", lines)


def figures_section(runs: Sequence[Run], heading: str, lines: Sequence[tuple[str, str, list[str]]]) -> str:
    """The summary table: a line per (metric key, label, each run's value)."""
    body = "".join(
        f"<tr><th>{label}</th>{''.join(f'<td data-metric={key!r} data-run={i}>{v}</td>' for i, v in enumerate(values))}</tr>"
        for key, label, values in lines
    )
    return f'<section id="summary"><h2>{heading}</h2><table class="grid">{run_heads(runs, "")}{body}</table></section>'


def flat(settings: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[prefix + key] = text if len(text) <= 120 else text[:117] + "..."
    return out


def settings_section(runs: Sequence[Run]) -> str:
    flats = [flat(r.settings) for r in runs]
    keys = sorted({k for f in flats for k in f})
    rows = []
    for key in keys:
        values = [f.get(key, "–") for f in flats]
        differs = " class=differs" if len(set(values)) > 1 else ""
        rows.append(f"<tr{differs}><th>{esc(key)}</th>{''.join(f'<td>{esc(v)}</td>' for v in values)}</tr>")
    return (
        f'<section id="settings"><h2>Settings</h2><details><summary>{len(keys)} settings'
        f"{' (differences highlighted)' if len(runs) > 1 else ''}</summary>"
        f'<table class="grid">{run_heads(runs, "setting")}{"".join(rows)}</table></details></section>'
    )


def histogram(series: Sequence[Sequence[pa.Array]], names: Sequence[str], title: str, integer: bool) -> str:
    """An SVG histogram with shared bins, one colour per run, bars of a bin side by side. Each run's
    values come as Arrow arrays, binned in Arrow compute."""
    arrays = [pa.chunked_array(s, s[0].type) if s else pa.chunked_array([], pa.float64()) for s in series]
    width, height, left, bottom, top = 600, 240, 48, 36, 12
    extremes = [pc.min_max(a).as_py() for a in arrays if len(a)]
    if not extremes:
        return f'<figure><figcaption>{esc(title)}</figcaption><p class="none">no values</p></figure>'
    lo, hi = min(e["min"] for e in extremes), max(e["max"] for e in extremes)
    if integer:
        lo, hi = math.floor(lo), math.floor(hi) + 1
        step = max(1, math.ceil((hi - lo) / BINS))
        edges = [lo + step * i for i in range(math.ceil((hi - lo) / step) + 1)]
    else:
        hi = hi if hi > lo else lo + 1
        edges = [lo + (hi - lo) * i / BINS for i in range(BINS + 1)]
    bins = len(edges) - 1
    counts = [bin_counts(a, edges) for a in arrays]
    tallest = max(max(c) for c in counts) or 1
    plot_w, plot_h = width - left - 24, height - bottom - top
    slot = plot_w / bins
    bar = slot * 0.9 / len(series)
    parts = [
        f'<svg width="{width}" height="{height}" role="img" aria-label="{esc(title)}">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#444"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#444"/>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{tallest}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    for run, c in enumerate(counts):
        for b, n in enumerate(c):
            if n:
                h = plot_h * n / tallest
                x = left + b * slot + slot * 0.05 + run * bar
                parts.append(
                    f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                    f'fill="{COLOURS[run % len(COLOURS)]}"><title>{esc(names[run])}: {n} rows in '
                    f"[{edges[b]:.3g}, {edges[b + 1]:.3g})</title></rect>"
                )
    for i in range(0, bins + 1, max(1, bins // 5)):
        x = left + i * slot
        label = f"{edges[i]:g}" if integer else f"{edges[i]:.2f}"
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{label}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">{esc(title)}</text></svg>')
    return f'<figure data-histogram="{esc(title)}">{"".join(parts)}</figure>'


def bin_counts(values: pa.ChunkedArray, edges: Sequence[float]) -> list[int]:
    """How many values fall in each bin: int((v - first) / (last - first) * bins), clipped."""
    bins = len(edges) - 1
    counts = [0] * bins
    if not len(values):
        return counts
    scaled = pc.multiply(pc.divide(pc.subtract(values.cast(pa.float64()), edges[0]), edges[-1] - edges[0]), bins)
    index = pc.min_element_wise(pc.max_element_wise(pc.trunc(scaled), 0), bins - 1).cast(pa.int64())
    for found in pc.value_counts(index).to_pylist():
        counts[found["values"]] = found["counts"]
    return counts


def charts_section(runs: Sequence[Run]) -> str:
    names = [r.name for r in runs]
    loss = histogram([r.losses for r in runs], names, "loss (nats)", False)
    tokens = histogram([r.tokens for r in runs], names, "num_completion_tokens", True)
    return distributions(names, loss + tokens)


def task_chart_section(runs: Sequence[Run], task: str) -> str:
    names = [r.name for r in runs]
    return distributions(names, histogram([r.losses for r in runs], names, TASK_CHART[task], False))


def distributions(names: Sequence[str], charts: str) -> str:
    legend = "".join(f"<span class=legend>{swatch(i)}{esc(n)}</span>" for i, n in enumerate(names))
    return f'<section id="charts"><h2>Distributions</h2><p>{legend}</p><div class="charts">{charts}</div></section>'


def group_keys(column: pa.ChunkedArray) -> pa.Array:
    """Each row's --by value as the text the page shows: "(none)" for null, JSON for nested values."""
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind):
        return pc.fill_null(column.cast(pa.string()), "(none)").combine_chunks()
    values = column.to_pylist()
    return pa.array(
        [json.dumps(v) if isinstance(v, (dict, list)) else ("(none)" if v is None else str(v)) for v in values],
        pa.string(),
    )


def add_groups(groups: dict[str, Tally], batch: pa.Table, by: str, task: str = "generate") -> None:
    """Each --by value's figures over this batch, added to `groups`: one Arrow group-by, however
    many values the column has."""
    kind = type(tally_for(task))
    means = {"loss": batch.column("loss")} if task == "generate" else {n: batch.column(n) for n in kind.LOSSES}
    sums = kind.per_row(batch) | {f"{n}_n": pc.is_valid(c).cast(pa.int64()) for n, c in means.items()}
    table = pa.table({"key": group_keys(batch.column(by)), **means, **sums})
    found = table.group_by("key", use_threads=False).aggregate(
        [("key", "count")] + [(name, "sum") for name in means] + [(name, "sum") for name in sums]
    )
    for row in found.to_pylist():
        counts = {name: row[f"{name}_sum"] or 0 for name in sums if name.removesuffix("_n") not in means}
        losses = {n: (row[f"{n}_sum"] or 0.0, row[f"{n}_n_sum"] or 0) for n in means}
        groups.setdefault(row["key"], kind()).merge(counts | {"samples": row["key_count"]}, losses)


def most_common(groups: dict[str, Tally]) -> list[tuple[str, Tally]]:
    """The groups by rows, most first; ties in the order first seen."""
    return sorted(groups.items(), key=lambda item: -item[1].counts["samples"])


def group_figures(runs: Sequence[Run]) -> tuple[list[dict[str, dict]], list[str]]:
    """Each run's figures per --by value, and the values, most rows first across the runs."""
    per_run = [{k: t.figures() for k, t in most_common(r.groups)} for r in runs]
    values: list[str] = []
    for groups in per_run:
        values += [v for v in groups if v not in values]
    return per_run, values


def by_section(runs: Sequence[Run], by: str | None) -> str:
    if by is None:
        return ""
    per_run, values = group_figures(runs)
    shown = sorted(values[:MAX_GROUPS])
    rows = []
    for value in shown:
        cells = []
        for i, groups in enumerate(per_run):
            f = groups.get(value)
            if f is None:
                cells.append("<td>–</td>")
                continue
            bar = (
                ""
                if f["accuracy"] is None
                else (
                    f'<div class="bar" style="width:{100 * f["accuracy"]:.1f}%;background:{COLOURS[i % len(COLOURS)]}"></div>'
                )
            )
            cells.append(
                f'<td data-group="{esc(value)}" data-run={i}><span data-metric="accuracy">{percent(f["accuracy"])}'
                f'</span> · answered <span data-metric="answer_rate">{percent(f["answer_rate"])}</span> · '
                f'<span data-metric="rows">{f["samples"]:,}</span> rows{bar}</td>'
            )
        rows.append(f"<tr><th>{esc(value)}</th>{''.join(cells)}</tr>")
    more = f"<p>{len(values) - MAX_GROUPS} more values not shown.</p>" if len(values) > MAX_GROUPS else ""
    return (
        f'<section id="by"><h2>Accuracy and answer rate by {esc(by)}</h2>'
        f'<table class="grid">{run_heads(runs, by)}{"".join(rows)}</table>{more}</section>'
    )


# A likelihood task's figures on the page: (key, label, how it reads from Tally.figures()).
TASK_FIGURES = {
    "choice": [
        (
            "acc",
            "acc",
            lambda f: (
                f"{number(f['acc'], 4)} ± {number(f['acc_stderr'], 4)} ({f['correct']:,} of {f['with_answer']:,})"
            ),
        ),
        (
            "acc_norm",
            "acc_norm",
            lambda f: f"{number(f['acc_norm'], 4)} ± {number(f['acc_norm_stderr'], 4)} ({f['correct_norm']:,})",
        ),
    ],
    "loglikelihood": [
        ("acc", "greedy (acc)", lambda f: f"{number(f['acc'], 4)} ± {number(f['acc_stderr'], 4)} ({f['greedy']:,})"),
        ("perplexity", "perplexity", lambda f: number(f["perplexity"], 4)),
    ],
    "perplexity": [
        ("word_perplexity", "word perplexity", lambda f: number(f["word_perplexity"], 4)),
        ("byte_perplexity", "byte perplexity", lambda f: number(f["byte_perplexity"], 4)),
        ("bits_per_byte", "bits per byte", lambda f: number(f["bits_per_byte"], 4)),
    ],
}
TASK_CHART = {
    "choice": "margin of the chosen choice over the next (nats)",
    "loglikelihood": "continuation log-prob (nats)",
    "perplexity": "perplexity per token, per row",
}


def task_summary_section(runs: Sequence[Run], task: str) -> str:
    stats = [r.tally.figures() for r in runs]
    lines = [
        ("rows", "rows", [f"{f['samples']:,}" for f in stats]),
        ("errors", "errors", [f"{f['errors']:,}" for f in stats]),
        *[(key, label, [shown(f) for f in stats]) for key, label, shown in TASK_FIGURES[task]],
        ("elapsed_s", "elapsed", [f"{number(r.summary.get('elapsed_s'), 1)} s" for r in runs]),
        ("rows_per_s", "rows/s", [number(r.summary.get("rows_per_s"), 2) for r in runs]),
        ("model", "model", [esc(r.summary.get("model") or r.settings.get("model", {}).get("source")) for r in runs]),
    ]
    return figures_section(runs, f"Summary: {esc(task)}", lines)


def task_by_section(runs: Sequence[Run], by: str | None, task: str) -> str:
    if by is None:
        return ""
    per_run, values = group_figures(runs)
    rows = []
    for value in sorted(values[:MAX_GROUPS]):
        cells = []
        for i, groups in enumerate(per_run):
            f = groups.get(value)
            figures = (
                "–"
                if f is None
                else " · ".join(
                    f'{label} <span data-metric="{key}">{shown(f)}</span>' for key, label, shown in TASK_FIGURES[task]
                )
                + f' · <span data-metric="rows">{f["samples"]:,}</span> rows'
            )
            cells.append(f'<td data-group="{esc(value)}" data-run={i}>{figures}</td>')
        rows.append(f"<tr><th>{esc(value)}</th>{''.join(cells)}</tr>")
    more = f"<p>{len(values) - MAX_GROUPS} more values not shown.</p>" if len(values) > MAX_GROUPS else ""
    return (
        f'<section id="by"><h2>{esc(task)} figures by {esc(by)}</h2>'
        f'<table class="grid">{run_heads(runs, by)}{"".join(rows)}</table>{more}</section>'
    )


def task_rows_section(runs: Sequence[Run], task: str) -> str:
    parts = []
    for i, run in enumerate(runs):
        if task == "choice":
            listed = row_table(run.wrong, CHOICE_WRONG_COLUMNS) if run.wrong else "<p class=none>No wrong picks.</p>"
            parts.append(f"<h3>{swatch(i)}{esc(run.name)}</h3><h4>Wrong picks (first {TOP_ROWS})</h4>{listed}")
        else:
            worst = run.worst.to_pylist() if run.worst is not None else []
            listed = row_table(worst, ["id", "logprob", "question"]) if worst else "<p class=none>No rows scored.</p>"
            parts.append(f"<h3>{swatch(i)}{esc(run.name)}</h3><h4>Least likely rows</h4>{listed}")
    return f'<section id="rows"><h2>Rows to look at</h2>{"".join(parts)}</section>'


def errors_section(runs: Sequence[Run]) -> str:
    parts = []
    for i, run in enumerate(runs):
        if not run.tally.error_kinds:
            parts.append(f"<h3>{swatch(i)}{esc(run.name)}</h3><p class=none>No errors.</p>")
            continue
        blocks = []
        for kind, n in run.tally.error_kinds.most_common():
            body = "".join(
                f"<tr><td>{esc(r['id'])}</td><td>{esc(r['question'])}</td><td>{esc(r['error'])}</td></tr>"
                for r in run.error_rows[kind]
            )
            blocks.append(
                f'<details open><summary data-error-kind="{esc(kind)}" data-run={i}>{esc(kind)}: '
                f'{n:,} row(s)</summary><table class="rows"><tr><th>id</th><th>question</th>'
                f"<th>error</th></tr>{body}</table></details>"
            )
        parts.append(f"<h3>{swatch(i)}{esc(run.name)}</h3>{''.join(blocks)}")
    return f'<section id="errors"><h2>Errors by kind</h2>{"".join(parts)}</section>'


def row_table(rows: list[dict], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class={'text' if c in ('question', 'completion') else 'cell'}>"
            f"{esc(number(r[c]) if isinstance(r[c], float) else r[c])}</td>"
            for c in columns
        )
        + "</tr>"
        for r in rows
    )
    return f'<table class="rows"><tr>{head}</tr>{body}</table>'


def rows_section(runs: Sequence[Run]) -> str:
    parts = []
    for i, run in enumerate(runs):
        worst_rows = run.worst.to_pylist() if run.worst is not None else []
        wrong = run.wrong
        parts.append(
            f"<h3>{swatch(i)}{esc(run.name)}</h3>"
            f"<h4>Highest loss</h4>"
            + (row_table(worst_rows, WORST_COLUMNS) if worst_rows else "<p class=none>No losses.</p>")
            + f"<h4>Wrong answers (first {TOP_ROWS})</h4>"
            + (row_table(wrong, WRONG_COLUMNS) if wrong else "<p class=none>No wrong answers graded.</p>")
        )
    return f'<section id="rows"><h2>Rows to look at</h2>{"".join(parts)}</section>'


STYLE = """
body{font:14px/1.4 system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:15px;margin:16px 0 6px}h4{font-size:13px;margin:10px 0 4px;color:#555}
table{border-collapse:collapse}th,td{padding:4px 8px;border:1px solid #e2e2e2;vertical-align:top;text-align:left}
table.grid td{min-width:140px}tr.differs{background:#fff6d6}
table.rows{width:100%;table-layout:fixed}table.rows td.text{white-space:pre-wrap;word-break:break-word}
table.rows td.cell{word-break:break-all}
.swatch{display:inline-block;width:10px;height:10px;margin-right:6px;border-radius:2px}
.legend{margin-right:16px}.bar{height:4px;margin-top:3px;border-radius:2px}
.charts{display:flex;flex-wrap:wrap;gap:24px}figure{margin:0}svg text{font-size:11px;fill:#333}
.none{color:#777;font-style:italic}summary{cursor:pointer}
"""


def render_report(runs: Sequence[Run], by: str | None) -> str:
    title = "bulkscore report: " + ", ".join(r.name for r in runs)
    task = runs[0].task
    if task == "generate":
        sections = [summary_section(runs), charts_section(runs), by_section(runs, by)]
        sections += [errors_section(runs), rows_section(runs)]
    else:
        sections = [task_summary_section(runs, task), task_chart_section(runs, task), task_by_section(runs, by, task)]
        sections += [errors_section(runs), task_rows_section(runs, task)]
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1>" + "".join(sections) + settings_section(runs) + "</body></html>\n"
    )


def build_report(locations: Sequence[Location], by: str | None) -> tuple[str, str | None]:
    """(the page, the column it groups by). `by` None: `category` where every run has it.

    Each output is read once, by record batches: a 10-million-row output reports in seconds, in
    the memory of its losses and token counts (12 bytes a row) and a batch."""
    opened = [open_run(loc, name) for loc, name in zip(locations, run_names(locations))]
    runs = [run for run, _ in opened]
    tasks = sorted({run.task for run in runs})
    if len(tasks) > 1:
        raise InputError(
            f"these outputs are of different tasks ({', '.join(tasks)}); report the runs of one task together"
        )
    if by is not None:
        missing = [str(loc) for loc, r in zip(locations, runs) if by not in r.columns]
        if missing:
            raise InputError(
                f"--by {by}: no such column in {', '.join(missing)}; columns: {', '.join(runs[0].columns)}"
            )
    elif all(DEFAULT_BY in r.columns for r in runs):
        by = DEFAULT_BY
    for location, (run, files) in zip(locations, opened):
        read_run(location, by, files, run)
    return render_report(runs, by), by
