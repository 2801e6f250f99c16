"""Security of the store service: loopback without keys, CURVE with keys, and the pitfalls.

- a bind beyond loopback without --keys is refused: exit 2, one line;
- --keys makes the key files on first use (secrets 0600) and a client with copies connects; the CLI
  with no keys, another host's keys or a key the service never authorised exits 2 with one line,
  and the service keeps serving;
- secret files readable by others are refused; --add-client makes a ready-to-copy folder, and
  deleting its public key from authorized/ locks it out while the service runs;
- without CURVE in libzmq, --keys is refused; if the ZAP authenticator dies the service stops
  instead of letting anyone with the server key in, and while none answers nobody gets in.
"""
from __future__ import annotations

import os
import shutil
import stat
import threading
import time

import pytest
import zmq

from helpers.swarm import run_cli, wait_for
from helpers.service_procs import start_service
from store import Store
from store.service import keys as keymod
from store.service.client import RemoteStore
from store.service.server import StoreServer

FAST = {"MUNET_STORE_CONNECT_TIMEOUT": "3"}


def copy_client_keys(keydir: str, dest) -> object:
    """What an operator copies to another host: the server's public key and one client pair."""
    dest.mkdir()
    for name in ("server.key", "client.key", "client.key_secret"):
        shutil.copy2(os.path.join(keydir, name), dest / name)
    return dest


def one_line_error(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:0", "tcp://*:0"])
def test_a_bind_beyond_loopback_needs_keys(tmp_path, bind):
    proc = run_cli("launch/serve_store.py", "--store", str(tmp_path / "s"), "--bind", bind,
                   timeout=60)
    assert "without --keys" in one_line_error(proc)
    assert not os.path.exists(tmp_path / "s")  # nothing created


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secured")
    keydir = str(tmp / "keys")
    svc = start_service(str(tmp / "served"), keys=keydir)
    yield svc, keydir, tmp
    svc.kill()


def test_keys_are_made_on_first_use_with_private_secrets(secured):
    _, keydir, _ = secured
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret",
                 "authorized/client.key"):
        assert os.path.isfile(os.path.join(keydir, name)), name
    for name in ("server.key_secret", "client.key_secret"):
        assert stat.S_IMODE(os.stat(os.path.join(keydir, name)).st_mode) == 0o600


def test_a_host_with_copied_keys_connects_and_bad_keys_get_one_line(secured, tmp_path):
    svc, keydir, _ = secured
    host_b = copy_client_keys(keydir, tmp_path / "host-b-keys")
    ok = run_cli("launch/query.py", "--store", svc.endpoint, "--keys", str(host_b), "stats",
                 "--json", env=FAST)
    assert ok.returncode == 0, ok.stderr
    # no keys at all
    err = one_line_error(run_cli("launch/query.py", "--store", svc.endpoint, "stats", env=FAST))
    assert "requires CURVE keys" in err
    # a pair the service never authorised
    stranger = str(tmp_path / "stranger")
    keymod.ensure_server_keys(stranger)
    shutil.copy2(os.path.join(keydir, "server.key"), os.path.join(stranger, "server.key"))
    err = one_line_error(run_cli("launch/query.py", "--store", svc.endpoint, "--keys", stranger,
                                 "stats", env=FAST))
    assert "refused this client's key" in err
    # the right client pair but another service's public key: CURVE says nothing, we time out
    wrong_server = tmp_path / "wrong-server"
    keymod.ensure_server_keys(str(wrong_server))
    for name in ("client.key", "client.key_secret"):
        os.remove(wrong_server / name)
        shutil.copy2(os.path.join(keydir, name), wrong_server / name)
    t0 = time.time()
    err = one_line_error(run_cli("launch/query.py", "--store", svc.endpoint, "--keys",
                                 str(wrong_server), "stats", env=FAST))
    assert "no answer" in err and "server.key" in err and time.time() - t0 < 30
    assert svc.proc.poll() is None
    again = run_cli("launch/query.py", "--store", svc.endpoint, "--keys", str(host_b), "verify",
                    env=FAST)
    assert again.returncode == 0, again.stderr


def test_loose_secret_permissions_are_refused(secured, tmp_path):
    svc, keydir, _ = secured
    loose = copy_client_keys(keydir, tmp_path / "loose")
    os.chmod(loose / "client.key_secret", 0o644)
    err = one_line_error(run_cli("launch/query.py", "--store", svc.endpoint, "--keys", str(loose),
                                 "stats", env=FAST))
    assert "chmod 600" in err


def test_add_client_then_revoke_it_while_the_service_runs(secured, tmp_path):
    svc, keydir, _ = secured
    made = run_cli("launch/serve_store.py", "--keys", keydir, "--add-client", "gpu-box-2")
    assert made.returncode == 0, made.stderr
    folder = os.path.join(keydir, "clients", "gpu-box-2")
    assert sorted(os.listdir(folder)) == ["client.key", "client.key_secret", "server.key"]

    def admitted() -> bool:
        """The service answers this client's hello (it reloads authorized/ about once a second)."""
        try:
            RemoteStore.connect(svc.endpoint, keys=folder, cache_dir=str(tmp_path / "c"),
                                connect_timeout=1).close()
            return True
        except keymod.ServiceUserError:
            return False

    wait_for(admitted, 20, "the service to admit the new client")
    with RemoteStore.connect(svc.endpoint, keys=folder, cache_dir=str(tmp_path / "c"),
                             connect_timeout=5) as st:
        assert st.meta()["schema_version"] >= 1
    os.remove(os.path.join(keydir, "authorized", "gpu-box-2.key"))
    wait_for(lambda: not admitted(), 20, "the service to refuse the revoked client")
    with pytest.raises(keymod.ServiceUserError):
        RemoteStore.connect(svc.endpoint, keys=folder, cache_dir=str(tmp_path / "c"),
                            connect_timeout=3)


