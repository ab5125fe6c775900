"""Redis with TLS and ACLs for tests and the native stack: certificates, ACL rendering, servers.

ACL rendering itself is runtime code (`tickbridge.ops.acl`: the compose init container runs it).
"""

from __future__ import annotations

import secrets
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from tickbridge.ops.acl import acl_variables, render_acl
from tickbridge_dev.devstack.servers import REPO_ROOT, RedisExporterServer, RedisServer, free_port
from tickbridge_dev.devstack.stack import NativeStack, StackConfig

CERTS_SCRIPT = REPO_ROOT / "scripts" / "certs.sh"
VPS_ACL = REPO_ROOT / "redis" / "users.vps.acl"
BRAIN_ACL = REPO_ROOT / "redis" / "users.brain.acl"


@dataclass(frozen=True)
class CertPaths:
    """The files `scripts/certs.sh` writes into one directory."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    def client_env(self) -> dict[str, str]:
        """The variables a role reads to dial a `rediss://` URL with this client certificate."""
        return {"REDIS_TLS_CA": str(self.ca), "REDIS_TLS_CERT": str(self.client_cert),
                "REDIS_TLS_KEY": str(self.client_key)}  # fmt: skip


def make_certs(
    out_dir: Path, *, client_cn: str = "tickbridge-forwarder", server_san: str = "DNS:localhost,IP:127.0.0.1"
) -> CertPaths:
    """Run `scripts/certs.sh OUT_DIR` (the same script as `make certs`)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "TLS_CLIENT_CN": client_cn, "TLS_SERVER_SAN": server_san}
    subprocess.run(["bash", str(CERTS_SCRIPT), str(out_dir)], check=True, capture_output=True, env=env, timeout=60)
    return CertPaths(out_dir)


def redis_url(scheme: str, port: int, user: str | None = None, password: str | None = None) -> str:
    """`redis[s]://user:password@127.0.0.1:port/0` with the credentials URL-quoted."""
    auth = f"{quote(user, safe='')}:{quote(password or '', safe='')}@" if user else ""
    return f"{scheme}://{auth}127.0.0.1:{port}/0"


class SecureRedisServer(RedisServer):
    """`redis-server` with an ACL file and, given certificates, a TLS port that requires client certificates.

    `plain_port=False` leaves only the TLS port open (`--port 0`), as on the Brain's public side.
    """

    name = "redis"

    def __init__(
        self,
        *,
        aclfile: Path,
        certs: CertPaths | None = None,
        plain_port: bool = True,
        appendonly: bool = False,
        workdir: Path | None = None,
        extra: list[str] | None = None,
    ) -> None:
        super().__init__(appendonly=appendonly, workdir=workdir, extra=extra)
        self.aclfile = aclfile
        self.certs = certs
        self.plain_port = plain_port
        self.tls_port = free_port() if certs is not None else 0
        if certs is None and not plain_port:
            raise ValueError("a server without TLS needs its plain port")

    def command(self) -> list[str]:
        cmd = super().command()
        cmd += ["--aclfile", str(self.aclfile)]
        if not self.plain_port:
            cmd += ["--port", "0"]  # a later --port wins: nothing listens in plaintext
        if self.certs is not None:
            cmd += [
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(self.certs.server_cert),
                "--tls-key-file", str(self.certs.server_key),
                "--tls-ca-cert-file", str(self.certs.ca),
                "--tls-auth-clients", "yes",
                "--tls-protocols", "TLSv1.2 TLSv1.3",
            ]  # fmt: skip
        return cmd

    def client_context(self) -> ssl.SSLContext:
        """An SSL context that trusts the private CA and presents the client certificate."""
        assert self.certs is not None
        ctx = ssl.create_default_context(cafile=str(self.certs.ca))
        ctx.load_cert_chain(str(self.certs.client_cert), str(self.certs.client_key))
        return ctx

    def ready(self) -> bool:
        if self.certs is None:
            return super().ready()
        ctx = self.client_context()
        ctx.check_hostname = False  # readiness only: tests also start servers whose name does not match
        with (
            socket.create_connection(("127.0.0.1", self.tls_port), timeout=1) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
        ):
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
            return reply.startswith(b"+PONG") or b"NOAUTH" in reply

    def url_for(self, user: str, password: str, *, tls: bool | None = None) -> str:
        """URL for `user`: TLS when the server has it (or `tls=True`), else the plain port."""
        use_tls = self.certs is not None if tls is None else tls
        if use_tls:
            return redis_url("rediss", self.tls_port, user, password)
        return redis_url("redis", self.port, user, password)


