"""`repro/run.sh` (`python -m repro.run`): serve the default model, answer ten fixed prompts greedily
(temperature 0, a fixed seed), and record the answers, their sha256 and the environment JSON in a run
folder. The first run in a folder becomes the reference and is reproduced at once by a second pass on
a freshly started server; later runs are compared with that reference. Exit 1, naming each prompt,
when any answer's hash differs.

Layout under the output folder (default `<state dir>/repro`):
    reference/{record.json,environment.json}    the answers every later run must give again
    runs/<timestamp>/{record.json,environment.json}
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
from pydantic import Field
from rich.console import Console

from bench.report import now_stamp
from dgxready.errors import DgxReadyError
from dgxready.files import sha256_file
from dgxready.progress import elapsed_text, make_console, step_progress
from dgxready.settings import Settings, load_settings
from model.running import RunningModel, running_model
from repro.documents import Doc, DocumentKind
from repro.environment import ENVIRONMENT, EnvironmentDoc, capture_document, diff_documents

SCHEMA_ID = "dgxready-repro-run/1"
RECORD_FILE = "record.json"
ENVIRONMENT_FILE = "environment.json"
REFERENCE_DIR = "reference"
RUNS_DIR = "runs"
SEED = 20240601
MAX_TOKENS = 64
CTX_PER_SLOT = 1024
REQUEST_TIMEOUT_S = 120.0
# One thread for decoding and for prompts. ggml's threads meet at a spinning barrier after every
# operation; on a machine with more runnable threads than cores each barrier waits for the
# scheduler, and 64 tokens of a 135M model took 40 s instead of one (2-core VM at load 15). One
# thread also keeps the answers independent of the host's core count.
LLAMA_SERVER_ARGS = ("--threads", "1", "--threads-batch", "1")

# The seed's "10 test outputs": short, varied prompts whose greedy answers fill MAX_TOKENS or stop.
PROMPTS: tuple[tuple[str, str], ...] = (
    ("capital", "What is the capital of France? Answer in one sentence."),
    ("arithmetic", "What is 17 multiplied by 23? Show the steps."),
    ("haiku", "Write a haiku about a server room at night."),
    ("python", "Write a Python function that reverses a string."),
    ("definition", "Define the word 'latency' for a new engineer."),
    ("list", "List three uses of a hash function."),
    ("translate", "Translate 'good morning, team' into Spanish."),
    ("summary", "Summarize in two sentences why backups need tested restores."),
    ("story", "Begin a short story about a robot that learns to garden."),
    ("advice", "Give one tip for writing clear commit messages."),
)


class Sampling(Doc):
    """How every answer is asked for. One slot and one request at a time: see `generate_all`."""
    temperature: float
    seed: int
    max_tokens: int
    slots: int
    cache_prompt: bool


class Generation(Doc):
    prompt_id: str
    prompt: str
    text: str
    completion_tokens: int
    finish_reason: str | None
    sha256: str = Field(description="sha256 of `text` as UTF-8")


class Mismatch(Doc):
    prompt_id: str
    prompt: str
    reference_sha256: str | None = Field(description="None when the reference lacks the prompt")
    sha256: str

    def describe(self) -> str:
        was = self.reference_sha256[:12] if self.reference_sha256 else "no answer"
        return f"prompt {self.prompt_id!r} ({self.prompt}): hash {self.sha256[:12]}, reference {was}"


class Comparison(Doc):
    reference_created_at: str
    reference_environment_sha256: str
    mismatches: list[Mismatch]


class RunRecord(Doc):
    schema_id: str = Field(SCHEMA_ID, alias="schema")
    created_at: str
    model: str
    format: str
    backend: str
    server_command: list[str]
    sampling: Sampling
    environment_file: str = ENVIRONMENT_FILE
    environment_sha256: str = Field(description="sha256 of the environment file beside this record")
    generations: list[Generation]
    verdict: Literal["reference", "reproduced", "differs"]
    comparison: Comparison | None = Field(None, description="None for the reference itself")
    seconds: float = Field(description="serving and answering, this pass alone")


RUN_RECORD = DocumentKind(RunRecord, SCHEMA_ID, "run-v1.schema.json")
SAMPLING = Sampling(temperature=0.0, seed=SEED, max_tokens=MAX_TOKENS, slots=1, cache_prompt=False)


@dataclass(frozen=True)
class Pass:
    """One serving of the default model and its ten answers, not yet compared or written."""
    record: RunRecord
    environment: EnvironmentDoc


@dataclass(frozen=True)
class RunFolder:
    path: Path
    record: RunRecord


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def generate(client: httpx.Client, model: str, prompt_id: str, prompt: str, sampling: Sampling) -> Generation:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "temperature": sampling.temperature, "seed": sampling.seed, "max_tokens": sampling.max_tokens,
            # llama-server's own field: recompute each prompt rather than reuse the previous
            # request's KV cache, so that an answer depends on its prompt alone, not on the order.
            "cache_prompt": sampling.cache_prompt}
    try:
        resp = client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        raise DgxReadyError(f"prompt {prompt_id!r}: {client.base_url}: {type(exc).__name__}: {exc}") from None
    if resp.status_code != 200:
        raise DgxReadyError(f"prompt {prompt_id!r}: HTTP {resp.status_code}: {resp.text[:300]}")
    choice = resp.json()["choices"][0]
    text = choice["message"].get("content") or ""
    tokens = (resp.json().get("usage") or {}).get("completion_tokens", 0)
    return Generation(prompt_id=prompt_id, prompt=prompt, text=text, completion_tokens=tokens,
                      finish_reason=choice.get("finish_reason"), sha256=text_sha256(text))


def generate_all(base_url: str, model: str, sampling: Sampling = SAMPLING,
                 prompts: tuple[tuple[str, str], ...] = PROMPTS) -> list[Generation]:
    """The prompts one after another against a server with one slot. With several slots, or
    requests in flight together, llama.cpp (continuous batching) and vLLM decode whichever
    sequences are active in one batch; the batch's shape changes the order of floating-point
    sums in the matrix products, and so, now and then, which token is the most likely one. One
    slot and sequential requests give every prompt the same batch shape in every run."""
    answers = []
    with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client, step_progress() as progress:
        task = progress.add_task("generations", total=len(prompts))
        for prompt_id, prompt in prompts:
            answers.append(generate(client, model, prompt_id, prompt, sampling))
            progress.advance(task)
    return answers


def serve_and_generate(settings: Settings, port: int | None) -> Pass:
    started = time.monotonic()
    with running_model(parallel=SAMPLING.slots, ctx_per_slot=CTX_PER_SLOT, backend="llamacpp", port=port,
                       extra_args=LLAMA_SERVER_ARGS, settings=settings) as served:
        generations = generate_all(served.base_url, served.state.model)
        environment = capture_document(settings)   # after the start: the build it served with
    return Pass(pass_record(served, generations, time.monotonic() - started), environment)


def pass_record(served: RunningModel, generations: list[Generation], seconds: float) -> RunRecord:
    return RunRecord(created_at=now_stamp(), model=served.state.model, format=served.state.fmt,
                     backend=served.state.backend, server_command=served.state.cmd, sampling=SAMPLING,
                     environment_sha256="0" * 64, generations=generations, verdict="reference",
                     seconds=round(seconds, 2))


def compare(reference: RunRecord, generations: list[Generation]) -> Comparison:
    known = {g.prompt_id: g.sha256 for g in reference.generations}
    mismatches = [Mismatch(prompt_id=g.prompt_id, prompt=g.prompt, reference_sha256=known.get(g.prompt_id),
                           sha256=g.sha256) for g in generations if known.get(g.prompt_id) != g.sha256]
    return Comparison(reference_created_at=reference.created_at,
                      reference_environment_sha256=reference.environment_sha256, mismatches=mismatches)


def compared(run: Pass, reference: RunRecord) -> Pass:
    comparison = compare(reference, run.record.generations)
    verdict = "differs" if comparison.mismatches else "reproduced"
    return Pass(run.record.model_copy(update={"verdict": verdict, "comparison": comparison}), run.environment)


def write_folder(folder: Path, run: Pass) -> RunFolder:
    """environment.json first, then the record that names its hash."""
    env_path = ENVIRONMENT.write(run.environment, folder / ENVIRONMENT_FILE)
    record = run.record.model_copy(update={"environment_sha256": sha256_file(env_path)})
    RUN_RECORD.write(record, folder / RECORD_FILE)
    return RunFolder(folder, record)


def new_run_folder(out_dir: Path, created_at: str) -> Path:
    stamp = created_at.replace(":", "").replace("-", "")
    folder, n = out_dir / RUNS_DIR / stamp, 1
    while folder.exists():
        n += 1
        folder = out_dir / RUNS_DIR / f"{stamp}-{n}"
    return folder


def write_reference(out_dir: Path, run: Pass) -> RunFolder:
    """Written beside, then moved into place: a crash leaves the old reference or the new one."""
    final = out_dir / REFERENCE_DIR
    tmp = out_dir / f".{REFERENCE_DIR}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    written = write_folder(tmp, run)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return RunFolder(final, written.record)


def load_folder(folder: Path) -> RunFolder:
    """The record and its environment file, both schema-checked, the file's hash the recorded one."""
    record = RUN_RECORD.load(folder / RECORD_FILE)
    env_path = folder / record.environment_file
    ENVIRONMENT.load(env_path)
    if sha256_file(env_path) != record.environment_sha256:
        raise DgxReadyError(f"{env_path}: sha256 differs from {folder / RECORD_FILE}'s environment_sha256 "
                            "(changed after the run)")
    return RunFolder(folder, record)


