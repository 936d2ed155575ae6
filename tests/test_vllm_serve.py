"""The vLLM serving path. No CUDA and no vLLM here, so two things are simulated: NVML reports a
GB10 (memory NOT_SUPPORTED), and `vllm` is a stand-in script that records its arguments and
answers the OpenAI API like a server. Everything between them is the real model.serve path:
format resolution, verification, the memory plan, the command line, readiness and the record."""
import json
import os
import sys

import openai

from dgxready.files import sha256_file
from dgxready.ports import free_port
from model.catalog import FileSpec, ModelFormat
from model.gpu import GpuFacts
from model.pull import store_for
from model.serve import ServeRequest, serve, stop

FAKE_VLLM = """#!{python}
import json, os, sys
sys.path.insert(0, {root!r})
args = sys.argv[1:]
json.dump(args, open(os.environ["FAKE_VLLM_ARGV"], "w"))
import uvicorn
from agents.benchmarks.instant_backend import make_app
uvicorn.run(make_app(), host=args[args.index("--host") + 1], port=int(args[args.index("--port") + 1]),
            log_level="warning")
"""


def test_vllm_backend_gets_the_planned_flags(isolated, tmp_path, monkeypatch):
    gb10 = [GpuFacts(0, "NVIDIA GB10", (12, 1), None, None, unified_memory=True)]
    monkeypatch.setattr("model.backend.gpu_facts", lambda: gb10)
    monkeypatch.setattr("model.memory.gpu_facts", lambda: gb10)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "vllm"
    fake.write_text(FAKE_VLLM.format(python=sys.executable, root=os.getcwd()))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_VLLM_ARGV", str(tmp_path / "argv.json"))

    model = "mistral-7b-instruct-v0.3"
    store = store_for(isolated)
    fmt_dir = store.format_dir(model, "tiny-local")
    fmt_dir.mkdir(parents=True)
    (fmt_dir / "config.json").write_text('{"architectures": ["MistralForCausalLM"]}')
    spec = FileSpec(name="config.json", size=(fmt_dir / "config.json").stat().st_size,
                    sha256=sha256_file(fmt_dir / "config.json"))
    store.add_local_format(model, "tiny-local", ModelFormat(engine="vllm", quantization="fp8", files=[spec]))

    state = serve(ServeRequest(model=model, fmt="tiny-local", port=free_port(), parallel=10,
                               ctx_per_slot=4096, kv_dtype="fp8"), isolated)
    try:
        assert state.backend == "vllm" and "NVIDIA GB10 found and vLLM is installed" in state.reason
        argv = json.loads((tmp_path / "argv.json").read_text())
        assert argv[:2] == ["serve", str(fmt_dir)]
        flag = lambda name: argv[argv.index(name) + 1]  # noqa: E731
        assert flag("--max-num-seqs") == "10" and flag("--max-model-len") == "4096"
        assert flag("--kv-cache-dtype") == "fp8" and flag("--served-model-name") == model
        assert 0.05 <= float(flag("--gpu-memory-utilization")) <= 0.95
        assert "--enable-prefix-caching" in argv
        reply = openai.OpenAI(base_url=f"{state.base_url}/v1", api_key="x").chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
    finally:
        stop(port=state.port, settings=isolated)
