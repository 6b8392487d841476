"""Bearer-token authorization of the kvfabric.v1 API: the one place the rules live.

Tokens come from ``auth_token`` (may access every namespace) and from
``auth_tokens_file``, a JSON object mapping each token to a list of
namespaces or to ``"*"``. Auth is on as soon as either is set (an empty tokens
file still turns it on: a typo must not open the store). Then:

* a mutating call (Put, Move, Pin, Unpin, Evict, Prefetch, Annotate, Hint)
  needs metadata ``authorization: Bearer <token>``, else UNAUTHENTICATED;
* a read (Lookup, Get, Stats, WatchEvents) needs it only with ``auth_reads``;
  a read that presents a token anyway has it checked like a mutation;
* a valid token used on a namespace it may not access gets PERMISSION_DENIED.

Tokens are kept only as SHA-256 digests and compared with
:func:`hmac.compare_digest` against every configured digest (equal lengths,
no early exit), so neither a token's bytes nor its length leak through timing.
No token is ever logged or put in an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kvfabric.config import KVFabricConfig
from kvfabric.errors import ConfigError, KVFabricError, PermissionDenied, Unauthenticated
from kvfabric.types import validate_namespace

log = logging.getLogger(__name__)

ALL = "*"
METADATA_KEY = "authorization"
_SCHEME = "bearer "
_MAX_TOKEN_CHARS = 4096


@dataclass(frozen=True, slots=True)
class Grant:
    """What one caller may touch: ``namespaces`` None means every namespace."""

    namespaces: frozenset[str] | None = None

    def allows(self, namespace: str) -> bool:
        """True when this caller may access ``namespace``."""
        return self.namespaces is None or namespace in self.namespaces

    def require(self, namespace: str) -> None:
        """PermissionDenied unless this caller may access ``namespace``."""
        if not self.allows(namespace):
            raise PermissionDenied(
                f"the bearer token may not access namespace {namespace!r}", "namespace"
            )


OPEN = Grant()
"""The grant of every caller when auth is off, and of anonymous reads without auth_reads."""


def _digest(token: str | bytes) -> bytes:
    raw = token.encode("utf-8") if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


def _check_token(token: Any, where: str) -> str:
    if not isinstance(token, str) or not 0 < len(token) <= _MAX_TOKEN_CHARS:
        raise ConfigError(f"{where}: a token must be a non-empty string", "auth_tokens_file")
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ConfigError(
            f"{where}: a token must be printable ASCII without spaces", "auth_tokens_file"
        )
    return token


def parse_tokens(data: Any) -> dict[str, frozenset[str] | None]:
    """Token → namespaces (None: all) from the decoded JSON of a tokens file."""
    if not isinstance(data, dict):
        raise ConfigError(
            'auth_tokens_file must hold a JSON object: token -> list of namespaces or "*"',
            "auth_tokens_file",
        )
    out: dict[str, frozenset[str] | None] = {}
    for n, (token, spaces) in enumerate(data.items(), start=1):
        where = f"auth_tokens_file entry #{n}"
        _check_token(token, where)
        if spaces == ALL:
            out[token] = None
            continue
        if not isinstance(spaces, list) or not all(isinstance(s, str) for s in spaces):
            raise ConfigError(
                f'{where}: the value must be a list of namespaces or "*"', "auth_tokens_file"
            )
        if ALL in spaces:
            out[token] = None
            continue
        try:
            out[token] = frozenset(validate_namespace(s) for s in spaces)
        except KVFabricError as exc:
            raise ConfigError(f"{where}: {exc.message}", "auth_tokens_file") from None
    return out


def load_tokens(config: KVFabricConfig) -> dict[str, frozenset[str] | None]:
    """Every configured token with the namespaces it may access."""
    tokens: dict[str, frozenset[str] | None] = {}
    if config.auth_tokens_file:
        try:
            with open(config.auth_tokens_file, encoding="utf-8") as fh:
                data = json.load(fh)
        except OSError as exc:
            raise ConfigError(
                f"cannot read auth_tokens_file {config.auth_tokens_file}: {exc.strerror}",
                "auth_tokens_file",
            ) from None
        except (ValueError, UnicodeDecodeError) as exc:
            # The decoder's message can quote the file's text, which holds tokens: leave it out.
            raise ConfigError(
                f"auth_tokens_file {config.auth_tokens_file} is not valid JSON "
                f"({type(exc).__name__})",
                "auth_tokens_file",
            ) from None
        tokens.update(parse_tokens(data))
    if config.auth_token:
        tokens[_check_token(config.auth_token, "auth_token")] = None
    return tokens


class Authorizer:
    """Decides, for one call's metadata, whether it may run and on which namespaces."""

    def __init__(
        self,
        tokens: Mapping[str, frozenset[str] | None],
        *,
        enabled: bool,
        auth_reads: bool = False,
    ) -> None:
        merged: dict[bytes, frozenset[str] | None] = {}
        for token, spaces in tokens.items():
            d = _digest(token)
            old = merged.get(d, frozenset())
            merged[d] = None if spaces is None or old is None else old | spaces
        self._table = list(merged.items())
        self.enabled = enabled
        self.auth_reads = auth_reads

    @classmethod
    def from_config(cls, config: KVFabricConfig) -> Authorizer:
        """The authorizer ``config`` describes (ConfigError for a bad tokens file)."""
        tokens = load_tokens(config)
        enabled = bool(config.auth_token or config.auth_tokens_file)
        if enabled:
            log.info("gRPC auth on: %d tokens, auth_reads=%s", len(tokens), config.auth_reads)
        return cls(tokens, enabled=enabled, auth_reads=config.auth_reads)

    def authorize(self, metadata: Iterable[Any] | None, *, mutating: bool) -> Grant:
        """The caller's grant; Unauthenticated when a needed token is missing or wrong."""
        if not self.enabled:
            return OPEN
        presented = _bearer(metadata)
        if presented is None:
            if mutating or self.auth_reads:
                raise Unauthenticated(
                    "this call needs metadata 'authorization: Bearer <token>'", METADATA_KEY
                )
            return OPEN
        return self._match(presented)

    def _match(self, presented: bytes) -> Grant:
        digest = _digest(presented)
        found = False
        spaces: frozenset[str] | None = frozenset()
        for known, allowed in self._table:  # no early exit: every digest is compared
            if hmac.compare_digest(digest, known):
                found, spaces = True, allowed
        if not found:
            raise Unauthenticated("the bearer token is not valid", METADATA_KEY)
        return Grant(spaces)


def _bearer(metadata: Iterable[Any] | None) -> bytes | None:
    """The token of the ``authorization`` metadata, None when absent; malformed → error."""
    values = [m[1] for m in metadata or () if str(m[0]).lower() == METADATA_KEY]
    if not values:
        return None
    if len(values) > 1:
        raise Unauthenticated("more than one 'authorization' metadata entry", METADATA_KEY)
    value = values[0]
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    if len(text) > len(_SCHEME) + _MAX_TOKEN_CHARS or text[: len(_SCHEME)].lower() != _SCHEME:
        raise Unauthenticated("'authorization' metadata must be 'Bearer <token>'", METADATA_KEY)
    token = text[len(_SCHEME) :].strip()
    if not token:
        raise Unauthenticated("'authorization' metadata carries an empty token", METADATA_KEY)
    return token.encode("utf-8", errors="replace")
