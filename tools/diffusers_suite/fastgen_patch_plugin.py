"""pytest plugin: run diffusers' own model tests against models that ``fastgen.patch`` has patched.

Load it with ``-p fastgen_patch_plugin`` (this folder on ``PYTHONPATH``) and choose the mode with
``--fastgen-patch`` (or the ``FASTGEN_PATCH`` environment variable):

- ``unpatched``: nothing is patched (the baseline run; outcomes are still recorded);
- ``default``: ``fastgen.patch(model)``;
- ``kernel``: ``fastgen.patch(model, attention_backend="triton", prologue_backend="triton")``. Without a
  CUDA GPU the Triton kernels run under the interpreter: the plugin sets ``TRITON_INTERPRET=1`` before
  the first conftest is loaded (diffusers' conftest imports diffusers, which imports Triton, and the
  variable must be set before that).

Every instance of the supported denoiser classes is patched at the end of its ``__init__``, which is
where direct construction, ``from_config`` and ``from_pretrained`` (also under ``init_empty_weights``)
all pass. Only instances of exactly those classes are patched (fastgen matches denoisers by class
name, so a subclass is not a supported denoiser). The wrappers are installed in ``pytest_configure``
and removed in ``pytest_unconfigure``; they only exist inside this test process.

``--fastgen-outcomes PATH`` writes one JSON line per test (nodeid, outcome, duration, how many models
were patched while it ran, fastgen's warnings, e.g. a kernel's fallback to SDPA, the crash message and
traceback of a failure), after a header line with the mode and the diffusers/fastgen versions in use.
``run.py`` compares those files across modes.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

MODES = ("unpatched", "default", "kernel")
PATCH_OPTIONS = {
    "default": {},
    "kernel": {"attention_backend": "triton", "prologue_backend": "triton"},
}
# The denoisers fastgen supports (fastgen.patching.registry), by their diffusers names.
MODEL_CLASSES = (
    "UNet2DConditionModel",
    "SD3Transformer2DModel",
    "FluxTransformer2DModel",
    "WanTransformer3DModel",
    "HunyuanVideoTransformer3DModel",
    "HunyuanVideoFramepackTransformer3DModel",
)
_MAX_LONGREPR = 20_000
_recorder = None  # the _Recorder of this session (--fastgen-outcomes), set in pytest_configure


class _Patcher:
    """Wraps the ``__init__`` of every class in MODEL_CLASSES to call ``fastgen.patch`` on the new instance."""

    def __init__(self, options: dict):
        self.options = options
        self.count = 0  # instances patched so far in this process
        self.originals: list[tuple[type, object]] = []

    def install(self) -> None:
        import diffusers
        import fastgen

        for name in MODEL_CLASSES:
            cls = getattr(diffusers, name)
            original = cls.__dict__["__init__"]
            cls.__init__ = self._wrap(cls, original, fastgen.patch)
            self.originals.append((cls, original))

    def _wrap(self, cls, original, patch):
        # functools.wraps keeps __wrapped__, through which diffusers' ConfigMixin reads the
        # signature (from_config, register_to_config).
        @functools.wraps(original)
        def __init__(model, *args, **kwargs):
            original(model, *args, **kwargs)
            if type(model) is cls:
                patch(model, **self.options)
                self.count += 1

        return __init__

    def uninstall(self) -> None:
        for cls, original in self.originals:
            cls.__init__ = original
        self.originals.clear()


class _Recorder:
    """One JSON line per test: its overall outcome over setup, call and teardown."""

    def __init__(self, path: str, header: dict, patcher: _Patcher | None):
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in pytest_unconfigure
        self.file.write(json.dumps({"header": header}) + "\n")
        self.patcher = patcher
        self.current: dict[str, dict] = {}
        # Finished tests wait here until the next one starts: pytest reports a test's warnings after
        # its pytest_runtest_logfinish.
        self.done: list[dict] = []

    def start(self, nodeid: str) -> None:
        self.flush()
        self.current[nodeid] = {
            "nodeid": nodeid, "outcome": None, "duration": 0.0, "message": None, "longrepr": None,
            "patched_models": self.patcher.count if self.patcher else 0, "fastgen_warnings": [],
        }

    def warning(self, nodeid: str, message: str) -> None:
        # fastgen warns once per reason and process: a fallback shows at the first test that hits it.
        for rec in [self.current.get(nodeid), *(r for r in self.done if r["nodeid"] == nodeid)]:
            if rec is not None:
                if message not in rec["fastgen_warnings"]:
                    rec["fastgen_warnings"].append(message)
                return

    def report(self, report) -> None:
        rec = self.current.get(report.nodeid)
        if rec is None:
            return
        rec["duration"] += report.duration
        xfail = hasattr(report, "wasxfail")
        if report.failed:
            outcome = "failed" if report.when == "call" else "error"
            if rec["outcome"] in (None, "passed", "xpassed"):
                rec["outcome"] = outcome
            if rec["message"] is None:
                crash = getattr(report.longrepr, "reprcrash", None)
                message = crash.message if crash is not None else str(report.longrepr)[-500:]
                rec["message"] = f"[{report.when}] {message}"
                rec["longrepr"] = report.longreprtext[-_MAX_LONGREPR:]
        elif report.skipped:
            if rec["outcome"] is None:
                rec["outcome"] = "xfailed" if xfail else "skipped"
                if xfail:
                    rec["message"] = str(report.wasxfail)[:500]
                else:
                    longrepr = report.longrepr
                    rec["message"] = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)[:500]
        elif report.when == "call" and rec["outcome"] is None:
            rec["outcome"] = "xpassed" if xfail else "passed"

    def finish(self, nodeid: str) -> None:
        rec = self.current.pop(nodeid, None)
        if rec is None:
            return
        if self.patcher:
            rec["patched_models"] = self.patcher.count - rec["patched_models"]
        rec["outcome"] = rec["outcome"] or "passed"
        self.done.append(rec)

    def flush(self) -> None:
        for rec in self.done:
            self.file.write(json.dumps(rec) + "\n")
        self.done.clear()
        self.file.flush()

    def close(self) -> None:
        self.flush()
        self.file.close()


def pytest_addoption(parser):
    group = parser.getgroup("fastgen", "fastgen.patch on diffusers' model tests")
    group.addoption("--fastgen-patch", choices=MODES, default=os.environ.get("FASTGEN_PATCH", "unpatched"),
                    help="patch every supported denoiser the tests build: unpatched (default; env FASTGEN_PATCH), "
                         "default (fastgen.patch(model)) or kernel (Triton attention and prologue)")
    group.addoption("--fastgen-outcomes", default=None, metavar="PATH",
                    help="write one JSON line per test (outcome, patched models, failure) to PATH")


def pytest_load_initial_conftests(early_config, parser, args):
    # Before any conftest: diffusers' tests/conftest.py imports diffusers, which imports Triton, and
    # TRITON_INTERPRET must be set before Triton is first imported (set later, a kernel's call of
    # another @triton.jit function fails with "Cannot call @triton.jit'd outside of the scope of a
    # kernel").
    if getattr(early_config.known_args_namespace, "fastgen_patch", None) != "kernel":
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    import torch

    if torch.cuda.is_available():
        return
    if "triton" in sys.modules:
        raise pytest.UsageError("--fastgen-patch=kernel on a CPU needs the Triton interpreter, but Triton was imported "
                                "before this plugin could set TRITON_INTERPRET=1: set it in the environment")
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    mode = config.getoption("--fastgen-patch")
    if mode not in MODES:
        raise pytest.UsageError(f"--fastgen-patch / FASTGEN_PATCH must be one of {MODES}, got {mode!r}")
    patcher = None
    if mode != "unpatched":
        import torch

        if mode == "kernel" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise pytest.UsageError("--fastgen-patch=kernel on a CPU needs TRITON_INTERPRET=1 set before Triton is "
                                    "imported (this plugin sets it when loaded with -p; else set it in the "
                                    "environment)")
        patcher = _Patcher(PATCH_OPTIONS[mode])
        patcher.install()
    config._fastgen_patcher = patcher
    global _recorder
    path = config.getoption("--fastgen-outcomes")
    if path:
        import diffusers

        header = {"mode": mode, "options": PATCH_OPTIONS.get(mode), "diffusers": diffusers.__version__,
                  "diffusers_file": diffusers.__file__, "python": sys.version.split()[0],
                  "triton_interpret": os.environ.get("TRITON_INTERPRET")}
        if patcher is not None:
            import fastgen

            header["fastgen"] = fastgen.__version__
            header["fastgen_file"] = fastgen.__file__
            header["fastgen_git"] = _git_state(os.path.dirname(fastgen.__file__))
        _recorder = _Recorder(path, header, patcher)


def _git_state(path: str) -> str | None:
    """``<commit>``, or ``<commit>+changes`` when src/ or kernels/ differ from it, of the git checkout
    holding ``path`` (fastgen's package); None outside one (an installed wheel)."""
    def git(*args):
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":/src", ":/kernels").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty else "")


def pytest_unconfigure(config):
    global _recorder
    patcher = getattr(config, "_fastgen_patcher", None)
    if patcher is not None:
        patcher.uninstall()
    if _recorder is not None:
        _recorder.close()
        _recorder = None


def pytest_report_header(config):
    patcher = getattr(config, "_fastgen_patcher", None)
    if patcher is None:
        return "fastgen: unpatched (baseline)"
    return f"fastgen: every {', '.join(MODEL_CLASSES)} patched after construction with {patcher.options or 'defaults'}"


def pytest_runtest_logstart(nodeid, location):
    if _recorder is not None:
        _recorder.start(nodeid)


def pytest_runtest_logreport(report):
    if _recorder is not None:
        _recorder.report(report)


def pytest_warning_recorded(warning_message, when, nodeid, location):
    if _recorder is not None and type(warning_message.message).__name__.startswith("Fastgen"):
        _recorder.warning(nodeid, str(warning_message.message))


def pytest_runtest_logfinish(nodeid, location):
    if _recorder is not None:
        _recorder.finish(nodeid)
