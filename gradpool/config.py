"""Settings loading shared by every role: flags > GRADPOOL_* environment > TOML file > defaults."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, TypeVar

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, TomlConfigSettingsSource

S = TypeVar("S", bound=BaseSettings)


class ConfigError(Exception):
    """A configuration a person must fix; the CLI prints it on one line."""


def load_settings(cls: type[S], toml_path: Path | None, overrides: dict[str, Any]) -> S:
    if toml_path is not None and not toml_path.is_file():
        raise ConfigError(f"config file {toml_path} does not exist")

    class Loaded(cls):  # type: ignore[misc,valid-type]
        @classmethod
        def settings_customise_sources(
            cls_,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if toml_path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
            return tuple(sources)

    Loaded.__name__ = cls.__name__
    try:
        return Loaded(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as e:  # pydantic ValidationError or a TOML syntax error
        raise ConfigError(_one_line(e, toml_path)) from None


def _one_line(e: Exception, toml_path: Path | None) -> str:
    where = f" in {toml_path}" if toml_path else ""
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        more = f" (and {len(errors()) - 1} more)" if len(errors()) > 1 else ""
        return f"invalid setting {loc}{where}: {first.get('msg')}{more}"
    return f"cannot read config{where}: {e}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure logging once, at the entry point: plain lines for people, or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
