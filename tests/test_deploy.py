"""deploy/: the nginx site and the systemd units of docs/deploy.md, run as shipped (only ports, paths and host
names replaced) in front of a real registry and a real service: TLS with a test CA, a push and a pull through
the proxy with the real huggingface_hub client and hf_xet, predictions and a hot-add under /adapters/."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from serve_support import ADMIN, build_family, free_port, image_bytes, predict_json

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
BIN = Path(sys.executable).parent  # the environment's console scripts: adapterkit, adapterkit-registry
pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None or shutil.which("openssl") is None,
    reason="needs nginx and openssl (Debian: apt-get install nginx-light openssl)",
)


class Stack(NamedTuple):
    env: dict[str, str]  # a client's environment: HF_ENDPOINT (through nginx), HF_TOKEN, SSL_CERT_FILE
    certs: dict[str, Path]
    ports: dict[str, int]
    family: Path
    processes: list[subprocess.Popen]


def certificates(folder: Path) -> dict[str, Path]:
    """A test CA and a certificate it signed for 127.0.0.1."""
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)  # noqa: E731
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "host.key",
        "-out",
        "host.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    run("x509", "-req", "-in", "host.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "host.pem",
        "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return {"ca": folder / "ca.pem", "cert": folder / "host.pem", "key": folder / "host.key"}


def replaced(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in the shipped file: update the test and docs/deploy.md"
        text = text.replace(old, new)
    return text


def exec_start(unit: str, replacements: dict[str, str]) -> list[str]:
    """The unit's ExecStart command line, with `replacements`."""
    line = next(x for x in (DEPLOY / "systemd" / unit).read_text().splitlines() if x.startswith("ExecStart="))
    return shlex.split(
        replaced(line.removeprefix("ExecStart="), {"/opt/adapterkit/venv/bin/": f"{BIN}/", **replacements})
    )


def nginx(
    folder: Path, certs: dict[str, Path], ports: dict[str, int], edit: dict[str, str]
) -> subprocess.Popen:
    """nginx running deploy/nginx/adapterkit.conf: the hub on ports["hub"], the service on ports["adapters"]."""
    site = replaced((DEPLOY / "nginx" / "adapterkit.conf").read_text(), edit)
    site = replaced(site, {
        "127.0.0.1:8000;": f"127.0.0.1:{ports['registry']};", "127.0.0.1:8001;": f"127.0.0.1:{ports['serve']};",
        "/etc/ssl/adapterkit/hub.pem": str(certs["cert"]), "/etc/ssl/adapterkit/hub.key": str(certs["key"]),
        "/etc/ssl/adapterkit/adapters.pem": str(certs["cert"]), "/etc/ssl/adapterkit/adapters.key": str(certs["key"]),
    })  # fmt: skip
    site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{ports['hub']} ssl;", 1)
    site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{ports['adapters']} ssl;", 1)
    (folder / "site.conf").write_text(site)
    temp = " ".join(
        f"{k}_temp_path {folder}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (folder / "nginx.conf").write_text(
        f"daemon off; worker_processes 1; pid {folder}/nginx.pid; error_log {folder}/error.log warn;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{ access_log off; {temp} include {folder}/site.conf; }}\n"
    )
    check = subprocess.run(
        ["nginx", "-t", "-c", f"{folder}/nginx.conf", "-p", str(folder)], capture_output=True
    )
    assert check.returncode == 0, check.stderr.decode()
    return subprocess.Popen(
        ["nginx", "-c", f"{folder}/nginx.conf", "-p", str(folder)], stderr=subprocess.PIPE
    )


