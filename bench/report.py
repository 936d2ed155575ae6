"""The baseline document: one JSON per run, validated against a versioned JSON Schema that is
generated from these models and committed as bench/schema/baseline-v5.schema.json. Version 2
added the samples that tell noise from change (per-request TPOT, STREAM repetitions, storage
windows, network rounds) and the capacity range; version 3 adds each request's output tokens,
whose spread the prediction's P95 request needs; version 4 the engine's own decode step by batch
and context (`micro.engine`), which bench.predict's measured profile calibrates with; version 5
each capacity level's per-request E2EL and TTFT. Older documents are still read, each checked
against its own version's schema, kept beside it."""
from __future__ import annotations

import json
import time
from pathlib import Path

from jsonschema import Draft202012Validator, ValidationError
from pydantic import BaseModel, ConfigDict, Field

from bench.engine_table import EngineTable
from bench.environment import Environment
from bench.hw import Check, GpuReport, HostFacts
from bench.metrics import ServingMetrics
from bench.net import NetResult
from bench.roofline import Roofline
from bench.serving import CapacityResult, LevelResult
from bench.storage import StorageResult
from bench.stream import StreamResult
from dgxready.errors import DgxReadyError
from dgxready.files import atomic_write_text

SCHEMA_DIR = Path(__file__).with_name("schema")
SCHEMA_ID = "dgxready-bench-baseline/5"
SCHEMA_PATH = SCHEMA_DIR / "baseline-v5.schema.json"
READABLE_SCHEMAS = {"dgxready-bench-baseline/1": SCHEMA_DIR / "baseline-v1.schema.json",
                    "dgxready-bench-baseline/2": SCHEMA_DIR / "baseline-v2.schema.json",
                    "dgxready-bench-baseline/3": SCHEMA_DIR / "baseline-v3.schema.json",
                    "dgxready-bench-baseline/4": SCHEMA_DIR / "baseline-v4.schema.json",
                    SCHEMA_ID: SCHEMA_PATH}


class Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hardware(Doc):
    host: HostFacts
    gpus: list[GpuReport]
    profile: str
    checks: list[Check]
    profile_passed: bool


class Micro(Doc):
    stream: StreamResult | None = None
    storage: StorageResult | None = None
    network: list[NetResult] = Field(default_factory=list)
    gpu: dict[str, float] | None = None
    engine: EngineTable | None = Field(None, description="absent before schema version 4, and where "
                                                         "the sweep's engine was not llama.cpp started here")


class ServingLevel(Doc):
    concurrency: int | None
    request_rate: float | None
    num_requests: int
    warmup_requests: int
    metrics: ServingMetrics
    e2el_samples: list[float]
    ttft_samples: list[float]
    tpot_samples: list[float] | None = Field(None, description="absent before schema version 2")
    output_token_samples: list[int] | None = Field(None, description="absent before schema version 3")

    @classmethod
    def of(cls, level: LevelResult) -> ServingLevel:
        return cls(concurrency=level.concurrency, request_rate=level.request_rate,
                   num_requests=level.num_requests, warmup_requests=level.warmup_requests,
                   metrics=level.metrics, e2el_samples=level.e2el_samples,
                   ttft_samples=level.ttft_samples, tpot_samples=level.tpot_samples,
                   output_token_samples=level.output_token_samples)

    def level_result(self) -> LevelResult:
        """The inverse of `of`; the ITL samples are not stored."""
        return LevelResult(self.concurrency, self.request_rate, self.num_requests, self.warmup_requests,
                           self.metrics, self.e2el_samples, self.ttft_samples, [], self.tpot_samples or [],
                           self.output_token_samples or [])


class Serving(Doc):
    url: str
    model: str
    backend: str | None
    started_server: bool
    workload: dict
    mode: str = Field(description="closed (fixed concurrency) or open (request rate)")
    burstiness: float | None = None
    levels: list[ServingLevel]


class Baseline(Doc):
    schema_id: str = Field(SCHEMA_ID, alias="schema")
    created_at: str
    host: str
    environment: Environment
    hardware: Hardware
    micro: Micro = Micro()
    serving: Serving | None = None
    capacity: CapacityResult | None = None
    roofline: Roofline | None = None
    plots: list[str] = Field(default_factory=list)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def generated_schema() -> dict:
    schema = Baseline.model_json_schema(by_alias=True)
    schema["$id"] = SCHEMA_ID
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def committed_schema(path: Path = SCHEMA_PATH) -> dict:
    return json.loads(path.read_text())


def schema_for(doc: object, source: str) -> dict:
    """The committed schema of the document's own version; the newest one when it names none."""
    version = doc.get("schema", SCHEMA_ID) if isinstance(doc, dict) else SCHEMA_ID
    if version not in READABLE_SCHEMAS:
        raise DgxReadyError(f"{source}: unknown baseline schema {version!r}; this kit reads "
                            + ", ".join(sorted(READABLE_SCHEMAS)))
    return committed_schema(READABLE_SCHEMAS[version])


def deepest(error: ValidationError) -> ValidationError:
    """An optional part (`anyOf` of a schema and null) that fails is reported where it fails
    inside, not as the whole part's dump."""
    while error.context:
        error = max(error.context, key=lambda e: len(e.absolute_path))
    return error


def validate_document(doc: object, source: str) -> None:
    """Raise with the JSON path of every schema violation."""
    errors = sorted((deepest(e) for e in Draft202012Validator(schema_for(doc, source)).iter_errors(doc)),
                    key=lambda e: [str(part) for part in e.absolute_path])
    if errors:
        lines = [f"{source}: {e.json_path}: {e.message[:200]}" for e in errors[:20]]
        raise DgxReadyError("baseline does not match the schema:\n" + "\n".join(lines))


def load_baseline(path: Path) -> Baseline:
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise DgxReadyError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise DgxReadyError(f"{path}: not JSON (truncated?): {exc}") from None
    validate_document(doc, str(path))
    return Baseline.model_validate(doc)


def write_baseline(baseline: Baseline, out_dir: Path) -> Path:
    doc = json.loads(baseline.model_dump_json(by_alias=True))
    validate_document(doc, "new baseline")
    stamp = baseline.created_at.replace(":", "").replace("-", "")
    path = out_dir / f"{stamp}.json"
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    return path


def now_stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


if __name__ == "__main__":
    SCHEMA_PATH.parent.mkdir(exist_ok=True)
    SCHEMA_PATH.write_text(json.dumps(generated_schema(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {SCHEMA_PATH}")
