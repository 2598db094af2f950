"""Recording SSH host keys in benchfleet's own known_hosts, after a person has seen the fingerprint.

Verification itself is never optional (see transport/ssh.py); this is how a new host becomes known: fetch the key
the host presents, show its SHA256 fingerprint, and append it to ~/.config/benchfleet/known_hosts (0600) when the
person confirms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import asyncssh

from remote.aio import within
from remote.transport.base import HostError
from remote.transport.ssh import client_options, known_hosts_files, own_known_hosts, parse_target


@dataclass(frozen=True)
class PresentedKey:
    """The key a host presented, and what benchfleet already knows about that host."""

    target: str
    hostname: str
    port: int
    key: asyncssh.SSHKey
    fingerprint: str
    already_trusted: bool
    known_elsewhere: bool
    """Some known_hosts file lists a different key for this host (it changed, or something is in the middle)."""

    def patterns(self) -> str:
        """known_hosts host patterns for this host as asyncssh and OpenSSH look it up."""
        if self.port == 22:
            return self.hostname
        return f"[{self.hostname}]:{self.port}"


async def fetch_host_key(target: str, ssh_config: str | None = None, *, timeout: float = 15.0) -> PresentedKey:
    """Connect far enough to see the host key (no authentication) and compare it with the known ones."""
    try:
        parsed = parse_target(target)
    except ValueError as exc:
        raise HostError(f"{target}: {exc}") from None
    options = client_options(target, parsed, ssh_config, connect_timeout=timeout)
    hostname, port = str(options.host), int(options.port or 22)
    try:
        key = await within(timeout, asyncssh.get_server_host_key(hostname, port))
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        raise HostError(f"{target}: cannot reach {hostname}:{port} to read its host key: {exc}") from None
    if key is None:
        raise HostError(f"{target}: {hostname}:{port} presented no host key")
    known = _known_keys(known_hosts_files(options), hostname, port)
    fingerprint = key.get_fingerprint("sha256")
    return PresentedKey(target=target, hostname=hostname, port=port, key=key, fingerprint=fingerprint,
                        already_trusted=fingerprint in known, known_elsewhere=bool(known - {fingerprint}))


def _known_keys(files: list[str], hostname: str, port: int) -> set[str]:
    """Fingerprints of the keys the known_hosts files list for the host."""
    fingerprints: set[str] = set()
    for path in files:
        try:
            known = asyncssh.read_known_hosts(path)
        except (OSError, ValueError):
            continue
        keys = known.match(hostname, "", port if port != 22 else None)[0]
        fingerprints.update(k.get_fingerprint("sha256") for k in keys)
    return fingerprints


def record(presented: PresentedKey) -> str:
    """Append the key to benchfleet's own known_hosts; returns the file's path."""
    path = own_known_hosts()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    line = f"{presented.patterns()} {presented.key.export_public_key('openssh').decode().strip()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line)
    os.chmod(path, 0o600)
    return str(path)
