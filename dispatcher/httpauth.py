"""The API's bearer token: read from `api.token_file`, checked in constant time.

The token never reaches a log line or an error message.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from pathlib import Path

from dispatcher.errors import ConfigError

MIN_TOKEN_LENGTH = 16


def read_token(path: Path) -> str:
    """The token in `path` (surrounding whitespace dropped); `ConfigError` if unusable."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"api.token_file {path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"api.token_file {path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"api.token_file {path}: not UTF-8 text") from None
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"api.token_file {path}: the token must be at least {MIN_TOKEN_LENGTH} characters"
        )
    if any(ch.isspace() for ch in token):
        raise ConfigError(f"api.token_file {path}: the token must not contain whitespace")
    return token


def presented_token(authorization: str | None) -> str | None:
    """The token an `Authorization` header carries: `Bearer TOKEN`, or Basic with
    TOKEN as the password (so a browser's login prompt can open the status page)."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return value.strip()
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


def token_matches(authorization: str | None, token: str) -> bool:
    """Whether the header carries `token`, compared in constant time."""
    presented = presented_token(authorization)
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), token.encode("utf-8"))
