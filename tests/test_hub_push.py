"""`gpt2cloud export`'s model card, and `export --push-to-hub ORG/NAME` (gpt2cloud/runs/card.py,
gpt2cloud/checkpoints/hub_push.py).

The Hub is PushHub: tests/test_hub.py's FakeHub (reads: revision, tree, resolve) taught the writes
huggingface_hub 1.16 makes for create_repo + create_commit, in the Hub's shapes: POST /api/repos/create
(409 when the repo exists), /api/validate-yaml (the card's front matter), /api/models/R/preupload/main
(model.safetensors goes "lfs", everything else "regular": base64 inside the commit), the LFS batch
endpoint R.git/info/lfs/objects/batch answering with the "basic" transfer (a PUT to an href, then a
verify), and /api/models/R/commit/main (NDJSON: header, file, lfsFile, deletedFile lines; a stale
parentCommit is refused). HF_ENDPOINT points at it; nothing reaches the network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants
import pytest
import yaml
from owned_helpers import one_line_error
from run_helpers import metrics_lines
from test_export import save_run
from test_hub import TOKEN, FakeHub
from typer.testing import CliRunner

from gpt2cloud.checkpoints import hub_push
from gpt2cloud.checkpoints.export import CARD_MARKER, PLOT_FILE
from gpt2cloud.checkpoints.hub_push import push_export
from gpt2cloud.cli import app
from gpt2cloud.errors import UserError
from gpt2cloud.runs.card import card_text
from gpt2cloud.runs.registry import RunSpec

# huggingface_hub's LFS upload hands httpx its file as data=; httpx asks for content=. Not ours to change.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")
runner = CliRunner()
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
REPO = "me/tiny-gpt2"
STEP, LAST, GPUS, PRICE = 7, 10, 2, 3.0  # the exported checkpoint's step; the run went on to LAST


class PushHub(FakeHub):
    """FakeHub that also takes pushes. repos[R]["commits"] gains one (sha, files) per commit received."""

    def __init__(self):
        super().__init__()
        self.lfs: dict[str, bytes] = {}  # sha256 -> bytes PUT through the LFS basic transfer
        self.private: dict[str, bool] = {}
        self.front_matter: list[dict] = []  # what /api/validate-yaml was asked to check
        self.forbidden = {"someone-else"}  # namespaces this token may not create repos in
        self.role = "write"  # the token's role, as /api/whoami-v2 tells it
        hub, base = self, self.server.RequestHandlerClass

        class Handler(base):
            def do_POST(self):
                hub.write(self)

            def do_PUT(self):
                hub.write(self)

        self.server.RequestHandlerClass = Handler

    def files(self, repo: str) -> dict:
        return self.repos[repo]["commits"][-1][1]

    # ---- reads: whoami; repo_info needs the file list and visibility besides the sha FakeHub answers
    def handle(self, h, body: bool) -> None:
        if urlsplit(h.path).path == "/api/whoami-v2":
            if not self._authorized(h):
                return None
            return self._send(h, 200, {"type": "user", "name": "me", "auth": {"accessToken": {"role": self.role}}})
        if m := re.match(r"^/api/models/([^/]+/[^/]+)/revision/([^/]+)$", urlsplit(h.path).path):
            found = self._find(h, "models", unquote(m[1]), unquote(m[2]))
            if found:
                siblings = [{"rfilename": p} for p in sorted(found[1])]
                self._send(h, 200, {"id": m[1], "sha": found[0], "private": self.private.get(m[1], False),
                                    "siblings": siblings})
            return
        super().handle(h, body)

    # ---- writes
    def write(self, h) -> None:
        path, data = urlsplit(h.path).path, self._body(h)
        if m := re.match(r"^/lfs-upload/([0-9a-f]{64})$", path):  # an S3-like href: no token needed
            if hashlib.sha256(data).hexdigest() != m[1]:
                return self._send(h, 400, {"error": "sha256 mismatch"})
            self.lfs[m[1]] = data
            return self._send(h, 200, {})
        if not self._authorized(h):
            return None
        routes = [(r"^/api/repos/create$", self._create), (r"^/api/validate-yaml$", self._validate_yaml),
                  (r"^/api/models/([^/]+/[^/]+)/preupload/main$", self._preupload),
                  (r"^/([^/]+/[^/]+)\.git/info/lfs/objects/batch$", self._lfs_batch),
                  (r"^/lfs-verify$", self._lfs_verify),
                  (r"^/api/models/([^/]+/[^/]+)/commit/main$", self._commit)]
        for pattern, route in routes:
            if m := re.match(pattern, path):
                return route(h, data, *m.groups())
        return self._send(h, 404, {"error": f"no route {path}"})

    def _create(self, h, data, *_):
        req = json.loads(data)
        repo_id = f"{req['organization']}/{req['name']}"
        if req["organization"] in self.forbidden:
            return self._send(h, 403, {"error": "You don't have the rights to create a model under this namespace"})
        if repo_id in self.repos:
            return self._send(h, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        self.push(repo_id, {".gitattributes": GITATTRIBUTES}, repo_type="model")
        self.private[repo_id] = req.get("visibility") == "private"
        return self._send(h, 200, {"url": f"{self.url}/{repo_id}"})

    def _validate_yaml(self, h, data, *_):
        content = json.loads(data)["content"]
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        meta = yaml.safe_load(m[1]) if m else None
        if not isinstance(meta, dict) or not isinstance(meta.get("license"), str):
            return self._send(h, 400, {"errors": [{"message": "no valid metadata block with a license"}]})
        self.front_matter.append(meta)
        return self._send(h, 200, {"errors": [], "warnings": []})

    def _preupload(self, h, data, repo_id):
        files = json.loads(data)["files"]
        self._send(h, 200, {"files": [{"path": f["path"], "shouldIgnore": False,
                                       "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular"}
                                      for f in files]})

    def _lfs_batch(self, h, data, repo_id):
        objects = json.loads(data)["objects"]
        self._send(h, 200, {"transfer": "basic", "objects": [
            {"oid": o["oid"], "size": o["size"], "authenticated": True,
             "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"},
                         "verify": {"href": f"{self.url}/lfs-verify"}}} for o in objects]})

    def _lfs_verify(self, h, data, *_):
        oid = json.loads(data)["oid"]
        self._send(h, 200 if oid in self.lfs else 404, {})

    def _commit(self, h, data, repo_id):
        lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        head, files = self.repos[repo_id]["commits"][-1]
        parent = lines[0]["value"].get("parentCommit")
        if parent and parent != head:
            return self._send(h, 412, {"error": "A commit has happened since. Please refresh and try again."})
        files = dict(files)
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return self._send(h, 422, {"error": f"LFS object {value['oid']} was never uploaded"})
                files[value["path"]] = self.lfs[value["oid"]]
            elif line["key"] == "deletedFile":
                files.pop(value["path"])
        sha = self.push(repo_id, files, repo_type="model")
        self._send(h, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha})

    @staticmethod
    def _authorized(h) -> bool:
        """The Hub's answer to a missing or unknown token: 401 with this message."""
        if h.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        h.send_response(401)
        h.send_header("X-Error-Message", "Invalid credentials in Authorization header")
        h.send_header("Content-Length", "0")
        h.end_headers()
        return False

    @staticmethod
    def _body(h) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":  # a streamed body of unknown length
            out = b""
            while size := int(h.rfile.readline().split(b";")[0], 16):
                out += h.rfile.read(size)
                h.rfile.readline()
            h.rfile.readline()
            return out
        return h.rfile.read(int(h.headers.get("Content-Length") or 0))

    @staticmethod
    def _send(h, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def _hub_env(mp: pytest.MonkeyPatch, server: PushHub) -> None:
    mp.setenv("HF_ENDPOINT", server.url)
    mp.setenv("HF_HUB_OFFLINE", "0")
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at import: this process
    mp.setenv("HF_TOKEN", TOKEN)


def _stop(server: PushHub) -> None:
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def hub(monkeypatch):
    server = PushHub()
    _hub_env(monkeypatch, server)
    yield server
    _stop(server)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run's OUT: checkpoint step 7 of a 10-step run on 2 GPUs at $3/GPU-hour, read from hf://org/shards;
    val loss at steps 5 and 8, HellaSwag at 6 and 9 (the card must show those at or before step 7)."""
    out = tmp_path_factory.mktemp("run") / "out"
    save_run(out, step=STEP)
    evals = [{"step": 5, "val_loss": 7.5}, {"step": 8, "val_loss": 7.0},
             {"step": 6, "hellaswag_acc_norm": 0.2612, "hellaswag_n": 100},
             {"step": 9, "hellaswag_acc_norm": 0.2700, "hellaswag_n": 100}, {"event": "end", "step": LAST}]
    (out / "metrics.jsonl").write_text(metrics_lines(LAST, LAST, price=PRICE, gpus=GPUS)
                                       + "".join(json.dumps(e) + "\n" for e in evals))
    spec = RunSpec(run_id="tiny-run", kind="cluster", infra="aws", run_url="s3://b/tiny-run", bucket="s3://b",
                   data_url="hf://org/shards", recipe="gpt2-tiny", gpu_type="H100", gpus_per_node=GPUS, nodes=1,
                   spot=False, price_per_gpu_hour=PRICE, total_steps=LAST, estimate=None)
    (out / "run.json").write_text(json.dumps(spec.to_dict()))
    return out


@pytest.fixture(scope="module")
def pushed(run_dir, tmp_path_factory):
    """`export OUT --hf DIR --push-to-hub me/tiny-gpt2 --json` once: (the Hub after it, DIR, the JSON)."""
    server = PushHub()
    dest = tmp_path_factory.mktemp("pushed") / "hf"
    with pytest.MonkeyPatch.context() as mp:
        _hub_env(mp, server)
        result = _export(run_dir, dest, "--push-to-hub", REPO, "--json")
    assert result.exit_code == 0, result.output
    yield server, dest, json.loads(result.stdout)  # stdout alone: huggingface_hub's progress bars are on stderr
    _stop(server)


@pytest.fixture(scope="module")
def plain_export(tmp_path_factory):
    """The export of a checkpoint with no run metrics beside it."""
    root = tmp_path_factory.mktemp("plain")
    save_run(root / "ckpt", step=3)
    result = _export(root / "ckpt", root / "hf")
    assert result.exit_code == 0, result.output
    return root / "hf"


def _export(src, dest, *extra):
    return runner.invoke(app, ["export", str(src), "--hf", str(dest), *extra])


def _one_error_line(result) -> str:
    assert TOKEN not in result.output
    return one_line_error(result)


def _front_matter(card: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert m, card[:200]
    return yaml.safe_load(m[1])


def _row(card: str, name: str) -> list[str]:
    (line,) = [x for x in card.splitlines() if x.startswith(f"| {name} |")]
    return [c.strip() for c in line.strip("|").split("|")]


# ---------------------------------------------------------------- the card


def test_the_card_gives_the_run_at_the_exported_step_with_sources(pushed, run_dir):
    _, hf_dir, info = pushed
    assert {"README.md", PLOT_FILE} <= set(info["files"])
    card = (hf_dir / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["license"] == "mit" and meta["library_name"] == "transformers"
    assert "gpt2" in meta["tags"] and meta["datasets"] == ["org/shards"]  # the run's --data, a Hub dataset
    assert CARD_MARKER in card and "# tiny-gpt2" in card
    # step 7 of the 10-step run: 1,024 tokens and 2 s a step, 2 GPUs at $3 (tests/run_helpers.py metrics_lines)
    assert _row(card, "checkpoint")[:2] == ["checkpoint", "step 7 of 10"]
    assert _row(card, "tokens trained")[1] == "7,168 (7.17k)" and "step 7" in _row(card, "tokens trained")[2]
    assert _row(card, "hardware")[1:] == ["2 x H100", "run.json (the launch's GPUs)"]
    assert _row(card, "wall time")[1] == "14 s"
    assert _row(card, "cost")[1] == "$0.02"  # 14 s x 2 GPUs x $3/h = $0.0233
    assert _row(card, "recipe")[1] == "gpt2-tiny" and _row(card, "data")[1] == "hf://org/shards"
    # the evaluations at or before step 7 (not step 8's val loss or step 9's HellaSwag), beside GPT-2's
    assert _row(card, "val loss") == ["val loss", "7.5000 (step 5)", "3.2924"]
    assert _row(card, "HellaSwag acc_norm") == ["HellaSwag acc_norm", "0.2612 (step 6, 100 examples)", "0.2955"]
    assert "not one of GPT-2's sizes" in card and "FineWeb-Edu val shard" in card and "10,042" in card
    assert f"![training curves]({PLOT_FILE})" in card
    assert (hf_dir / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in card and "pipeline(" in card
    assert str(run_dir) not in card  # no local path of the run on a page that may be public


def test_a_checkpoint_without_metrics_gets_a_card_of_what_is_known(plain_export):
    card = (plain_export / "README.md").read_text()
    assert "datasets" not in _front_matter(card) and CARD_MARKER in card
    assert _row(card, "recipe")[1:] == ["gpt2-tiny", "the checkpoint's manifest.json"]
    assert _row(card, "cost")[1] == "unknown" and _row(card, "hardware")[1].startswith("unknown")
    assert _row(card, "val loss")[1].startswith("not measured")
    assert not (plain_export / PLOT_FILE).exists() and "training curves" not in card
    assert f'from_pretrained("{plain_export}")' in card  # not pushed: the directory


@pytest.mark.parametrize("shape,size,val_ref,hs_ref", [
    ((12, 12, 768), "124M", "3.2924", "0.2955"),
    ((48, 25, 1600), "1558M", "n/a", "0.4893"),  # no published val loss on FineWeb-Edu in our table
    ((24, 16, 1024), "350M", "n/a", "n/a"),
])
def test_the_card_compares_with_gpt2_of_the_same_size(shape, size, val_ref, hs_ref, tmp_path):
    model = dict(zip(("n_layer", "n_head", "n_embd"), shape), block_size=1024)
    export = {"checkpoint": str(tmp_path), "step": None, "dir": str(tmp_path), "params": 1, "model": model}
    card = card_text(export, None, False, "me/x")
    assert f"A GPT-2 {size} language model" in card and f"| this model | OpenAI GPT-2 {size} |" in card
    assert _row(card, "val loss")[2] == val_ref and _row(card, "HellaSwag acc_norm")[2] == hs_ref
    if "n/a" in (val_ref, hs_ref):
        assert f"no published figure in gpt2cloud's reference table for {size}" in card
    assert 'from_pretrained("me/x")' in card and "exported by gpt2cloud from an HF-format directory" in card


# ---------------------------------------------------------------- push


def test_push_uploads_exactly_the_export(pushed):
    server, hf_dir, info = pushed
    local = {p.name: p.read_bytes() for p in hf_dir.iterdir()}
    assert server.files(REPO) == {**local, ".gitattributes": GITATTRIBUTES}  # byte-equal, nothing else
    assert local["model.safetensors"] in server.lfs.values()  # the weights went through LFS, not the commit body
    assert server.front_matter[-1]["license"] == "mit"  # the Hub's metadata check saw the card
    assert info["pushed"]["url"] == f"{server.url}/{REPO}"
    assert info["pushed"]["commit"] == server.repos[REPO]["commits"][-1][0] and not server.private[REPO]


def test_a_second_push_replaces_our_own_export_and_drops_its_stale_files(hub, pushed, plain_export):
    _, with_plot, _ = pushed
    push_export(with_plot, REPO, TOKEN, private=True)
    assert hub.private[REPO] and PLOT_FILE in hub.files(REPO)
    r = push_export(plain_export, REPO, TOKEN, private=True)  # an earlier push of ours: replaced
    assert r["deleted"] == [PLOT_FILE]
    local = {p.name: p.read_bytes() for p in plain_export.iterdir()}
    assert hub.files(REPO) == {**local, ".gitattributes": GITATTRIBUTES}


@pytest.mark.parametrize("before", ["0", None], ids=["user-set", "unset"])
def test_the_push_goes_over_the_bounded_client_not_xet_and_puts_the_switch_back(hub, plain_export, monkeypatch,
                                                                                before):
    """hf_xet (installed here) takes the weights through the Xet client, whose waits _bounded_waits' timeouts do
    not reach: the push switches it off (huggingface_hub reads HF_HUB_DISABLE_XET at import: its constant)."""
    import os

    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils._runtime import is_xet_available

    seen = {}
    real = HfApi.create_commit

    def spy(self, *args, **kwargs):
        seen.update(constant=constants.HF_HUB_DISABLE_XET, env=os.environ.get(hub_push.XET_ENV),
                    xet=is_xet_available())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", spy)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    if before is None:
        monkeypatch.delenv(hub_push.XET_ENV, raising=False)
    else:
        monkeypatch.setenv(hub_push.XET_ENV, before)
    push_export(plain_export, REPO, TOKEN)
    assert seen == {"constant": True, "env": "1", "xet": False}
    assert constants.HF_HUB_DISABLE_XET is False and os.environ.get(hub_push.XET_ENV) == before  # put back


@pytest.mark.parametrize("theirs,why", [
    ({"README.md": b"# my model\n", "pytorch_model.bin": b"weights"},
     "files gpt2cloud did not write (pytorch_model.bin)"),
    ({"README.md": b"---\nlicense: mit\n---\n# mine\n", "config.json": b"{}"}, "not a gpt2cloud model card"),
])
def test_a_repo_gpt2cloud_did_not_write_is_refused_before_exporting(hub, pushed, run_dir, tmp_path, theirs, why):
    hub.push(REPO, {".gitattributes": GITATTRIBUTES, **theirs}, repo_type="model")
    before = list(hub.repos[REPO]["commits"])
    line = _one_error_line(_export(run_dir, tmp_path / "hf", "--push-to-hub", REPO))
    assert why in line and "push to a new name" in line
    assert hub.repos[REPO]["commits"] == before and not hub.lfs  # nothing written, not even an LFS object
    assert not (tmp_path / "hf").exists()  # refused before the export, too
    with pytest.raises(UserError, match=re.escape(why)):  # and by the push itself, had it changed meanwhile
        push_export(pushed[1], REPO, TOKEN)
    assert hub.repos[REPO]["commits"] == before


def test_private_onto_an_existing_public_repo_is_refused(hub, pushed, run_dir, tmp_path):
    push_export(pushed[1], REPO, TOKEN)
    before = list(hub.repos[REPO]["commits"])
    line = _one_error_line(_export(run_dir, tmp_path / "hf", "--push-to-hub", REPO, "--private"))
    assert "is public" in line and hub.repos[REPO]["commits"] == before and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("repo_id", ["no-slash", "a/b/c", "me/bad name", "me/-x", "me/a..b"])
def test_a_bad_repo_id_is_one_line_before_exporting(hub, run_dir, tmp_path, repo_id):
    line = _one_error_line(_export(run_dir, tmp_path / "hf", "--push-to-hub", repo_id))
    assert "not a Hub repo id" in line and not (tmp_path / "hf").exists()


def test_no_hf_token_is_one_line_before_exporting(hub, run_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    line = _one_error_line(_export(run_dir, tmp_path / "hf", "--push-to-hub", REPO))
    assert "HF_TOKEN is not set" in line and not (tmp_path / "hf").exists() and REPO not in hub.repos


@pytest.mark.parametrize("token,role,expect", [
    ("hf_wrong_token_0123456789", "write", "HTTP 401"),  # the Hub does not know the token
    (TOKEN, "read", "read token"),
])
def test_a_token_that_cannot_push_is_one_line_before_exporting(hub, run_dir, tmp_path, monkeypatch, token, role,
                                                                expect):
    monkeypatch.setenv("HF_TOKEN", token)
    hub.role = role
    result = _export(run_dir, tmp_path / "hf", "--push-to-hub", REPO)
    line = _one_error_line(result)
    assert expect in line and "write token" in line and token not in result.output
    assert REPO not in hub.repos and not (tmp_path / "hf").exists()


def test_a_namespace_the_token_may_not_write_is_one_line(hub, pushed):
    with pytest.raises(UserError) as e:
        push_export(pushed[1], "someone-else/x", TOKEN)
    assert "HTTP 403" in str(e.value) and "someone-else" in str(e.value) and "\n" not in str(e.value)


def test_an_unreachable_hub_is_one_line(hub, run_dir, tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    line = _one_error_line(_export(run_dir, tmp_path / "hf", "--push-to-hub", REPO))
    assert "cannot reach" in line and "HF_ENDPOINT" in line


def test_a_hub_that_never_answers_is_one_line_within_the_bound(hub, run_dir, tmp_path, monkeypatch):
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setattr(hub_push, "IO_S", 0.5)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    timer = threading.Timer(20, silent.close)  # never hang the suite, whatever happens
    timer.start()
    try:
        t0 = time.monotonic()
        line = _one_error_line(_export(run_dir, tmp_path / "hf", "--push-to-hub", REPO))
        assert time.monotonic() - t0 < 10
    finally:
        timer.cancel()
        silent.close()
    assert "no answer" in line and "in time" in line
