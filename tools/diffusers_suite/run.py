"""Run diffusers' model tests for fastgen's six denoisers unpatched, then patched, and list what patching breaks.

    python tools/diffusers_suite/run.py --tests /path/to/diffusers            # a checkout holding tests/
    python tools/diffusers_suite/run.py --tests ... --modes default -k IPAdapter
    python tools/diffusers_suite/run.py --out build/diffusers-suite --compare-only

For every selected test file and mode (unpatched, default, kernel) it runs pytest once, in the tests
checkout, with ``fastgen_patch_plugin`` loaded; outcomes go to ``OUT/<mode>/<file>.jsonl`` (the plugin's
per-test records) and ``OUT/<mode>/<file>.xml`` (JUnit). Then it prints, per file, the outcome counts
of each mode and every test that passes unpatched but fails or errors patched, minus the exclusions in
``exclusions.toml`` (one reason per test). Exit status 1 when such an unexcluded test exists, 2 when a
run recorded no test at all (a collection error: see its log).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODES = ("unpatched", "default", "kernel")
# diffusers' model test files for the denoisers fastgen supports (FramePack has its own file).
FILES = (
    "tests/models/unets/test_models_unet_2d_condition.py",
    "tests/models/transformers/test_models_transformer_sd3.py",
    "tests/models/transformers/test_models_transformer_flux.py",
    "tests/models/transformers/test_models_transformer_wan.py",
    "tests/models/transformers/test_models_transformer_hunyuan_video.py",
    "tests/models/transformers/test_models_transformer_hunyuan_video_framepack.py",
)
FAILING = ("failed", "error")
PASSING = ("passed", "xpassed")
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def tests_root(path: Path) -> Path:
    """The directory holding diffusers' ``tests/`` package: ``path`` itself or its parent."""
    path = path.resolve()
    if (path / "tests" / "models").is_dir():
        return path
    if path.name == "tests" and (path / "models").is_dir():
        return path.parent
    raise SystemExit(f"{path} holds no diffusers tests/ folder (expected {path}/tests/models); see "
                     f"{HERE / 'README.md'} for how to check one out")


