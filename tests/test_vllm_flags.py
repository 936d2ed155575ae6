"""Every vLLM flag the toolkit emits must exist in the pinned vLLM, and every value it passes must
be one that flag accepts: a flag vLLM does not know makes `vllm serve` exit before it loads
anything, on a GPU host these tests never reach.

The pinned vLLM is the one in `serve.vllm_image`: NVIDIA's vLLM Release 25.10 notes list
"vLLM: 0.10.2" for nvcr.io/nvidia/vllm:25.10-py3 (NGC_VLLM below maps image tags to versions).

The flag list is tests/fixtures/vllm/serve-flags-<version>.json. The current one was DERIVED FROM
vLLM 0.10.2's SOURCE (the vllm-0.10.2 wheel from PyPI, read with `ast` by
tests/fixtures/vllm/extract_flags.py, which re-implements how vLLM turns its config dataclasses
into argparse options); it was NOT recorded from a live `vllm serve --help` on a GPU host. It was
cross-checked once against the same wheel's own `vllm serve --help`, run on a CPU-only machine
(same 236 options, same choices; see the fixture's `source`), and all the command lines below
were parsed by that real parser without an error. NVIDIA builds its image from its own vLLM
tree, so refresh the fixture from the image itself on a machine that has it (a GPU host;
`--help` itself needs no GPU) when one is at hand:

    docker run --rm nvcr.io/nvidia/vllm:25.10-py3 vllm serve --help > serve-help.txt
    python tests/fixtures/vllm/extract_flags.py help serve-help.txt --version 0.10.2

(0.10.x prints every option for a bare `--help`, and its `--help=all` is a keyword search; later
releases print a short page for `--help` and need `--help=all`).
The help text is read by `parse_help`, which test_parse_help_reads_argparse_output below checks
against argparse's own output. When `serve.vllm_image` moves to another release, add its tag to
NGC_VLLM and record that version's fixture, from help text or with
`extract_flags.py source <unpacked vllm wheel> --version X`.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import get_args

import pytest

from dgxready.settings import ServeSettings
from model.backend import BackendChoice, VllmInstall
from model.catalog import FileSpec, ModelFormat
from model.memory import MemoryBudget
from model.plan import KV_DTYPE_BYTES, KvShape, engine_flags, engine_kv_dtype
from model.serve import vllm_command
from provision.core import Host
from provision.inventory import HostEntry, HostVars, Target
from provision.steps import services
from provision.steps.modelfiles import ModelFiles
from provision.steps.services import EngineService

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"
# NGC tag -> the upstream vLLM in it, from NVIDIA's vLLM container release notes
# (docs.nvidia.com/deeplearning/frameworks/vllm-release-notes/rel-25-10.html: "vLLM: 0.10.2").
NGC_VLLM = {"25.10-py3": "0.10.2"}
GiB = 1024**3
PINNED_IMAGE = ServeSettings().vllm_image  # the default in dgxready/settings.py, not a local override


def extractor():
    spec = importlib.util.spec_from_file_location("vllm_extract_flags", FIXTURES / "extract_flags.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def pinned_version() -> str:
    image = PINNED_IMAGE
    tag = image.rsplit(":", 1)[-1]
    assert tag in NGC_VLLM, (f"serve.vllm_image is {image}: add its vLLM version to NGC_VLLM "
                             "(NVIDIA's vLLM release notes) and record its flag fixture")
    return NGC_VLLM[tag]


def pinned_flags() -> dict[str, dict]:
    version = pinned_version()
    path = FIXTURES / f"serve-flags-{version}.json"
    assert path.exists(), f"no flag fixture for vLLM {version}: see this file's docstring"
    data = json.loads(path.read_text())
    assert data["vllm_version"] == version
    return data["flags"]


# --- what the toolkit emits -------------------------------------------------------------------

def serve_argvs() -> list[tuple[str, list[str]]]:
    """model/serve.py's vllm_command, for both installs, every KV dtype the CLI offers for vLLM,
    with and without the Mistral tokenizer, on a unified-memory and a discrete-GPU budget."""
    image = PINNED_IMAGE
    installs = [VllmInstall("venv", "/opt/vllm/bin/vllm"), VllmInstall("container", image)]
    budgets = [MemoryBudget("unified", 119 * GiB, 100 * GiB, "test"),
               MemoryBudget("gpu", 80 * GiB, 79 * GiB, "test")]
    kv_dtypes = [k for k in KV_DTYPE_BYTES if k not in ("q8_0", "q4_0")]  # make_plan refuses these
    out = []
    for install in installs:
        choice = BackendChoice("vllm", "test", install)
        for budget in budgets:
            for kv in kv_dtypes:
                flags = engine_flags("vllm", 8, 4096, engine_kv_dtype("vllm", kv), 30 * GiB, budget)
                for mistral in (False, True):
                    cmd = vllm_command(choice, Path("/models/m/fmt"), "some-model", "127.0.0.1",
                                       8000, flags, mistral, ())
                    out.append((f"model.serve {install.kind} {budget.kind} kv={kv} "
                                f"mistral={mistral}", cmd))
    return out


def provision_engine_argvs() -> list[tuple[str, list[str]]]:
    """provision/steps/services.py's EngineService.vllm_argv (the provisioned engine's command,
    `--scheduling-policy priority` included), for both installs, loopback and exposed binds,
    every KV dtype, with and without the Mistral tokenizer. If provisioning grows another vLLM
    command builder, add it here: test_provision_builders_are_covered looks for one."""
    image = PINNED_IMAGE
    budget = MemoryBudget("unified", 119 * GiB, 100 * GiB, "test")
    out = []
    for mistral in (False, True):
        names = ["config.json"] + (["tokenizer.model.v3"] if mistral else [])
        spec = ModelFormat(engine="vllm", quantization="fp8",
                           files=[FileSpec(name=n, size=1, sha256="0" * 64) for n in names])
        fmt = ModelFiles("some-model", "fp8", (), spec,
                         KvShape(32, 8, 128, 32768, "test"))
        for install in ("container", "venv"):
            # A venv exposed beyond loopback is refused (no key file option in vLLM 0.10).
            for bind in (None, "0.0.0.0") if install == "container" else (None,):
                for kv in [k for k in get_args(HostVars.model_fields["kv_dtype"].annotation)
                           if k not in ("q8_0", "q4_0")]:
                    hv = HostVars(profile="dgx-spark", vllm=install, serve_host=bind, kv_dtype=kv)
                    host = Host.offline(Target(name="box", entry=HostEntry(address="127.0.0.61",
                                                                           vars=hv)), {})
                    flags = engine_flags("vllm", 8, 4096, engine_kv_dtype("vllm", kv), 30 * GiB,
                                         budget)
                    argv = EngineService({}, image).vllm_argv(host, fmt, flags, "/opt/m/fp8")
                    out.append((f"provision {install} bind={bind} kv={kv} mistral={mistral}",
                                list(argv)))
    return out


def all_argvs() -> list[tuple[str, list[str]]]:
    return serve_argvs() + provision_engine_argvs()


def vllm_args(cmd: list[str]) -> list[str]:
    """What `vllm serve` parses: the tokens after `serve MODEL` (docker's own flags come before)."""
    i = next(i for i, tok in enumerate(cmd) if tok == "serve" and Path(cmd[i - 1]).name == "vllm")
    assert not cmd[i + 1].startswith("-"), f"no model positional after `vllm serve`: {cmd}"
    return cmd[i + 2:]


def problems(args: list[str], flags: dict[str, dict]) -> list[str]:
    found, i = [], 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("-"):
            found.append(f"{tok!r}: a stray positional (vllm serve takes only the model)")
            i += 1
            continue
        name, eq, inline = tok.partition("=")
        spec = flags.get(name)
        if spec is None:
            found.append(f"{name}: vLLM has no such flag")
            i += 1
            continue
        if spec.get("deprecated"):
            found.append(f"{name}: deprecated in this vLLM")
        if not spec["takes_value"]:
            if eq:
                found.append(f"{name} is a switch and takes no value")
            i += 1
            continue
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(args):
            value, i = args[i + 1], i + 2
        else:
            found.append(f"{name}: no value follows")
            break
        if spec["choices"] is not None and value not in spec["choices"]:
            found.append(f"{name} {value}: not one of {spec['choices']}")
    return found


# --- the checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("label,cmd", all_argvs(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_emitted_flag_is_accepted_by_the_pinned_vllm(label, cmd):
    assert problems(vllm_args(cmd), pinned_flags()) == [], f"{label}: {cmd}"


def test_the_check_catches_bad_flags_and_values():
    flags = pinned_flags()
    assert problems(["--max-num-seqs", "4", "--kv-cache-dtype", "fp8"], flags) == []
    assert problems(["--enable-prefix-caching", "--served-model-name", "m"], flags) == []
    assert problems(["--kv-cache-dtype", "q8_0"], flags) == [
        f"--kv-cache-dtype q8_0: not one of {flags['--kv-cache-dtype']['choices']}"]
    assert problems(["--no-such-flag"], flags) == ["--no-such-flag: vLLM has no such flag"]
    assert problems(["--model", "x"], flags)[0] == "--model: vLLM has no such flag"  # serve refuses it
    assert problems(["--scheduling-policy=lifo"], flags) == [
        "--scheduling-policy lifo: not one of ['fcfs', 'priority']"]
    assert problems(["--enable-prefix-caching=1"], flags) == [
        "--enable-prefix-caching is a switch and takes no value"]


def test_priority_scheduling_exists_in_the_pinned_vllm():
    """The multiplexer forwards request priorities; vLLM honours them only under
    `--scheduling-policy priority` (0.10.2: SchedulerPolicy = Literal["fcfs", "priority"])."""
    flags = pinned_flags()
    assert problems(["--scheduling-policy", "priority"], flags) == []
    assert flags["--scheduling-policy"]["choices"] == ["fcfs", "priority"]


def test_provision_builders_are_covered():
    """Provisioning's vLLM command builders are the ones provision_engine_argvs calls."""
    covered = {"EngineService.vllm_argv"}
    found = {f"{cls}.{name}" if cls else name
             for cls, obj in [("", services)] + [(n, getattr(services, n)) for n in dir(services)
                                                 if isinstance(getattr(services, n), type)]
             for name in vars(obj)
             if callable(getattr(obj, name)) and "vllm" in name.lower()
             and getattr(getattr(obj, name), "__module__", "") == services.__name__}
    assert found <= covered, (f"provision.steps.services has {sorted(found - covered)}: add its "
                              "command lines to provision_engine_argvs() in tests/test_vllm_flags.py")
    assert any(label.startswith("provision") for label, _ in provision_engine_argvs())


def test_parse_help_reads_argparse_output():
    """The refresh path: argparse's help for the kinds of option vLLM declares, read back."""
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass  # vLLM's SortedHelpFormatter derives from these two

    p = argparse.ArgumentParser(prog="vllm serve", formatter_class=Formatter)
    p.add_argument("model_tag", nargs="?")
    g = p.add_argument_group("CacheConfig", "Configuration for the KV cache.\n\n- not an option")
    g.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "fp8_e4m3"], default="auto",
                   help="Data type for kv cache storage. " * 4)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   help="Whether to enable prefix caching.")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="TP.")
    g.add_argument("--cuda-graph-sizes", type=int, nargs="+", help="Sizes.")
    g.add_argument("--block-size", type=int, choices=[8, 16], nargs="?", help="Block.")
    g.add_argument("--collect", choices=["model", "worker"], nargs="+", help="Traces.")
    g.add_argument("--hf-token", nargs="?", const=True, help="Token.")
    g.add_argument("--disable-log-stats", action="store_true", help="--not-a-flag in help text")
    g.add_argument("--tool-call-parser", metavar="{a,b} or name registered in --tool-parser-plugin")
    flags = extractor().parse_help(p.format_help())
    assert flags == {
        "--block-size": {"choices": ["8", "16"], "takes_value": True, "deprecated": None},
        "--collect": {"choices": ["model", "worker"], "takes_value": True, "deprecated": None},
        "--cuda-graph-sizes": {"choices": None, "takes_value": True, "deprecated": None},
        "--disable-log-stats": {"choices": None, "takes_value": False, "deprecated": None},
        "--enable-prefix-caching": {"choices": None, "takes_value": False, "deprecated": None},
        "--help": {"choices": None, "takes_value": False, "deprecated": None},
        "--hf-token": {"choices": None, "takes_value": True, "deprecated": None},
        "--kv-cache-dtype": {"choices": ["auto", "fp8", "fp8_e4m3"], "takes_value": True,
                             "deprecated": None},
        "--no-enable-prefix-caching": {"choices": None, "takes_value": False, "deprecated": None},
        "--tensor-parallel-size": {"choices": None, "takes_value": True, "deprecated": None},
        "--tool-call-parser": {"choices": None, "takes_value": True, "deprecated": None},
        "-h": {"choices": None, "takes_value": False, "deprecated": None},
        "-tp": {"choices": None, "takes_value": True, "deprecated": None},
    }


def test_fixture_names_the_flags_the_toolkit_relies_on():
    """A sanity check on the fixture itself, whichever way it was recorded."""
    flags = pinned_flags()
    for name in ("--host", "--port", "--served-model-name", "--tokenizer-mode", "--max-num-seqs",
                 "--max-model-len", "--gpu-memory-utilization", "--api-key", "--scheduling-policy"):
        assert name in flags
    assert "mistral" in flags["--tokenizer-mode"]["choices"]
    assert {"auto", "fp8"} <= set(flags["--kv-cache-dtype"]["choices"])
