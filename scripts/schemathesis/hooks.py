"""Schemathesis hooks for scripts/check-api: the credentials of each case.

Routes that take a user get an identity token (HS256 with the run's TALLY_JWT_SECRET); admin
routes an admin's token or the run's admin API key, in turn; routes that also take an API key
get the run's API key (all scopes) every other case. A destructive case (`DELETE /v1/me`) gets
a user of its own, made for it, so it never deletes the user the other cases use.
"""

import base64
import hashlib
import hmac
import itertools
import json
import os
import time
import uuid

import schemathesis

SECRET = os.environ["TALLY_JWT_SECRET"]
API_KEY = os.environ["CHECK_API_KEY"]
ADMIN_SUBJECT = os.environ["CHECK_ADMIN_SUBJECT"]
USER_SUBJECT = "st-user"
_turn = itertools.count()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def identity_token(subject: str) -> str:
    """An identity token of `subject`, as the app's identity provider would sign it."""
    now = int(time.time())
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = _b64(json.dumps({"sub": subject, "email": f"{subject}@example.com", "email_verified": True,
                              "iat": now, "exp": now + 3600}).encode())
    signature = hmac.new(SECRET.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{_b64(signature)}"


def _schemes(operation) -> set:
    security = operation.definition.raw.get("security") or []
    return {name for requirement in security for name in requirement}


@schemathesis.auth(refresh_interval=None)
class Credentials:
    """Chooses the bearer credential of each case."""

    def get(self, case, context):
        schemes = _schemes(context.operation)
        if not schemes:
            return None
        path, method = context.operation.path, context.operation.method.upper()
        if method == "DELETE" and path == "/v1/me":
            return identity_token(f"st-deleted-{uuid.uuid4()}")
        turn = next(_turn)
        if path.startswith("/v1/admin/"):
            return API_KEY if turn % 2 else identity_token(ADMIN_SUBJECT)
        if "api_key" in schemes and turn % 2:
            return API_KEY
        return identity_token(USER_SUBJECT)

    def set(self, case, data, context):
        if data is None:
            return
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"
