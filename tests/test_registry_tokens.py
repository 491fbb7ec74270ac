"""Tokens under concurrency: CLI processes and the running server create and revoke at once.

Every created token must work at once and every revoked one must fail at once, whichever process
made the change (the bug this guards against: 59 of 150 revoked tokens came back to life)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest
from adapterkit_registry import RegistryServer
from adapterkit_registry.auth import TokenStore

CLI = [sys.executable, "-m", "adapterkit_registry"]
WORKER = textwrap.dedent(
    """
    import json, sys
    from adapterkit_registry.auth import TokenStore
    store, n, out = TokenStore(sys.argv[1]), int(sys.argv[2]), []
    for i in range(n):
        token = store.create("w" + sys.argv[3], "read")
        if i % 2:
            store.revoke(store.authenticate(token).token_id)
            out.append([token, False])
        else:
            out.append([token, True])
    print(json.dumps(out))
    """
)


def _whoami(url: str, token: str) -> int:
    return httpx2.get(f"{url}/api/whoami-v2", headers={"authorization": f"Bearer {token}"}).status_code


def test_concurrent_create_and_revoke_across_processes(tmp_path):
    root = tmp_path / "root"
    with RegistryServer(root) as srv:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(root), "30", str(i)], stdout=subprocess.PIPE, text=True
            )
            for i in range(4)
        ]
        cli = [
            subprocess.Popen(
                [*CLI, "token", "create", "--root", str(root), "--user", f"c{i}"],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(4)
        ]
        in_server: list[tuple[str, bool]] = []
        for i in range(30):  # the server's own store changes tokens meanwhile
            token = srv.create_token(f"s{i}", "read")
            if i % 2:
                assert srv.app.state.hub.tokens.revoke(srv.app.state.hub.tokens.authenticate(token).token_id)
            in_server.append((token, not i % 2))
        outcomes = list(in_server)
        for p in procs:
            stdout, _ = p.communicate(timeout=120)
            assert p.returncode == 0
            outcomes += [tuple(x) for x in json.loads(stdout)]
        for p in cli:
            stdout, _ = p.communicate(timeout=120)
            assert p.returncode == 0
            outcomes.append((stdout.strip(), True))
        assert len(outcomes) == 30 + 4 * 30 + 4
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda o: _whoami(srv.url, o[0]), outcomes))
        lost = [o for o, s in zip(outcomes, statuses, strict=True) if o[1] and s != 200]
        revived = [o for o, s in zip(outcomes, statuses, strict=True) if not o[1] and s != 401]
        assert lost == [] and revived == []
        assert len(TokenStore(root).list()) == 15 + 4 * 15 + 4


def test_revocation_takes_effect_in_the_running_server_at_once(tmp_path):
    root = tmp_path / "root"
    with RegistryServer(root) as srv:
        token = subprocess.run(
            [*CLI, "token", "create", "--root", str(root), "--user", "eve"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert _whoami(srv.url, token) == 200
        token_id = next(t["id"] for t in TokenStore(root).list() if t["user"] == "eve")
        subprocess.run([*CLI, "token", "revoke", "--root", str(root), "--id", token_id], check=True)
        assert _whoami(srv.url, token) == 401
    assert os.stat(root / "tokens.db").st_mode & 0o077 == 0


def test_tokens_json_of_an_older_root_is_imported_once(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    digest = __import__("hashlib").sha256(b"legacy-token-0123456789").hexdigest()
    legacy = {
        "id": digest[:12],
        "hash": digest,
        "user": "old",
        "scope": "write",
        "orgs": [],
        "name": "",
        "created": "x",
    }
    (root / "tokens.json").write_text(json.dumps({"format_version": 1, "tokens": [legacy]}))
    store = TokenStore(root)
    assert store.authenticate("legacy-token-0123456789").user == "old"
    assert store.revoke(digest[:12])
    assert TokenStore(root).authenticate("legacy-token-0123456789") is None  # not imported a second time


def test_a_name_differing_only_in_case_from_a_known_namespace_is_refused(tmp_path):
    """Repo ids are case-insensitive, so `ALICE` would share (and could block or probe) `alice`'s repos."""
    root = tmp_path / "root"
    store = TokenStore(root)
    store.create("alice", "write", orgs=("Lab",))
    store.create("alice", "read")  # the same user again is fine
    for user, orgs in (("ALICE", ()), ("bob", ("lab",)), ("lab", ())):
        with pytest.raises(ValueError, match="differs only in case"):
            store.create(user, "write", orgs=orgs)
    assert sorted({t["user"] for t in store.list()}) == ["alice"]
    run = subprocess.run(
        [*CLI, "token", "create", "--root", str(root), "--user", "Alice"], capture_output=True, text=True
    )
    assert run.returncode != 0 and "differs only in case" in run.stderr and not run.stdout
    token_id = store.list()[0]["id"]
    revoked = subprocess.run(
        [*CLI, "token", "revoke", "--root", str(root), "--id", token_id], capture_output=True, text=True
    )
    assert revoked.returncode == 0 and revoked.stdout.strip() == f"revoked token {token_id}"


def test_a_namespace_that_holds_repos_keeps_its_case_after_its_tokens_are_revoked(tmp_path):
    from adapterkit_registry import Storage
    from adapterkit_registry.storage import RepoKey

    root = tmp_path / "root"
    store = TokenStore(root)
    carol = store.create("carol", "write")
    Storage(root).create_repo(RepoKey("model", "carol", "x"), "carol", False)
    assert store.revoke(store.authenticate(carol).token_id)
    with pytest.raises(
        ValueError, match="differs only in case from the existing user or organisation 'carol'"
    ):
        store.create("CAROL", "write")
