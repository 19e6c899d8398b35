"""`report.md` and `report.json` from the analysis (selfdistill.report.analysis) and its plots.

The twin audit ledger comes first: a comparison is only as good as its twins. Every table gives
n beside its rates; runs that did not finish are marked wherever they appear.
"""

from __future__ import annotations

import json
import os
from typing import Optional

SECTIONS = ("Twin audit ledger", "Runs", "Held-out: arms vs base", "Paired statistics on the same problems",
            "Held-in validation accuracy by step", "Delta vs base at shared steps", "Per-domain accuracy",
            "Accuracy and meta emission by difficulty band", "With vs without meta: per band and pooled",
            "Drift: held-in vs held-out gain", "How to read this report")


def _f(x: Optional[float], digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


_DRIFT = {True: "**DRIFT**", False: "no", None: "-"}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _cell(c: Optional[dict]) -> str:
    return f"{_f(c['accuracy'])} (n={c['n']})" if c else "-"


def _mark(status: str) -> str:
    return "" if status == "finished" else f" **[{status}]**"


def audit_lines(report: dict) -> list[str]:
    ledger = report["audit"]
    if not ledger:
        return ["No arm runs to audit (only the base arm was found)."]
    names = [c["check"] for c in ledger[0]["checks"]] if ledger[0]["base_run"] else []
    names = names or sorted({c["check"] for e in ledger for c in e["checks"]})
    rows = []
    for e in ledger:
        status = {c["check"]: c["status"] for c in e["checks"]}
        rows.append([e["run"], e["base_run"] or "-", *[status.get(n, "-") for n in names], "PASS" if e["passed"] else "**FAIL**"])
    lines = _table(["run", "base run", *names, "verdict"], rows)
    failed = [(e["run"], c) for e in ledger for c in e["checks"] if c["status"] != "pass"]
    if failed:
        lines += ["", "Checks that did not pass (a failed check marks the comparison; it is still shown below):", ""]
        lines += [f"- {run}: **{c['check']}** {c['status']}: {c['detail']}" for run, c in failed]
    return lines


def runs_lines(report: dict) -> list[str]:
    st = report["status"]
    rows = [[r["run"] + _mark(r["status"]), r["status"], ", ".join(map(str, r["heldout_steps"])) or "-",
             ", ".join(map(str, r["heldin_steps"])) or "-", {True: "pass", False: "fail", None: "(base)"}[r["audit_passed"]],
             f"`{r['path']}`"] for r in report["runs"]]
    lines = _table(["run", "status", "held-out steps", "held-in steps", "audit", "directory"], rows)
    for u in st["unfinished"]:
        lines.append(f"- {u['run']} is **{u['status']}**" + (f": {u['error']}" if u["error"] else "")
                     + "; its curves are shown (dashed), it is left out of the statistics.")
    if st["missing"]:
        lines.append(f"- missing (arm, seed) cells: {', '.join(st['missing'])}")
    lines += [f"- superseded duplicate run: `{p}`" for p in st["superseded"]]
    lines += [f"- skipped `{s['path']}`: {s['reason']}" for s in st["skipped"]]
    return lines


def summary_lines(report: dict) -> list[str]:
    s, base = report["summary"], report["base_arm"]
    rows = []
    for arm in report["arms"]:
        e = s["arms"][arm]
        acc = e["accuracy"]
        acc_text = f"{_f(acc['mean'])} ± {_f(acc['std'])} [{_f(acc['min'])}, {_f(acc['max'])}]" if acc else "-"
        if arm == base:
            rows.append([f"**{arm}**", ", ".join(map(str, e["seeds"])) or "-", acc_text, "(anchor)", "-", "-", "-", "-", "-"])
            continue
        g = e["gain"]
        drift = e["drift"]["flag"]
        rows.append([arm, ", ".join(map(str, e["seeds"])) or "-", acc_text, _f(g["mean"], signed=True) if g else "-",
                     f"[{_f(g['min'], signed=True)}, {_f(g['max'], signed=True)}]" if g else "-", e["noise"] or "-",
                     _f(e["heldin_gain"], signed=True), _DRIFT[drift],
                     "pass" if e["audit_passed"] else "**FAIL**"])
    anchor = s["anchor"]
    lines = _table(["arm", "seeds", "held-out accuracy mean ± std [min, max]", f"gain vs {base} (mean)",
                    "gain over seeds [min, max]", "noise (vs base seed spread)", "held-in gain", "drift", "audit"], rows)
    if anchor and anchor["n"] >= 2:
        lines.append(f"\nAnchor: {base} over {anchor['n']} seeds, held-out accuracy {_f(anchor['min'])} to "
                     f"{_f(anchor['max'])} (spread {_f(anchor['range'])}); a mean gain within ±{_f(anchor['range'])} is labelled noise.")
    else:
        lines.append(f"\nNo noise anchor: fewer than two finished {base} seeds, so no gain can be told apart from seed noise.")
    return lines


def pairs_lines(report: dict, confidence: float) -> list[str]:
    rows = []
    for p in report["comparisons"]:
        if not p["compared"]:
            rows.append([p["run"], "-", "-", "-", "-", "-", "-", "-", "-", f"not compared: {p['reason']}"])
            continue
        m = p["mcnemar"]
        rows.append([p["run"], p["step"], p["problems"], _f(p["base_accuracy"]), _f(p["accuracy"]), _f(p["gain"], signed=True),
                     f"[{_f(p['ci'][0], signed=True)}, {_f(p['ci'][1], signed=True)}]", f"{m['b']} / {m['c']} of {m['pairs']}",
                     _f(m["p"], 4), "pass" if p["audit_passed"] else "**FAIL** (see ledger)"])
    if not rows:
        return ["No arm run has a base twin to compare with."]
    return _table(["run", "step", "problems", "base acc", "arm acc", "gain", f"{int(confidence * 100)}% bootstrap CI",
                   "McNemar b / c", "McNemar p", "audit"], rows)


def _step_table(series: dict, value: str, arms: list[str]) -> list[str]:
    steps = sorted({p["step"] for a in arms for p in series[a]["mean"]})
    if not steps:
        return ["No held-in points to show (held-in validation needs eval.every and eval.val_size or data.val_path; "
                "deltas need an arm and its base twin)."]
    by = {a: {p["step"]: p for p in series[a]["mean"]} for a in arms}
    rows = [[s, *[(_f(by[a][s][value], signed=value == "delta") + (f" ({by[a][s]['seeds']})" if by[a][s]["seeds"] > 1 else ""))
                  if s in by[a] else "-" for a in arms]] for s in steps]
    return _table(["step", *arms], rows)


def breakdown_table(report: dict, key: str) -> list[str]:
    table = report["breakdowns"][key]
    arms = [a for a in report["arms"] if a in table]
    groups: list[str] = []
    for a in arms:
        groups += [g for g in table[a] if g not in groups]
    if not arms:
        return ["No finished run to break down."]
    if key == "band":
        rows = [[g, *[f"{_cell(table[a].get(g))}, meta {_f(table[a][g]['meta_emission_rate'])}" if g in table[a] else "-"
                      for a in arms]] for g in groups]
        return _table(["band", *[f"{a}: accuracy (n), meta emission" for a in arms]], rows)
    return _table([key, *arms], [[g, *[_cell(table[a].get(g)) for a in arms]] for g in groups])


def meta_lines(report: dict) -> list[str]:
    meta, bands = report["breakdowns"]["meta"], report["breakdowns"]["band"]
    lines = []
    for arm in [a for a in report["arms"] if a in meta]:
        m = meta[arm]
        rows = [[g, _cell(c["with_meta"]), _cell(c["without_meta"]),
                 _f(c["with_meta"]["accuracy"] - c["without_meta"]["accuracy"], signed=True)
                 if c["with_meta"]["n"] and c["without_meta"]["n"] else "-"] for g, c in bands[arm].items()]
        p = m["pooled"]
        rows.append(["**pooled**", _cell(p["with_meta"]), _cell(p["without_meta"]), _f(m["pooled_gap"], signed=True)])
        rows.append(["**stratified** (bands with both, n-weighted)", "", "", _f(m["stratified_gap"], signed=True)])
        verdict = ("**Simpson reversal**: the pooled gap and the stratified gap have opposite signs; read the bands, "
                   "not the pooled number." if m["reversal"] else "Pooled and stratified gaps agree in sign (or one is undefined).")
        lines += [f"**{arm}**", "", *_table(["band", "with meta: accuracy (n)", "without meta: accuracy (n)", "gap"], rows),
                  "", verdict, ""]
    return lines or ["No finished run to break down."]


def drift_lines(report: dict, threshold: float) -> list[str]:
    rows = [[p["run"], p["heldin_step"] if p["heldin_step"] is not None else "-", _f(p["heldin_gain"], signed=True),
             p["step"], _f(p["gain"], signed=True), _DRIFT[p["drift"]["flag"]],
             p["drift"]["reason"]] for p in report["comparisons"] if p["compared"]]
    arms = [[f"{a} (mean over seeds)", "", _f(e["heldin_gain"], signed=True), "",
             _f(e["gain"]["mean"] if e["gain"] else None, signed=True),
             _DRIFT[e["drift"]["flag"]], e["drift"]["reason"]]
            for a, e in report["summary"]["arms"].items() if a != report["base_arm"]]
    if not rows:
        return ["No compared pair."]
    return [f"Flag: the held-in gain over base and the held-out gain disagree in sign, or differ by more than "
            f"report.drift_threshold = {threshold}.", "",
            *_table(["run", "held-in step", "held-in gain", "held-out step", "held-out gain", "drift", "why"], rows + arms)]


READING = """- Held-in = validation rows from the training distribution that training never sampled; held-out = the
  separate evaluation split. Claims rest on held-out; a held-in gain that does not carry over is drift.
- Gains are arm minus its base twin of the same seed, on the same problems (evaluation samples are seeded by
  problem and sample index, so both arms see the same sampling noise). The bootstrap resamples problems
  (seeded: report.bootstrap_seed); McNemar's exact test counts the (problem, sample) pairs where exactly one
  run is right (b: arm only, c: base only).
- The base arm over several seeds is the noise anchor: a mean gain inside its seed spread is labelled noise.
- Pooled with-vs-without-meta accuracy compares different problems (meta is written more often on harder
  ones); the per-band rows hold difficulty fixed. Small cells (see n) are noisy.
- Runs that failed or are still running are marked and left out of the statistics; regenerate the report
  at any time with the same command."""


def markdown(report: dict, plots: dict[str, str], cfg) -> str:
    st, base = report["status"], report["base_arm"]
    out = [f"# Reward arms vs `{base}`: {len(report['arms'])} arms x {len(report['seeds'])} seeds", ""]
    if st["partial"]:
        out += [f"> **PARTIAL SWEEP**: {len(st['unfinished'])} run(s) not finished, {len(st['missing'])} (arm, seed) "
                "cell(s) missing; marked below.", ""]
    out.append(f"Generated {report['generated_at']} from {', '.join(f'`{p}`' for p in report['inputs'])}.")

    def plot(name: str, what: str) -> list[str]:
        return [f"![{what}]({plots[name]})", ""] if name in plots else [f"(no data for the {what} plot)", ""]

    body = {
        "Twin audit ledger": audit_lines(report),
        "Runs": runs_lines(report),
        "Held-out: arms vs base": summary_lines(report),
        "Paired statistics on the same problems": pairs_lines(report, cfg.confidence),
        "Held-in validation accuracy by step": plot("val_accuracy", "held-in accuracy by step")
        + _step_table(report["heldin_curves"], "accuracy", report["arms"]),
        "Delta vs base at shared steps": plot("delta_vs_base", "delta vs base")
        + _step_table(report["heldin_deltas"], "delta", [a for a in report["arms"] if a != base]),
        "Per-domain accuracy": plot("domains", "per-domain accuracy") + breakdown_table(report, "domain")
        + ["", "By data_source:", ""] + breakdown_table(report, "data_source"),
        "Accuracy and meta emission by difficulty band": plot("bands", "accuracy and meta emission by band")
        + breakdown_table(report, "band"),
        "With vs without meta: per band and pooled": plot("meta_by_band", "with vs without meta") + meta_lines(report),
        "Drift: held-in vs held-out gain": drift_lines(report, cfg.drift_threshold),
        "How to read this report": [READING],
    }
    for i, title in enumerate(SECTIONS, start=1):
        out += ["", f"## {i}. {title}", "", *body[title]]
    return "\n".join(out) + "\n"


def write_report(report: dict, plots: dict[str, str], cfg, out_dir: str) -> tuple[str, str]:
    md_path, json_path = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.json")
    with open(md_path, "w") as f:
        f.write(markdown(report, plots, cfg))
    with open(json_path, "w") as f:
        json.dump({**report, "plots": plots}, f, indent=1, default=str)
    return md_path, json_path
