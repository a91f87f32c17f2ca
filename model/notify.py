"""Notifications (`--notify URL`): a run's milestones and failures posted to webhooks.

What is told, and by whom (docs/cloud.md#notifications):
- the trainer, rank 0 only (RunNotices): the first step of each attempt, the finish, a cap stop (budget,
  time) or another stop (`down --graceful`, pushes failing), a divergence, and a recovery: a node that
  finds an earlier attempt of its run in the pulled timeline (SkyPilot relaunched a managed job, or the
  same --name was launched again) says so, and whether that attempt vanished mid-run (a preemption, a lost
  node: nothing ends such an attempt's script, so nobody could tell it then) or ended with an exit code;
- the node's scripts, once, as the job ends (`python -m model.notify_cli EVENT --text ...`, bounded by
  `timeout`): a failure with what was saved (the newest checkpoint on the node, whether it reached the
  bucket), a stall, a deadman exit, a signal (a preemption's shutdown, `down`, a cancel);
- `gpt2cloud train` on this machine: the trainer's events, and a failure of the trainer.

The format follows the URL (FORMATS, the first that matches): Slack's incoming webhooks ({"text"}),
Discord's ({"content"}), ntfy (a plain-text body, a Title header) and, for any other URL, a JSON POST of
the whole event: {"run", "event", "text", "step", "loss", "cost_usd", "time", ...}.

A notification never fails or slows the run: each URL has a daemon thread behind a bounded queue (an event
that finds it full is dropped), each POST has a TIMEOUT_S read timeout and at most one retry (none after a
timeout: a server that did not answer in time is not asked again), a URL's first failure is logged once,
and the end of a run waits at most CLOSE_WAIT_S for what is still queued.

The URLs are credentials (a Slack webhook URL is enough to post to its channel): they come only from the
environment (NOTIFY_ENV, one a line; a launch passes it as a SkyPilot secret), never from the command line
of a process, and nothing here prints more of one than its scheme and host (redact).

Imports only the standard library (and model/ and the store's layout, both pure Python), so that a
node's setup can run it straight from the build's wheel before anything is installed.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import SplitResult, urlsplit

from gpt2cloud.store.layout import TIMELINE
from model.inbox import Inbox
from model.metrics import parse_metrics

NOTIFY_ENV = "GPT2CLOUD_NOTIFY"  # the URLs, one a line: a secret, never a plain env or a file
TIMEOUT_S = 5.0  # one POST's connect and read timeout
RETRY_DELAY_S = 1.0  # before the one retry of a POST that failed fast (refused, a 5xx or 429)
QUEUE_EVENTS = 32  # a URL this far behind is hung: later events for it are dropped
CLOSE_WAIT_S = 2.0  # the trainer's end waits this long, for all URLs together
TEXT_CHARS = 1800  # Discord takes 2000 characters; every format gets the same text
EVENTS = ("first_step", "finish", "cap_stop", "stopped", "diverged", "recovery",  # the trainer's
          "stall", "deadman", "preemption", "failed")  # the node scripts' (model/notify_cli.py), `train`'s failure


class BadURL(ValueError):
    """A --notify value that is not a webhook URL: its message is one line, the URL in it redacted."""


# ---- the URLs ----


def redact(url: str) -> str:
    """A URL as messages and logs show it: its scheme and host (a webhook's path or topic is its secret)."""
    text = str(url).strip()
    try:
        parts = urlsplit(text)
        host = parts.hostname or ""
    except ValueError:
        parts, host = None, ""
    if parts is not None and parts.scheme and host:
        more = parts.path not in ("", "/") or parts.query or parts.username
        return f"{parts.scheme}://{host}{'/...' if more else ''}"
    head = text.split("/")[0][:40]
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in head) + (
        "/..." if len(head) < len(text) else "")


