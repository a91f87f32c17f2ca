"""`export --push-to-hub ORG/NAME [--private]`: an export directory uploaded to a Hugging Face Hub model repo.

The push is one commit of exactly the files the export wrote (its marker's list, the card and plot
included), with the files of an earlier push of ours that this export no longer has deleted in the
same commit: the repo then holds this export and nothing else of ours. The commit names the revision
it was checked against (parent_commit), so a repo changed in between is never written over.

Ownership (docs/ownership.md): the repo must be new, empty (the .gitattributes the Hub creates it with)
or an earlier push of ours: its README.md carries the card's marker line and it holds no file an export
does not write. Anything else is refused with one line before anything is written. `preflight` checks
this, the repo id and the token before the export starts; `push_export` checks the repo again.

HF_TOKEN (a write token) comes from the environment only and is never printed; HF_ENDPOINT selects
another Hub. Every request is bounded: huggingface_hub's shared HTTP client gets our timeouts for the
push (it has none by default), and its own retries of uploads are bounded in number. The weights go over
that client too (the LFS transfer): the Xet client (hf_xet), which the Hub would otherwise take them
through, has timeouts of its own that ours do not reach, so it is switched off for the push. huggingface_hub
is imported inside the functions, so `gpt2cloud --help` never pays for it.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from gpt2cloud.checkpoints.export import CARD_FILE, CARD_FILES, EXPORT_FILES, exported_files, is_our_card
from gpt2cloud.errors import UserError
from gpt2cloud.store.hub import DEFAULT_ENDPOINT, NAME, endpoint_override

CONNECT_S = 10.0  # to open a connection to the Hub
IO_S = 120.0  # between two reads or writes of one request (the Hub may take a while to answer a commit)
XET_ENV = "HF_HUB_DISABLE_XET"  # huggingface_hub's switch: no Xet transfers (their waits are not ours to bound)
HUB_FILES = (".gitattributes",)  # what the Hub writes into a new repo itself
OURS = frozenset((*EXPORT_FILES, *CARD_FILES, *HUB_FILES))
SPELLING = "--push-to-hub ORG/NAME (e.g. my-user/gpt2-124m)"


def endpoint() -> str:
    return endpoint_override() or DEFAULT_ENDPOINT


def preflight(repo_id: str, private: bool = False) -> str:
    """Before anything is exported (an export of 1.5B parameters takes minutes): the repo id's spelling,
    HF_TOKEN, that the Hub answers and takes the token, and that the repo is new or ours. Returns the token."""
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(NAME.match(p) and ".." not in p and "--" not in p for p in parts):
        raise UserError(f"--push-to-hub {repo_id!r}: not a Hub repo id; use {SPELLING}: letters, digits, "
                        "'-', '_' and '.' on each side of one '/'")
    token = (os.environ.get("HF_TOKEN") or "").strip()
    if not token:
        raise UserError(f"--push-to-hub: HF_TOKEN is not set; create a write token at {endpoint()}/settings/tokens "
                        "and export HF_TOKEN=... (it is read from the environment only)")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi(endpoint=endpoint(), token=token)
    with _bounded_waits(), _errors(repo_id):
        role = ((api.whoami().get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise UserError(f"--push-to-hub: HF_TOKEN is a read token; create a write token at "
                            f"{endpoint()}/settings/tokens and set HF_TOKEN to it")
        try:
            state = _repo_state(api, repo_id)
        except RepositoryNotFoundError:
            return token  # a new repo (or one this token cannot see: creating it will tell)
        _check_repo(api, repo_id, state, private)
    return token


def push_export(out_dir: str | Path, repo_id: str, token: str, private: bool = False) -> dict:
    """Upload the export in out_dir to the model repo repo_id (created if new) as one commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    out = Path(out_dir)
    files = exported_files(out)
    api = HfApi(endpoint=endpoint(), token=token)
    with _bounded_waits(), _errors(repo_id):
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        state = _repo_state(api, repo_id)  # again: the repo may have changed since the preflight
        _check_repo(api, repo_id, state, private)
        sha, remote, _ = state
        stale = sorted(n for n in remote if n in OURS and n not in files and n not in HUB_FILES)
        operations = ([CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(out / n)) for n in files]
                      + [CommitOperationDelete(path_in_repo=n) for n in stale])
        commit = api.create_commit(repo_id, operations, commit_message=f"gpt2cloud export of {out.name}",
                                   repo_type="model", parent_commit=sha)  # refused if the repo moved on
    return {"repo": repo_id, "url": f"{endpoint()}/{repo_id}", "commit": commit.oid, "files": sorted(files),
            "deleted": stale}


