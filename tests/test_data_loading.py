"""Loading and saving dataset rows (SPEC section 9): round trips and per-row validation."""

import copy
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfdistill.data.decoys import make_decoy
from selfdistill.data.example import Example
from selfdistill.data.loading import DataError, load_examples, save_examples


def _row(i=0, **overrides):
    row = {
        "data_source": "math500",
        "prompt": [{"role": "system", "content": "Reason step by step."},
                   {"role": "user", "content": f"Question {i}?"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "\\frac{1}{2}"},
        "extra_info": {"id": f"q{i}", "domain": "algebra", "difficulty": "3"},
    }
    for key, value in overrides.items():
        row[key] = value
    return row


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _examples():
    return [
        Example(id="a", prompt=[{"role": "user", "content": "What is 4^2?"}], gold="16",
                data_source="gsm8k", domain="arithmetic", difficulty="1",
                extra={"split": "train", "tags": ["easy", "square"]}),
        Example(id="b", prompt=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Half of one?"}],
                gold="\\frac{1}{2}", data_source="math", ability="math", domain="algebra",
                difficulty=None, solution="1/2 = \\frac{1}{2}", extra={"score": 0.25}),
        Example(id="c", prompt=[{"role": "user", "content": "Area of the unit circle?"}],
                gold="\\pi", data_source="math"),
    ]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_round_trip(tmp_path, suffix):
    original = _examples()
    path = tmp_path / f"data{suffix}"
    save_examples(original, path)
    loaded = load_examples(path)
    assert [e.decoy for e in loaded] == [make_decoy(e.gold) for e in original]
    for ex in original:
        ex.decoy = make_decoy(ex.gold)
    assert loaded == original
    # And again through the other format.
    other = tmp_path / ("again.jsonl" if suffix == ".parquet" else "again.parquet")
    save_examples(loaded, other)
    assert load_examples(other) == original


def test_parquet_is_verl_schema(tmp_path):
    path = tmp_path / "d.parquet"
    save_examples(_examples(), path)
    schema = pq.read_schema(path)
    assert set(schema.names) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    row = pq.read_table(path).to_pylist()[0]
    assert row["reward_model"]["ground_truth"] == "16"
    assert row["prompt"] == [{"role": "user", "content": "What is 4^2?"}]
    assert row["extra_info"]["id"] == "a"


def test_verl_parquet_written_by_pyarrow_loads(tmp_path):
    path = tmp_path / "verl.parquet"
    pq.write_table(pa.Table.from_pylist([_row(0), _row(1)]), path)
    a, b = load_examples(path, decoy_seed=3)
    assert (a.id, a.gold, a.domain, a.difficulty, a.data_source) == ("q0", "\\frac{1}{2}",
                                                                     "algebra", "3", "math500")
    assert b.decoy == make_decoy("\\frac{1}{2}", seed=3)
    # Integer gold, id and difficulty columns are accepted and kept as strings.
    rows = [_row(0), _row(1)]
    rows[0]["reward_model"] = {"style": "rule", "ground_truth": 42}
    rows[0]["extra_info"] = {"id": 7, "domain": "nt", "difficulty": 5}
    rows[1]["reward_model"] = {"style": "rule", "ground_truth": -3}
    rows[1]["extra_info"] = {"id": 8, "domain": "nt", "difficulty": None}
    pq.write_table(pa.Table.from_pylist(rows), path)
    a, b = load_examples(path)
    assert (a.id, a.gold, a.difficulty, a.decoy) == ("7", "42", "5", make_decoy("42"))
    assert (b.id, b.gold, b.difficulty) == ("8", "-3", None)


def test_optional_fields_default(tmp_path):
    row = _row()
    del row["ability"]
    row["extra_info"] = {"id": "only-id"}
    ex, = load_examples(_write_jsonl(tmp_path / "d.jsonl", [row]))
    assert (ex.ability, ex.domain, ex.difficulty, ex.solution, ex.extra) == (
        "math", "unknown", None, None, {})


def test_gold_is_stripped(tmp_path):
    ex, = load_examples(_write_jsonl(tmp_path / "d.jsonl", [
        _row(reward_model={"ground_truth": "  16 \n"})]))
    assert ex.gold == "16" and ex.decoy == "6"


def _bad(**overrides):
    return [_row(0), _row(1, **overrides)]


_DELETE = object()


def _nested(field, value):
    """Rows 0 and 1, row 1 with one nested key replaced (or deleted, for _DELETE)."""
    row = _row(1)
    outer, inner = field.split(".")
    row[outer] = copy.deepcopy(row[outer])
    if value is _DELETE:
        del row[outer][inner]
    else:
        row[outer][inner] = value
    return [_row(0), row]


BAD_ROWS = [
    # (rows, field named in the error, words of the expectation)
    (_nested("reward_model.ground_truth", _DELETE), "reward_model.ground_truth",
     "non-empty string"),
    (_nested("reward_model.ground_truth", "   "), "reward_model.ground_truth", "non-empty string"),
    (_nested("reward_model.ground_truth", 2.5), "reward_model.ground_truth", "as strings"),
    (_nested("reward_model.ground_truth", True), "reward_model.ground_truth", "integer"),
    (_nested("reward_model.ground_truth", ["1", "2"]), "reward_model.ground_truth", "integer"),
    (_bad(reward_model=None), "reward_model", "struct"),
    (_bad(reward_model="16"), "reward_model", "struct"),
    (_bad(prompt=[]), "prompt", "non-empty list"),
    (_bad(prompt="What is 2+2?"), "prompt", "wrap a plain string"),
    (_bad(prompt=None), "prompt", "non-empty list"),
    (_bad(prompt=[{"role": "user", "content": ""}]), "prompt[0].content", "non-empty string"),
    (_bad(prompt=[{"role": "user", "content": "  "}]), "prompt[0].content", "non-empty string"),
    (_bad(prompt=[{"role": "user", "content": 3}]), "prompt[0].content", "non-empty string"),
    (_bad(prompt=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]),
     "prompt[1].role", "system, user, assistant"),
    (_bad(prompt=[{"content": "x"}]), "prompt[0].role", "system, user, assistant"),
    (_bad(prompt=["hi"]), "prompt[0]", "message"),
    (_bad(data_source=None), "data_source", "non-empty string"),
    (_bad(data_source=5), "data_source", "non-empty string"),
    (_bad(ability=""), "ability", "non-empty string"),
    (_bad(extra_info=None), "extra_info", "struct"),
    (_nested("extra_info.id", _DELETE), "extra_info.id", "rename it to id"),
    (_nested("extra_info.id", ""), "extra_info.id", "non-empty string or an integer"),
    (_nested("extra_info.id", 1.5), "extra_info.id", "non-empty string or an integer"),
    (_nested("extra_info.domain", 3), "extra_info.domain", "non-empty string"),
    (_nested("extra_info.difficulty", float("nan")), "extra_info.difficulty", "finite"),
    (_nested("extra_info.difficulty", float("inf")), "extra_info.difficulty", "finite"),
    (_nested("extra_info.difficulty", ""), "extra_info.difficulty", "non-empty string"),
    (_nested("extra_info.solution", 12), "extra_info.solution", "non-empty string"),
    (_nested("extra_info.score", float("-inf")), "extra_info.score", "finite number"),
    (_bad(reward_model={"ground_truth": "\\pm\\infty"}), "reward_model.ground_truth",
     "no decoy can be built"),
]