#: role -> (its user on the VPS Redis, its user on the Brain Redis); None: the role has no business there.
ROLE_USERS: dict[str, tuple[str | None, str | None]] = {
    "collector": ("collector", None),
    "forwarder": ("forwarder", "forwarder"),
    "forwarder-live": ("forwarder", "forwarder"),  # the forwarder's live lane (issue 16): the same user
    "consumer": (None, "consumer"),
    "writer": (None, "writer"),
}


class SecureNativeStack(NativeStack):
    """The native stack as deployed: ACL users on both Redis servers (random passwords, rendered from the
    committed templates), the Brain's Redis reachable only over TLS with a client certificate from the
    private CA, and each role holding only its own credentials."""

    def __init__(self, config: StackConfig) -> None:
        if config.with_toxiproxy:
            raise ValueError("SecureNativeStack does not route the TLS link through toxiproxy")
        super().__init__(config)
        self.certs = make_certs(self.workdir / "certs")
        names = acl_variables(VPS_ACL.read_text()) + acl_variables(BRAIN_ACL.read_text())
        self.passwords = {name: secrets.token_urlsafe(24) for name in names}
        acl_dir = self.workdir / "acl"
        self.vps_redis = SecureRedisServer(aclfile=render_acl(VPS_ACL, acl_dir / "vps.acl", self.passwords),
                                           appendonly=True, workdir=self.workdir / "vps-redis")  # fmt: skip
        self.brain_redis = SecureRedisServer(aclfile=render_acl(BRAIN_ACL, acl_dir / "brain.acl", self.passwords),
                                             certs=self.certs, plain_port=False, appendonly=True,
                                             workdir=self.workdir / "brain-redis")  # fmt: skip

    def user_url(self, host: str, user: str) -> str:
        """URL of `user` on `host` ("vps" or "brain"): plain on the VPS, TLS to the Brain."""
        server = self.vps_redis if host == "vps" else self.brain_redis
        assert isinstance(server, SecureRedisServer)
        return server.url_for(user, self.passwords[f"{host.upper()}_REDIS_{user.upper()}_PASSWORD"])

    def redis_exporter(self, host: str) -> RedisExporterServer:
        """As in compose: the `monitor` user, its password in a file, and over TLS with the client certificate to
        the Brain (whose Redis has no plain port here)."""
        password = self.passwords[f"{host.upper()}_REDIS_MONITOR_PASSWORD"]
        workdir = self.workdir / f"{host}-redis-exporter"
        if host == "vps":
            return RedisExporterServer(f"redis://127.0.0.1:{self.vps_redis.port}", user="monitor", password=password,
                                       streams=(self.stream_key,), workdir=workdir)  # fmt: skip
        assert isinstance(self.brain_redis, SecureRedisServer)
        tls = (self.certs.ca, self.certs.client_cert, self.certs.client_key)
        return RedisExporterServer(f"rediss://127.0.0.1:{self.brain_redis.tls_port}", user="monitor",
                                   password=password, tls=tls, streams=(self.stream_key,), workdir=workdir)  # fmt: skip

    def env_for(self, role: str, venue: str | None = None) -> dict[str, str]:
        env = super().env_for(role, venue)
        vps_user, brain_user = ROLE_USERS.get(role, (None, None))
        # A role without a user on a host gets an address without credentials: unusable (default user off).
        env["VPS_REDIS_URL"] = (
            self.user_url("vps", vps_user) if vps_user else f"redis://127.0.0.1:{self.vps_redis.port}/0"
        )
        if brain_user:
            env["BRAIN_REDIS_URL"] = self.user_url("brain", brain_user)
            env.update(self.certs.client_env())
        else:
            assert isinstance(self.brain_redis, SecureRedisServer)
            env["BRAIN_REDIS_URL"] = f"rediss://127.0.0.1:{self.brain_redis.tls_port}/0"
        return env
