from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from dgxready.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def format_validation_error(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {field_path(err['loc']) or '<root>'}: {msg}")
    return "\n".join(lines)


def read_yaml(path: Path) -> object:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def load_yaml(path: Path, model: type[M]) -> M:
    """Parse `path` and validate it as `model`; errors read `file: a.b[0].c: reason`."""
    data = read_yaml(path)
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path.name, exc)) from None
