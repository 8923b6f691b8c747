"""Resolves the `authorization` metadata of a call to a principal (API keys and JWT)."""

import hmac

import jwt

from services.common.context import ANONYMOUS, Principal, current_principal, parse_principal
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.settings import ServiceSettings


class Authenticator:
    """Accepts `Bearer <api key>` or `Bearer <JWT>`; off only when no credentials are set.

    Configured credentials are always enforced: `auth_disabled` only allows an open
    service beyond loopback, it never switches configured keys off.
    """

    def __init__(self, settings: ServiceSettings) -> None:
        self.enabled = settings.auth_configured
        self._api_keys = {key: parse_principal(value) for key, value in settings.api_keys.items()}
        self._jwt_key = settings.jwt_key
        self._jwt_algorithms = settings.jwt_algorithms
        self._jwt_audience = settings.jwt_audience or None
        self._tenant_claim = settings.jwt_tenant_claim

    def authenticate(self, authorization: str) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            raise Unauthenticated(
                "missing credentials: send metadata 'authorization: Bearer <key or token>'",
                reason="CREDENTIALS_MISSING",
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "authorization must be 'Bearer <key or token>'", reason="CREDENTIALS_MALFORMED"
            )
        token = token.strip()
        for key, principal in self._api_keys.items():
            if hmac.compare_digest(key.encode(), token.encode()):
                return principal
        if self._jwt_key and token.count(".") == 2:
            return self._verify_jwt(token)
        raise Unauthenticated("invalid credentials", reason="CREDENTIALS_INVALID")

    def _verify_jwt(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._jwt_key,
                algorithms=self._jwt_algorithms,
                audience=self._jwt_audience,
                options={"require": ["sub", "exp"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid token: {exc}", reason="CREDENTIALS_INVALID") from exc
        tenant = claims.get(self._tenant_claim)
        if not isinstance(tenant, str) or not tenant.strip():
            raise Unauthenticated(
                f"token has no tenant: claim {self._tenant_claim!r} must name the tenant",
                reason="TENANT_MISSING",
                metadata={"claim": self._tenant_claim},
            )
        return Principal(
            subject=str(claims["sub"]), tenant=tenant.strip(), scopes=_token_scopes(claims)
        )


def _token_scopes(claims: dict) -> frozenset[str]:
    """Scopes from `scope` (OAuth 2.0: space-separated) and/or `scopes` (a list)."""
    scopes: set[str] = set()
    scope = claims.get("scope")
    if isinstance(scope, str):
        scopes.update(scope.split())
    listed = claims.get("scopes")
    if isinstance(listed, str):
        scopes.update(listed.split())
    elif isinstance(listed, list):
        scopes.update(str(item) for item in listed if str(item).strip())
    return frozenset(scopes)


def require_scope(scope: str) -> Principal:
    """The current caller, if it holds scope; PERMISSION_DENIED naming the scope otherwise."""
    principal = current_principal()
    if scope not in principal.scopes:
        raise PermissionDenied(
            f"this call needs the scope {scope!r}, which {principal.subject!r} does not have",
            reason="SCOPE_REQUIRED",
            metadata={"scope": scope},
        )
    return principal
