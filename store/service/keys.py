"""CURVE keys of a store service and its clients, kept as files in one folder (``--keys KEYDIR``).

    KEYDIR/server.key          the service's public key (every client needs a copy)
    KEYDIR/server.key_secret   the service's secret key (mode 0600; never leaves the service host)
    KEYDIR/client.key          the first authorised client's public key
    KEYDIR/client.key_secret   its secret key (mode 0600): copy it with server.key and client.key to
                               another host's KEYDIR and agents there may connect
    KEYDIR/authorized/*.key    public keys the service lets in (reloaded while it runs)
    KEYDIR/clients/NAME/       a ready-to-copy KEYDIR for one more client (``serve_store.py
                               --add-client NAME``): server.key, client.key, client.key_secret

The service creates the missing files on first use. Secret files are written 0600 from the start and
refused when group or others may read them (a copied key with loose permissions is a leaked key).
The files use the ZeroMQ certificate text layout, so ``zmq.auth.load_certificate`` reads them.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import stat
from dataclasses import dataclass

import zmq
import zmq.auth

from store.service.wire import ServiceUserError

SERVER = "server"
CLIENT = "client"
AUTHORIZED = "authorized"
CLIENTS = "clients"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class KeyFileError(ServiceUserError):
    """A key folder or file that cannot be used (missing, unreadable, too open): a user error."""


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    authorized_dir: str


@dataclass(frozen=True)
class ClientKeys:
    server_public: bytes
    public: bytes
    secret: bytes


def require_curve() -> None:
    if not zmq.has("curve"):
        raise KeyFileError(f"this libzmq {zmq.zmq_version()} was built without CURVE security, so "
                        f"--keys cannot work: install a pyzmq wheel with libsodium/curve support")


def _write_key(path: str, public: bytes, secret: bytes | None, what: str) -> None:
    """Write one certificate file; a secret one is created 0600 (never briefly world-readable)."""
    lines = [f"#   munet-swarm store service: {what}",
             f"#   written {datetime.datetime.now().isoformat(timespec='seconds')}",
             "#   " + ("SECRET: keep it 0600, copy it only to the host it identifies"
                      if secret else "public key: safe to copy"),
             "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    mode = 0o600 if secret is not None else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, ("\n".join(lines) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pair(folder: str, name: str, what: str) -> tuple[bytes, bytes]:
    public, secret = zmq.curve_keypair()
    _write_key(os.path.join(folder, f"{name}.key"), public, None, what)
    _write_key(os.path.join(folder, f"{name}.key_secret"), public, secret, what)
    return public, secret


def _load(path: str, want_secret: bool) -> tuple[bytes, bytes | None]:
    if not os.path.isfile(path):
        raise KeyFileError(f"key file {path} is missing")
    if want_secret:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise KeyFileError(f"secret key {path} has mode {mode:04o}: others may read it; run "
                            f"`chmod 600 {path}` (or make a new key if it leaked)")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"key file {path} cannot be read: {exc}") from None
    if want_secret and not secret:
        raise KeyFileError(f"key file {path} holds no secret key")
    return public, secret


def _mkdir_private(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)


def ensure_server_keys(keydir: str) -> ServerKeys:
    """Load the service's keys from ``keydir``, creating the service pair and a first authorised
    client pair when the folder has none yet."""
    require_curve()
    _mkdir_private(keydir)
    authorized = os.path.join(keydir, AUTHORIZED)
    _mkdir_private(authorized)
    if not os.path.exists(os.path.join(keydir, f"{SERVER}.key_secret")):
        _write_pair(keydir, SERVER, "the service's own key pair")
    first_client = os.path.join(keydir, f"{CLIENT}.key_secret")
    if not os.path.exists(first_client) and not load_authorized(authorized)[0]:
        _write_pair(keydir, CLIENT, "the first authorised client")
        shutil.copyfile(os.path.join(keydir, f"{CLIENT}.key"),
                        os.path.join(authorized, f"{CLIENT}.key"))
    public, secret = _load(os.path.join(keydir, f"{SERVER}.key_secret"), want_secret=True)
    admitted, problems = load_authorized(authorized)
    if not admitted:
        skipped = f" (skipped as not keys: {'; '.join(problems)})" if problems else ""
        raise KeyFileError(f"{authorized} holds no valid client key (*.key){skipped}: nobody could "
                           f"connect; add one with serve_store.py --keys {keydir} --add-client NAME")
    return ServerKeys(public=public, secret=secret, authorized_dir=authorized)


def _public_keys(folder: str) -> list[str]:
    try:
        return sorted(f for f in os.listdir(folder) if f.endswith(".key"))
    except (FileNotFoundError, NotADirectoryError):  # no folder: nobody is authorised
        return []


def load_authorized(folder: str) -> tuple[dict[bytes, bool], list[str]]:
    """The public keys in ``folder`` that the service admits, file by file: a file that is not a key
    is skipped (and named in the second value) while every other key still counts. A missing folder
    admits nobody. (pyzmq's own loader gives up on the first bad file, and its authenticator then keeps
    its old list: a key revoked after that would still get in.)"""
    keys: dict[bytes, bool] = {}
    problems = []
    for name in _public_keys(folder):
        try:
            public, _ = zmq.auth.load_certificate(os.path.join(folder, name))
        except FileNotFoundError:  # removed between the listing and the read: it is gone
            continue
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            problems.append(f"{name} ({type(exc).__name__}: {str(exc)[:80]})")
            continue
        if not public or len(public) != 40:
            problems.append(f"{name} (no 40-character public key in it)")
            continue
        keys[public] = True
    return keys, problems


def add_client(keydir: str, name: str) -> str:
    """A new authorised client: its pair plus the service's public key in ``KEYDIR/clients/NAME``
    (copy that folder to the client host and pass it as --keys there); returns the folder."""
    if not _NAME.match(name) or name in (SERVER, CLIENT):
        raise KeyFileError(f"client name {name!r}: use letters, digits, '_', '.', '-' (not "
                        f"'{SERVER}' or '{CLIENT}')")
    keys = ensure_server_keys(keydir)
    folder = os.path.join(keydir, CLIENTS, name)
    if os.path.exists(folder):
        raise KeyFileError(f"{folder} already exists: pick another name or delete it (and "
                        f"{keys.authorized_dir}/{name}.key) to revoke that client")
    _mkdir_private(folder)
    public, _ = _write_pair(folder, CLIENT, f"authorised client {name}")
    shutil.copyfile(os.path.join(keydir, f"{SERVER}.key"), os.path.join(folder, f"{SERVER}.key"))
    _write_key(os.path.join(keys.authorized_dir, f"{name}.key"), public, None,
               f"authorised client {name}")
    return folder


def load_client_keys(keydir: str) -> ClientKeys:
    """What a client needs from its KEYDIR: the service's public key and its own pair."""
    require_curve()
    if not os.path.isdir(keydir):
        raise KeyFileError(f"--keys {keydir}: no such folder (copy server.key, client.key and "
                        f"client.key_secret from the service host's key folder)")
    server_public, _ = _load(os.path.join(keydir, f"{SERVER}.key"), want_secret=False)
    public, secret = _load(os.path.join(keydir, f"{CLIENT}.key_secret"), want_secret=True)
    return ClientKeys(server_public=server_public, public=public, secret=secret)


def authorized_stamp(folder: str) -> tuple:
    """Changes whenever a key file is added, removed or replaced (the service then reloads)."""
    out = []
    for name in _public_keys(folder):
        try:
            st = os.stat(os.path.join(folder, name))
        except FileNotFoundError:  # removed between the listing and the stat: it is gone
            continue
        out.append((name, st.st_mtime_ns, st.st_size))
    return tuple(out)
