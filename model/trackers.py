"""Where the trainer's metrics go: OUT/metrics.jsonl always (the run's own record, which the bucket,
`status`, `plot` and `report` read), and every tracker the config names (cfg.trackers): TensorBoard,
Weights & Biases, Trackio.

A tracker is a sink with write(record) and close(), made by a factory(cfg, out, run) and registered by
name in TRACKERS with the package it needs: a new one is one class here and one line in TRACKERS. Each
sink gets every record metrics.jsonl gets (Metrics.write) and charts what it knows of it (chart_points):
train loss, lr, grad norm, tokens/s, MFU, dollars so far, val loss, HellaSwag, samples as text.

Only rank 0 writes. Each tracker runs on a thread of its own behind a bounded queue (Feed): the training
loop only enqueues, so a login, a slow server or a hung client never holds a step. A tracker that fails
(its package missing, its server gone) is noted once and dropped: a tracker's outage never stops a paid
run, and metrics.jsonl still holds every line.

A run keeps one tracker run id (TrackerRun) in every checkpoint's trainer_state.json, so a resumed or
preempted run goes on in the same tracker run: wandb resumes that id, TensorBoard writes to the same
log dir and purges what an earlier attempt logged after the checkpoint, Trackio resumes the same run name.

The tracker packages are optional (pyproject's extras, a node installs them only when asked:
gpt2cloud/launch/build.py) and imported here only inside the sink that uses them.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from gpt2cloud.store.layout import TENSORBOARD
from model.inbox import Inbox
from model.metrics import MetricsLog

PROJECT = "gpt2cloud"  # the wandb (unless WANDB_PROJECT says otherwise) and Trackio project
TENSORBOARD_DIR = TENSORBOARD  # under OUT: `tensorboard --logdir OUT/tensorboard`; the bucket's copy too
QUEUE_RECORDS = 10_000  # records a tracker may fall behind (hours of steps) before it is dropped as hung
CLOSE_SECONDS = 120.0  # the end of a run waits this long, for all trackers together, for their last uploads
RUN_ID_KEY = "tracker_run_id"  # trainer_state.json's key for the tracker run id (model/checkpoint.py)


# ---- what a tracker charts of a metrics.jsonl record ----

# metrics.jsonl's numbers -> the chart each tracker shows them in
SCALARS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_seen": "train/tokens_seen",
    "tokens_per_second": "perf/tokens_per_second", "mfu": "perf/mfu", "step_seconds": "perf/step_seconds",
    "elapsed_seconds": "perf/elapsed_seconds", "cost_usd": "cost/usd",
    "val_loss": "val/loss", "hellaswag_acc_norm": "eval/hellaswag_acc_norm", "hellaswag_acc": "eval/hellaswag_acc",
}
SAMPLE = "samples/text"
STEP = "step"  # wandb's x axis (define_metric): a resumed run's redone steps are charted, not dropped


def chart_points(record: dict) -> tuple[Optional[int], dict, Optional[str]]:
    """(step, {chart: number}, sample text) of a record; (None, {}, None) for one with nothing to chart.
    Events (start, checkpoint, the stops) chart nothing: their step and cost are already in the per-step
    lines, and the run's config goes to the tracker when it starts."""
    if "event" in record or not isinstance(record.get("step"), int):
        return None, {}, None
    values = {chart: float(record[key]) for key, chart in SCALARS.items()
              if isinstance(record.get(key), (int, float)) and not isinstance(record.get(key), bool)}
    sample = record.get("sample") if isinstance(record.get("sample"), str) else None
    return record["step"], values, sample


# ---- the run a tracker logs to ----


@dataclass(frozen=True)
class TrackerRun:
    """Which tracker run this training run is: the same over every resume and preemption."""

    id: str  # kept in every checkpoint (trainer_state.json RUN_ID_KEY); a new run draws a fresh one
    name: str  # what the tracker shows: the launch's run id on a node, else OUT's name
    resumed_step: Optional[int] = None  # the step of the checkpoint this run resumed from; None: a new run

    @classmethod
    def of(cls, out: Path, saved_id: Optional[str], resumed_step: Optional[int]) -> "TrackerRun":
        name = os.environ.get("GPT2CLOUD_RUN_ID") or Path(out).resolve().name
        # a hex id: valid as a wandb run id and a Trackio run name suffix
        return cls(saved_id or secrets.token_hex(8), name, resumed_step)


# ---- the sinks ----


