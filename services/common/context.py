"""Per-call context (request id, principal, deadline) carried in context variables."""

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

# The scope that lets a principal change a service for every tenant (load or unload a
# model, change global settings).
ADMIN_SCOPE = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a subject, the tenant whose data it may see, and its scopes."""

    subject: str
    tenant: str
    scopes: frozenset[str] = field(default_factory=frozenset)


# The caller when authentication is off (loopback, no credentials configured): the
# machine's own user, who may do everything.
ANONYMOUS = Principal(subject="anonymous", tenant="default", scopes=frozenset({ADMIN_SCOPE}))
# Work a service does on its own behalf (background jobs), outside any call.
SERVICE = Principal(subject="service", tenant="", scopes=frozenset())


def parse_principal(value: str) -> Principal:
    """Parses an API key's `"<subject>:<tenant>[:<scope>[,<scope>...]]"`.

    Raises ValueError when the subject or tenant is missing: a key that would land its
    holder in the tenant of anonymous callers is refused at start.
    """
    parts = value.split(":")
    if len(parts) not in (2, 3) or not parts[0].strip() or not parts[1].strip():
        raise ValueError(
            f"API key value {value!r} must be '<subject>:<tenant>' or "
            "'<subject>:<tenant>:<scope>[,<scope>...]'"
        )
    listed = parts[2].split(",") if len(parts) == 3 else []
    scopes = frozenset(s.strip() for s in listed if s.strip())
    return Principal(subject=parts[0].strip(), tenant=parts[1].strip(), scopes=scopes)


request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
principal_var: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "principal", default=ANONYMOUS
)
# The incoming call's authorization header, forwarded to upstream services.
authorization_var: contextvars.ContextVar[str] = contextvars.ContextVar("authorization", default="")
# Monotonic time by which the incoming call must be answered; None without a deadline.
deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "deadline", default=None
)


def current_principal() -> Principal:
    return principal_var.get()


def current_tenant() -> str:
    return principal_var.get().tenant


def current_request_id() -> str:
    return request_id_var.get()


def time_remaining() -> float | None:
    """Seconds left before the incoming call's deadline, or None without one."""
    deadline = deadline_var.get()
    return None if deadline is None else deadline - time.monotonic()


@contextlib.contextmanager
def background(request_id: str = "") -> Iterator[None]:
    """Runs the enclosed code as the service itself, not as any caller.

    Tasks inherit the context of the call that created them; background work (ingest's
    jobs, sessions' memory indexing) must not carry a caller's credentials, deadline or
    tenant. Upstream calls made inside send the service's own credentials instead.
    """
    tokens = [
        (authorization_var, authorization_var.set("")),
        (principal_var, principal_var.set(SERVICE)),
        (deadline_var, deadline_var.set(None)),
        (request_id_var, request_id_var.set(request_id)),
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)
