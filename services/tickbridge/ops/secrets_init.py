"""One-shot compose init: render a Redis ACL template and hand TLS files to the uid that reads them.

    python -m tickbridge.ops.secrets_init --acl TEMPLATE OUT --tls SRC_DIR DEST_DIR NAME... --owner UID:GID

Why a step at all: the committed ACL files hold `#@VARIABLE@` placeholders (never secrets) that
`tickbridge.ops.acl.render_acl` turns into SHA-256 hashes of the passwords in `.env`; and the
keys `make certs` writes are mode 0600 for the deploying user, which the container users (redis 999,
tickbridge 10001) cannot read. The init container runs as root once, writes into a named volume with
the reader's ownership and mode 0600/0644, and exits; redis and the forwarder mount that volume
read-only and start only after it completed (`service_completed_successfully`).

The passwords come from compose secrets: `NAME_FILE=/run/secrets/name` supplies `NAME` (the same checks
as a role's `*_FILE` settings: the file exists, is not open to every user, holds no placeholder and no
short secret); a plain `NAME` still works (tests, native runs), but not both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from tickbridge.core.settings import read_secret_file
from tickbridge.ops.acl import AclRenderError, render_acl


class SecretFileError(ValueError):
    """A `NAME_FILE` variable that cannot supply NAME (the message names it)."""


def resolve_secret_files(env: dict[str, str]) -> dict[str, str]:
    """`env` with each `NAME_FILE` (a path) replaced by `NAME` (the file's secret)."""
    resolved = {k: v for k, v in env.items() if not (k.endswith("_FILE") and k[:-5].endswith(("PASSWORD", "SECRET")))}
    for key, path in env.items():
        name = key[:-5]
        if key not in resolved:
            if env.get(name):
                raise SecretFileError(f"secrets-init: {key}: {name} is set too: give the password in one place")
            try:
                resolved[name] = read_secret_file(path)
            except ValueError as exc:
                raise SecretFileError(f"secrets-init: {key}: {exc}") from None
    return resolved


def _owner(value: str) -> tuple[int, int]:
    uid, _, gid = value.partition(":")
    return int(uid), int(gid or uid)


def _place(path: Path, owner: tuple[int, int] | None, mode: int) -> None:
    if owner is not None and os.geteuid() == 0:
        os.chown(path, *owner)
    path.chmod(mode)


def run(
    acl: tuple[Path, Path] | None,
    tls: tuple[Path, Path, list[str]] | None,
    owner: tuple[int, int] | None,
    env: dict[str, str],
) -> list[Path]:
    """Render and copy; returns what was written."""
    written: list[Path] = []
    if acl is not None:
        template, out = acl
        render_acl(template, out, env)
        _place(out, owner, 0o600)
        written.append(out)
    if tls is not None:
        src, dest, names = tls
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            target = dest / name
            shutil.copyfile(src / name, target)
            # Private keys stay private to their reader; certificates are public.
            _place(target, owner, 0o600 if name.endswith(".key") else 0o644)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tickbridge.ops.secrets_init", description=__doc__)
    parser.add_argument("--acl", nargs=2, type=Path, metavar=("TEMPLATE", "OUT"))
    parser.add_argument("--tls", nargs="+", metavar="SRC_DIR DEST_DIR NAME", help="copy NAMEs from SRC to DEST")
    parser.add_argument("--owner", type=_owner, help="UID[:GID] that will read the files")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    tls = None
    if args.tls:
        if len(args.tls) < 3:
            parser.error("--tls needs SRC_DIR DEST_DIR and at least one file name")
        tls = (Path(args.tls[0]), Path(args.tls[1]), list(args.tls[2:]))
    try:
        written = run(args.acl, tls, args.owner, resolve_secret_files(dict(os.environ)))
    except (AclRenderError, SecretFileError) as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(2) from None
    except FileNotFoundError as exc:
        print(f"secrets-init: {exc.filename} missing (run `make certs` and copy the files, see docs/deploy-vps.md)",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2) from None
    for path in written:
        print(f"secrets-init: wrote {path}")


if __name__ == "__main__":
    main()