class TensorBoard:
    """Event files in OUT/tensorboard, written with TensorBoard's own writer (no TensorFlow, no torch).
    Each attempt starts with a session-start event at the step it continues from: TensorBoard then hides
    what an earlier attempt logged from that step on (purge_step), so a resumed run's redone steps show
    once, and a new run in the same OUT hides an abandoned attempt's events altogether."""

    def __init__(self, cfg, out: Path, run: TrackerRun):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.text.summary_v2 import text_pb
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.Event, self.Summary, self.text_pb = Event, Summary, text_pb
        self.writer = EventFileWriter(str(Path(out) / TENSORBOARD_DIR), flush_secs=30)
        purge = 0 if run.resumed_step is None else run.resumed_step + 1
        self.writer.add_event(Event(wall_time=time.time(), step=purge,
                                    session_log=SessionLog(status=SessionLog.START)))

    def write(self, record: dict) -> None:
        step, values, sample = chart_points(record)
        if step is None:
            return
        now = time.time()
        if values:
            summary = self.Summary(value=[self.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
            self.writer.add_event(self.Event(wall_time=now, step=step, summary=summary))
        if sample is not None:
            self.writer.add_event(self.Event(wall_time=now, step=step, summary=self.text_pb(SAMPLE, sample)))

    def close(self) -> None:
        self.writer.close()


class RunLog:
    """A client whose run logs a dict of values at a step and finishes (wandb, Trackio): each says how it
    logs and how it shows a sample's text."""

    def write(self, record: dict) -> None:
        step, values, sample = chart_points(record)
        if step is None:
            return
        if sample is not None:
            values[SAMPLE] = self.sample_value(sample)
        if values:
            self.log(step, values)

    def close(self) -> None:
        self.run.finish()


class WandB(RunLog):
    """A Weights & Biases run (online with WANDB_API_KEY or `wandb login`; WANDB_MODE=offline keeps it in
    OUT/wandb for `wandb sync`). The tracker run id is the wandb run id, resumed with resume="allow"."""

    def __init__(self, cfg, out: Path, run: TrackerRun):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, id=run.id, name=run.name,
                              resume="allow", config=dataclasses.asdict(cfg),
                              dir=None if os.environ.get("WANDB_DIR") else str(out),
                              settings=wandb.Settings(console="off"))  # the node's log already has the console
        self.run.define_metric("*", step_metric=STEP)

    def sample_value(self, sample: str):
        return self.wandb.Html(f"<pre>{html.escape(sample)}</pre>")

    def log(self, step: int, values: dict) -> None:
        self.run.log({STEP: step, **values})


class Trackio(RunLog):
    """A Trackio run: local (TRACKIO_DIR, `trackio show`), or a Hugging Face Space (TRACKIO_SPACE_ID) or a
    self-hosted server (TRACKIO_SERVER_URL). Resumed by its name, which holds the tracker run id."""

    def __init__(self, cfg, out: Path, run: TrackerRun):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=PROJECT, name=f"{run.name}-{run.id[:8]}", resume="allow",
                                config=dataclasses.asdict(cfg), embed=False)

    def sample_value(self, sample: str):
        return self.trackio.Markdown(f"```\n{sample}\n```")

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)


# ---- the registry ----


@dataclass(frozen=True)
class Tracker:
    """A kind of tracker: how to make its sink, and what it needs where the trainer runs."""

    make: Callable  # (cfg: TrainConfig, out: Path, run: TrackerRun) -> sink with write(record), close()
    requirement: str = ""  # the pip requirement a node installs for it (pyproject's extra of the same name)
    module: str = ""  # the module that must import where the trainer runs ("": none)
    plain_envs: tuple = ()  # settings a launch passes on to the node when they are set here
    secret_envs: tuple = ()  # credentials a launch passes on as secrets, never written or printed


# name -> Tracker: what --tracker, `config set tracker` and a recipe's eval.trackers accept
TRACKERS: dict[str, Tracker] = {
    "tensorboard": Tracker(TensorBoard, requirement="tensorboard", module="tensorboard"),
    "wandb": Tracker(WandB, requirement="wandb", module="wandb",
                     plain_envs=("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL"),
                     secret_envs=("WANDB_API_KEY",)),
    # TRACKIO_SERVER_URL may carry a write token in its query: a secret too
    "trackio": Tracker(Trackio, requirement="trackio", module="trackio", plain_envs=("TRACKIO_SPACE_ID",),
                       secret_envs=("HF_TOKEN", "TRACKIO_SERVER_URL", "TRACKIO_WRITE_TOKEN")),
}


