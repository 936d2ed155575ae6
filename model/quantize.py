"""Requantize a GGUF with llama.cpp's own llama-quantize; the result becomes a local format."""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dgxready.errors import DgxReadyError
from dgxready.files import sha256_file
from dgxready.progress import waiting
from dgxready.settings import Settings, load_settings
from model.catalog import FileSpec, ModelFormat, load_catalog
from model.llamacpp_build import require_binary
from model.pull import resolve_format, store_for

QUANT_TYPE = re.compile(r"^(Q[2-8]_[0-9K](_[SML])?|IQ[1-4]_[A-Z]{1,3}|F16|BF16|F32|Q8_0|TQ[12]_0)$")


@dataclass(frozen=True)
class QuantizeResult:
    model: str
    fmt: str
    path: Path
    size: int
    sha256: str


def local_format_name(qtype: str) -> str:
    return f"gguf-{qtype.lower()}-local"


def quantize(model: str, qtype: str, source_fmt: str | None = None,
             settings: Settings | None = None) -> QuantizeResult:
    if not QUANT_TYPE.match(qtype):
        raise DgxReadyError(f"--type {qtype!r} is not a llama.cpp quantization type (e.g. Q4_K_M, Q8_0)")
    settings = settings or load_settings()
    store = store_for(settings)
    src = resolve_format(load_catalog(), store, model, source_fmt, engine="llamacpp")
    src_path = store.require_verified(model, src.name, src.spec)
    fmt = local_format_name(qtype)
    out_dir = store.format_dir(model, fmt)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_name = f"{src_path.stem.split('.')[0]}.{qtype}.gguf"
    tmp = store.partial_dir(model, fmt) / out_name
    tmp.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(require_binary("llama-quantize", settings))]
    if src.spec.quantization and src.spec.quantization.upper() not in ("F16", "BF16", "F32"):
        cmd.append("--allow-requantize")
    cmd += [str(src_path), str(tmp), qtype]
    with waiting(f"llama-quantize {src.name} -> {qtype}"):
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise DgxReadyError(f"llama-quantize failed (exit {proc.returncode}):\n{tail}")
    digest, size = sha256_file(tmp), tmp.stat().st_size
    final = out_dir / out_name
    os.replace(tmp, final)
    store.add_local_format(model, fmt, ModelFormat(
        engine="llamacpp", quantization=qtype,
        files=[FileSpec(name=out_name, size=size, sha256=digest)],
    ))
    return QuantizeResult(model, fmt, final, size, digest)