def test_no_curve_in_libzmq_means_keys_are_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(zmq, "has", lambda what: False if what == "curve" else True)
    with pytest.raises(keymod.KeyFileError, match="without CURVE"):
        keymod.ensure_server_keys(str(tmp_path / "k"))
    with pytest.raises(keymod.KeyFileError, match="without CURVE"):
        keymod.load_client_keys(str(tmp_path / "k"))


def test_the_service_stops_when_its_authenticator_dies_and_nobody_gets_in_meanwhile(tmp_path):
    keydir = str(tmp_path / "keys")
    server_keys = keymod.ensure_server_keys(keydir)
    store = Store.open(str(tmp_path / "s"), create=True)
    server = StoreServer(store, "tcp://127.0.0.1:*", keys=server_keys)
    server.start()
    failure: list[BaseException] = []

    def serve():
        try:
            server.serve(lambda: False)
        except BaseException as exc:  # noqa: BLE001 - what the test looks at
            failure.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with RemoteStore.connect(server.endpoint, keys=keydir, cache_dir=str(tmp_path / "c"),
                                 connect_timeout=5) as st:
            assert st.health()["authenticator_alive"]
        server._auth.stop()  # the ZAP handler is gone: CURVE alone would let any key in
        with pytest.raises(keymod.ServiceUserError):  # ZAP_ENFORCE_DOMAIN: nobody in meanwhile
            RemoteStore.connect(server.endpoint, keys=keydir, cache_dir=str(tmp_path / "c"),
                                connect_timeout=2)
        thread.join(10)
        assert failure and "authenticator" in str(failure[0])
    finally:
        server._auth = None
        server.close()
        store.close()


def _admitted(endpoint: str, keys: str, cache: str) -> bool:
    try:
        RemoteStore.connect(endpoint, keys=keys, cache_dir=cache, connect_timeout=1).close()
        return True
    except keymod.ServiceUserError:
        return False


def test_a_bad_key_file_is_skipped_and_a_revocation_still_takes_effect(tmp_path):
    """A junk *.key in authorized/ (at start and later) is skipped with a warning; the valid keys
    keep working, and removing one still locks its client out."""
    keydir = str(tmp_path / "keys")
    os.makedirs(os.path.join(keydir, "authorized"))
    (tmp_path / "keys" / "authorized" / "junk.key").write_text("not a key\n")
    made = run_cli("launch/serve_store.py", "--keys", keydir, "--add-client", "box")  # + the first client
    assert made.returncode == 0, made.stderr
    box = os.path.join(keydir, "clients", "box")
    svc = start_service(str(tmp_path / "served"), keys=keydir)
    try:
        cache = str(tmp_path / "c")
        assert _admitted(svc.endpoint, box, cache) and _admitted(svc.endpoint, keydir, cache)
        (tmp_path / "keys" / "authorized" / "later.key").write_text("metadata\ncurve\n    public-key = \"short\"\n")
        time.sleep(1.5)  # the service has reloaded with the second bad file in place
        os.remove(os.path.join(keydir, "authorized", "box.key"))
        wait_for(lambda: not _admitted(svc.endpoint, box, cache), 20, "the revoked key refused")
        assert _admitted(svc.endpoint, keydir, cache)  # the other valid key still gets in
        log = open(svc.log).read()
        assert "junk.key" in log and "later.key" in log and "skipped" in log, log[-2000:]
    finally:
        svc.kill()


def test_without_the_authorized_folder_nobody_gets_in(tmp_path):
    keydir = str(tmp_path / "keys")
    svc = start_service(str(tmp_path / "served"), keys=keydir)
    try:
        cache = str(tmp_path / "c")
        assert _admitted(svc.endpoint, keydir, cache)
        shutil.rmtree(os.path.join(keydir, "authorized"))
        wait_for(lambda: not _admitted(svc.endpoint, keydir, cache), 20, "everyone refused")
        assert "no client is authorised" in open(svc.log).read()
    finally:
        svc.kill()


def test_only_junk_keys_at_start_is_one_line_that_names_them(tmp_path):
    keydir = tmp_path / "keys"
    r = run_cli("launch/serve_store.py", "--keys", str(keydir), "--add-client", "x")  # makes the folders
    assert r.returncode == 0, r.stderr
    for f in (keydir / "authorized").iterdir():
        f.write_text("garbage")
    proc = run_cli("launch/serve_store.py", "--store", str(tmp_path / "s"), "--keys", str(keydir),
                   "--bind", "tcp://127.0.0.1:0", timeout=60)
    line = one_line_error(proc)
    assert "no valid client key" in line and "client.key" in line and "x.key" in line, line
