"""Settings every service shares; each service subclasses with its own env prefix."""

import difflib
import ipaddress
from collections.abc import Mapping
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.context import parse_principal


class ServiceSettings(BaseSettings):
    """Read from `RAGMESH_<SERVICE>_*` environment variables, validated at start.

    List and dict values are given as JSON, for example
    `RAGMESH_INGEST_API_KEYS='{"secret-key": "alice:acme"}'`.
    """

    model_config = SettingsConfigDict(extra="ignore", validate_default=True)

    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    # Where the service keeps its files (databases, blobs, local Qdrant).
    data_dir: Path = Path("var")
    log_level: str = "INFO"
    log_json: bool = False
    # Seconds in-flight calls get to finish after SIGTERM before they are cancelled.
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    # API key -> "subject:tenant" or "subject:tenant:scope,scope" (the scope "admin" may
    # load models and change global settings). A value without a tenant is refused.
    api_keys: dict[str, str] = Field(default_factory=dict)
    # HS256 secret, or a PEM public key for RS256/ES256, to verify JWT bearer tokens.
    jwt_key: str = ""
    jwt_algorithms: list[str] = Field(default_factory=lambda: ["HS256"])
    jwt_audience: str = ""
    # Claim holding the tenant; the subject comes from "sub".
    jwt_tenant_claim: str = "tenant"
    # Must be set to listen beyond loopback without credentials configured. It never
    # switches configured credentials off.
    auth_disabled: bool = False
    # OTLP/gRPC endpoint for traces, for example http://otel-collector:4317.
    otlp_endpoint: str = ""
    # Largest message the server accepts or sends, bytes.
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # Calls one caller (subject and tenant) may have in flight on this server, streams
    # counted while open; past it RESOURCE_EXHAUSTED. 0: no limit. 64 is far above what a
    # client does (a chat stream, a few uploads, watches and searches) and what the
    # mesh's load test opens per key, yet stops one runaway client from holding every
    # handler. Health, reflection, metrics and the mesh's own calls are not limited.
    max_calls_per_caller: int = Field(default=64, ge=0)

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {value!r}")
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_name_a_tenant(cls, value: dict[str, str]) -> dict[str, str]:
        for key, principal in value.items():
            if not key.strip():
                raise ValueError("an API key must not be empty")
            parse_principal(principal)
        return value

    @classmethod
    def env_name(cls, field_name: str) -> str:
        """The environment variable of a setting: RAGMESH_INGEST_PORT for ingest's port."""
        return f"{cls.model_config.get('env_prefix', '')}{field_name}".upper()

    @classmethod
    def unknown_variables(cls, environ: Mapping[str, str]) -> list[str]:
        """The variables under the service's prefix that name none of its settings, each
        with the one it most looks like: pydantic-settings would ignore a misspelt
        setting in silence. A setting read from another name (an alias, such as
        telemetry's NODE_NAME) is not known by its prefixed name, and points there."""
        prefix = cls.model_config.get("env_prefix", "")
        if not prefix:
            return []
        # The part after the prefix of each setting -> the variable it is read from.
        settings = {
            name.upper(): _read_from(cls, name, field) for name, field in cls.model_fields.items()
        }
        unknown = []
        for variable in sorted(environ):
            upper = variable.upper()
            setting = upper.removeprefix(prefix)
            if not upper.startswith(prefix) or settings.get(setting) == upper:
                continue
            close = difflib.get_close_matches(setting, settings, n=1, cutoff=0.75)
            unknown.append(
                f"{variable} (did you mean {settings[close[0]]}?)" if close else variable
            )
        return unknown

    @classmethod
    def service_name(cls) -> str:
        """The service's short name, from its prefix: RAGMESH_INGEST_ gives "ingest"."""
        prefix = cls.model_config.get("env_prefix", "")
        return prefix.removeprefix("RAGMESH_").strip("_").lower() or "service"

    @property
    def auth_configured(self) -> bool:
        return bool(self.api_keys or self.jwt_key)

    @property
    def loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

    def check_exposure(self) -> None:
        """Refuses to expose an unauthenticated service beyond loopback."""
        if not self.loopback_only and not self.auth_configured and not self.auth_disabled:
            raise ValueError(
                f"refusing to listen on {self.host} without credentials: set api_keys or "
                "jwt_key, or set auth_disabled=true to run an open service on purpose"
            )


def _read_from(settings_class: type[ServiceSettings], name: str, field: FieldInfo) -> str:
    """The environment variable a setting is read from: its prefixed name, or its alias."""
    alias = field.validation_alias
    if alias is None:
        return settings_class.env_name(name)
    if isinstance(alias, AliasChoices):
        alias = alias.choices[0]
    return str(alias).upper()
