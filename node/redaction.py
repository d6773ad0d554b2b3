"""Secrets recognised by their names, and hidden wherever the node prints values.

A list of known secret keys misses the ones the node does not define itself: the
environment an operator hands apptainer (``APPTAINER_DOCKER_PASSWORD``), a plugin's
settings, a header in a log line. So a name is taken for a secret by its shape: it
contains ``password``, ``passphrase``, ``secret``, ``token`` or ``credential``, or one of
its words (split at ``_``, ``-``, ``.`` and spaces) is ``key``, ``apikey``, ``auth``,
``pass`` or ``pwd``. A few names that match but hold no secret are shown as they are
(``private_key`` is the key file's path, ``image_pull_secrets`` names Kubernetes
Secrets). Passwords written into URIs (``postgresql://me:pw@db``) are hidden too.

:func:`redact` is used by ``fednode config check`` (via :mod:`node.settings`);
:func:`redact_event` is a structlog processor, so no log line carries such a value.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

REDACTED = "***"

_SECRET_PARTS = ("password", "passphrase", "secret", "token", "credential")
_SECRET_WORDS = frozenset({"key", "apikey", "auth", "pass", "pwd", "passwd"})
#: Names that look like secrets but are not: shown as they are.
NOT_SECRET = frozenset({"private_key", "image_pull_secrets"})
_WORDS = re.compile(r"[_\-.\s]+")
_URI_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+:)[^@\s]+@")


def is_secret_name(name: object) -> bool:
    """Whether a key, setting, variable or header of this name holds a secret."""
    if not isinstance(name, str):
        return False
    verdict = _verdicts.get(name)
    if verdict is None:
        verdict = _judge(name)
        if len(_verdicts) < _MAX_VERDICTS:  # log keys are few and repeat: judged once each
            _verdicts[name] = verdict
    return verdict


_verdicts: dict[str, bool] = {}
_MAX_VERDICTS = 4096


def _judge(name: str) -> bool:
    lowered = name.lower()
    if lowered in NOT_SECRET:
        return False
    if any(part in lowered for part in _SECRET_PARTS):
        return True
    return any(word in _SECRET_WORDS for word in _WORDS.split(lowered))


def redact(value: Any) -> Any:
    """``value`` (plain data) with secret-named entries and URI passwords replaced."""
    if isinstance(value, dict):
        return {
            k: (REDACTED if is_secret_name(k) and v is not None else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, str):
        if "://" not in value or "@" not in value:
            return value
        return _URI_PASSWORD.sub(rf"\g<head>{REDACTED}@", value)
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def redact_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: hide secret-named keys and URI passwords in an event."""
    for key, value in event.items():
        if value is None or key == "event":
            continue
        if is_secret_name(key):
            event[key] = REDACTED
        elif isinstance(value, str):
            if "@" in value and "://" in value:
                event[key] = _URI_PASSWORD.sub(rf"\g<head>{REDACTED}@", value)
        elif isinstance(value, dict | list | tuple):
            event[key] = redact(value)
    return event
