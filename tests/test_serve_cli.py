"""`adapterkit serve SOURCE`: a real process serving a family folder on a free loopback port, the admin
token from a file or the environment (never a command-line value), and `repo@revision` sources."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch
from serve_support import ADMIN, b64, build_family, free_port, image_bytes, predict_json
from typer.testing import CliRunner

from adapterkit import cli_serve
from adapterkit.cli_errors import CliError
from adapterkit.serve_run import load_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("serve-cli") / "fam")


def command() -> list[str]:
    """`adapterkit serve`, as the console script runs it."""
    return [sys.executable, "-m", "adapterkit.cli", "serve"]


def wait_ready(url: str, process: subprocess.Popen) -> None:
    for _ in range(240):  # start-up imports torch and timm: at most 120 s on a busy machine
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError("the server did not become ready")


def test_serve_command_serves_predicts_and_hot_adds(family, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN + "\n")
    token_file.chmod(0o600)
    port = free_port()
    args = [str(family), "--domain", "a", "--port", str(port), "--admin-token-file", str(token_file)]
    args += ["--root-path", "ak/", "--max-images", "2"]  # ak/: read as /ak (/docs referred to ak/...)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ADAPTERKIT_ADMIN_TOKEN", None)
    process = subprocess.Popen(
        [*command(), *args, "--torch-threads", "1", "--max-wait-ms", "1", "--no-freeze-gc"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        with httpx.Client(base_url=url, timeout=60) as client:
            assert [d["name"] for d in client.get("/v1/domains").json()["domains"]] == ["a"]
            assert "url: '/ak/openapi.json'" in client.get("/docs").text
            assert predict_json(client, [("a", image_bytes(0))]).status_code == 200
            three = predict_json(client, [("a", image_bytes(i)) for i in range(3)])
            assert three.status_code == 413 and three.json()["error"]["code"] == "too_many_images"
            body = {"source": str(family), "domain": "b"}
            assert client.post("/v1/domains", json=body).status_code == 401
            auth = {"Authorization": f"Bearer {ADMIN}"}
            assert client.post("/v1/domains", json=body, headers=auth).status_code == 201
            assert predict_json(client, [("b", image_bytes(1))]).status_code == 200
            wrong = {"Authorization": "Bearer not-the-admin-token"}
            assert client.delete("/v1/domains/b", headers=wrong).status_code == 403
            assert client.delete("/v1/domains/b", headers=auth).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)  # as systemd, docker and Kubernetes stop it
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert f"serving 1 domain of {family} on {url} (admin endpoints on" in err
    assert f"hot-add of b from {family}: ok in" in err and "removed domain b" in err
    assert "admin request with a wrong token refused: DELETE /ak/v1/domains/b from 127.0.0.1" in err
    assert "not-the-admin-token" not in err and ADMIN not in err
    assert "stopped by SIGTERM (the requests in flight had up to 20 s to be answered)" in err


def test_port_0_serves_on_a_free_port_and_says_which(family):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*command(), str(family), "--domain", "a", "--port", "0", "--log-level", "warning"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stderr.readline()
        port = int(re.search(r"on http://127.0.0.1:(\d+) ", line).group(1))
        assert port != 0
        wait_ready(f"http://127.0.0.1:{port}", process)
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0 and "stopped by" not in err  # (--log-level warning: no info lines)


def test_an_unreachable_registry_is_an_error_not_a_cached_copy(family, registry, tmp_path, monkeypatch):
    from adapterkit import AdapterModel
    from adapterkit.sources import open_source

    repo = "alice/serve-cli-unreachable"
    AdapterModel.from_pretrained(family).push_to_hub(repo, token=registry.tokens["alice"])
    cache = tmp_path / "cache"
    open_source(repo, cache_dir=cache)  # a snapshot in the cache (its config only)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(
        ConnectionError, match="cannot reach .*HF_HUB_OFFLINE=1 uses the copy in the local cache"
    ):
        open_source(repo, cache_dir=cache, cache_fallback=False)
    assert open_source(repo, cache_dir=cache).revision is not None  # a library call may read the cache


def test_admin_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(cli_serve.TOKEN_ENV, raising=False)
    assert cli_serve.admin_token(None) is None
    monkeypatch.setenv(cli_serve.TOKEN_ENV, "  from-the-environment  ")
    assert cli_serve.admin_token(None) == "from-the-environment"
    path = tmp_path / "token"
    path.write_text("from-the-file-0123\nignored\n")
    assert cli_serve.admin_token(path) == "from-the-file-0123"  # the file wins
    path.write_text("")
    with pytest.raises(CliError, match="is empty"):
        cli_serve.admin_token(path)
    with pytest.raises(CliError, match="cannot read"):
        cli_serve.admin_token(tmp_path / "missing")
    monkeypatch.setenv(cli_serve.TOKEN_ENV, "short")
    with pytest.raises(CliError, match="shorter than 8"):
        cli_serve.admin_token(None)


def test_a_token_file_the_server_cannot_read_names_its_owner_not_its_path(tmp_path):
    """A root-owned token file and a service running as its own user (docs/deploy.md) said "check the
    path". Root reads any file, so under root the check runs in a forked child as user nobody."""
    path = tmp_path / "admin-token"
    path.write_text("a-long-random-admin-token\n")
    path.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(CliError, match=r"\(Permission denied\); make it readable by the user"):
            cli_serve.admin_token(path)
        return
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # (the child only reads a file and writes the message: no torch, no threads)
        try:
            os.setuid(65534)
            cli_serve.admin_token(path)
            os.write(write, b"no error")
        except BaseException as e:
            os.write(write, str(e).encode())
        finally:
            os._exit(0)
    os.close(write)
    message = os.read(read, 4096).decode()
    os.waitpid(child, 0)
    assert "(Permission denied); make it readable by the user the server runs as" in message, message


