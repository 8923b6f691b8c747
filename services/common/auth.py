"""Resolves the `authorization` metadata of a call to a principal (API keys and JWT)."""

import hmac

import jwt

from services.common.context import ANONYMOUS, Principal
from services.common.errors import Unauthenticated
from services.common.settings import ServiceSettings


class Authenticator:
    """Accepts `Bearer <api key>` or `Bearer <JWT>`; off when no credentials are set."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.enabled = settings.auth_configured and not settings.auth_disabled
        self._api_keys = {key: _parse_principal(value) for key, value in settings.api_keys.items()}
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
        return Principal(
            subject=str(claims["sub"]), tenant=str(claims.get(self._tenant_claim) or "default")
        )


def _parse_principal(value: str) -> Principal:
    subject, _, tenant = value.partition(":")
    return Principal(subject=subject or "api-key", tenant=tenant or "default")