def check_url(url: str) -> str:
    """The URL, stripped, if a notification can be POSTed to it; BadURL (one line, redacted) otherwise."""
    text = str(url).strip()
    example = ("e.g. https://hooks.slack.com/services/..., https://discord.com/api/webhooks/..., https://ntfy.sh/TOPIC, "
               "or any URL that takes a JSON POST")
    if not text or any(c.isspace() or not c.isprintable() for c in text):
        raise BadURL(f"{redact(text) or repr(text)}: a webhook URL has no spaces or control characters; {example}")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise BadURL(f"{redact(text)}: not a valid URL; {example}") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise BadURL(f"{redact(text)}: expected an https:// (or http://) URL with a host; {example}")
    if parts.username or parts.password:
        raise BadURL(f"{redact(text)}: credentials before the host are not sent; put them in the URL's path or "
                     "query (ntfy: ?auth=...)")
    return text


def check_urls(urls) -> list[str]:
    """Each URL checked (check_url), each once, in order; BadURL for the first that is not a webhook URL."""
    return list(dict.fromkeys(check_url(u) for u in urls or ()))


def urls_from_env(env: Optional[dict] = None) -> list[str]:
    """NOTIFY_ENV's URLs, each once. One that is not a URL (a hand-set environment) is skipped with a note:
    a notification is never a reason to fail a run."""
    env = os.environ if env is None else env
    out = []
    for line in env.get(NOTIFY_ENV, "").splitlines():
        if not line.strip():
            continue
        try:
            out.append(check_url(line))
        except BadURL as e:
            log(f"skipped {e}")
    return list(dict.fromkeys(out))


# ---- the formats: what each kind of URL is sent ----


def _json_body(event: dict) -> tuple[bytes, dict]:
    return json.dumps(event).encode(), {"Content-Type": "application/json"}


def _slack_body(event: dict) -> tuple[bytes, dict]:
    return json.dumps({"text": event["text"]}).encode(), {"Content-Type": "application/json"}


def _discord_body(event: dict) -> tuple[bytes, dict]:
    return json.dumps({"content": event["text"]}).encode(), {"Content-Type": "application/json"}


def _ntfy_body(event: dict) -> tuple[bytes, dict]:
    # HTTP headers are Latin-1: the title keeps to ASCII, the body carries the text as UTF-8
    title = f"gpt2cloud {event['run']}: {event['event']}".encode("ascii", "replace").decode()
    tags = "warning" if event["event"] in ("failed", "stall", "deadman", "diverged", "preemption") else "robot"
    return event["text"].encode(), {"Content-Type": "text/plain; charset=utf-8", "Title": title, "Tags": tags}


@dataclass(frozen=True)
class Format:
    """How one kind of webhook is recognised by its URL, and the body (and headers) it is sent."""

    matches: Callable[[SplitResult], bool]
    body: Callable[[dict], tuple[bytes, dict]]


def _host(u: SplitResult) -> str:
    return (u.hostname or "").lower()


# name -> Format, tried in order: a new kind of webhook is one function above and one line here
FORMATS: dict[str, Format] = {
    "slack": Format(lambda u: _host(u) == "hooks.slack.com", _slack_body),
    "discord": Format(lambda u: _host(u) in ("discord.com", "discordapp.com", "ptb.discord.com",
                                             "canary.discord.com") and u.path.startswith("/api/webhooks/"),
                      _discord_body),
    "ntfy": Format(lambda u: _host(u) == "ntfy.sh" or _host(u).startswith("ntfy."), _ntfy_body),
    "json": Format(lambda u: True, _json_body),  # anything else: the whole event
}


def format_of(url: str) -> str:
    """The name of the first format in FORMATS whose rule the URL matches."""
    parts = urlsplit(url)
    return next(name for name, f in FORMATS.items() if f.matches(parts))


def make_event(run: str, event: str, text: str, **fields) -> dict:
    """One notification: the run, the event, a sentence saying what happened (with the run's name) and
    the figures (step, loss, cost_usd: None when unknown, so that every event has them)."""
    line = f"gpt2cloud {run}: {text}"
    if len(line) > TEXT_CHARS:
        line = line[:TEXT_CHARS - 3] + "..."
    return {"run": run, "event": event, "text": line, "step": None, "loss": None, "cost_usd": None,
            "time": round(time.time(), 3), **fields}


