"""The repro documents (environment, run record, gate status): pydantic models whose JSON Schema is
generated from them and committed under repro/schema/, checked on every write and every load, as
bench/report.py does for baselines. `python -m repro.schemas` rewrites the committed schemas."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from jsonschema import Draft202012Validator
from pydantic import BaseModel, ConfigDict, ValidationError

from dgxready.config import format_validation_error
from dgxready.errors import DgxReadyError
from dgxready.files import atomic_write_text

SCHEMA_DIR = Path(__file__).with_name("schema")


class Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


D = TypeVar("D", bound=Doc)


@dataclass(frozen=True)
class DocumentKind(Generic[D]):
    """One versioned document type: its model, its schema id and the committed schema's file."""
    model: type[D]
    schema_id: str
    schema_file: str

    @property
    def schema_path(self) -> Path:
        return SCHEMA_DIR / self.schema_file

    def generated_schema(self) -> dict:
        schema = self.model.model_json_schema(by_alias=True)
        schema["$id"] = self.schema_id
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        return schema

    def committed_schema(self) -> dict:
        return json.loads(self.schema_path.read_text())

    def check(self, doc: object, source: str) -> None:
        """Raise naming the source and the JSON path of every violation of the committed schema."""
        errors = sorted(Draft202012Validator(self.committed_schema()).iter_errors(doc),
                        key=lambda e: list(e.absolute_path))
        if errors:
            lines = [f"{source}: {e.json_path}: {e.message[:200]}" for e in errors[:20]]
            raise DgxReadyError(f"{source} does not match {self.schema_file}:\n" + "\n".join(lines))

    def load(self, path: Path) -> D:
        try:
            doc = json.loads(path.read_text())
        except OSError as exc:
            raise DgxReadyError(f"{path}: cannot read: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise DgxReadyError(f"{path}: not JSON (truncated?): {exc}") from None
        self.check(doc, str(path))
        try:
            return self.model.model_validate(doc)
        except ValidationError as exc:
            raise DgxReadyError(format_validation_error(str(path), exc)) from None

    def dump(self, document: D) -> dict:
        doc = json.loads(document.model_dump_json(by_alias=True))
        self.check(doc, f"new {self.schema_file.split('-v')[0]} document")
        return doc

    def write(self, document: D, path: Path) -> Path:
        atomic_write_text(path, json.dumps(self.dump(document), indent=2) + "\n")
        return path

    def write_schema(self) -> Path:
        SCHEMA_DIR.mkdir(exist_ok=True)
        text = json.dumps(self.generated_schema(), indent=2, sort_keys=True) + "\n"
        atomic_write_text(self.schema_path, text)
        return self.schema_path