def _parquet_representable(rows):
    try:
        pa.Table.from_pylist(rows)
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # one column, mixed types
        return False


BAD_CASES = [(rows, field, expected, suffix)
             for rows, field, expected in BAD_ROWS
             for suffix in (".jsonl", ".parquet")
             if suffix == ".jsonl" or _parquet_representable(rows)]


@pytest.mark.parametrize("rows, field, expected, suffix", BAD_CASES,
                         ids=[f"{f}-{suffix[1:]}-{i}" for i, (_, f, _, suffix)
                              in enumerate(BAD_CASES)])
def test_bad_row_error_names_file_row_and_field(tmp_path, rows, field, expected, suffix):
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        _write_jsonl(path, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError) as info:
        load_examples(path)
    msg = str(info.value)
    assert str(path) in msg and "row 1" in msg and f"'{field}'" in msg, msg
    assert expected in msg, msg
    if suffix == ".jsonl":
        assert "(line 2)" in msg


def test_non_finite_gold_and_nan_literal_in_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_row(0)) + "\n"
                    + json.dumps(_row(1)).replace('"\\\\frac{1}{2}"', "NaN") + "\n")
    with pytest.raises(DataError, match=r"row 1 \(line 2\): field 'reward_model.ground_truth'"):
        load_examples(path)


def test_duplicate_ids_name_both_rows(tmp_path):
    rows = [_row(0), _row(1), _row(2)]
    rows[2]["extra_info"] = dict(rows[0]["extra_info"])
    with pytest.raises(DataError, match=r"rows 0 and 2: field 'extra_info.id': duplicate id 'q0'"):
        load_examples(_write_jsonl(tmp_path / "d.jsonl", rows))
    # An integer id and the same id as a string collide too.
    rows = [_row(0), _row(1)]
    rows[0]["extra_info"] = {"id": 5}
    rows[1]["extra_info"] = {"id": "5"}
    with pytest.raises(DataError, match="rows 0 and 1"):
        load_examples(_write_jsonl(tmp_path / "e.jsonl", rows))


def test_invalid_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_row(0)) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"row 1 \(line 3\): invalid JSON"):
        load_examples(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"expected \.parquet .* or \.jsonl"):
        load_examples(tmp_path / "d.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_examples(tmp_path / "empty.jsonl")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read as parquet"):
        load_examples(tmp_path / "junk.parquet")
    assert issubclass(DataError, ValueError)


def test_save_rejects_nan_in_jsonl(tmp_path):
    ex = _examples()[0]
    ex.extra = {"score": float("nan")}
    with pytest.raises(ValueError):
        save_examples([ex], tmp_path / "d.jsonl")
