"""Expected failures of the command line, each said in one line naming the problem and the fix.

`explain` turns an exception into that line (or None for a bug, which main reports as unexpected).
`require_endpoint` fails fast when the Hub or registry cannot be reached: huggingface_hub retries a
refused connection five times with back-off (1+2+4+8+8 s) before falling back to its cache, and
`hf_hub_download` then reports a missing file, so without the check `pull`/`info` waited 27 s and
blamed the family. `check_push_token` asks the endpoint who the token belongs to before anything is
built, so a missing, read-only or foreign token fails in a second. Imports no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Class names of the HTTP clients' network failures (requests, httpx, urllib3, socket).
_NETWORK = {"ConnectionError", "ConnectError", "ConnectTimeout", "TransportError", "Timeout"}
_NETWORK |= {
    "TimeoutException",
    "ReadTimeout",
    "NewConnectionError",
    "MaxRetryError",
    "ConnectionRefusedError",
}
_REGISTRY_HINT = "(self-hosted registry: adapterkit-registry token create --root DIR --user NAME)"


class CliError(Exception):
    """An expected failure; its message names the problem and the fix."""


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def unreachable_message(reason: object) -> str:
    return (
        f"cannot reach {endpoint()} ({reason}); start the registry or fix the address: "
        "export HF_ENDPOINT=http://HOST:PORT (unset it for huggingface.co), or HF_HUB_OFFLINE=1 to use the cache"
    )


def endpoint_problem(timeout: float = 3.0) -> str | None:
    """Why the endpoint does not answer HTTP within `timeout` seconds, or None if it answers (any status).

    Uses the Hub client's own session, so proxies and certificates are the ones downloads will use."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint(), timeout=timeout)
    except Exception as e:  # noqa: BLE001  (any transport failure means unreachable)
        if is_network_error(e):
            return short_reason(e, limit=80)
        raise
    return None


def require_endpoint() -> None:
    """Raise a one-line `CliError` unless the endpoint answers (skipped with HF_HUB_OFFLINE=1)."""
    problem = None if offline() else endpoint_problem()
    if problem is not None:
        raise CliError(unreachable_message(problem))


def _chain(error: BaseException, depth: int = 8) -> Iterator[BaseException]:
    """`error` and the exceptions it was raised from (or while handling), at most `depth` of them."""
    seen: BaseException | None = error
    while seen is not None and depth > 0:
        yield seen
        seen, depth = seen.__cause__ or seen.__context__, depth - 1


def is_network_error(error: BaseException) -> bool:
    """True if `error`, or an exception it was raised from, is a network failure."""
    return any({cls.__name__ for cls in type(e).__mro__} & _NETWORK for e in _chain(error))


def check_push_token(repo_id: str, token: str | None) -> str:
    """The full repo id (`user/name` for a bare `name`), after checking that the token may write there."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        me = HfApi(token=token).whoami()
    except HfHubHTTPError as e:
        if _status(e) == 401:
            raise CliError(
                f"pushing to {endpoint()} needs a write token, and none was given or it is not valid: pass "
                f"--token TOKEN or set HF_TOKEN {_REGISTRY_HINT}"
            ) from e
        raise
    except OSError as e:  # LocalTokenNotFoundError: no token at all
        raise CliError(
            f"pushing to {endpoint()} needs a write token and none is set: pass --token TOKEN or set HF_TOKEN "
            f"{_REGISTRY_HINT}"
        ) from e
    user = me.get("name", "")
    role = (me.get("auth", {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise CliError(
            f"the token of {user!r} is read-only; pass a write token (--token or HF_TOKEN) {_REGISTRY_HINT}"
        )
    namespace, slash, name = repo_id.rpartition("/")
    if not slash:
        return f"{user}/{repo_id}"
    allowed = {user} | {o.get("name") for o in me.get("orgs", []) if isinstance(o, dict)}
    if namespace not in allowed:
        raise CliError(
            f"the token of {user!r} cannot write to namespace {namespace!r}; push to {user}/{name} or use a "
            f"token of {namespace!r}"
        )
    return repo_id


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def explain(error: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for an unexpected one (a bug)."""
    if isinstance(error, CliError):
        return str(error)
    answered = _status_in_message(error)
    if answered is not None:
        return answered
    if is_network_error(error):
        return unreachable_message(type(error).__name__)
    http = _http_message(error)
    if http is not None:
        return http
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    if isinstance(error, (ValueError, OSError)):  # OSError: missing files, permissions, Hub auth
        return str(error)
    if isinstance(error, RuntimeError) and _raised_by_adapterkit(error):
        return str(error)  # deliberate (a push conflict, say); torch's own RuntimeErrors are bugs
    return None