def _repo_state(api, repo_id: str) -> tuple[str | None, list[str], bool | None]:
    """(head commit of main, the files there, private?); a repo without a commit yet has no files."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        info = api.model_info(repo_id, revision="main")
    except RevisionNotFoundError:
        return None, [], None
    return info.sha, [s.rfilename for s in info.siblings or []], info.private


def _check_repo(api, repo_id: str, state: tuple, private: bool) -> None:
    """A repo with files beyond the Hub's own must be an earlier push of ours, and --private must not
    publish into a public one; else one line, before anything is written."""
    sha, remote, is_private = state
    if private and is_private is False:
        raise UserError(f"--private: {repo_id} already exists on {endpoint()} and is public; make it private "
                        "in its settings on the Hub first, or push without --private")
    content = [n for n in remote if n not in HUB_FILES]
    if not content:
        return
    ways = f"push to a new name (e.g. --push-to-hub {repo_id}-2), or delete or rename that repo on the Hub first"
    foreign = [n for n in content if n not in OURS]
    if foreign:
        what = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UserError(f"--push-to-hub {repo_id}: the repo holds files gpt2cloud did not write ({what}); {ways}")
    if CARD_FILE not in content or not is_our_card(_read_remote(api, repo_id, CARD_FILE, sha)):
        raise UserError(f"--push-to-hub {repo_id}: the repo's {CARD_FILE} is not a gpt2cloud model card (no "
                        f"marker line), so gpt2cloud did not write it; {ways}")


def _read_remote(api, repo_id: str, name: str, sha: str | None) -> str:
    """One small file of the repo at the commit checked, downloaded into a throwaway cache."""
    with tempfile.TemporaryDirectory(prefix="gpt2cloud-hub-") as cache:
        path = api.hf_hub_download(repo_id, name, revision=sha, cache_dir=cache, etag_timeout=CONNECT_S)
        return Path(path).read_text(encoding="utf-8", errors="replace")


@contextmanager
def _bounded_waits():
    """Our timeouts on huggingface_hub's shared client for the push, its own (none) put back after; and no
    Xet transfer meanwhile (HF_HUB_DISABLE_XET), so that the uploads go through that client. huggingface_hub
    reads HF_HUB_DISABLE_XET once, at import (huggingface_hub.constants): the constant is what counts in
    this process; the variable is set too, for anything that reads the environment. Both put back after."""
    import httpx
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    session = get_session()
    before = session.timeout, constants.HF_HUB_DISABLE_XET, os.environ.get(XET_ENV)
    session.timeout = httpx.Timeout(IO_S, connect=CONNECT_S)
    constants.HF_HUB_DISABLE_XET = True
    os.environ[XET_ENV] = "1"
    try:
        yield
    finally:
        session.timeout, constants.HF_HUB_DISABLE_XET, env = before
        if env is None:
            os.environ.pop(XET_ENV, None)
        else:
            os.environ[XET_ENV] = env


@contextmanager
def _errors(repo_id: str):
    """huggingface_hub's and httpx's exceptions -> one-line UserErrors that say what to do."""
    import httpx
    from huggingface_hub import errors as hf

    where, tokens = endpoint(), f"{endpoint()}/settings/tokens"
    org = repo_id.split("/")[0]
    try:
        yield
    except UserError:
        raise
    except hf.OfflineModeIsEnabled:
        raise UserError("--push-to-hub: HF_HUB_OFFLINE is set; unset it to push to the Hub") from None
    except hf.RepositoryNotFoundError as e:
        raise UserError(f"--push-to-hub {repo_id}: {where} neither shows nor creates it for this HF_TOKEN (HTTP "
                        f"{_status(e)}); check ORG in ORG/NAME and that the token may write to {org}") from None
    except hf.HfHubHTTPError as e:
        raise UserError(f"--push-to-hub {repo_id}: {_http_fix(_status(e), where, org, tokens)}") from None
    except httpx.TimeoutException as e:
        raise UserError(f"--push-to-hub {repo_id}: no answer from {where} in time ({type(e).__name__}); check the "
                        "network or HF_ENDPOINT, and run again: a push is one commit, nothing is half-written"
                        ) from None
    except httpx.HTTPError as e:  # refused, unresolvable, or the connection dropped midway
        raise UserError(f"--push-to-hub {repo_id}: cannot reach {where} ({type(e).__name__}: {_first_line(e)}); "
                        "check the network or HF_ENDPOINT, and run again") from None
    except ValueError as e:  # huggingface_hub's checks: a repo id or card metadata it refuses, an LFS error
        raise UserError(f"--push-to-hub {repo_id}: {_first_line(e)}") from None
    except OSError as e:  # a file of the export unreadable midway
        raise UserError(f"--push-to-hub {repo_id}: {_first_line(e)}; run `gpt2cloud export` again") from None


def _http_fix(status: int | None, where: str, org: str, tokens: str) -> str:
    if status == 401:
        return f"{where} refused HF_TOKEN (HTTP 401); create a write token at {tokens} and set HF_TOKEN to it"
    if status == 403:
        return (f"HF_TOKEN may not write to {org} on {where} (HTTP 403); use a token with write access to {org} "
                f"({tokens}), or push to your own namespace")
    if status in (409, 412):
        return f"the repo changed on the Hub while pushing (HTTP {status}); run again"
    if status == 429:
        return f"rate-limited by {where} (HTTP 429); wait a few minutes and run again"
    return f"HTTP {status} from {where}; the Hub may be down: run again later (a push is one commit)"


def _status(e) -> int | None:
    return e.response.status_code if getattr(e, "response", None) is not None else None


def _first_line(e: BaseException) -> str:
    """The message on one line (huggingface_hub's span several: the reason is often on the second)."""
    text = " ".join(str(e).split())
    return text[:300] if text else type(e).__name__