def load_reference(out_dir: Path) -> RunFolder | None:
    folder = out_dir / REFERENCE_DIR
    return load_folder(folder) if (folder / RECORD_FILE).exists() else None


def run_folders(out_dir: Path) -> list[Path]:
    """Oldest first (their names are timestamps)."""
    runs = out_dir / RUNS_DIR
    return sorted(p for p in runs.iterdir() if (p / RECORD_FILE).exists()) if runs.is_dir() else []


def print_answers(run: RunFolder, out: Console) -> None:
    for g in run.record.generations:
        out.print(f"  {g.prompt_id:<11} {g.sha256[:16]}  {g.completion_tokens:>3} tokens  "
                  f"{g.text[:60].replace(chr(10), ' ')!r}", markup=False, highlight=False)


def print_verdict(run: RunFolder, reference: RunFolder, out: Console) -> None:
    comparison = run.record.comparison
    assert comparison is not None
    if not comparison.mismatches:
        out.print(f"[green]reproduced[/]: all {len(run.record.generations)} hashes match the reference "
                  f"of {reference.record.created_at} ({run.path})")
        return
    out.print(f"[red]differs[/]: {len(comparison.mismatches)} of {len(run.record.generations)} answers "
              f"changed from the reference of {reference.record.created_at} ({reference.path}):")
    for m in comparison.mismatches:
        out.print(f"  {m.describe()}", markup=False, highlight=False)
    changed = diff_documents(ENVIRONMENT.dump(ENVIRONMENT.load(reference.path / ENVIRONMENT_FILE)),
                             ENVIRONMENT.dump(ENVIRONMENT.load(run.path / ENVIRONMENT_FILE)))
    out.print(f"environment since the reference: {len(changed)} change(s)" if changed
              else "environment since the reference: unchanged")
    for d in changed[:20]:
        out.print(f"  {d}", markup=False, highlight=False)


