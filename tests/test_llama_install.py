"""How `make venv` compiles llama-cpp-python: never native, never AMX, one wheel per CPU flag set."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from uniil.attrpool import llama_install as li
from uniil.attrpool.local_server import describe_exit, has_amx_kernels, LocalModelServer

SAPPHIRE_RAPIDS = ("fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c bmi2 avx2 avx512f avx512dq avx512cd avx512bw "
                   "avx512vl avx512vbmi avx512_vnni avx_vnni avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8")
HASWELL = "fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c bmi2 avx2"


def options(flags: str) -> dict[str, str]:
    args = li.cmake_args(set(flags.split()), machine="x86_64")
    return dict(a[2:].split("=", 1) for a in args)


def test_amx_cpu_gets_its_vector_units_but_never_amx():
    o = options(SAPPHIRE_RAPIDS)
    assert o["GGML_NATIVE"] == "OFF"  # -march=native would define __AMX_INT8__ and compile the AMX path in
    assert (o["GGML_AMX_TILE"], o["GGML_AMX_INT8"], o["GGML_AMX_BF16"]) == ("OFF", "OFF", "OFF")
    assert o["GGML_AVX512"] == o["GGML_AVX512_VNNI"] == o["GGML_AVX512_BF16"] == o["GGML_AVX2"] == "ON"


def test_cpu_without_avx512_gets_no_avx512():
    o = options(HASWELL)
    assert o["GGML_AVX2"] == o["GGML_FMA"] == o["GGML_F16C"] == "ON"
    assert o["GGML_AVX512"] == o["GGML_AVX512_VNNI"] == o["GGML_AVX_VNNI"] == "OFF"
    assert o["GGML_AMX_INT8"] == "OFF"


def test_avx512_needs_all_five_foundation_flags():
    assert options(HASWELL + " avx512f avx512cd")["GGML_AVX512"] == "OFF"


def test_each_flag_set_has_its_own_wheel_directory(monkeypatch, tmp_path):
    spr = li.build_key(li.cmake_args(set(SAPPHIRE_RAPIDS.split()), "x86_64"))
    hsw = li.build_key(li.cmake_args(set(HASWELL.split()), "x86_64"))
    assert spr != hsw and spr.startswith(li.VERSION) and hsw.startswith(li.VERSION)
    assert spr == li.build_key(li.cmake_args(set(SAPPHIRE_RAPIDS.split()), "x86_64"))  # stable
    monkeypatch.setenv("UNIIL_WHEEL_DIR", str(tmp_path))
    assert li.wheel_root() == tmp_path


def test_cpu_flags_are_read_from_cpuinfo():
    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 amx_int8\n\nprocessor\t: 1\n"
    assert li.cpu_flags(text) == {"fpu", "avx2", "amx_int8"}
    assert li.cpu_flags("Features\t: fp asimd sve\n") == {"fp", "asimd", "sve"}
    assert li.cpu_flags("") == set()


def test_the_pinned_version_is_the_one_the_script_builds():
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    local = meta["project"]["optional-dependencies"]["local"]
    assert local == [f"llama-cpp-python[server]=={li.VERSION}"]


def test_the_check_names_the_fix_when_the_build_does_not_fit(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(li, "marker_path", lambda: tmp_path / "marker")
    (tmp_path / "marker").write_text("0.3.36-someothercpu\n")
    assert li.check() == 1
    assert "uniil.attrpool.llama_install" in capsys.readouterr().out
    (tmp_path / "marker").write_text(li.build_key(li.cmake_args(li.cpu_flags())) + "\n")
    assert li.check() == 0


def test_system_info_with_amx_is_recognised():
    assert has_amx_kernels("CPU : SSE3 = 1 | AVX512 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 |")
    assert not has_amx_kernels("CPU : SSE3 = 1 | AVX512 = 1 | LLAMAFILE = 1 |")


def test_exit_descriptions_name_the_signal_and_the_fix():
    assert describe_exit(-11) == "signal 11 (SIGSEGV)"
    assert describe_exit(-4) == "signal 4 (SIGILL)"
    assert describe_exit(2) == "exit code 2"

    class Dead:
        pid, returncode = 4242, -11

    server = LocalModelServer(Path("m.gguf"), "m")
    server.proc = Dead()
    msg = server.death_message(7)
    assert "pid 4242" in msg and "SIGSEGV" in msg and "7 answer(s)" in msg and "--llm-url" in msg
    assert "\n" not in msg
    server.proc.returncode = -4
    assert re.search(r"SIGILL.*compiled for another CPU.*llama_install --force", server.death_message(0))
