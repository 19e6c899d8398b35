"""Load and save dataset rows in the verl parquet schema, or JSONL with the same fields (SPEC 9).

One row:
    data_source: str                                    required
    prompt: [{"role": system|user|assistant, "content": str}, ...]   required, non-empty
    ability: str                                        optional, default "math"
    demonstration: str                                  optional, SDFT's teacher context (else extra_info.solution)
    reward_model: {"ground_truth": str | int | float | decimal, ...}   required (other keys ignored)
    extra_info: {"id": str | int,                       the row id, unique within the file;
                 "index": int | str,                    verl's preprocess scripts write this instead:
                                                        the id when there is no "id"
                 "domain": str,                         optional, default "unknown"
                 "difficulty": str | int | float,       optional (kept as a string)
                 "solution": str,                       optional, worked solution for SFT
                 ...}                                   other keys are kept in Example.extra
Other top-level columns are ignored.

Numeric ground truths become text (the grader and the decoys read text): an integer as `str(int)`;
a float as the shortest decimal that reads back as the same float64, positional (never an
exponent) and without a trailing `.0` (`2.5` -> "2.5", `3.0` -> "3", `1e-05` -> "0.00001"): a float
keeps no spelling, so this is the one text that names exactly its value, and a whole-number float
(an integer column upcast by pandas) reads as the integer it held. A decimal (parquet decimal128)
keeps its own digits (`2.50` -> "2.50"). Strings are kept as written (stripped).

Validation is per row and fails loudly: a bad row raises DataError naming the file, the row index
(0-based; JSONL also gives the 1-based line) and the field, what was expected and what was found.
A null means "absent" only for optional fields.

Decoys (SPEC section 3) are built lazily: each Example carries (gold, decoy_seed) and builds its
decoy the first time `Example.decoy` is read (by the scorer, for a row a meta arm samples), then
keeps it; identical golds share the math-verify work (selfdistill.data.decoys caches per gold).
Building every decoy at load costs several math-verify parses and verifications per distinct gold
(benchmarks/bench_data_load.py), which arms that never score (base, cf, asym_cf) and evaluation
never need. The cost of deferring: a row whose gold has no valid decoy is rejected when its decoy
is first needed, not at load, with the same error naming the file, row index and id.
"""

from __future__ import annotations

import json
import math
import os
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from selfdistill.data.example import DataError, Example

__all__ = ["DataError", "load_examples", "numeric_answer_text", "save_examples"]

ROLES = ("system", "user", "assistant")
_EXTRA_INFO_FIELDS = ("id", "domain", "difficulty", "solution")


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Row:
    """Where a row came from, for error messages."""

    def __init__(self, path: str, index: int, line: int | None = None):
        self.path, self.index, self.line = path, index, line

    def where(self) -> str:
        line = f" (line {self.line})" if self.line is not None else ""
        return f"{self.path}: row {self.index}{line}"

    def error(self, field: str, expected: str, got: Any) -> DataError:
        return DataError(f"{self.where()}: field '{field}': expected {expected}, "
                         f"got {_kind(got)} {_fmt(got)}")


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".jsonl":
        return "jsonl"
    raise DataError(f"{path}: unsupported file extension {path.suffix!r}; "
                    f"expected .parquet (verl schema) or .jsonl (same fields)")


def _read_rows(path: Path) -> Iterator[tuple[_Row, Any]]:
    fmt = _format_of(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise DataError(f"{path}: cannot read as parquet: {e}") from e
        for i, row in enumerate(table.to_pylist()):
            yield _Row(str(path), i), row
        return
    index = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = _Row(str(path), index, line_no)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where.where()}: invalid JSON: {e}") from e
            yield where, row
            index += 1


