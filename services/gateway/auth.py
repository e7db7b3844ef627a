"""Tenants and API keys.

`LLMMESH_GATEWAY_TENANTS_FILE` names a YAML (or JSON) file:

```yaml
tenants:
  - name: acme                 # sent to the orchestrator's Admit as `tenant` (fair queuing)
    priority: interactive      # interactive | standard | batch: every request of the tenant
    requests_per_minute: 600   # optional; no limit when absent
    tokens_per_minute: 200000  # optional; prompt + completion tokens
    max_concurrent_requests: 64  # optional; generations open at once, per gateway process
    api_keys_sha256:           # sha256 hex digests of the keys: printf %s "$KEY" | sha256sum
      - 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
```

Clients send `Authorization: Bearer <key>` (HTTP header, or gRPC metadata `authorization`).
The key is hashed and compared with every stored digest using `hmac.compare_digest` (all of
them, no early exit). A missing or unknown key is 401 / UNAUTHENTICATED.

Without a tenants file, authentication is off: every request is served, the tenant is the
OpenAI `user` field (a hint) or empty, priority is the request's own, and no rate limits apply.

Rate limits hold per gateway process, or across every gateway with `limits_redis_url`
(limits_redis.py; `Authenticator.from_settings` wires it). `max_concurrent_requests` is per
gateway process.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmmesh.common.errors import Unauthenticated
from llmmesh.common.topology import Priority
from services.gateway.limits import Clock, TenantLimits
from services.gateway.limits_redis import RedisLimiter
from services.gateway.settings import GatewaySettings

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_CREDENTIAL_CHARS = 4096


class PriorityClass(enum.Enum):
    """The tenants file's priority vocabulary; `priority` is what admission uses."""

    INTERACTIVE = "interactive"
    STANDARD = "standard"
    BATCH = "batch"

    @property
    def priority(self) -> Priority:
        return _PRIORITY_OF_CLASS[self]


_PRIORITY_OF_CLASS: Final = {
    PriorityClass.INTERACTIVE: Priority.INTERACTIVE,
    PriorityClass.STANDARD: Priority.STANDARD,
    PriorityClass.BATCH: Priority.BATCH,
}


class TenantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128, description="Tenant name (fair queuing key).")
    priority: PriorityClass = Field(
        default=PriorityClass.STANDARD, description="Priority class of every request."
    )
    requests_per_minute: int | None = Field(default=None, gt=0, description="Requests/min.")
    tokens_per_minute: int | None = Field(
        default=None, gt=0, description="Prompt + completion tokens per minute."
    )
    max_concurrent_requests: int | None = Field(
        default=None, gt=0, description="Generations open at once, per gateway process."
    )
    api_keys_sha256: list[str] = Field(
        min_length=1, description="sha256 hex digests of the tenant's API keys."
    )

    @field_validator("api_keys_sha256")
    @classmethod
    def _digests(cls, value: list[str]) -> list[str]:
        out = [v.strip().lower() for v in value]
        bad = [v for v in out if not _HEX64.match(v)]
        if bad:
            raise ValueError(f"not a sha256 hex digest: {bad[0][:16]!r}...")
        return out


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenants: list[TenantConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> TenantsFile:
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique")
        digests = [d for t in self.tenants for d in t.api_keys_sha256]
        if len(set(digests)) != len(digests):
            raise ValueError("an API key digest is listed twice")
        return self


@dataclass(frozen=True, eq=False)
class Tenant:
    name: str
    priority: PriorityClass
    limits: TenantLimits


def _load(path: Path) -> TenantsFile:
    text = path.read_text(encoding="utf-8")
    data: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return TenantsFile.model_validate(data)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def bearer_token(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (None when absent or not Bearer)."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class Authenticator:
    def __init__(
        self,
        config: TenantsFile,
        clock: Clock = time.monotonic,
        *,
        shared: RedisLimiter | None = None,
        share: int = 1,
        retry_after_bounds: tuple[float, float] = (0.2, 10.0),
    ):
        """`shared`: rate limits held across gateways (the local buckets keep 1/`share` of
        each limit as the fallback)."""
        self._entries: list[tuple[bytes, Tenant]] = []
        self.tenants: dict[str, Tenant] = {}
        self.shared = shared
        for t in config.tenants:
            rated = t.requests_per_minute is not None or t.tokens_per_minute is not None
            tenant = Tenant(
                t.name,
                t.priority,
                TenantLimits(
                    t.name,
                    t.requests_per_minute,
                    t.tokens_per_minute,
                    clock,
                    max_concurrent=t.max_concurrent_requests,
                    shared=(
                        shared.quota(t.name, t.requests_per_minute, t.tokens_per_minute)
                        if shared is not None and rated
                        else None
                    ),
                    share=share if shared is not None else 1,
                    retry_after_bounds=retry_after_bounds,
                ),
            )
            self.tenants[t.name] = tenant
            self._entries.extend((bytes.fromhex(d), tenant) for d in t.api_keys_sha256)

    @classmethod
    def from_file(cls, path: Path, clock: Clock = time.monotonic) -> Authenticator:
        return cls(_load(path), clock)

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Authenticator | None:
        """The tenants file's authenticator with the limits the settings ask for (shared in
        Redis with `limits_redis_url`); None without a tenants file."""
        if settings.tenants_file is None:
            return None
        shared = (
            None
            if settings.limits_redis_url is None
            else RedisLimiter.from_url(
                settings.limits_redis_url,
                timeout_s=settings.limits_redis_timeout_s,
                retry_s=settings.limits_redis_retry_s,
                flush_s=settings.limits_redis_flush_s,
                max_connections=settings.redis_max_connections,
            )
        )
        return cls(
            _load(settings.tenants_file),
            shared=shared,
            share=settings.limits_gateways,
            retry_after_bounds=(
                settings.overload_retry_after_min_s,
                settings.overload_retry_after_max_s,
            ),
        )

    async def close(self) -> None:
        """Write the shared limiter's queued charges and close its connection."""
        if self.shared is not None:
            await self.shared.close()

    def authenticate(self, api_key: str | None) -> Tenant:
        if not api_key:
            raise Unauthenticated("an API key is required (Authorization: Bearer <key>)")
        if len(api_key) > MAX_CREDENTIAL_CHARS:
            raise Unauthenticated("invalid API key")
        digest = hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).digest()
        found: Tenant | None = None
        for stored, tenant in self._entries:
            if hmac.compare_digest(stored, digest) and found is None:
                found = tenant
        if found is None:
            raise Unauthenticated("invalid API key")
        return found