def refusal(names, where: str, here: bool = False) -> Optional[str]:
    """One line about the first of `names` that cannot run, or None: a name TRACKERS lacks, or (here: the
    trainer runs on this machine) one whose package this Python cannot import. `where` names the source
    (`--tracker`, `recipe X: eval.trackers:`)."""
    for name in names:
        if name not in TRACKERS:
            return f"{where} {name}: not a tracker the trainer knows (known: {', '.join(TRACKERS)})"
        module = TRACKERS[name].module
        if here and module and importlib.util.find_spec(module) is None:
            return (f"{where} {name}: the trainer runs on this machine and {module} is not installed here; "
                    f"pip install 'gpt2cloud[{name}]' (or {TRACKERS[name].requirement})")
    return None


# ---- metrics.jsonl and the trackers, written together ----


class Feed(Inbox):
    """One tracker on a thread of its own, fed through a bounded queue. Making its sink (an import, a login,
    a server's answer), writing and closing all happen on that thread: the trainer only enqueues. A failure
    there is noted once and ends the feed; `failed` tells the trainer to drop it. However the feed ends (the
    last record, a failure, dropped for falling behind), its thread closes the sink it made, and `closed`
    says whether that close returned: the trainer waits a bounded time for it (Metrics.close)."""

    def __init__(self, name: str, make: Callable[[], object]):
        self.name, self.make = name, make
        self.failed = False
        self.dropped = False  # set by the trainer: the thread closes the sink after the write it is in
        self.closed = False  # the sink's close() returned (or no sink was made: nothing to close)
        super().__init__(f"tracker-{name}", QUEUE_RECORDS)

    def run(self) -> None:
        sink = None
        try:
            sink = self.make()
            for record in self.items():
                if self.dropped:
                    break
                sink.write(record)
        except Exception as e:  # noqa: BLE001 - any failure of a tracker's client: drop it, keep training
            self.failed = True
            note(self.name, f"failed ({type(e).__name__}: {e})")
        if sink is None:
            self.closed = True
            return
        try:
            sink.close()  # a failed or dropped tracker too: its client may hold a process or a connection
            self.closed = True
        except Exception as e:  # noqa: BLE001
            if not self.failed:
                self.failed = True
                note(self.name, f"failed to close ({type(e).__name__}: {e})")

    def drop(self) -> None:
        """Stop feeding it: its thread closes the sink once the write it is in (if any) returns."""
        self.dropped = True
        self.finish()  # wakes a thread waiting for a record; a full queue's thread sees `dropped` instead

    def close(self, deadline: float) -> bool:
        """Let the queued records go, close the sink; wait until `deadline` (time.monotonic()). True when the
        sink's close() returned in time (or the feed had none to close)."""
        if not self.dropped and not self.failed:
            if not self.finish():  # full: it hangs; close after the write it is in
                self.dropped = True
        if not self.join(deadline):
            note(self.name, f"did not finish within {CLOSE_SECONDS:g} s; its last records may be missing")
            return False
        return self.closed


def note(name: str, what: str) -> None:
    print(f"note: tracker {name} {what}; metrics.jsonl still has every line", file=sys.stderr, flush=True)


class Metrics:
    """metrics.jsonl plus the configured trackers: every record goes to both."""

    def __init__(self, path: Path, enabled: bool, cfg, out: Path, run: Optional[TrackerRun] = None):
        self.log = MetricsLog(path, enabled=enabled)
        self.run = run or TrackerRun.of(out, None, None)
        self.trackers: dict[str, Feed] = {}  # the trackers still fed
        self.feeds: list[Feed] = []  # every one started, dropped or failed included: each is closed at the end
        for name in (cfg.trackers if enabled else ()):  # names checked on every rank by refusal()
            make = TRACKERS[name].make
            self.trackers[name] = Feed(name, lambda make=make: make(cfg, out, self.run))
            self.feeds.append(self.trackers[name])

    def write(self, record: dict) -> None:
        self.log.write(record)
        for name, feed in list(self.trackers.items()):
            if feed.failed:  # noted by its thread
                del self.trackers[name]
            elif not feed.put(record):
                del self.trackers[name]
                feed.drop()
                note(name, f"fell {QUEUE_RECORDS:,} records behind (its client hangs?) and was dropped")

    def close(self) -> bool:
        """Close metrics.jsonl, then every tracker's sink (those dropped or failed too), waiting at most
        CLOSE_SECONDS for all of them together. True when every sink's close returned in time; False when one
        still hangs (or its close failed): its client may then hold the process's exit too (wandb's atexit
        hook joins its service process without a timeout), so the trainer ends the process itself
        (model/train.py)."""
        feeds, self.feeds, self.trackers = self.feeds, [], {}
        try:
            self.log.close()
        finally:  # (a full disk failing the log's last write still closes the trackers)
            deadline = time.monotonic() + CLOSE_SECONDS
            done = True
            for feed in feeds:
                done = feed.close(deadline) and done
        return done
