"""The user's defaults for `launch`: one TOML file, $GPT2CLOUD_HOME/config.toml, set with `gpt2cloud config`.

    bucket = "s3://my-bucket/runs"
    gpus = "H100:8"
    max-cost = 300
    notify = ["..."]

A value comes from the launch's flag if it is given, else from this file, else from the built-in default
(resolve() says which, for `launch --dry-run`). Every value is checked with the rule the launch applies to
its flag, both on `config set` and when the file is read: a hand-edited file with a bad value or key fails
with one line naming the file, never with a launch that goes somewhere unexpected. The file is rewritten
whole through a temporary file and a rename, under a lock on its directory, so a `set` never loses another
key, nor leaves a torn file. It is the user's alone (MODE 0600): notify's webhook URLs are credentials.

defaults() is what other commands read: every key's value, the file's or the built-in one.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from gpt2cloud import home
from gpt2cloud.errors import UserError, positive
from gpt2cloud.names import ANY, LOCAL
from gpt2cloud.store import atomic_write

FLAG, CONFIG, DEFAULT = "flag", "config", "default"  # where a resolved value came from
LOCK_WAIT_S = 10.0  # a `config set` takes milliseconds: a lock held longer belongs to a hung process
MODE = 0o600  # the file may hold webhook URLs (notify), which are credentials: the user's alone
HEADER = "# gpt2cloud's defaults for `launch` (a flag always wins); edit with `gpt2cloud config set KEY VALUE`\n"
BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def path() -> Path:
    return home.home() / "config.toml"


# ---------------------------------------------------------------- the rules: the launch's own checks


def _bucket(v: str) -> str:
    from gpt2cloud.launch.task import check_url  # the launch's URL rule (imports the launch floor)

    # the launch may use any infra, so file:// (only with --infra local) is allowed here; it checks again
    return check_url("bucket", v, LOCAL)


def _infra(v: str) -> str:
    from gpt2cloud.launch.plan import normalize_infra

    if any(c.isspace() for c in v):
        raise UserError(f"infra {v!r}: expected one name, e.g. lambda, aws/us-east-1 or local")
    return normalize_infra(v)


def _gpus(v: str) -> str:
    from gpt2cloud.cost.hardware import parse_gpu_candidates

    return ",".join(f"{name}:{count}" for name, count in parse_gpu_candidates(v))


def _notify(v: str) -> str:
    from gpt2cloud.launch.plan import check_notify  # the launch's check: the node's rule, the URL redacted

    return check_notify([v], "notify")[0]


def _tracker(v: str) -> str:
    from model.trackers import TRACKERS  # the trainer's own registry of tracker names

    if v not in TRACKERS:
        known = ", ".join(sorted(TRACKERS)) or "none yet"
        raise UserError(f"tracker {v!r}: not a tracker the trainer knows (known: {known})")
    return v


@dataclass(frozen=True)
class Key:
    """One setting: the launch flag it stands in for, how its text is read, its rule, its built-in value."""

    name: str
    types: tuple  # what one value may be in the file
    rule: Callable[[Any], Any]  # the launch's check: returns the value normalized, or raises UserError
    builtin: Any  # the launch's value when neither flag nor file gives one (None: the launch decides)
    builtin_text: str  # the built-in default, said in words (`config show`)
    example: str
    many: bool = False  # a list (`config set notify A B`); the flag will be repeatable

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    def from_text(self, texts: list[str]) -> Any:
        """`config set KEY VALUE...`: the command line's text -> the checked value."""
        if not texts:
            raise UserError(f"config set {self.name}: give a value, e.g. gpt2cloud config set {self.name} "
                            f"{self.example}")
        if not self.many and len(texts) > 1:
            raise UserError(f"config set {self.name}: takes one value, got {len(texts)}; e.g. gpt2cloud config set "
                            f"{self.name} {self.example}")
        values = [self.rule(_parse(self, t.strip())) for t in texts]
        return list(dict.fromkeys(values)) if self.many else values[0]

    def from_file(self, value: Any) -> Any:
        """A value as the TOML file holds it -> the checked value."""
        items = value if self.many else [value]
        if self.many and not isinstance(value, list):
            raise UserError(f"{self.name} = {value!r}: expected a list, e.g. {self.name} = [\"{self.example}\"]")
        for v in items:
            if isinstance(v, bool) or not isinstance(v, self.types):
                raise UserError(f"{self.name} = {v!r}: expected {_kind(self)}, e.g. {self.name} = {_example(self)}")
        checked = [self.rule(v) for v in items]
        return checked if self.many else checked[0]


