"""`selfdistill-report DIR [DIR ...] [report.key=value ...]` (also `python -m selfdistill.report`):
compare reward arms with their matched base twins over a sweep (DESIGN.md; seeds
`metacognition-rewards.txt` and `autonomous-post-training-paper.txt`).

Reads every run below the given directories (a multirun directory, or run directories) through
its `manifest.json` and `eval_samples.jsonl`, and writes into the first directory (or
`report.out_dir`): `report.md`, `report.json` and `plots/*.png`. The modules, one concept each:

    runs.py        find and read runs (a sample evaluated twice keeps its last row)
    audit.py       the twin audit ledger, printed first
    statistics.py  paired bootstrap, McNemar's exact test, seed spread and the noise anchor,
                   drift, the stratified (Simpson) meta gap
    analysis.py    pairs, curves, deltas, per-arm summary, breakdowns by domain / band
    plots.py       PNGs (matplotlib, headless; imported only there)
    writer.py      report.md and report.json

Partial sweeps (a run failed or still running, a cell missing) are reported with those runs
marked; the report can be regenerated at any time.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from selfdistill.manifest import now

USAGE = """usage: selfdistill-report DIR [DIR ...] [report.KEY=VALUE ...]

DIR: a multirun directory (every run below it with a manifest.json is read) or run directories.
Keys (selfdistill.config.ReportConfig): base_arm, drift_threshold, bootstrap_samples, bootstrap_seed,
confidence, step (held-out step compared; default: the last one each pair shares), out_dir."""


def report_config(overrides: Sequence[str] = ()):
    """The typed ReportConfig with `report.key=value` overrides (a mistyped key fails, naming it)."""
    from omegaconf import OmegaConf

    from selfdistill.config import ConfigError, ReportConfig, validate_report

    bad = [o for o in overrides if not o.startswith("report.")]
    if bad:
        raise ConfigError(f"unknown argument(s) {bad}: options are report.KEY=VALUE (e.g. report.drift_threshold=0.05)")
    cfg = OmegaConf.merge(OmegaConf.structured(ReportConfig), OmegaConf.from_dotlist([o[len("report."):] for o in overrides]))
    typed = OmegaConf.to_object(cfg)
    validate_report(typed)
    return typed


def build_report(dirs: Sequence[str], cfg=None, out_dir: Optional[str] = None) -> dict:
    """Analyse the runs under `dirs`, write report.md / report.json / plots; return the report dict."""
    from selfdistill.report.analysis import analyze
    from selfdistill.report.plots import make_plots
    from selfdistill.report.runs import find_runs
    from selfdistill.report.writer import write_report

    cfg = cfg or report_config()
    runs, skipped = find_runs(list(dirs))
    if not runs:
        raise SystemExit(f"selfdistill-report: no run with a manifest.json under {list(dirs)}"
                         + (f" (skipped: {skipped})" if skipped else ""))
    out_dir = out_dir or cfg.out_dir or dirs[0]
    report = {"schema": "selfdistill.report/1", "generated_at": now(), "inputs": list(dirs),
              "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, **analyze(runs, skipped, cfg)}
    plots = make_plots(report, out_dir)
    md, js = write_report(report, plots, cfg, out_dir)
    report.update(plots=plots, files={"markdown": md, "json": js})
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
    from selfdistill.config import ConfigError
    from selfdistill.report.writer import audit_lines, summary_lines

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or any(a in ("-h", "--help") for a in args):
        print(USAGE)
        raise SystemExit(0 if args else 2)
    dirs = [a for a in args if "=" not in a]
    try:
        cfg = report_config([a for a in args if "=" in a])
    except ConfigError as e:
        raise SystemExit(f"selfdistill-report: {e}") from None
    if not dirs:
        raise SystemExit(f"selfdistill-report: no directory given\n{USAGE}")
    report = build_report(dirs, cfg)
    print("Twin audit ledger")
    print("\n".join(audit_lines(report)))
    print()
    print("\n".join(summary_lines(report)))
    if report["status"]["partial"]:
        print("\nPARTIAL SWEEP: see the Runs section of the report")
    print(f"\nwrote {report['files']['markdown']}, {report['files']['json']} and {len(report['plots'])} plots")


__all__ = ["build_report", "main", "report_config"]
