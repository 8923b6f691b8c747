"""Per-call context (request id, principal, deadline) carried in context variables."""

import contextvars
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    """Who is calling: a subject and the tenant whose data it may see."""

    subject: str
    tenant: str


ANONYMOUS = Principal(subject="anonymous", tenant="default")

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