def wait_for(url: str, process: subprocess.Popen, ca: Path | bool = False) -> None:
    for _ in range(240):  # start-up imports torch and timm: at most 120 s on a busy machine
        if process.poll() is not None:
            raise AssertionError(
                f"{process.args[0]} exited with {process.returncode}: {process.stderr.read()}"
            )
        try:
            if (
                httpx.get(
                    url, timeout=2, verify=ssl.create_default_context(cafile=ca) if ca else True
                ).status_code
                == 200
            ):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)  # as systemd stops it
    try:
        process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_systemd_units_verify(tmp_path):
    for unit in ("adapterkit-registry.service", "adapterkit-serve.service"):
        text = replaced((DEPLOY / "systemd" / unit).read_text(), {"/opt/adapterkit/venv/bin/": f"{BIN}/"})
        (tmp_path / unit).write_text(text)
        result = subprocess.run(
            ["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True
        )
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@contextmanager
def behind_nginx(folder: Path, site_edit: dict[str, str] | None = None) -> Iterator[Stack]:
    """The registry of the shipped unit behind the shipped nginx site (with `site_edit`), and a family whose
    domain b is larger than nginx's default body limit (1 MB)."""
    certs = certificates(folder)
    ports = {name: free_port() for name in ("registry", "serve", "hub", "adapters")}
    hub = f"https://127.0.0.1:{ports['hub']}"
    root = folder / "registry"
    token = subprocess.run(
        [f"{BIN}/adapterkit-registry", "token", "create", "--root", str(root), "--user", "alice"],
        check=True, capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SSL_CERT_FILE": str(certs["ca"]),
        "HF_HOME": str(folder / "hf"),
    }
    env |= {"HF_ENDPOINT": hub, "HF_TOKEN": token}  # what /etc/adapterkit/serve.env holds
    env.pop("ADAPTERKIT_ADMIN_TOKEN", None)
    registry = subprocess.Popen(
        exec_start("adapterkit-registry.service", {
            "/var/lib/adapterkit-registry": str(root), "--port 8000": f"--port {ports['registry']}",
            "https://hub.example.com": hub,
        }) + ["--lfs-threshold-mb", "0.01"],  # the test's small files go through Xet
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    processes = [registry, nginx(folder, certs, ports, site_edit or {})]
    try:
        wait_for(f"{hub}/healthz", registry, certs["ca"])
        family = build_family(folder / "fam", {"a": (3, 32, ["cat", "dog", "eel"]), "b": (8000, 32, None)})
        assert (family / "domains" / "b.safetensors").stat().st_size > 2**20  # its head: 8,000 classes
        yield Stack(env, certs, ports, family, processes)
    finally:
        for process in reversed(processes):
            stop(process)


def adapterkit(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adapterkit.cli", *args], env=env, capture_output=True, text=True
    )


def test_a_family_pushed_pulled_and_served_through_nginx_with_tls(tmp_path):
    with behind_nginx(tmp_path) as stack:
        pushed = adapterkit("push", str(stack.family), "alice/fam", env=stack.env)
        assert pushed.returncode == 0, pushed.stderr
        assert stack.env["HF_ENDPOINT"] in pushed.stdout  # the commit URL names the public address
        pulled = adapterkit("pull", "alice/fam", str(tmp_path / "pulled"), env=stack.env)
        assert pulled.returncode == 0, pulled.stderr
        for path in stack.family.rglob("*.safetensors"):
            assert (tmp_path / "pulled" / path.relative_to(stack.family)).read_bytes() == path.read_bytes()
        (tmp_path / "admin-token").write_text(ADMIN + "\n")
        serve = subprocess.Popen(
            exec_start("adapterkit-serve.service", {
                "alice/decathlon-r56@v1": "alice/fam", "--port 8001": f"--port {stack.ports['serve']}",
                "/etc/adapterkit/admin-token": str(tmp_path / "admin-token"), "--torch-threads 4": "--torch-threads 1",
            }) + ["--domain", "a", "--no-freeze-gc"],
            env=stack.env, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        stack.processes.append(serve)
        adapters = f"https://127.0.0.1:{stack.ports['adapters']}/adapters"
        wait_for(f"{adapters}/readyz", serve, stack.certs["ca"])
        verify = ssl.create_default_context(cafile=stack.certs["ca"])
        with httpx.Client(base_url=adapters, verify=verify, timeout=60) as client:
            assert predict_json(client, [("a", image_bytes(0))]).json()["predictions"][0]["domain"] == "a"
            auth = {"Authorization": f"Bearer {ADMIN}"}
            added = client.post("/v1/domains", json={"source": "alice/fam", "domain": "b"}, headers=auth)
            assert added.status_code == 201, added.text
            assert predict_json(client, [("b", image_bytes(1))]).status_code == 200
            page = client.get("/docs")
            assert page.status_code == 200 and "/adapters/openapi.json" in page.text  # --root-path
            assert client.get("/openapi.json").status_code == 200


def test_a_proxys_body_limit_is_named_not_reported_as_an_unreachable_registry(tmp_path):
    # hf_xet raises the proxy's 413 as a ConnectionError; it used to read "cannot reach https://..."
    with behind_nginx(tmp_path, {"client_max_body_size 0;": "# nginx's default: 1m"}) as stack:
        pushed = adapterkit("push", str(stack.family), "alice/fam", env=stack.env)
    assert pushed.returncode == 2
    assert "answered 413" in pushed.stderr and "client_max_body_size 0" in pushed.stderr, pushed.stderr
    assert "cannot reach" not in pushed.stderr


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="runs the install's lines as root"
)
def test_the_install_lines_leave_the_units_user_what_it_reads():
    """docs/deploy.md's install lines for the registry's root and /etc/adapterkit, run as written (sudo
    dropped, `sudo -u adapterkit` as `nobody`, the folders under a root-owned one). Before, the token
    commands could not create /var/lib/adapterkit-registry (root's /var/lib; systemd creates the
    StateDirectory only when the unit starts, later), and the admin token file was root's with mode 600,
    which the serve unit, running as `adapterkit`, cannot read (it exited 2 in a restart loop)."""
    unit = (DEPLOY / "systemd" / "adapterkit-serve.service").read_text()
    assert "User=adapterkit" in unit and "--admin-token-file /etc/adapterkit/admin-token" in unit
    doc = (DEPLOY.parent / "docs" / "deploy.md").read_text()
    paths = ("/etc/adapterkit", "/var/lib/adapterkit-registry")
    lines = [x[2:] for x in doc.splitlines() if x.startswith("$ ") and any(p in x for p in paths)]
    lines = [x for x in lines if not x.startswith("sudo useradd")]  # (nobody exists)
    as_user = "setpriv --reuid=nobody --regid=nogroup --clear-groups"
    probe = subprocess.run(
        [*as_user.split(), f"{BIN}/python", "-c", "import adapterkit_registry"], capture_output=True
    )
    if probe.returncode != 0:  # (the service's venv is readable by its user; this test's may not be)
        pytest.skip(f"nobody cannot run this environment's Python ({BIN}): {probe.stderr.decode()[-200:]}")
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:  # (pytest's tmp_path is closed to others)
        os.chmod(folder, 0o755)
        etc, state = Path(folder) / "etc-adapterkit", Path(folder) / "var-lib-registry"
        script = "\n".join(lines).replace("sudo -u adapterkit ", f"{as_user} ").replace("sudo ", "")
        script = script.replace("/etc/adapterkit", str(etc)).replace(paths[1], str(state))
        script = script.replace("/opt/adapterkit/venv/bin/", f"{BIN}/")
        script = re.sub(r"(?<![\w/.-])adapterkit(?![\w/.-])", "nobody", script)  # the user and group
        script = script.replace("-g nobody", "-g nogroup")
        done = subprocess.run(["bash", "-ec", script], capture_output=True, text=True, cwd=folder)
        assert done.returncode == 0, done.stderr
        read = subprocess.run([*as_user.split(), "cat", str(etc / "admin-token")], capture_output=True)
        assert read.returncode == 0 and len(read.stdout.strip()) == 64, read.stderr
        assert (etc / "admin-token").stat().st_mode & 0o077 == 0  # nobody else's
        assert (state / "registry.db").exists() or any(state.iterdir())  # the tokens were written
