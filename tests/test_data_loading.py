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
    (_nested("reward_model.ground_truth", float("nan")), "reward_model.ground_truth", "finite number"),
    (_nested("reward_model.ground_truth", float("inf")), "reward_model.ground_truth", "finite number"),
    (_nested("reward_model.ground_truth", True), "reward_model.ground_truth", "finite number"),
    (_nested("reward_model.ground_truth", ["1", "2"]), "reward_model.ground_truth", "finite number"),
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
    (_nested("extra_info.id", _DELETE), "extra_info.id", "extra_info.index as verl"),
    (_nested("extra_info.id", ""), "extra_info.id", "non-empty string or an integer"),
    (_nested("extra_info.id", 1.5), "extra_info.id", "non-empty string or an integer"),
    (_nested("extra_info.domain", 3), "extra_info.domain", "non-empty string"),
    (_nested("extra_info.difficulty", float("nan")), "extra_info.difficulty", "finite"),
    (_nested("extra_info.difficulty", float("inf")), "extra_info.difficulty", "finite"),
    (_nested("extra_info.difficulty", ""), "extra_info.difficulty", "non-empty string"),
    (_nested("extra_info.solution", 12), "extra_info.solution", "non-empty string"),
    (_nested("extra_info.score", float("-inf")), "extra_info.score", "finite number"),
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


# ----------------------------------------------------------------------------- verl files at scale

def _verl_row(index, answer, question="What is 2+2?"):
    """A row as verl's preprocess scripts write it: extra_info.index, no id."""
    return {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": question}], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": "train", "index": index, "answer": f"#### {answer}", "question": question}}


def test_verl_file_with_index_and_numeric_answers_loads(tmp_path, monkeypatch):
    from decimal import Decimal

    from selfdistill.data import decoys

    rows = [_verl_row(0, 72), _verl_row(1, 2.5), _verl_row(2, 3.0), _verl_row(3, 1e-05), _verl_row(4, -0.1)]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    calls = []
    real = decoys.make_decoy
    monkeypatch.setattr(decoys, "make_decoy", lambda g, seed=42: calls.append(g) or real(g, seed))
    exs = load_examples(path)
    assert [e.id for e in exs] == ["0", "1", "2", "3", "4"]
    assert [e.gold for e in exs] == ["72", "2.5", "3", "0.00001", "-0.1"]
    assert exs[0].extra == {"split": "train", "answer": "#### 72", "question": "What is 2+2?"}  # index became the id
    # decoys are built when first read, once per row, and equal the eager SPEC section 3 choice
    assert calls == []
    assert exs[1].decoy == real("2.5") and exs[1].decoy == exs[1].decoy
    assert calls == ["2.5"]
    assert [e.decoy for e in exs] == [real(e.gold) for e in exs] and len(calls) == 5
    # an id next to an index wins; the index stays an extra key
    rows = [_verl_row(0, "7"), _verl_row(1, "8")]
    for i, r in enumerate(rows):
        r["extra_info"]["id"] = f"q{i}"
    pq.write_table(pa.Table.from_pylist(rows), path)
    a, b = load_examples(path)
    assert (a.id, b.id, a.extra["index"]) == ("q0", "q1", 0)
    # a parquet decimal keeps its digits; duplicate indexes are duplicate ids
    table = pa.table({"data_source": ["d", "d"], "prompt": [[{"role": "user", "content": "q"}]] * 2,
                      "reward_model": [{"ground_truth": Decimal("2.50")}, {"ground_truth": Decimal("-0.75")}],
                      "extra_info": [{"index": 5}, {"index": 6}]})
    pq.write_table(table, path)
    assert [e.gold for e in load_examples(path)] == ["2.50", "-0.75"]
    pq.write_table(pa.Table.from_pylist([_verl_row(3, 1), _verl_row(3, 2)]), path)
    with pytest.raises(DataError, match=r"rows 0 and 1: field 'extra_info.id': duplicate id '3'"):
        load_examples(path)


@pytest.mark.parametrize("value, text", [
    (2.5, "2.5"), (3.0, "3"), (-0.0, "-0"), (0.1, "0.1"), (1e-05, "0.00001"), (1e16, "10000000000000000"),
    (123456.789, "123456.789"), (2 / 3, "0.6666666666666666"), (-7, "-7"), (10**20, "100000000000000000000"),
])
def test_numeric_answer_text(value, text):
    from selfdistill.data.loading import numeric_answer_text

    assert numeric_answer_text(value) == text
    assert float(text) == value  # the text names exactly the stored value


def test_numeric_answer_text_round_trips_random_floats():
    import random

    from selfdistill.data.loading import numeric_answer_text

    rng = random.Random(0)
    for _ in range(2000):
        x = rng.uniform(-1e6, 1e6) * 10 ** rng.randint(-12, 6)
        text = numeric_answer_text(x)
        assert float(text) == x and "e" not in text.lower(), (x, text)


def test_row_without_a_decoy_is_rejected_when_its_decoy_is_first_read(tmp_path):
    rows = [_row(0), _row(1, reward_model={"ground_truth": "\\pm\\infty"})]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    good, bad = load_examples(path)  # loading checks the schema only
    assert good.decoy == make_decoy("\\frac{1}{2}")
    for _ in range(2):  # every read raises: a failed decoy is not cached as None
        with pytest.raises(DataError) as info:
            _ = bad.decoy
        msg = str(info.value)
        assert str(path) in msg and "row 1 (line 2)" in msg and "row id 'q1' is rejected" in msg, msg
        assert "'reward_model.ground_truth'" in msg and "no decoy can be built" in msg
