#!/usr/bin/env python3
"""Bootstrap and run Lookout from a fresh clone with nothing but Python 3.11+.

    python3 dev.py demo      run the demo
    python3 dev.py test      lint, type-check and run the whole test suite
    python3 dev.py lock      re-resolve requirements/dev.lock from pyproject.toml

The first run creates `.venv/`, installs uv into it and syncs the pinned lock file;
later runs reuse it until pyproject.toml or the lock file changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("LOOKOUT_VENV", ROOT / ".venv"))
LOCK = ROOT / "requirements" / "dev.lock"
UV_VERSION = "0.13.9"
STAMP = VENV / ".lookout-stamp"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
USAGE = __doc__.split("\n\n")[1]


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def run(*cmd: str | Path, check: bool = True) -> int:
    code = subprocess.call([str(c) for c in cmd], cwd=ROOT)
    if check and code != 0:
        print(f"dev.py: {Path(str(cmd[0])).name} exited with {code}", file=sys.stderr)
        sys.exit(1)
    return code


def wanted_stamp() -> str:
    digest = hashlib.sha256()
    for path in (ROOT / "pyproject.toml", LOCK):
        digest.update(path.read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def bootstrap() -> None:
    """Create the virtualenv and install the locked dependencies, showing progress."""
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py may be run by an older python3
        sys.exit(f"dev.py: Python 3.11 or newer is needed, this is {sys.version.split()[0]}.")
    python = BIN / "python"
    if not python.exists():
        step(f"creating virtualenv {VENV}")
        run(sys.executable, "-m", "venv", VENV)
    stamp = wanted_stamp()
    if STAMP.exists() and STAMP.read_text() == stamp:
        return
    started = time.monotonic()
    uv = BIN / "uv"
    if not uv.exists():
        step(f"installing uv {UV_VERSION} into the virtualenv")
        run(python, "-m", "pip", "install", "--disable-pip-version-check", f"uv=={UV_VERSION}")
    env = {**os.environ, "VIRTUAL_ENV": str(VENV)}
    step(f"syncing dependencies from {LOCK.relative_to(ROOT)}")
    code = subprocess.call([str(uv), "pip", "sync", str(LOCK)], cwd=ROOT, env=env)
    if code != 0:
        sys.exit(f"dev.py: dependency sync failed (uv exited {code}); see the lines above.")
    step("installing lookout and busline (editable)")
    code = subprocess.call(
        [str(uv), "pip", "install", "--no-deps", "-e", str(ROOT)], cwd=ROOT, env=env
    )
    if code != 0:
        sys.exit(f"dev.py: editable install failed (uv exited {code}).")
    STAMP.write_text(stamp)
    step(f"environment ready in {time.monotonic() - started:.1f}s")


def cmd_test(args: list[str]) -> int:
    bootstrap()
    paths = [p for p in ("src", "tests", "bench", "docs/examples", "dev.py") if (ROOT / p).exists()]
    step("ruff check")
    run(BIN / "ruff", "check", *paths)
    step("ruff format --check")
    run(BIN / "ruff", "format", "--check", *paths)
    step("mypy (strict, src/)")
    run(BIN / "mypy")
    step("pytest")
    return test_status(run(BIN / "python", "-m", "pytest", *parallel(args), *args, check=False))


def parallel(args: list[str]) -> list[str]:
    """Two pytest workers (`LOOKOUT_TEST_WORKERS`), each taking whole files: most tests
    wait on processes they start rather than compute. `-n` given, or 1 worker: as asked."""
    if any(a == "-n" or a.startswith(("-n", "--numprocesses")) for a in args):
        return []
    workers = os.environ.get("LOOKOUT_TEST_WORKERS", "2").strip() or "2"
    if workers in ("0", "1"):
        return []
    return ["-n", workers, "--dist", "loadfile"]


def test_status(pytest_code: int) -> int:
    """dev.py's exit status for pytest's: only 0 passes; 5 (no tests ran) fails too."""
    if pytest_code == 5:
        print("dev.py: pytest collected no tests; that counts as a failure.", file=sys.stderr)
    return 0 if pytest_code == 0 else 1


def _die_with_us() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when we die, even by kill -9."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM


def cmd_demo(args: list[str]) -> int:
    bootstrap()
    # `lookout demo`: the server, busline and its customers (docs/cli.md). Ctrl-C reaches
    # the demo too (one process group); it stops everything and so do we. If we are killed,
    # the demo gets SIGTERM and stops everything as well.
    preexec = _die_with_us if sys.platform.startswith("linux") else None
    demo = subprocess.Popen(
        [str(BIN / "python"), "-m", "lookout", "demo", *args],
        cwd=ROOT,
        preexec_fn=preexec,  # noqa: PLW1509 - one prctl call
    )
    try:
        return demo.wait()
    except KeyboardInterrupt:
        try:
            return demo.wait(timeout=15)
        except subprocess.TimeoutExpired:
            demo.kill()
            return 130


def cmd_lock(_: list[str]) -> int:
    bootstrap()
    step("resolving requirements/dev.lock")
    return run(
        BIN / "uv", "pip", "compile", "pyproject.toml", "--extra", "dev",
        "--python-version", "3.11", "--output-file", LOCK, check=False,
    )  # fmt: skip


COMMANDS = {"test": cmd_test, "demo": cmd_demo, "lock": cmd_lock}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage:\n{USAGE}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
