"""Settings shared across services. Each service defines its own `BaseSettings` subclass with its
own env prefix; these are the pieces they have in common. Built once in `main`, then injected.

A process that starts another one configures it through a settings object of the child's class
and `to_env`, never by spelling variable names (pydantic-settings ignores a misspelt one);
`split_env` and `with_env` apply variables written by hand, refusing names that are no field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from llmmesh.kvblocks import BlockConfig

S = TypeVar("S", bound=BaseSettings)

#: Every llmmesh settings class's env prefix starts with this.
ENV_ROOT: Final = "LLMMESH_"


class KvBlockSettings(BaseSettings):
    """KV block identity. One setting for engines and registry: a mismatch routes wrong."""

    model_config = SettingsConfigDict(env_prefix="LLMMESH_KV_", extra="ignore")

    block_size: int = Field(
        default=32,
        gt=0,
        description="Tokens per KV block (TensorRT-LLM `tokens_per_block`).",
    )
    hash_seed: int = Field(default=0, ge=0, lt=2**64, description="Seed of the chained block hash.")

    def block_config(self) -> BlockConfig:
        return BlockConfig(block_size=self.block_size, hash_seed=self.hash_seed)


class ServiceSettings(BaseSettings):
    """Fields every gRPC service has. Subclasses set `env_prefix` and declare their own
    `grpc_port` and `metrics_port` (the defaults differ per service, see docs/conventions.md)."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = Field(
        default="127.0.0.1", description="Interface the gRPC and metrics servers bind."
    )
    drain_seconds: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight RPCs may take to finish."
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/gRPC endpoint for traces (e.g. http://jaeger:4317); tracing export is off when unset.",
    )
    trace_sample_ratio: float = Field(
        default=1.0, ge=0, le=1, description="Head sampling ratio for new root traces."
    )
    log_level: str = Field(default="INFO", description="Python logging level.")
    log_json: bool = Field(default=True, description="Emit one JSON object per log line.")
    ready_file: Path | None = Field(
        default=None,
        description="If set, the bound ports are written here as JSON once serving (for port 0).",
    )


def env_prefix(cls: type[BaseSettings]) -> str:
    """The prefix of the variables `cls` reads (its `model_config`), upper case."""
    return str(cls.model_config.get("env_prefix") or "").upper()


def settings_of(cls: type[S], **fields: Any) -> S:
    """`cls` with `fields` set and validated, reading nothing from this process's environment
    (what another process will be given, not what this one has). Unlike the constructor, a name
    that is no field of `cls` is a ValueError, not ignored."""
    unknown = sorted(set(fields) - set(cls.model_fields))
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}")
    return cls.model_validate(fields)


def to_env(settings: BaseSettings) -> dict[str, str]:
    """Variables under which `type(settings)()` equals `settings`: one per field that was set
    explicitly or differs from its default (the rest are the child's own defaults). Models,
    lists and dicts as JSON, as pydantic-settings decodes them; scalars as text. A None where the
    default is not None has no spelling in the environment and is refused."""
    cls = type(settings)
    prefix = env_prefix(cls)
    dumped = settings.model_dump(mode="json")
    out: dict[str, str] = {}
    for name, field in cls.model_fields.items():
        value = getattr(settings, name)
        default = field.get_default(call_default_factory=True)
        if name not in settings.model_fields_set and value == default:
            continue
        text = dumped[name]
        if text is None:
            if default is None:
                continue
            raise ValueError(f"{cls.__name__}.{name}: None cannot be set through the environment")
        if isinstance(text, str):
            out[f"{prefix}{name.upper()}"] = text
        else:
            out[f"{prefix}{name.upper()}"] = json.dumps(text, separators=(",", ":"))
    return out


def split_env(
    env: Mapping[str, str], classes: Iterable[type[BaseSettings]]
) -> tuple[dict[type[BaseSettings], dict[str, str]], dict[str, str]]:
    """`env` by the class whose prefix each variable starts with (the longest: `LLMMESH_KV_`
    and `LLMMESH_KV_REGISTRY_` both match a registry variable), and the variables under none.
    Raises ValueError for a variable under a prefix that names none of that class's fields."""
    by_prefix = sorted(((env_prefix(c), c) for c in classes), key=lambda pc: -len(pc[0]))
    owned: dict[type[BaseSettings], dict[str, str]] = {}
    rest: dict[str, str] = {}
    for key, value in env.items():
        for prefix, cls in by_prefix:
            if prefix and key.upper().startswith(prefix):
                name = key[len(prefix) :].lower()
                if name not in cls.model_fields:
                    raise ValueError(
                        f"{key}: {cls.__name__} has no field {name!r} (known: "
                        f"{', '.join(sorted(cls.model_fields))})"
                    )
                owned.setdefault(cls, {})[key] = value
                break
        else:
            rest[key] = value
    return owned, rest


def with_env(settings: S, env: Mapping[str, str]) -> S:
    """`settings` with the fields that `env` sets for its class replaced, decoded as
    pydantic-settings decodes them and validated. Variables under other prefixes are ignored;
    one under this class's prefix that names no field is a ValueError."""
    cls = type(settings)
    owned, _ = split_env(env, [cls])
    mine = owned.get(cls, {})
    if not mine:
        return settings
    source = EnvSettingsSource(cls)
    source.env_vars = {k if source.case_sensitive else k.lower(): v for k, v in mine.items()}
    updates: dict[str, Any] = source()
    current = {name: getattr(settings, name) for name in settings.model_fields_set}
    return cls.model_validate({**current, **updates})
