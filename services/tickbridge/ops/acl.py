"""Render the committed Redis ACL templates: the compose init container (`tickbridge.ops.secrets_init`)
and the native TLS stack both use this.

The committed ACL files (`redis/users.vps.acl`, `redis/users.brain.acl`) hold rules, never secrets:
each password is a placeholder `#@VARIABLE@` that `render_acl` replaces with the SHA-256 of the
variable's value from the environment. An unrendered file cannot be loaded by accident: `#` wants 64
hex digits, so redis-server refuses to start instead of accepting a guessable password.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

from tickbridge.core.settings import secret_problem

_PLACEHOLDER = re.compile(r"#@([A-Z][A-Z0-9_]*)@")


class AclRenderError(ValueError):
    """A password variable the ACL template needs is missing or empty (the message names it)."""


def password_hash(password: str) -> str:
    """What an ACL file stores for a password (`#<sha256 hex>`), so no rendered file holds the password."""
    return hashlib.sha256(password.encode()).hexdigest()


def acl_variables(template: str) -> list[str]:
    """The password variables a template needs, in order of first use."""
    return list(dict.fromkeys(_PLACEHOLDER.findall(template)))


def render_acl_text(template: str, env: Mapping[str, str]) -> str:
    """Replace every `#@VAR@` with `#<sha256(env[VAR])>`; `AclRenderError` names a missing variable, or one
    holding a `change-me-…` placeholder or fewer than `MIN_SECRET_CHARS` characters."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        value = env.get(name)
        if not value:
            raise AclRenderError(f"config error: {name}: required to render the Redis ACL file (not set or empty)")
        problem = secret_problem(value)
        if problem is not None:  # a placeholder rendered here would be a live password
            raise AclRenderError(f"config error: {name}: {problem}")
        return "#" + password_hash(value)

    return _PLACEHOLDER.sub(sub, template)


def render_acl(template: Path, out: Path, env: Mapping[str, str]) -> Path:
    """Render `template` into `out` (mode 0600) and return `out`."""
    text = render_acl_text(template.read_text(), env)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.touch(mode=0o600, exist_ok=True)
    out.write_text(text)
    return out