def _parse(key: Key, text: str) -> Any:
    if float in key.types:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"{key.name} {text!r}: not a number; e.g. {key.name} {key.example}") from None
    if int in key.types:
        try:
            return int(text)
        except ValueError:
            raise UserError(f"{key.name} {text!r}: not a whole number; e.g. {key.name} {key.example}") from None
    return text


def _kind(key: Key) -> str:
    return "a number" if float in key.types else "a whole number" if int in key.types else "a string"


def _example(key: Key) -> str:
    return key.example if int in key.types or float in key.types else f'"{key.example}"'


KEYS: dict[str, Key] = {k.name: k for k in (
    Key("bucket", (str,), _bucket, None, "none: launch needs --bucket", "s3://my-bucket/runs"),
    Key("infra", (str,), _infra, ANY, "any: the cheapest enabled cloud", "lambda"),
    Key("gpus", (str,), _gpus, None, "H100:8; with --infra local this machine's GPUs, else its CPU cores",
        "H100:8"),
    Key("max-cost", (int, float), lambda v: float(positive("max-cost", v, "300")), None, "none: no budget cap",
        "300"),
    Key("idle-minutes", (int,), lambda v: positive("idle-minutes", v, "10"), 10, "10", "10"),
    Key("notify", (str,), _notify, [], "none", "https://hooks.slack.com/services/...", many=True),
    Key("tracker", (str,), _tracker, [], "none", "wandb", many=True),
)}


def key(name: str) -> Key:
    """The Key for a name as typed (max_cost and MAX-COST mean max-cost); UserError naming the known ones."""
    found = KEYS.get(str(name).strip().lower().replace("_", "-"))
    if found is None:
        raise UserError(f"config: unknown key {name!r}; the keys are {', '.join(KEYS)}")
    return found


# ---------------------------------------------------------------- the file


def _raw() -> dict:
    """The file as TOML, unchecked ({} if there is none); UserError naming the file if it cannot be read."""
    p = path()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        what = getattr(e, "strerror", None) or type(e).__name__
        raise UserError(f"{p}: cannot be read ({what}); fix its permissions, or remove it and set the values again "
                        "with `gpt2cloud config set KEY VALUE`") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p}: not valid TOML ({e}); fix that line (KEY = VALUE, e.g. bucket = "
                        "\"s3://my-bucket/runs\") or remove the file and use `gpt2cloud config set KEY VALUE`"
                        ) from None


def read() -> dict:
    """The values the file sets, each checked with its launch rule; UserError naming the file and the key."""
    p, out = path(), {}
    for name, value in _raw().items():
        if name not in KEYS:
            raise UserError(f"{p}: unknown key {name!r} (the keys are {', '.join(KEYS)}); fix it there or run "
                            f"`gpt2cloud config unset {name}`")
        try:
            out[name] = KEYS[name].from_file(value)
        except UserError as e:
            raise UserError(f"{p}: {e}; fix it there, or run `gpt2cloud config set {name} VALUE` or "
                            f"`gpt2cloud config unset {name}`") from None
    return out


def defaults() -> dict[str, Any]:
    """Every key's value when no flag is given: the file's, else the built-in one (None: the launch
    decides, e.g. gpus). A list key (notify, tracker) is a list. UserError if the file is bad."""
    found = read()
    return {name: found.get(name, k.builtin) for name, k in KEYS.items()}


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # FLAG, CONFIG or DEFAULT


