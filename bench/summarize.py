"""Write OUT/summary.md for bench/run_gpu.sh: device, versions and commit, each stage's outcome and
time (what was skipped or cut, and why), the tests' result line and failures, fastgen's benchmark
tables, the Flux-dev step and the automatic-backend decisions. Reads only what the stages left in
OUT, so it runs (and says what is missing) whatever failed before it.

    python bench/summarize.py OUT --stages FILE --phases "quick" --elapsed SECONDS [--dry-run 0|1]
        [--decisions DIR...]

The decisions files of the folders given (the run's FASTGEN_CACHE_DIR, the Flux step's own) are
merged into OUT/autotune.json, so they come back as one file.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from pathlib import Path


def _environment() -> dict:
    try:
        from fastgen import benchmarks as B

        return B.environment(B.default_device())
    except Exception as exc:  # noqa: BLE001 - the summary is written whatever broke; the error is reported in it
        return {"device": f"unknown ({type(exc).__name__}: {exc})"}


def _stages(path: str | None) -> list[tuple[str, str, str]]:
    if not path or not os.path.exists(path):
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        parts = line.split("|")
        if len(parts) == 3:
            rows.append((parts[0], parts[1], parts[2]))
    return rows


def _tests(out: Path) -> list[str]:
    log = out / "tests.log"
    if not log.exists():
        return ["(no tests.log: the tests did not run)"]
    lines = log.read_text(errors="replace").splitlines()
    result = [ln for ln in lines if re.match(r"^=+ .*(passed|failed|error|skipped|no tests ran).* =+$", ln)]
    failures = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    done = sum(1 for ln in lines if re.search(r" (PASSED|FAILED|ERROR|SKIPPED)( |$)", ln))
    text = [result[-1].strip("= ") if result else f"(no result line: cut before the end; {done} tests had run)"]
    text += [f"- {ln}" for ln in failures[:30]]
    if len(failures) > 30:
        text.append(f"- ... and {len(failures) - 30} more (tests.log)")
    return text


def _flux(out: Path) -> list[str]:
    path = out / "flux-step.json"
    if not path.exists():
        return ["(no flux-step.json: the Flux step did not finish)"]
    r = json.loads(path.read_text())
    rows = [
        f"{r['case']}, {r['dtype']}, random weights (built on the device in {r['build_s']} s):",
        "",
        "| | diffusers | fastgen.patch |",
        "| --- | ---: | ---: |",
        f"| ms / step (median of {len(r['fastgen_ms_all'])}) | {r['diffusers_ms']:.2f} | {r['fastgen_ms']:.2f} |",
        f"| all runs, ms | {', '.join(f'{x:.1f}' for x in r['diffusers_ms_all'])} | "
        f"{', '.join(f'{x:.1f}' for x in r['fastgen_ms_all'])} |",
        f"| peak MB | {_num(r['diffusers_peak_mb'])} | {_num(r['fastgen_peak_mb'])} |",
        "",
        f"Speed-up: {r['speedup_text']}; max |fastgen - diffusers| {r['max_diff']:.3g} "
        f"(output max {r['ref_max_abs']:.3g}).",
        f"Automatic backends, decided in the first patched step (empty decisions and Triton caches; that step took "
        f"{r['first_patched_step_ms']:.0f} ms): {r['autotune_ms']:.0f} ms = **{100 * r['autotune_share']:.2f}%** of a "
        f"{r['steps_per_generation']}-step generation, of which {r['autotune_first_runs_ms']:.0f} ms were candidates' "
        f"first runs (Triton's JIT compile and tile autotune, paid once per machine); without them "
        f"**{100 * r['autotune_share_without_first_runs']:.2f}%**.",
        "",
    ]
    rows += [f"- {d}" for d in r["decisions"]] or ["- (no decision: nothing to choose on this device)"]
    return rows


def _merge_decisions(folders: list[str], dest: Path) -> dict:
    entries, doc = {}, None
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "autotune-v*.json"))):
            try:
                doc = json.loads(Path(path).read_text())
                entries.update(doc.get("entries", {}))
            except (OSError, ValueError, AttributeError):
                continue
    if entries:
        dest.write_text(json.dumps(dict(doc, entries=entries), indent=1, sort_keys=True))
    return entries


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--stages")
    p.add_argument("--phases", default="quick")
    p.add_argument("--elapsed", type=int, default=0)
    p.add_argument("--dry-run", default="0")
    p.add_argument("--decisions", nargs="*", default=[], help="FASTGEN_CACHE_DIR folders to merge")
    args = p.parse_args(argv)
    out = Path(args.out)
    env = _environment()
    dry = args.dry_run == "1"
    lines = [f"# fastgen GPU check: {args.phases}" + (" (DRY RUN on a CPU: script paths only, no measurement)" if dry else ""),
             "",
             f"- device: {env.get('device')} (sm {env.get('compute_capability')})",
             f"- torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, python {env.get('python')}, "
             f"fastgen {env.get('fastgen')}, commit {env.get('commit')}",
             f"- date {env.get('date')}; the script ran {args.elapsed} s before this summary",
             "", "## Stages", "", "| stage | outcome | seconds |", "| --- | --- | ---: |"]
    stages = _stages(args.stages)
    lines += [f"| {n} | {s} | {t} |" for n, s, t in stages]
    cut = [n for n, s, _ in stages if s.startswith("cut")]
    if cut:
        lines += ["", f"Cut at their time limit: {', '.join(cut)}. What they measured before the cut is below, "
                  "marked partial; the rest was not measured."]
    build = out / "build.log"
    if build.exists():
        notes = [ln for ln in build.read_text(errors="replace").splitlines() if "fastgen" in ln.lower() and "cuda" in ln.lower()]
        if notes:
            lines += ["", "CUDA extension: " + notes[-1].strip()]
    if (out / "tests.log").exists() or "quick" in args.phases or "test" in args.phases:
        lines += ["", "## Tests", ""] + _tests(out)
    tables = sorted(glob.glob(str(out / "bench-*.md")))
    if tables:
        lines += ["", "## Benchmarks (median ms, one run, one device)", ""]
        for t in tables:
            lines += [Path(t).read_text().rstrip(), ""]
    if "quick" in args.phases:
        lines += ["", "## Flux-dev step", ""] + _flux(out)
    if "demo" in args.phases and (out / "bench.log").exists():
        tail = (out / "bench.log").read_text(errors="replace").splitlines()[-30:]
        lines += ["", "## Demo", "", "```"] + tail + ["```"]
    entries = _merge_decisions(args.decisions, out / "autotune.json")
    if entries:
        lines += ["", f"## Decisions file ({len(entries)} keys)", ""]
        lines += [f"- {key.rsplit('|', 2)[-2]} [{key.rsplit('|', 1)[-1]}] -> {e['backend']}: {e['why']}"
                  + (f"; rejected {e['rejected']}" if e.get("rejected") else "") for key, e in sorted(entries.items())]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
