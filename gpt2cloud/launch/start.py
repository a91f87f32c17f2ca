"""A planned launch, carried out: check the storage the node will use, write the build, record the run,
hand it to its backend.

The run is recorded before its backend starts it, so `gpt2cloud down` finds it even if the launch is
interrupted. From the record's claim until the backend has started the run, SIGTERM and SIGHUP (a closed
terminal, a dropped SSH session, `kill`) are raised as Terminated, a KeyboardInterrupt: they take Ctrl-C's
road (the backend cancels what it started, the record says LAUNCH_FAILED) instead of ending the process
with a launch request still provisioning on SkyPilot's API server.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import uuid

from gpt2cloud import home
from gpt2cloud.backends import LAUNCH_UNDER_WAY, MAY_BE_ALIVE, NothingRunning, backend_for, state_of
from gpt2cloud.errors import UserError
from gpt2cloud.names import DOWN, LAUNCH_FAILED, LAUNCHED, LAUNCHING
from gpt2cloud.launch import task
from gpt2cloud.launch.plan import Plan, with_data_manifest, with_data_url
from gpt2cloud.runs import registry
from gpt2cloud.store import NoSuchObject, StorageError, open_store
from gpt2cloud.store.layout import MANIFEST, RUN_JSON

PROBE = ".gpt2cloud-probe-"  # preflight's write test in the run's prefix, deleted at once
# A record still LAUNCHING this young belongs to a launch under way in another process (its backend may
# not know the run yet); an older one was left by a launch that was killed, and may be relaunched.
LAUNCHING_GRACE_S = 120.0
# Past that grace, what the backend says: a launch request of any attempt still active (a spot launch may
# spend minutes starting the jobs controller) or a cluster still provisioning is a launch under way
# (LAUNCH_UNDER_WAY), whatever its age; so is a live job (gpt2cloud/backends/__init__.py MAY_BE_ALIVE).

# The signals that end a launch like Ctrl-C: what a closed terminal or a dropped SSH session sends
# (SIGHUP), and what `kill`, a shutdown or a CI runner's timeout sends (SIGTERM).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a launch. A KeyboardInterrupt, so that everything that cleans up after
    Ctrl-C (the backends' cancel and teardown, the record's LAUNCH_FAILED) does so after these too."""

    def __init__(self, signum: int):
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what the signal itself would have made the exit status


@contextlib.contextmanager
def stop_signals_interrupt():
    """Inside the block, the first SIGTERM or SIGHUP raises Terminated; the caller's handlers come back
    after it. Repeats are ignored until the block ends: a closed terminal sends SIGHUP more than once
    (the kernel to the foreground group, the shell to its jobs), and a repeat must not cut short the
    cleanup the first one started (Ctrl-C still does; -9 always ends the process). Nested blocks keep
    the outer one's handlers; outside the main thread Python cannot install any, and nothing changes."""
    guard = {"armed": True}  # the caller disarms it once the backend has started the run: it is launched
    if threading.current_thread() is not threading.main_thread() or \
            getattr(signal.getsignal(STOP_SIGNALS[0]), "_gpt2cloud_launch", False):
        yield guard
        return
    raised: list = []

    def on_signal(signum, _frame):
        if guard["armed"] and not raised:
            raised.append(signum)
            raise Terminated(signum)

    on_signal._gpt2cloud_launch = True
    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        yield guard
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def write_build(p: Plan) -> None:
    """The node's workdir (wheel, config.json, task.yaml): for a launch, and for `--export-yaml`."""
    task.write_workdir(p.job)


def preflight(p: Plan) -> Plan:
    """Check what the launch will use, from here, writing nothing but a probe it removes: this machine's
    $GPT2CLOUD_HOME, the data's manifest, the bucket writable. Returns the plan to launch: with Hub data
    (hf://) its URL pinned to the commit read now, so every node and every spot recovery downloads the
    same bytes. The run's spec goes to the bucket (run.json) only once start() owns the run's record."""
    home.check_usable(write=True)
    check_name(p, registry.find(p.run_id))
    try:
        data = open_store(p.spec.data_url)
        manifest = data.get_bytes(MANIFEST)  # the Hub builds it from the repo's listing; S3 and files hold one
        p = with_data_manifest(p, manifest)  # the node's disk, sized from the shards the run will read
    except NoSuchObject:
        raise UserError(f"--data {p.spec.data_url}: no {MANIFEST} there, so the node cannot verify the shards; "
                        "prepare and upload them with `gpt2cloud data prepare` and `gpt2cloud data upload DIR "
                        f"{p.spec.data_url}`") from None
    except StorageError as e:
        raise UserError(f"--data {p.spec.data_url}: cannot read it ({e})") from None
    pinned = data.pinned_url() if hasattr(data, "pinned_url") else p.spec.data_url
    if pinned != p.spec.data_url:
        p = with_data_url(p, pinned)
    try:
        # a probe of our own, removed at once: two launches racing for one name both may write it
        run = open_store(p.spec.run_url)
        probe = f"{PROBE}{uuid.uuid4().hex[:12]}"
        run.put_bytes(probe, b"gpt2cloud: can the node write here?\n")
        run.delete(probe)
    except StorageError as e:
        raise UserError(f"--bucket {p.spec.bucket}: the node could not write there ({e})") from None
    return p