# ---- sending ----


def log(what: str) -> None:
    print(f"note: notify: {what}", file=sys.stderr, flush=True)


def post(url: str, event: dict, timeout: float = TIMEOUT_S) -> str:
    """POST the event in its URL's format: "" when it was taken, else why not (never the URL itself). At
    most one retry, after a fast failure (refused, a 5xx or 429); none after a timeout."""
    body, headers = FORMATS[format_of(url)].body(event)
    request = urllib.request.Request(url, data=body, method="POST", headers={"User-Agent": "gpt2cloud", **headers})
    error = ""
    for attempt in range(2):
        retry = False
        try:
            # an opener per POST: the environment's proxy settings as they are now (urlopen caches its first)
            with urllib.request.build_opener().open(request, timeout=timeout) as answer:
                answer.read(4096)
            return ""
        except urllib.error.HTTPError as e:
            error, retry = f"HTTP {e.code} {e.reason}", e.code >= 500 or e.code == 429
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            reason = getattr(e, "reason", e)
            timed_out = isinstance(reason, TimeoutError) or "timed out" in str(reason)
            error, retry = f"{type(reason).__name__}: {reason}", not timed_out
        if not retry or attempt:
            break
        time.sleep(RETRY_DELAY_S)
    return error.replace(url, redact(url))


class Channel(Inbox):
    """One URL: a daemon thread sends its events in order, behind a bounded queue the caller never waits on.
    Its first failure is logged (the URL redacted); later ones are not."""

    def __init__(self, url: str):
        self.url = url
        self.failed = False
        super().__init__("gpt2cloud-notify", QUEUE_EVENTS)  # a POST that hangs never holds the trainer

    def run(self) -> None:
        for event in self.items():
            try:
                error = post(self.url, event)
            except Exception as e:  # noqa: BLE001 - whatever goes wrong here, the run goes on
                error = f"{type(e).__name__}: {e}".replace(self.url, redact(self.url))
            if error:
                self._failed(f"{event['event']} not delivered ({error})")

    def _failed(self, why: str) -> None:
        if not self.failed:
            self.failed = True
            log(f"{redact(self.url)}: {why}; later failures of this URL are not logged, and the run goes on")

    def send(self, event: dict) -> None:
        if not self.put(event):
            self._failed(f"{QUEUE_EVENTS} notifications behind (it hangs?): {event['event']} dropped")


class Notifier:
    """Events to every URL (none: nothing happens, no thread starts)."""

    def __init__(self, urls: list[str], run: str):
        self.run = run
        self.channels = [Channel(u) for u in urls]

    def send(self, event: str, text: str, **fields) -> None:
        """Queue the event for every URL; returns at once."""
        if self.channels:
            record = make_event(self.run, event, text, **fields)
            for channel in self.channels:
                channel.send(record)

    def close(self, wait: float = CLOSE_WAIT_S) -> None:
        """Wait at most `wait` seconds, for all URLs together, for what is still queued; then leave it."""
        deadline = time.monotonic() + wait
        for channel in self.channels:  # every URL's last item first: they finish side by side, not in turn
            channel.finish()
        late = [c for c in self.channels if not c.join(deadline)]
        if late:
            log(f"{len(late)} URL(s) still sending after {wait:g} s; left behind")
        self.channels = []


def run_name(out: Optional[str | Path] = None) -> str:
    """The run's name in a notification: the launch's run id on a node, else OUT's directory name."""
    return os.environ.get("GPT2CLOUD_RUN_ID") or (Path(out).resolve().name if out else "run")


# ---- what the node holds: earlier attempts ----