def reference_for(out_dir: Path, settings: Settings, port: int | None, fresh: bool, out: Console) -> RunFolder:
    """The recorded reference; with none (or `fresh`), a pass that becomes it."""
    reference = None if fresh else load_reference(out_dir)
    if reference:
        out.print(f"reference: {reference.path} ({reference.record.created_at})")
        return reference
    out.print("no reference here yet: this pass records it, a second pass on a fresh server reproduces it")
    first = serve_and_generate(settings, port)
    write_folder(new_run_folder(out_dir, first.record.created_at), first)
    reference = write_reference(out_dir, first)
    out.print(f"reference recorded: {reference.path} ({first.record.seconds:.1f} s)")
    print_answers(reference, out)
    return reference


def reproduce(out_dir: Path, settings: Settings, port: int | None, fresh: bool, out: Console) -> RunFolder:
    reference = reference_for(out_dir, settings, port, fresh, out)
    run = compared(serve_and_generate(settings, port), reference.record)
    written = write_folder(new_run_folder(out_dir, run.record.created_at), run)
    print_verdict(written, reference, out)
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Ten fixed prompts, greedy, one slot: record the answers' "
                                                 "hashes and check them against the reference.")
    parser.add_argument("--out", type=Path, default=None,
                        help="run folder root (default: <state dir>/repro, where `invoke gate` looks)")
    parser.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    parser.add_argument("--new-reference", action="store_true",
                        help="record a new reference first (after a deliberate change of model or engine)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = make_console()
    settings = load_settings()
    started = time.monotonic()
    try:
        run = reproduce(args.out or settings.state_dir / "repro", settings, args.port, args.new_reference, out)
    except DgxReadyError as exc:
        out.print(f"[red]repro run failed:[/] {exc}")
        return 2
    out.print(f"repro run took {elapsed_text(time.monotonic() - started)}")
    return 0 if run.record.verdict == "reproduced" else 1


if __name__ == "__main__":
    sys.exit(main())