def _check_finite(value: Any, field: str, row: _Row) -> None:
    """Reject NaN / inf anywhere inside a value we keep (nested dicts and lists included)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise row.error(field, "a finite number", value)
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{field}.{k}", row)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{field}[{i}]", row)


def _non_empty_str(value: Any, field: str, row: _Row) -> str:
    if not isinstance(value, str) or not value.strip():
        raise row.error(field, "a non-empty string", value)
    return value


def _optional_str(value: Any, field: str, row: _Row, default: str | None) -> str | None:
    return default if value is None else _non_empty_str(value, field, row)


def _prompt(value: Any, row: _Row) -> list[dict]:
    if isinstance(value, str):
        raise row.error("prompt", 'a non-empty list of {"role", "content"} messages (wrap a plain '
                        'string as [{"role": "user", "content": ...}])', value)
    if not isinstance(value, (list, tuple)) or not value:
        raise row.error("prompt", 'a non-empty list of {"role", "content"} messages', value)
    messages = []
    for j, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise row.error(f"prompt[{j}]", 'a {"role", "content"} message', msg)
        role = msg.get("role")
        if role not in ROLES:
            raise row.error(f"prompt[{j}].role", f"one of {', '.join(ROLES)}", role)
        content = _non_empty_str(msg.get("content"), f"prompt[{j}].content", row)
        messages.append({"role": role, "content": content})
    return messages


def numeric_answer_text(value: int | float | Decimal) -> str:
    """The text of a numeric ground truth (module docstring): int -> str(int); float -> shortest
    round-trip decimal, positional, no trailing `.0`; Decimal -> its own digits, positional."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise TypeError(f"numeric_answer_text: expected an int, float or Decimal, got {type(value).__name__} {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        return format(value, "f")
    return np.format_float_positional(value, unique=True, trim="-")


def _gold(reward_model: Any, row: _Row) -> str:
    if not isinstance(reward_model, dict):
        raise row.error("reward_model", 'a struct {"ground_truth": ...}', reward_model)
    gt = reward_model.get("ground_truth")
    field = "reward_model.ground_truth"
    expected = "a non-empty string or a finite number"
    if isinstance(gt, bool):
        raise row.error(field, expected, gt)
    if isinstance(gt, (float, Decimal)) and not math.isfinite(gt):
        raise row.error(field, expected, gt)
    if isinstance(gt, (int, float, Decimal)):
        return numeric_answer_text(gt)
    if not isinstance(gt, str) or not gt.strip():
        raise row.error(field, expected, gt)
    return gt.strip()


def _id(info: dict, row: _Row) -> str:
    """`extra_info.id`, or verl's `extra_info.index` when there is no id."""
    field = "extra_info.id" if info.get("id") is not None or info.get("index") is None else "extra_info.index"
    value = info.get(field.split(".")[1])
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    raise row.error(field, "a non-empty string or an integer, unique within the file (extra_info.id, or "
                    "extra_info.index as verl's preprocess scripts write it)", value)


def _difficulty(value: Any, row: _Row) -> str | None:
    if value is None:
        return None
    field = "extra_info.difficulty"
    expected = "a non-empty string, an integer, a finite number, or null when unknown"
    if isinstance(value, bool):
        raise row.error(field, expected, value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise row.error(field, expected, value)
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise row.error(field, expected, value)


def _example(raw: Any, row: _Row, decoy_seed: int) -> Example:
    if not isinstance(raw, dict):
        raise row.error("<row>", "an object with data_source, prompt, reward_model, extra_info",
                        raw)
    data_source = _non_empty_str(raw.get("data_source"), "data_source", row)
    prompt = _prompt(raw.get("prompt"), row)
    ability = _optional_str(raw.get("ability"), "ability", row, "math")
    gold = _gold(raw.get("reward_model"), row)
    info = raw.get("extra_info")
    if not isinstance(info, dict):
        raise row.error("extra_info", 'a struct {"id", "domain", "difficulty", ...}', info)
    ex_id = _id(info, row)
    domain = _optional_str(info.get("domain"), "extra_info.domain", row, "unknown")
    difficulty = _difficulty(info.get("difficulty"), row)
    solution = _optional_str(info.get("solution"), "extra_info.solution", row, None)
    demonstration = _optional_str(raw.get("demonstration"), "demonstration", row, None)
    # Parquet structs give every row every key (null where absent): drop nulls so JSONL and
    # parquet load to the same Example. verl's `index` is the id when there is no `id`.
    skip = _EXTRA_INFO_FIELDS + (("index",) if info.get("id") is None else ())
    extra = {k: v for k, v in info.items() if k not in skip and v is not None}
    _check_finite(extra, "extra_info", row)
    return Example(id=ex_id, prompt=prompt, gold=gold, data_source=data_source, ability=ability,
                   domain=domain, difficulty=difficulty, solution=solution, demonstration=demonstration,
                   extra=extra, decoy_seed=decoy_seed, origin=row.where())


def load_examples(path: str | os.PathLike, decoy_seed: int = 42) -> list[Example]:
    """Read and validate every row of a .parquet (verl schema) or .jsonl file (SPEC section 9).

    Raises DataError on the first bad row, on duplicate ids (naming both rows) and on an empty
    file. Each Example builds its decoy from (gold, decoy_seed) when it is first read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples: list[Example] = []
    first_row_of_id: dict[str, int] = {}
    for row, raw in _read_rows(path):
        ex = _example(raw, row, decoy_seed)
        if ex.id in first_row_of_id:
            raise DataError(f"{path}: rows {first_row_of_id[ex.id]} and {row.index}: field "
                            f"'extra_info.id': duplicate id {ex.id!r}; ids must be unique")
        first_row_of_id[ex.id] = row.index
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no rows; expected at least one example")
    return examples


def _to_row(ex: Example) -> dict:
    info: dict[str, Any] = {"id": ex.id, "domain": ex.domain, "difficulty": ex.difficulty}
    if ex.solution is not None:
        info["solution"] = ex.solution
    for k, v in ex.extra.items():
        if k in _EXTRA_INFO_FIELDS:
            raise DataError(f"example {ex.id!r}: extra key {k!r} collides with the "
                            f"extra_info.{k} field; keep it in the Example attribute")
        info[k] = v
    return {
        "data_source": ex.data_source,
        "prompt": [{"role": m["role"], "content": m["content"]} for m in ex.prompt],
        "ability": ex.ability,
        "reward_model": {"style": "rule", "ground_truth": ex.gold},
        "extra_info": info,
    }


def save_examples(examples: list[Example], path: str | os.PathLike) -> None:
    """Write examples as .parquet (verl schema) or .jsonl; `load_examples` reads them back equal.

    The decoy is not stored: it is a function of (gold, seed) and is rebuilt after loading.
    """
    path = Path(path)
    fmt = _format_of(path)
    rows = [_to_row(ex) for ex in examples]
    if any(ex.demonstration is not None for ex in examples):  # a column for every row (parquet takes the first row's keys)
        for row, ex in zip(rows, examples):
            row["demonstration"] = ex.demonstration
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                # allow_nan=False: a NaN would load back as a DataError, so fail at write time.
                f.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"{path}: cannot write as parquet (the values of one extra_info key "
                        f"must have one type across examples): {e}") from e
    pq.write_table(table, path)
