"""Compile and install llama-cpp-python for the embedded LLM, safely for this machine's CPU.

llama-cpp-python ships no wheel on PyPI, so pip compiles llama.cpp on the machine. By default that
compile uses `-march=native`, and on CPUs with AMX (Sapphire Rapids and later) llama.cpp then
repacks the weights into its AMX buffer type, whose matmul segfaults in the first decode (measured
with 0.3.36 and the SmolLM2 GGUF). So the build here is never native: each x86 instruction-set
option is set from the CPU's own flags, and the AMX options are always off.

The wheel is tagged `py3-none-linux_x86_64` whatever the flags, so pip's wheel cache could hand a
wheel compiled for another CPU (or natively, with AMX) to a later install without a word. This
script therefore builds with pip's cache off, keeps the wheel under a directory named after the
version and the exact CMake options, and installs it with `--only-binary` from that directory only.

Run by `make venv` (stdlib only, so it runs before uniil is installed); by hand:
    python -m uniil.attrpool.llama_install          # build if needed, install, record
    python -m uniil.attrpool.llama_install --check  # exit 0 if the installed build matches this CPU
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The range tested (pyproject's `local` extra pins the same; a test checks they agree).
VERSION = "0.3.36"

# /proc/cpuinfo flag(s) -> the ggml CMake option they allow. AVX-512 F/CD/VL/DQ/BW come as one option.
X86_OPTIONS = [
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
]
# Never on: the AMX buffer type is the crashing path.
ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
# Not needed by uniil: the multimodal library (a third of the compile) and curl.
COMMON = ("-DGGML_NATIVE=OFF", "-DLLAVA_BUILD=OFF", "-DLLAMA_CURL=OFF")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags as Linux reports them (x86 `flags`, ARM `Features`)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cmake_args(flags: set[str], machine: str | None = None) -> list[str]:
    """The CMake options for this CPU: every instruction set it has, AMX never."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        # No AMX outside x86; ggml's native detection is the sane choice there.
        return ["-DGGML_NATIVE=ON", "-DLLAVA_BUILD=OFF", "-DLLAMA_CURL=OFF"]
    args = list(COMMON)
    for option, needed in X86_OPTIONS:
        args.append(f"-D{option}={'ON' if all(f in flags for f in needed) else 'OFF'}")
    args += [f"-D{option}=OFF" for option in ALWAYS_OFF]
    return args


def build_key(args: list[str]) -> str:
    """Names one build: the version and the exact options, so no other wheel is ever mistaken for it."""
    digest = hashlib.sha256(" ".join([VERSION, platform.machine(), *args]).encode()).hexdigest()[:16]
    return f"{VERSION}-{digest}"


def wheel_root() -> Path:
    if os.environ.get("UNIIL_WHEEL_DIR"):
        return Path(os.environ["UNIIL_WHEEL_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "uniil" / "wheels" / "llama-cpp-python"


def marker_path() -> Path:
    """Where the interpreter's environment records which build it has (next to site-packages)."""
    return Path(sys.prefix) / ".uniil-llama-cpp-build"


def _pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, env=env)
    if proc.returncode:
        raise SystemExit(f"llama_install: `{' '.join(cmd)}` failed with exit code {proc.returncode}")


def build_wheel(args: list[str], dest: Path) -> Path:
    """Compile the wheel with these options into dest (atomically: a killed build leaves nothing)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CMAKE_ARGS": " ".join(args), "FORCE_CMAKE": "1",
           "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    print(f"llama_install: compiling llama-cpp-python {VERSION} for this CPU (4-10 min on 2 cores)\n"
          f"  CMAKE_ARGS={env['CMAKE_ARGS']}", flush=True)
    start = time.time()
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".building-") as tmp:
        _pip("wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python",
             "-w", tmp, f"llama-cpp-python=={VERSION}", env=env)
        wheels = list(Path(tmp).glob("llama_cpp_python-*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"llama_install: expected one wheel in {tmp}, found {wheels}")
        staged = Path(tmp) / "wheel"
        staged.mkdir()
        wheels[0].rename(staged / wheels[0].name)
        (staged / "CMAKE_ARGS").write_text(" ".join(args) + "\n")
        if dest.exists():  # another build finished meanwhile
            shutil.rmtree(dest)
        staged.rename(dest)
    print(f"llama_install: compiled in {time.time() - start:.0f} s -> {dest}", flush=True)
    return dest


def install(force: bool = False) -> str:
    args = cmake_args(cpu_flags())
    key = build_key(args)
    marker = marker_path()
    if not force and marker.is_file() and marker.read_text().strip() == key and _importable():
        print(f"llama_install: llama-cpp-python {key} already installed for this CPU")
        return key
    dest = wheel_root() / key
    if force or not list(dest.glob("llama_cpp_python-*.whl")):
        build_wheel(args, dest)
    else:
        print(f"llama_install: reusing the wheel compiled for this CPU in {dest}")
    # --only-binary with our directory as the only source of that wheel: pip can neither compile it
    # with its default (native) flags nor take a wheel from its cache.
    _pip("install", "-q", "--no-cache-dir", "--force-reinstall", "--no-deps", "--no-index",
         "--only-binary", "llama-cpp-python", "--find-links", str(dest), f"llama-cpp-python=={VERSION}")
    _pip("install", "-q", "--only-binary", "llama-cpp-python", "--find-links", str(dest),
         f"llama-cpp-python[server]=={VERSION}")
    marker.write_text(key + "\n")
    return key


def _importable() -> bool:
    return subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True).returncode == 0


def check() -> int:
    key = build_key(cmake_args(cpu_flags()))
    marker = marker_path()
    have = marker.read_text().strip() if marker.is_file() else None
    if have == key:
        print(f"llama-cpp-python build {key} matches this CPU")
        return 0
    print(f"llama-cpp-python build {have or 'unknown'} does not match this CPU ({key}); "
          f"run: {sys.executable} -m uniil.attrpool.llama_install")
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only say whether the installed build fits this CPU")
    p.add_argument("--force", action="store_true", help="compile again even if a matching wheel exists")
    p.add_argument("--print-args", action="store_true", help="print the CMake options for this CPU and exit")
    a = p.parse_args(argv)
    if a.print_args:
        args = cmake_args(cpu_flags())
        print(" ".join(args))
        print(build_key(args))
        return 0
    if a.check:
        return check()
    install(force=a.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