def run_file(root: Path, test_file: str, mode: str, out: Path, python: str, extra: list[str]) -> dict:
    stem = Path(test_file).stem
    (out / mode).mkdir(parents=True, exist_ok=True)
    jsonl, xml, log = (out / mode / f"{stem}{ext}" for ext in (".jsonl", ".xml", ".log"))
    cmd = [python, "-m", "pytest", "-p", "no:cacheprovider", "-p", "fastgen_patch_plugin",
           f"--fastgen-patch={mode}", f"--fastgen-outcomes={jsonl}", f"--junitxml={xml}",
           "-q", "-rN", "--tb=short", test_file, *extra]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("FASTGEN_PATCH", None)  # the command line says which mode
    start = time.time()
    with open(log, "w", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    took = time.time() - start
    print(f"  {mode:9s} {test_file}: pytest exit {rc} in {took:.0f}s (log {log})", flush=True)
    if rc not in (0, 1):  # 2: interrupted (e.g. a collection error), 3: internal error, 4: usage error
        print(f"  WARNING: pytest did not complete the run (exit {rc}); see the end of {log}", flush=True)
    return {"rc": rc, "seconds": took}


def load(path: Path) -> tuple[dict, dict[str, dict]]:
    header, records = {}, {}
    if not path.exists():
        return header, records
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "header" in rec:
            header = rec["header"]
        else:
            records[rec["nodeid"]] = rec
    return header, records


def load_exclusions(path: Path) -> list[dict]:
    if not path.exists():
        return []
    entries = tomllib.loads(path.read_text(encoding="utf-8")).get("exclude", [])
    for e in entries:
        if not e.get("test") or not e.get("reason"):
            raise SystemExit(f"{path}: every [[exclude]] needs a test (nodeid or fnmatch pattern) and a reason: {e}")
        bad = set(e.get("modes", MODES[1:])) - set(MODES[1:])
        if bad:
            raise SystemExit(f"{path}: unknown modes {sorted(bad)} in {e['test']} (known: default, kernel)")
    return entries


def excluded(nodeid: str, mode: str, exclusions: list[dict]) -> dict | None:
    for e in exclusions:
        if mode in e.get("modes", MODES[1:]) and fnmatch.fnmatchcase(nodeid, e["test"]):
            return e
    return None


def compare(out: Path, files: list[str], modes: list[str], exclusions: list[dict]) -> dict:
    summary = {"headers": {}, "files": {}, "broken_runs": [], "regressions": [], "excluded": [], "fixed_exclusions": [],
               "skipped_patched": [], "not_run": []}
    for test_file in files:
        stem = Path(test_file).stem
        runs = {m: load(out / m / f"{stem}.jsonl") for m in ("unpatched", *modes)
                if (out / m / f"{stem}.jsonl").exists()}
        counts = {}
        for m, (header, recs) in runs.items():
            summary["headers"].setdefault(m, header)
            counts[m] = {o: sum(r["outcome"] == o for r in recs.values()) for o in OUTCOMES}
            counts[m]["patched_models"] = sum(r.get("patched_models", 0) for r in recs.values())
            counts[m]["diffusers"] = header.get("diffusers")
            counts[m]["fastgen_warnings"] = sorted({w for r in recs.values() for w in r.get("fastgen_warnings", [])})
            if not recs:  # a collection error or a crash: nothing to compare, and it must not look clean
                summary["broken_runs"].append({"file": test_file, "mode": m, "log": str(out / m / f"{stem}.log")})
        summary["files"][test_file] = counts
        if "unpatched" not in runs:
            continue
        base = runs["unpatched"][1]
        for m in modes:
            if m == "unpatched" or m not in runs:
                continue
            recs = runs[m][1]
            for nodeid, b in base.items():
                if b["outcome"] not in PASSING:
                    continue
                r = recs.get(nodeid)
                if r is None:  # deselected (-k) in this mode, or the run stopped early
                    summary["not_run"].append({"test": nodeid, "mode": m})
                    continue
                outcome = r["outcome"]
                if outcome in PASSING:
                    e = excluded(nodeid, m, exclusions)
                    if e is not None:
                        summary["fixed_exclusions"].append({"test": nodeid, "mode": m, "pattern": e["test"]})
                    continue
                if outcome in ("skipped", "xfailed"):
                    summary["skipped_patched"].append({"test": nodeid, "mode": m, "outcome": outcome,
                                                       "message": r.get("message")})
                    continue
                item = {"test": nodeid, "mode": m, "outcome": outcome, "message": r.get("message")}
                e = excluded(nodeid, m, exclusions)
                if e is not None:
                    summary["excluded"].append({**item, "reason": e["reason"]})
                else:
                    summary["regressions"].append(item)
    return summary


def first_line(message: str | None, limit: int = 300) -> str:
    line = (message or "").strip().splitlines()[0] if (message or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def report(summary: dict, modes: list[str]) -> str:
    cols = list(dict.fromkeys(("unpatched", *modes)))
    lines = [""]
    for m, h in summary["headers"].items():
        fastgen = f"; fastgen {h.get('fastgen_git') or h.get('fastgen_file')}" if m != "unpatched" else ""
        lines.append(f"{m}: diffusers {h.get('diffusers')} ({h.get('diffusers_file')}){fastgen}")
    lines.append("outcomes per file (passed/failed/error/skipped/xfailed/xpassed; patched models built):")
    for test_file, counts in summary["files"].items():
        lines.append(f"  {test_file}")
        for m in cols:
            c = counts.get(m)
            if c is None:
                lines.append(f"    {m:9s} (not run)")
                continue
            tally = "/".join(str(c[o]) for o in OUTCOMES)
            lines.append(f"    {m:9s} {tally}; {c['patched_models']} patched models")
            lines += [f"              fastgen warned: {w}" for w in c["fastgen_warnings"]]
    lines.append("")
    if summary["broken_runs"]:
        lines.append(f"RUNS THAT RECORDED NO TEST ({len(summary['broken_runs'])}; a collection error? see the logs):")
        lines += [f"  [{b['mode']}] {b['file']}: {b['log']}" for b in summary["broken_runs"]]
    if summary["not_run"]:
        lines.append(f"passing unpatched, not run patched ({len(summary['not_run'])}; deselected, or the run stopped):")
        lines += [f"  [{s['mode']}] {s['test']}" for s in summary["not_run"]]
    if summary["skipped_patched"]:
        lines.append(f"passing unpatched but skipped patched ({len(summary['skipped_patched'])}):")
        lines += [f"  [{s['mode']}] {s['test']}: {s['outcome']}: {first_line(s['message'])}"
                  for s in summary["skipped_patched"]]
    if summary["excluded"]:
        lines.append(f"excluded patched-only failures ({len(summary['excluded'])}; exclusions.toml):")
        lines += [f"  [{s['mode']}] {s['test']}: {s['reason']}" for s in summary["excluded"]]
    if summary["fixed_exclusions"]:
        lines.append(f"excluded tests that now pass patched ({len(summary['fixed_exclusions'])}; drop the exclusion?):")
        lines += [f"  [{s['mode']}] {s['test']} (matched {s['pattern']})" for s in summary["fixed_exclusions"]]
    lines.append(f"PASS UNPATCHED, FAIL PATCHED, not excluded ({len(summary['regressions'])}):")
    lines += [f"  [{s['mode']}] {s['test']}: {s['outcome']}: {first_line(s['message'])}"
              for s in summary["regressions"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=Path, default=os.environ.get("DIFFUSERS_TESTS"),
                        help="a diffusers checkout holding tests/ (or that tests/ folder), at the installed "
                             "diffusers version (env DIFFUSERS_TESTS)")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "diffusers-suite",
                        help="where outcomes, JUnit files and logs go (default build/diffusers-suite)")
    parser.add_argument("--modes", default="unpatched,default,kernel",
                        help="comma-separated, run in this order: unpatched, default, kernel (default all three)")
    parser.add_argument("--files", nargs="+", default=list(FILES),
                        help="test files, relative to the checkout (default: the six denoisers' files)")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression, for every run")
    parser.add_argument("--exclusions", type=Path, default=HERE / "exclusions.toml")
    parser.add_argument("--python", default=sys.executable, help="the interpreter with diffusers and fastgen")
    parser.add_argument("--compare-only", action="store_true", help="compare the outcomes already in --out")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(modes) - set(MODES)
    if bad:
        parser.error(f"unknown modes {sorted(bad)}; known: {', '.join(MODES)}")
    exclusions = load_exclusions(args.exclusions)
    if not args.compare_only:
        if args.tests is None:
            parser.error("--tests (or DIFFUSERS_TESTS) is required: a checkout of diffusers' tests at the installed "
                         "version (see tools/diffusers_suite/README.md)")
        root = tests_root(args.tests)
        if (root / "src" / "diffusers").is_dir():
            print(f"note: {root}/src/diffusers exists; diffusers' tests/conftest.py puts it first on sys.path, so the "
                  "tests run against that source, not the installed diffusers (the outcomes' headers say which)")
        missing = [f for f in args.files if not (root / f).is_file()]
        if missing:
            raise SystemExit(f"not in {root}: {', '.join(missing)}")
        extra = (["-k", args.keyword] if args.keyword else []) + args.pytest_args
        for test_file in args.files:
            for mode in modes:
                run_file(root, test_file, mode, args.out, args.python, extra)
    summary = compare(args.out, args.files, modes, exclusions)
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    text = report(summary, modes)
    (args.out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 2 if summary["broken_runs"] else 1 if summary["regressions"] else 0


if __name__ == "__main__":
    sys.exit(main())