def start(p: Plan) -> registry.RunRecord:
    """Launch, recording the run first: the record is claimed (created, or for a relaunch replaced only
    if it is still the one read here) before anything else is written, so of two launches with one name
    exactly one goes on and the other leaves everything as it found it."""
    old = registry.find(p.run_id)
    check_name(p, old)
    what = "launch" if old is None else "relaunch (resumes from the bucket)"
    record = registry.RunRecord(
        spec=p.spec, started_at=time.time(), state=LAUNCHING,
        launches=(old.launches + 1) if old else 1, history=list(old.history) if old else [],
        fetched_dir=old.fetched_dir if old else None,  # a relaunch continues the same run
        # the earlier attempts' handle: the backend keeps their request and job ids beside the new ones
        # (of the same kind of run only: another backend's ids would mean other things)
        handle=old.handle if old is not None and old.spec.kind == p.spec.kind else None,
    )
    record.history.append({"at": time.time(), "event": what})

    def write_run() -> None:  # the bucket's run.json and the node's build
        write_spec(p)
        write_build(p)

    with stop_signals_interrupt() as guard:
        registry.claim(record, old)  # RunTaken: another launch owns the name; nothing was written
        _start_on_backend(record, p.job, first=write_run, guard=guard)
    return _launched(record)


def check_name(p: Plan, old) -> None:
    """Refuse a launch whose name is taken: a launch of it under way in another process, the run still
    running (its record missing or not), or an earlier run of that name that this launch would not resume
    (another recipe or bucket: the node would refuse it only after a cluster was paid for)."""
    run_id = p.run_id
    if old is not None and old.state == LAUNCHING and time.time() - old.started_at < LAUNCHING_GRACE_S:
        raise registry.RunTaken(f"run '{run_id}' is being launched by another gpt2cloud process (started "
                                f"{time.time() - old.started_at:.0f} s ago); watch it with `gpt2cloud status "
                                f"{run_id}`, or pick another --name")
    if old is not None:
        earlier_attempt_gone(old)
    if old is None:
        left = registry.recover(run_id, f"its record {registry.path_for(run_id)} is missing")
        if left is not None and state_of(left) in MAY_BE_ALIVE:
            raise UserError(f"run '{run_id}' is still running ({left.recovered}); stop it with "
                            f"`gpt2cloud down {run_id}`, or pick another --name")
        return
    for what, was, now in (("recipe", old.spec.recipe, p.spec.recipe), ("--bucket", old.spec.run_url, p.spec.run_url)):
        if was != now:
            raise UserError(f"run '{run_id}' was launched with {what} {was}, not {now}: launching a name again "
                            f"resumes that run, so it takes the same recipe and --bucket; pick another --name "
                            f"for a new run")


def earlier_attempt_gone(old: registry.RunRecord) -> None:
    """UserError unless SkyPilot (or the local node) confirms that no earlier attempt of the run may still
    be alive: its launch request under way, its cluster provisioning, its job or managed job live. The
    backend asks about every request and job the run ever had. A state it cannot get (SkyPilot's server
    unreachable) confirms nothing, unless `down` stopped the run since."""
    run_id = old.run_id
    try:
        state = backend_for(old.spec.kind).state(old)
    except NothingRunning:  # the backend's own answer: nothing of the run is there
        return
    except UserError as e:
        if old.state == DOWN:
            return
        raise UserError(f"run '{run_id}' may still be running or launching, and SkyPilot could not say ({e}); "
                        f"retry when it answers, or stop it with `gpt2cloud down {run_id}` first") from None
    if state in MAY_BE_ALIVE:
        doing = "still being launched" if state in LAUNCH_UNDER_WAY else f"still running ({state})"
        raise UserError(f"run '{run_id}' is {doing}; watch it with `gpt2cloud status {run_id}`, or stop it "
                        f"with `gpt2cloud down {run_id}` before launching it again")


def write_spec(p: Plan) -> None:
    try:
        open_store(p.spec.run_url).put_bytes(RUN_JSON, (json.dumps(p.spec.to_dict(), indent=2) + "\n").encode())
    except StorageError as e:
        raise UserError(f"--bucket {p.spec.bucket}: the node could not write there ({e})") from None


def hand_to_backend(record: registry.RunRecord, job: task.Job, what: str, noted: bool = False) -> registry.RunRecord:
    """Start a recorded run (a training run or a prepare job: any Job) on its backend, noting each state as
    it goes (noted: the launch is recorded already)."""
    with stop_signals_interrupt() as guard:
        if not noted:
            registry.note(record, what, state=LAUNCHING)
        _start_on_backend(record, job, guard=guard)
    return _launched(record)


def _start_on_backend(record: registry.RunRecord, job: task.Job, first=None, guard=None) -> None:
    """`first()` (what the launch writes before the backend starts: run.json, the build), then the backend's
    start; whatever fails or interrupts either is noted as a failed launch. Called with SIGTERM and SIGHUP
    raising (stop_signals_interrupt): once the backend has started the run it is launched, and it stays."""
    try:
        if first is not None:
            first()
        backend_for(record.spec.kind).start(record, task.build_config(job), job.secrets, save=registry.save)
        if guard is not None:
            guard["armed"] = False  # started: a signal from here on must not make it a failed launch
    except BaseException:
        # the backend cancelled and removed what it started, or printed which cluster may still bill
        registry.note(record, "launch failed", state=LAUNCH_FAILED)
        raise


def _launched(record: registry.RunRecord) -> registry.RunRecord:
    try:
        registry.note(record, "launched", state=LAUNCHED)
    except registry.RunTaken:  # another launch took the name over meanwhile: say loudly what may bill
        raise UserError(f"run '{record.run_id}' was taken over by another launch while this one started it: what "
                        f"this launch started may still bill; look for "
                        f"'{getattr(record.handle, 'cluster', None) or record.run_id}' in "
                        "`sky status` and `sky jobs queue` and remove it (`sky down` / `sky jobs cancel`)") from None
    return record