# hf_xet reports an HTTP error answer as a ConnectionError: "HTTP status client error (413 Request Entity
# Too Large), domain: https://..."
_XET_STATUS = re.compile(r"HTTP status \w+ error \((\d{3})([^)]*)\), domain: (\S+)")


def _status_in_message(error: BaseException) -> str | None:
    """The line for a server's HTTP error answer that the client raised as another error (hf_xet's uploads
    and downloads), so that it is not reported as an unreachable endpoint."""
    for seen in _chain(error):
        match = _XET_STATUS.search(str(seen))
        if match is not None:
            status, reason, url = match[1], match[2].strip(), match[3]
            hint = "retry, or check the server's log"
            if status == "413":
                hint = (
                    "the body was refused as too large: behind nginx set client_max_body_size 0 "
                    "(docs/deploy.md); the registry's own limit is --max-upload-mb"
                )
            return f"{url} answered {status} {reason}; {hint}"
    return None


def _raised_by_adapterkit(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("adapterkit")


def _http_message(error: BaseException) -> str | None:
    try:
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover
        return None
    if isinstance(error, RepositoryNotFoundError):
        return f"repo not found on {endpoint()} ({_first_line(error)}); check the name, or pass --token if it is private"
    if not isinstance(error, HfHubHTTPError):
        return None
    status, detail = _status(error), _first_line(error)
    if status == 401:
        return f"{endpoint()} needs a valid token ({detail}); pass --token TOKEN or set HF_TOKEN {_REGISTRY_HINT}"
    if status == 403:
        return f"the token may not do this ({detail}); use a write token of the repo's namespace"
    return f"{endpoint()} answered {status} ({detail}); retry, or check the server's log"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def short_reason(error: BaseException, limit: int = 160) -> str:
    """`Type: first words of the message`, to quote a cause inside a one-line message."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def train_config_from_flags(**options: Any):
    """`TrainConfig(**options)` from `adapterkit train`'s flags; its refusals name the flags, not the fields."""
    from .train_config import TrainConfig

    for name, example in (("weight_decay", "0.0005"), ("adapter_lr_scale", "3.5")):
        value = options[name]
        try:
            options[name] = value if value == "auto" else float(value)
        except ValueError as e:
            flag = "--" + name.replace("_", "-")
            raise CliError(f"{flag} {value!r} is not a number; pass e.g. {example}, or 'auto'") from e
    try:
        return TrainConfig(**options)
    except ValueError as e:
        flags = {name: "--" + name.replace("_", "-") for name in options} | {"num_workers": "--workers"}
        text = re.sub(
            r"\b[a-z]+(?:_[a-z]+)+\b|\b(?:epochs|steps|lr)\b", lambda m: flags.get(m[0], m[0]), str(e)
        )
        raise CliError(text) from e


def interrupted(domain: str, config: Any) -> str:
    """What an interrupted training left, and how to continue it."""
    if config.checkpoint_every:
        folder = Path(config.output_dir) / "checkpoints" / domain
        return (
            f"interrupted: {domain!r} was not saved; rerun the command with --resume to continue from the "
            f"last checkpoint in {folder}"
        )
    return (
        f"interrupted: {domain!r} was not saved; with --output-dir DIR --checkpoint-every N, a rerun with "
        "--resume continues from the last checkpoint"
    )
