"""Shared fixtures and the suite's rules.

`isolated_home` (autouse): every test gets its own HOME, $GPT2CLOUD_HOME and caches under its tmp_path
(`session_home` does the same for module and session fixtures), so nothing of the developer's machine
(~/.gpt2cloud/calibration.jsonl, ~/.aws, a tiktoken or Hugging Face cache) changes what a test sees,
and nothing a test writes lands there. Subprocesses inherit it. Tests that import SkyPilot set HOME
again themselves (tests/sky_offline.py's `sky_mod`, which runs after this fixture), because SkyPilot
reads HOME once, at `import sky`.

`s3_server`: a real S3 endpoint over HTTP (moto's server in a thread of the test process), started
once per session; fake AWS credentials are in the environment for the whole session. boto3 is not patched: code under
test talks to it exactly as to AWS, through `endpoint_url`. `s3_bucket`: a fresh, empty bucket on it.

`global_state_unchanged` (autouse): a test that leaves a signal handler, an environment variable, the
working directory or the multiprocessing start method changed fails (and the state is put back). A
handler left behind by a library call once hung the suite: a later fork inherited it (issue 19).

No silent skips in CI: with CI set (as CI services do) or GPT2CLOUD_NO_SKIPS=1, a skipped test, or a
test module skipped at import, fails the run: a feature the README promises must not go untested
because a package was missing on the CI machine. Elsewhere skips are allowed and listed (`-rs`).
"""

from __future__ import annotations

import getpass
import multiprocessing
import os
import signal
import tempfile
import uuid

import pytest

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata credential lookup
}

# Where libraries look for per-user state when these are set: unset them, so that HOME decides.
_USER_STATE_VARS = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE",
                    "TORCH_HOME", "DATA_GYM_CACHE_DIR", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                    "SKYPILOT_CONFIG", "PYTHONUSERBASE")


# ---------------------------------------------------------------- isolation


def isolate_home(mp: pytest.MonkeyPatch, home) -> None:
    """Point HOME, $GPT2CLOUD_HOME, the XDG dirs and the tools' caches into `home` (created here).

    torch.compile's Inductor cache is left where it is (/tmp/torchinductor_$USER, not under HOME):
    it holds compiled kernels keyed by their source, changes no result, and a cold one costs ~1 min.
    """
    home.mkdir(parents=True, exist_ok=True)
    for var in _USER_STATE_VARS:
        mp.delenv(var, raising=False)
    mp.setenv("HOME", str(home))
    mp.setenv("GPT2CLOUD_HOME", str(home / ".gpt2cloud"))
    mp.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    mp.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    mp.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    mp.setenv("XDG_STATE_HOME", str(home / ".local" / "state"))
    mp.setenv("TIKTOKEN_CACHE_DIR", str(home / ".cache" / "tiktoken"))
    mp.setenv("MPLCONFIGDIR", str(home / ".config" / "matplotlib"))
    # Inductor writes its default into the environment on first use: name it here, so that first use
    # (in whichever test) changes nothing global.
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}"))
    mp.setenv("HF_HUB_OFFLINE", "1")  # no test may reach the Hugging Face hub
    mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory):
    """The same for what runs outside any one test: module and session fixtures (reference training
    runs, servers). Each test then gets a HOME of its own (isolated_home)."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("session-home")
    isolate_home(mp, home)
    # Fake AWS credentials for the whole session, set before any test: the S3 server (started lazily,
    # by whichever test first needs it) then changes no environment inside a test, and a developer's
    # real credentials, profile or endpoint never reach one.
    for k, v in FAKE_AWS_ENV.items():
        mp.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(k, raising=False)
    yield home
    mp.undo()


# ---------------------------------------------------------------- no leaked global state


def _handlers() -> dict:
    """The Python-level disposition of every signal that can be caught (SIGALRM is pytest-timeout's:
    it takes it back early, in the failure hook, when a test fails)."""
    out = {}
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGALRM):
            continue
        try:
            out[sig] = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
    return out


def global_state() -> dict:
    """What a test (or a library call inside it) must leave as it found it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # pytest's own, per phase
    return {"signal handlers": _handlers(), "environment": env, "working directory": os.getcwd(),
            "multiprocessing start method": _start_method()}


def _start_method() -> str:
    """The method new processes start with. A library that asks get_start_method() fixes the default
    (None -> the platform's first method): that changes nothing; a set_start_method() to another does."""
    return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]


def _diff(name: str, before, after) -> str:
    if isinstance(before, dict):
        keys = sorted({*before, *after} - {k for k in before if after.get(k, object()) == before[k]}, key=str)
        changed = [f"{getattr(k, 'name', k)}: {before.get(k, '<unset>')!r} -> {after.get(k, '<unset>')!r}" for k in keys]
        return f"{name} changed: " + "; ".join(changed)
    return f"{name} changed: {before!r} -> {after!r}"


def _restore(before: dict) -> None:
    """Put the state back, so one leaking test does not fail the ones after it too."""
    for sig, handler in before["signal handlers"].items():
        if signal.getsignal(sig) is not handler and handler is not None:
            signal.signal(sig, handler)
    for k in set(os.environ) - set(before["environment"]) - {"PYTEST_CURRENT_TEST"}:
        del os.environ[k]
    os.environ.update(before["environment"])
    os.chdir(before["working directory"])
    if _start_method() != before["multiprocessing start method"]:
        multiprocessing.set_start_method(before["multiprocessing start method"], force=True)


@pytest.fixture(autouse=True)
def global_state_unchanged():
    """Fail a test that leaves signal handlers, environment variables, the working directory or the
    multiprocessing start method changed. Set up before isolated_home (which it wraps), so the
    environment is compared after monkeypatch has undone that fixture's own changes."""
    before = global_state()
    yield
    after = global_state()
    leaks = [_diff(name, before[name], after[name]) for name in before if after[name] != before[name]]
    if leaks:
        _restore(before)
        pytest.fail("the test leaked global state: " + " | ".join(leaks), pytrace=False)


@pytest.fixture(autouse=True)
def isolated_home(global_state_unchanged, session_home, tmp_path, monkeypatch):
    """A fresh HOME for this test at tmp_path/.home, with $GPT2CLOUD_HOME and the caches inside it."""
    home = tmp_path / ".home"
    isolate_home(monkeypatch, home)
    return home


# ---------------------------------------------------------------- no silent skips in CI


def no_skips() -> bool:
    """CI (set to anything but a false value) or GPT2CLOUD_NO_SKIPS=1: a skip is a failure."""
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in ("", "0", "false", "no") or os.environ.get("GPT2CLOUD_NO_SKIPS") == "1"


def _skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return str(longrepr[2])
    return str(longrepr)


_NO_SKIPS_NOTE = "skipped tests fail the run when CI or GPT2CLOUD_NO_SKIPS=1 is set (tests/conftest.py)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and no_skips():
        report.outcome = "failed"
        report.longrepr = f"{_skip_reason(report.longrepr)}\n{_NO_SKIPS_NOTE}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module that skips itself at import (pytest.importorskip at the top) is a skip too."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and no_skips():
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid}: {_skip_reason(report.longrepr)}\n{_NO_SKIPS_NOTE}"


def pytest_report_header(config):
    if no_skips():
        return "no skips allowed (CI or GPT2CLOUD_NO_SKIPS=1): a skipped test fails"
    return None


# ---------------------------------------------------------------- S3


@pytest.fixture(scope="session")
def s3_server():
    """Start a local S3 server; return its endpoint URL, e.g. "http://127.0.0.1:41234"."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # credentials: session_home
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """Create a new empty bucket on the local S3 server; return its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name
