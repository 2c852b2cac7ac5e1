"""Where `make setup` takes torch from (issue 22, item 10).

Both requirement sets pin torch's CPU build (`torch==X+cpu`), which only PyTorch's CPU wheel
index publishes. With a local wheel folder holding that wheel (this machine kind:
/opt/wheels, which pip's find-links names) the install must take it from there and need no
PyTorch index; anywhere else it must add uv's `--torch-backend cpu`. The Makefile builds the
command from that; `make print-install` prints it. uv runs here with --offline and a fresh
cache, so nothing touches the network.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UV = REPO / ".venv" / "bin" / "uv"
TORCH_INDEX = "download.pytorch.org"
BACKEND = ["--torch-backend", "cpu"]


def _pin(name: str, req: str = "pipeline.txt") -> str:
    for line in (REPO / "requirements" / req).read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"no {name}== pin in requirements/{req}")


TORCH_PIN = _pin("torch")
LOCAL_TORCH = sorted(Path("/opt/wheels").glob(f"torch-{TORCH_PIN}-*.whl"))
needs_local_torch = pytest.mark.skipif(
    not LOCAL_TORCH, reason=f"/opt/wheels holds no torch-{TORCH_PIN} wheel: not this machine kind")
needs_uv = pytest.mark.skipif(not UV.exists(), reason=".venv/bin/uv missing: run `make setup`")


def _env(**overrides: str | None) -> dict[str, str]:
    # uv's own settings in the caller's environment would change what it resolves.
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_") and k != "MAKEFLAGS"}
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _make(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _install_argv(*make_args: str, env: dict[str, str]) -> list[str]:
    lines = _make("print-install", *make_args, env=env).strip().splitlines()
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])
    assert argv[:3] == [".venv/bin/uv", "pip", "install"], argv
    return argv


def _has(argv: list[str], *flags: str) -> bool:
    n = len(flags)
    return any(argv[i:i + n] == list(flags) for i in range(len(argv) - n + 1))


def _setup_install_lines(*make_args: str, env: dict[str, str]) -> list[str]:
    """The uv install commands `make setup` runs from scratch (-B: as on a fresh clone)."""
    lines = [line for line in _make("-n", "-B", "setup", *make_args, env=env).splitlines()
             if " pip install " in line and "uv" in line.split()[0]]
    assert len(lines) == 3, lines  # pipeline set, the project itself, serving set
    return lines


# --- (a) the command the Makefile builds -------------------------------------------------

def test_pins_agree():
    assert TORCH_PIN.endswith("+cpu"), TORCH_PIN
    assert _pin("torch", "serving.txt") == TORCH_PIN


def test_no_local_folder_uses_pytorch_cpu_backend(tmp_path):
    # No PIP_FIND_LINKS and no LOCAL_WHEELS folder: a laptop with PyPI alone.
    env = _env(PIP_FIND_LINKS="")
    args = (f"LOCAL_WHEELS={tmp_path / 'absent'}",)
    argv = _install_argv(*args, env=env)
    assert _has(argv, *BACKEND), argv
    assert "--find-links" not in argv, argv
    for line in _setup_install_lines(*args, env=env):
        assert _has(shlex.split(line), *BACKEND), line


def test_installs_compile_bytecode():
    """Every install writes .pyc files: with PYTHONDONTWRITEBYTECODE=1 (set on this machine
    kind) a fresh process would otherwise compile torch, transformers and vLLM from source."""
    lines = _setup_install_lines(env=_env())
    assert all("--compile-bytecode" in shlex.split(line) for line in lines), lines
    if (REPO / ".venv" / ".installed").exists():
        import transformers

        cached = Path(transformers.__file__).parent / "__pycache__"
        assert any(cached.glob("__init__.cpython-*.pyc")), f"no .pyc in {cached}: reinstall with `make setup`"


@pytest.mark.parametrize("content", ["empty", "other torch", "other wheels"])
def test_local_folder_without_the_pinned_torch_uses_pytorch_cpu_backend(tmp_path, content):
    folder = tmp_path / "wheels"
    folder.mkdir()
    if content == "other torch":
        (folder / "torch-1.0.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    elif content == "other wheels":
        (folder / "six-1.17.0-py2.py3-none-any.whl").touch()
    env = _env(PIP_FIND_LINKS=str(folder))
    argv = _install_argv(f"LOCAL_WHEELS={tmp_path / 'absent'}", env=env)
    assert _has(argv, "--find-links", str(folder)), argv  # the folder is still used
    assert _has(argv, *BACKEND), argv


def test_local_folder_with_the_pinned_torch_needs_no_pytorch_index(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    (folder / f"torch-{TORCH_PIN}-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    for env, args in [(_env(PIP_FIND_LINKS=str(folder)), ()),            # pip's variable
                      (_env(PIP_FIND_LINKS=None), (f"LOCAL_WHEELS={folder}",))]:  # fallback
        argv = _install_argv(*args, env=env)
        assert _has(argv, "--find-links", str(folder)), argv
        assert "--torch-backend" not in argv and TORCH_INDEX not in " ".join(argv), argv


@needs_local_torch
def test_this_machine_takes_opt_wheels():
    # Whether or not pip's variable is set in the caller's shell, /opt/wheels is found.
    for env in (_env(), _env(PIP_FIND_LINKS=None)):
        argv = _install_argv(env=env)
        assert _has(argv, "--find-links", "/opt/wheels"), argv
        assert "--torch-backend" not in argv and TORCH_INDEX not in " ".join(argv), argv
        for line in _setup_install_lines(env=env):
            assert "--find-links /opt/wheels" in line and "--torch-backend" not in line, line


# --- (b) what uv resolves with those commands --------------------------------------------

@pytest.fixture(scope="module")
def empty_venv(tmp_path_factory) -> Path:
    if not UV.exists():
        pytest.skip(".venv/bin/uv missing: run `make setup`")
    venv = tmp_path_factory.mktemp("install") / "venv"
    subprocess.run([str(UV), "venv", "-q", "--offline", "--python", str(REPO / ".venv/bin/python"),
                    str(venv)], check=True, env=_env(), timeout=60)
    return venv


def _dry_run(argv: list[str], requirement: str, venv: Path, cache: Path,
             env: dict[str, str]) -> subprocess.CompletedProcess:
    """The Makefile's command as a verbose offline dry run of one requirement."""
    argv = [a for a in argv if a != "-q"]
    return subprocess.run(
        [*argv, "--dry-run", "--offline", "--cache-dir", str(cache), "-v",
         "--python", str(venv / "bin/python"), requirement],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@needs_uv
@needs_local_torch
def test_here_torch_resolves_to_the_local_wheel(empty_venv, tmp_path):
    env = _env()
    argv = _install_argv(env=env)
    done = _dry_run(argv, f"torch=={TORCH_PIN}", empty_venv, tmp_path / "cache", env)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert f"+ torch=={TORCH_PIN}" in log, log
    picked = re.search(rf"Selecting: torch=={re.escape(TORCH_PIN)} \[compatible\] \((\S+\.whl)\)", log)
    assert picked, log
    assert picked.group(1) in {w.name for w in LOCAL_TORCH}, picked.group(1)
    assert TORCH_INDEX not in log, log  # the PyTorch index was not even asked

    # The same flags for `uv pip compile` name the source of the pick outright.
    compile_argv = [*argv[:2], "compile", *argv[3:]]
    done = subprocess.run([*compile_argv, "--offline", "--cache-dir", str(tmp_path / "cache"),
                           "--no-header", "--emit-index-annotation", "--python-version", "3.11",
                           "-"], input=f"torch=={TORCH_PIN}\n", cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"torch=={TORCH_PIN}\n    # from file:///opt/wheels" in done.stdout, done.stdout


@needs_uv
def test_elsewhere_only_pytorch_packages_go_to_pytorch_cpu_index(empty_venv, tmp_path):
    # Offline, so each lookup fails; uv's log still says which index it asked.
    env = _env(PIP_FIND_LINKS="")
    argv = _install_argv(f"LOCAL_WHEELS={tmp_path / 'absent'}", env=env)
    asked = {}
    for name, req in [("torch", "pipeline.txt"), ("triton", "serving.txt"),
                      ("numpy", "pipeline.txt"), ("jinja2", "pipeline.txt")]:
        done = _dry_run(argv, f"{name}=={_pin(name, req)}", empty_venv, tmp_path / name, env)
        asked[name] = re.findall(rf"GET request for: (\S+/{name}/)", done.stdout + done.stderr)
    assert asked == {"torch": ["https://download.pytorch.org/whl/cpu/torch/"],
                     "triton": ["https://download.pytorch.org/whl/cpu/triton/"],
                     "numpy": ["https://pypi.org/simple/numpy/"],
                     "jinja2": ["https://pypi.org/simple/jinja2/"]}
