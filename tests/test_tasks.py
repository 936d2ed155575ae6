import platform
import shutil
import subprocess
import sys

import pytest

from model.llamacpp_build import BASE_FLAGS, X86_NO_AMX, BuildSpec, cuda_architecture
from model.systemd import render_unit, systemd_quote
from tasks import ns


def test_invoke_list_shows_the_collections():
    out = subprocess.run([sys.executable, "-m", "invoke", "--list"], capture_output=True,
                         text=True, check=True).stdout
    for name in ("model.pull", "model.serve", "model.stop", "model.plan", "model.build-llamacpp",
                 "model.quantize", "model.verify", "model.list", "model.status", "quickstart"):
        assert name in out


def all_tasks(coll, prefix=""):
    for name, t in coll.tasks.items():
        yield prefix + name, t
    for cname, sub in coll.collections.items():
        yield from all_tasks(sub, f"{prefix}{cname}.")


def test_every_flag_has_help_text():
    missing = [f"{name} --{arg.name}" for name, t in all_tasks(ns)
               for arg in t.get_arguments() if not arg.help]
    assert missing == []


def test_cuda_arch_for_gb10_and_hopper():
    assert cuda_architecture(12, 1) == "121a-real"
    assert cuda_architecture(9, 0) == "90-real"


def test_build_key_follows_flags_and_cpu():
    cpu = BuildSpec("0.3.36", "x86_64", "abc")
    cuda = BuildSpec("0.3.36", "x86_64", "abc", cuda_architectures="121a-real")
    other_cpu = BuildSpec("0.3.36", "x86_64", "def")
    assert len({cpu.key, cuda.key, other_cpu.key}) == 3
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in BASE_FLAGS
    assert "-DGGML_CUDA=ON" in cuda.cmake_flags() and "-DGGML_CUDA=ON" not in cpu.cmake_flags()


def test_x86_builds_leave_out_the_amx_kernels_that_crash_and_arm_builds_pass_no_x86_flags():
    x86 = BuildSpec("0.3.36", "x86_64", "abc").cmake_flags()
    arm = BuildSpec("0.3.36", "aarch64", "abc").cmake_flags()
    assert f"-DCMAKE_C_FLAGS={X86_NO_AMX}" in x86 and f"-DCMAKE_CXX_FLAGS={X86_NO_AMX}" in x86
    assert not [f for f in arm if "amx" in f]


@pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("gcc"), reason="needs gcc on x86_64")
def test_no_amx_flags_win_over_march_native_in_either_order():
    for order in ([*X86_NO_AMX.split(), "-march=native"], ["-march=native", *X86_NO_AMX.split()]):
        macros = subprocess.run(["gcc", *order, "-dM", "-E", "-"], input="", capture_output=True,
                                text=True, check=True).stdout
        assert "__AMX_INT8__" not in macros and "__AMX_TILE__" not in macros


def test_unit_quotes_hostile_arguments():
    unit = render_unit("dgxready-llama-x", "llama", ["/opt/bin/llama-server", "-m",
                       "/models/a b/$HOME;%h.gguf", "--alias", 'x"y'])
    assert ('ExecStart=/opt/bin/llama-server -m "/models/a b/$$HOME;%%h.gguf" --alias "x\\"y"'
            in unit)
    with pytest.raises(Exception, match="line break"):
        systemd_quote("a\nExecStartPre=/bin/rm -rf /")
    with pytest.raises(Exception, match="unit name"):
        render_unit("x;y", "d", ["/bin/true"])