def test_an_empty_token_variable_is_an_error_not_a_read_only_server(monkeypatch):
    """`ADAPTERKIT_ADMIN_TOKEN=$(cat token)` with a missing file started a read-only server (403 on every
    hot-add), while an empty token file is an error."""
    monkeypatch.setenv(cli_serve.TOKEN_ENV, "  ")
    with pytest.raises(
        CliError, match=r"ADAPTERKIT_ADMIN_TOKEN is set but empty.*unset it to serve read-only"
    ):
        cli_serve.admin_token(None)


def test_a_taken_port_or_a_missing_device_is_one_line_before_anything_loads(family, capsys):
    import socket

    from adapterkit.cli import main

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(CliError, match=f"cannot listen on 127.0.0.1:{port}.*another --port"):
            cli_serve.check_port("127.0.0.1", port)
    cli_serve.check_port("127.0.0.1", port)  # free again
    # a --host that is not this machine's said "pass another --port or stop what holds it"
    with pytest.raises(CliError, match="nosuchhost.invalid:0 .*--host is an address of this machine"):
        cli_serve.check_port("nosuchhost.invalid", 0)
    with pytest.raises(CliError, match="192.0.2.1:0 .*--host is an address of this machine"):
        cli_serve.check_port("192.0.2.1", 0)  # TEST-NET-1: never an address of this machine
    with pytest.raises(CliError, match="'gpu' is not a device torch knows; pass cpu, cuda"):
        cli_serve.check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(CliError, match="0 CUDA devices"):
            cli_serve.check_device("cuda")
        assert main(["predict", str(family), str(family / "adapterkit.json"), "--device", "cuda"]) == 2
        assert "--device cuda: this machine has 0 CUDA devices" in capsys.readouterr().err
    cli_serve.check_device("cpu")


def test_the_token_is_never_a_command_line_value():
    from adapterkit.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert (
        result.exit_code == 0 and "--admin-token-file" in result.output and "--no-freeze-gc" in result.output
    )
    assert "--admin-token " not in result.output
    result = CliRunner().invoke(app, ["serve", "fam", "--admin-token", "secret-value"])
    assert result.exit_code != 0


def test_a_repo_source_takes_a_revision_after_an_at_sign(family, registry):
    from adapterkit import AdapterModel

    repo = "alice/serve-cli-revision"
    model = AdapterModel.from_pretrained(family, domains=["a"])
    model.push_to_hub(repo, token=registry.tokens["alice"], branch="v1")
    loaded, source, revision = load_family(f"{repo}@v1")
    assert (source, loaded.domains) == (repo, ["a"])
    assert len(revision) == 40  # the branch's commit, so every read (and /v1/domains) names one version
    with pytest.raises(FileNotFoundError):
        load_family(f"{repo}@no-such-branch")
    # a hot-add takes the same `repo@revision`
    from adapterkit.serve_domains import Domains
    from adapterkit.serve_errors import ServeError

    domains = Domains(AdapterModel.from_pretrained(family, domains=[]))
    with pytest.raises(ServeError, match="disagree") as refused:
        domains.hot_add(f"{repo}@v1", "a", "main", None)
    assert refused.value.status == 422
    added = domains.hot_add(f"{repo}@v1", "a", None, None)
    assert added["name"] == "a" and added["revision"] == revision


def test_serve_function_loads_and_serves_a_family(family):
    port = free_port()
    code = f"from adapterkit.serve_run import serve; serve({str(family)!r}, domains=['b'], port={port}, torch_threads=1)"
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        with httpx.Client(base_url=url, timeout=60) as client:
            assert predict_json(client, [("b", image_bytes(2))]).status_code == 200
            assert client.post("/v1/domains", json={"source": str(family), "domain": "a"}).status_code == 403
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err


def test_the_command_lines_pixel_limit_is_the_services():
    from adapterkit.serve_images import DEFAULT_MAX_PIXELS

    assert cli_serve.MAX_PIXELS == DEFAULT_MAX_PIXELS  # (cli_serve imports no torch, so it repeats it)


def test_images_still_queued_at_the_graceful_timeout_get_a_json_503(family):
    """SIGTERM with more queued than the graceful timeout lets the server run: what is still queued near
    the timeout is answered 503 `shutting_down` as JSON (before: uvicorn cancelled it, a plain-text 500)."""
    port = free_port()
    flags = ["--port", str(port), "--max-batch-size", "1", "--queue-size", "4096", "--graceful-timeout", "1"]
    process = subprocess.Popen(
        [*command(), str(family), "--domain", "a", *flags, "--torch-threads", "1", "--no-freeze-gc"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    body = {"images": [{"domain": "a", "data": b64(image_bytes(i))} for i in range(64)]}
    stopping = []  # one SIGTERM only: a second one during the interpreter's exit would kill it (-15)

    async def load() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            sent = [asyncio.create_task(client.post("/v1/predict", json=body)) for _ in range(32)]
            for _ in range(600):  # at most 60 s for the queue to fill
                if (await client.get("/readyz")).json().get("queue_depth", 0) >= 1000:
                    break
                await asyncio.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            stopping.append(True)
            return await asyncio.gather(*sent)

    try:
        wait_ready(url, process)
        answers = asyncio.run(load())
    finally:
        if not stopping:
            process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    codes = [(r.status_code, r.json().get("error", {}).get("code")) for r in answers]  # all JSON
    assert set(codes) <= {(200, None), (503, "shutting_down")}, codes
    assert (503, "shutting_down") in codes and process.returncode == 0, err
    assert "queued images answered 503" in err