def resolve(**flags) -> dict[str, Setting]:
    """Every key's value and where it came from: the flag if given (None, or [] for a repeatable flag, is
    not given), else the file, else the built-in default. Flags by their Python names: max_cost=..."""
    given = {name.replace("_", "-"): v for name, v in flags.items()}
    unknown = set(given) - set(KEYS)
    if unknown:
        raise TypeError(f"resolve(): no such setting: {', '.join(sorted(unknown))}")
    found = read()
    out = {}
    for name, k in KEYS.items():
        flag = given.get(name)
        if flag is not None and flag != []:
            out[name] = Setting(flag, FLAG)
        elif name in found:
            out[name] = Setting(found[name], CONFIG)
        else:
            out[name] = Setting(k.builtin, DEFAULT)
    return out


def blame(e: UserError, chosen: dict[str, Setting]) -> UserError:
    """A launch error about a flag the user did not type (its value came from the file): say so."""
    for name, s in chosen.items():
        if s.source == CONFIG and str(e).startswith(f"{KEYS[name].flag} "):
            return UserError(f"{e} ({KEYS[name].flag} came from {path()}: pass {KEYS[name].flag}, or "
                             f"`gpt2cloud config set {name} VALUE`)")
    return e


# ---------------------------------------------------------------- writing it


def set_value(name: str, texts: list[str]) -> tuple[str, Any]:
    """`config set`: check the value, then rewrite the file with it and every other key as it was."""
    k = key(name)
    value = k.from_text(texts)
    with _locked():
        raw = _raw()
        raw[k.name] = value
        _write(raw)
    return k.name, value


def unset(name: str) -> tuple[str, bool]:
    """`config unset`: remove the key (an unknown one too, if the file has it: the way out of a typo).
    Returns (name, whether the file had it)."""
    with _locked():
        raw = _raw()
        typed = str(name).strip()
        found = typed if typed in raw else key(name).name  # a key the file holds as written, else a known one
        if found not in raw:
            return found, False
        del raw[found]
        _write(raw)
    return found, True


@contextmanager
def _locked():
    """An exclusive lock on the home directory among `config set/unset`s, so that two at once both keep
    their key; the home is created (and checked writable) first. Bounded: UserError after LOCK_WAIT_S."""
    h = home.check_usable(write=True)
    fd = os.open(h, os.O_RDONLY)  # a directory's descriptor: no lock file left behind
    try:
        home.lock_exclusive(fd, LOCK_WAIT_S, f"{path()}: another gpt2cloud process has been changing it for over "
                                             f"{LOCK_WAIT_S:g} s; retry when it is done")
        yield
    finally:
        os.close(fd)


def _render(raw: dict) -> str:
    return HEADER + "".join(f"{_toml_key(k)} = {_toml_value(k, v)}\n" for k, v in raw.items())


def _write(raw: dict) -> None:
    text = _render(raw)
    if _render(tomllib.loads(text)) != text:  # never replace the file with something that reads back differently
        raise RuntimeError(f"config writer: {text!r} does not read back as written")
    try:
        atomic_write(path(), text, mode=MODE)
    except OSError as e:
        raise home.unusable(e) from None


def _toml_key(k: str) -> str:
    return k if BARE_KEY.match(k) else _toml_string(k)


def _toml_value(k: str, v: Any) -> str:
    """TOML for the flat values this file holds: strings, numbers, booleans and lists of them."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):  # nan and inf too: a hand-written one is kept for its own error message
        return repr(v) if math.isfinite(v) else "nan" if math.isnan(v) else "inf" if v > 0 else "-inf"
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(k, x) for x in v) + "]"
    raise UserError(f"{path()}: {k!r} holds {type(v).__name__}, which this file does not use; remove it by hand "
                    f"or with `gpt2cloud config unset {k}`")


def _toml_string(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:  # control characters: escaped, as TOML requires
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def describe(name: str, value: Optional[Any]) -> str:
    """A value as `config show` and the dry run print it."""
    if value is None or value == []:
        return KEYS[name].builtin_text if name in KEYS else "none"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)