def earlier_attempt(out: Path, node_up: float) -> Optional[dict]:
    """The attempt before this one, from the timeline pulled from the bucket (rank 0's events): None if
    there was none. {"attempts": how many came before, "code": its exit code (None: it vanished without one,
    as a preempted or lost node does), "up": when it came up}. This attempt's node_up is `node_up`."""
    try:
        rows = parse_metrics((out / TIMELINE).read_text(encoding="utf-8"))
    except OSError:
        return None
    ups = sorted(r["time"] for r in rows if r.get("event") == "node_up" and r.get("rank", 0) == 0
                 and isinstance(r.get("time"), (int, float)) and r["time"] < node_up - 1e-3)
    if not ups:
        return None
    last = ups[-1]
    ended = [r for r in rows if isinstance(r.get("time"), (int, float)) and last <= r["time"] < node_up
             and r.get("event") in ("train_end", "deadman") and isinstance(r.get("code"), int)]
    code = ended[-1]["code"] if ended else None
    return {"attempts": len(ups), "code": code, "up": last}


# ---- the trainer's notifications ----


class RunNotices:
    """What the trainer tells (rank 0; the other ranks get one that sends nothing)."""

    def __init__(self, notifier: Optional[Notifier] = None, total_steps: int = 0):
        self.notifier = notifier or Notifier([], "run")
        self.total_steps = total_steps
        self.first_told = False

    @classmethod
    def start(cls, out: Path, master: bool, total_steps: int, node_up: Optional[float],
              resumed_step: Optional[int]) -> "RunNotices":
        """The run's notices, from NOTIFY_ENV; on a node, a recovery is told at once."""
        urls = urls_from_env() if master else []
        notices = cls(Notifier(urls, run_name(out)), total_steps)
        if urls and node_up is not None:
            notices.recovery(earlier_attempt(Path(out), node_up), resumed_step)
        return notices

    def recovery(self, before: Optional[dict], resumed_step: Optional[int]) -> None:
        if before is None:
            return
        how = ("vanished mid-run without an exit code (a preemption, or a lost node)" if before["code"] is None
               else "ended normally (a finish or a stop)" if before["code"] == 0
               else f"ended with exit code {before['code']}")
        where = (f"resuming from checkpoint step {resumed_step}" if resumed_step is not None
                 else "starting from step 0 (no checkpoint of it reached the bucket)")
        self.notifier.send("recovery", f"a new node took over (a managed job's recovery, or a relaunch of the same "
                           f"--name): the attempt before it {how}; {where}", step=resumed_step,
                           attempt=before["attempts"] + 1, preempted=before["code"] is None,
                           previous_code=before["code"])

    def step(self, step: int, loss: float, cost: Optional[float]) -> None:
        """After each step read back: the first one of this attempt is told."""
        if self.first_told:
            return
        self.first_told = True
        self.notifier.send("first_step", f"training: step {step}/{self.total_steps}, loss {loss:.4f}"
                           + (f", ${cost:,.2f} so far" if cost is not None else ""),
                           step=step, loss=loss, cost_usd=cost, total_steps=self.total_steps)

    def finished(self, step: int, loss: Optional[float], cost: Optional[float], checkpoint: Optional[int]) -> None:
        self.notifier.send("finish", f"finished at step {step}/{self.total_steps}"
                           + (f", final loss {loss:.4f}" if loss is not None else "")
                           + (f", ${cost:,.2f}" if cost is not None else "")
                           + (f"; checkpoint step {checkpoint}" if checkpoint is not None else ""),
                           step=step, loss=loss, cost_usd=cost, checkpoint_step=checkpoint,
                           total_steps=self.total_steps)

    def stopped(self, reason: str, line: str, step: int, loss: Optional[float], cost: Optional[float]) -> None:
        """A stop before the last step (model/stop.py): a cap (budget, time), a request, failing pushes."""
        event = "cap_stop" if reason in ("budget", "time") else "stopped"
        self.notifier.send(event, line, reason=reason, step=step, loss=loss, cost_usd=cost, checkpoint_step=step,
                           total_steps=self.total_steps)

    def diverged(self, line: str, step: int, checkpoint: Optional[str]) -> None:
        self.notifier.send("diverged", line, step=step, checkpoint=checkpoint, total_steps=self.total_steps)

    def close(self) -> None:
        self.notifier.close(CLOSE_WAIT_S)
