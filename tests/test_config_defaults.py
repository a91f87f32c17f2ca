"""`gpt2cloud config`: launch defaults in $GPT2CLOUD_HOME/config.toml, their provenance in `launch --dry-run`,
and shell completion of recipe and run names (gpt2cloud/settings.py, gpt2cloud/cli/config.py,
gpt2cloud/cli/completion.py). Every test runs in its own $GPT2CLOUD_HOME (tests/conftest.py)."""

from __future__ import annotations

import os
import tomllib

import pytest
import yaml
from typer.testing import CliRunner
from owned_helpers import one_line_error

from gpt2cloud import settings
from gpt2cloud.cli import completion
from gpt2cloud.cli.app import app
from gpt2cloud.errors import UserError

LOCAL_RUN = ["launch", "gpt2-tiny", "--infra", "local", "--data", "file:///nowhere/shards", "--dry-run"]


def cli(*args, env=None):
    return CliRunner().invoke(app, list(args), env=env)


def write_config(text: str):
    p = settings.path()
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


# ---------------------------------------------------------------- set / get / show / unset


def test_set_get_show_unset_round_trip():
    assert cli("config", "set", "bucket", "s3://my-bucket/runs").exit_code == 0
    assert cli("config", "set", "max_cost", "300").exit_code == 0  # max_cost means max-cost
    assert cli("config", "set", "gpus", "h100:8,a100-80gb:8").exit_code == 0
    assert cli("config", "set", "notify", "https://ntfy.sh/a-topic", "https://hooks.slack.com/services/T/B/x").exit_code == 0

    assert cli("config", "get", "bucket").stdout == "s3://my-bucket/runs\n"
    assert cli("config", "get", "max-cost").stdout == "300\n"
    assert cli("config", "get", "gpus").stdout == "H100:8,A100-80GB:8\n"  # normalized as launch reads it
    assert cli("config", "get", "notify").stdout == "https://ntfy.sh/a-topic\nhttps://hooks.slack.com/services/T/B/x\n"
    assert cli("config", "get", "idle-minutes").stdout == "10\n"  # not set: the built-in default

    shown = yaml.safe_load(cli("config", "show", "--json").stdout)  # JSON is YAML
    assert shown["path"] == str(settings.path()) and shown["exists"]
    assert shown["settings"]["max-cost"] == {"value": 300.0, "source": "config"}
    # webhook URLs are credentials: show gives their scheme and host (get, asked for the key, the whole URLs)
    assert shown["settings"]["notify"] == {"value": ["https://ntfy.sh/...", "https://hooks.slack.com/..."], "source": "config"}
    assert shown["settings"]["idle-minutes"] == {"value": 10, "source": "default"}
    table = cli("config", "show").stdout
    assert "s3://my-bucket/runs" in table and "config file" in table and "built-in" in table
    assert "https://ntfy.sh/..., https://hooks.slack.com/..." in table and "a-topic" not in table and "T/B/x" not in table

    r = cli("config", "unset", "max-cost")
    assert r.exit_code == 0 and "removed" in r.stdout
    r = cli("config", "get", "max-cost")
    assert r.exit_code == 1 and r.stdout == "" and "not set" in r.output
    assert tomllib.loads(settings.path().read_text()) == {
        "bucket": "s3://my-bucket/runs", "gpus": "H100:8,A100-80GB:8", "notify": ["https://ntfy.sh/a-topic", "https://hooks.slack.com/services/T/B/x"]}
    assert cli("config", "unset", "max-cost").exit_code == 0  # unsetting twice is fine


def test_set_keeps_every_other_key_and_hand_written_values():
    write_config('# mine\ninfra = "lambda"\nidle-minutes = 7\n')
    assert cli("config", "set", "bucket", "s3://b/runs").exit_code == 0
    assert cli("config", "set", "infra", "AWS").exit_code == 0
    assert tomllib.loads(settings.path().read_text()) == {"infra": "aws", "idle-minutes": 7, "bucket": "s3://b/runs"}


def test_hand_written_strings_survive_a_rewrite():
    # quotes, a backslash, a control character and non-ASCII: the writer escapes what TOML requires
    write_config('notify = ["a\\"b\\\\c\\u007fd\u00e9"]\nmax-cost = inf\n')
    before = tomllib.loads(settings.path().read_text())
    assert before["notify"] == ['a"b\\c\x7fd\u00e9']
    assert cli("config", "set", "bucket", "s3://b/runs").exit_code == 0
    assert tomllib.loads(settings.path().read_text()) == {**before, "bucket": "s3://b/runs"}


def test_write_is_atomic_and_leaves_no_temporary_file(monkeypatch):
    assert cli("config", "set", "bucket", "s3://b/runs").exit_code == 0
    assert cli("config", "set", "max-cost", "5").exit_code == 0
    home = settings.path().parent
    assert sorted(os.listdir(home)) == ["config.toml"]
    before = settings.path().read_text()

    def no_rename(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr("gpt2cloud.store.base.os.replace", no_rename)
    r = cli("config", "set", "max-cost", "9")
    one_line_error(r, "No space left on device")
    assert settings.path().read_text() == before  # the old file, whole
    assert sorted(os.listdir(home)) == ["config.toml"]  # and no temporary file beside it


def test_the_file_is_the_users_alone_and_set_notify_never_echoes_the_url():
    old = os.umask(0o022)  # the usual umask: a plain write would leave the file world-readable
    try:
        r = cli("config", "set", "notify", "https://hooks.slack.com/services/T/B/secret-part",
                "https://ntfy.sh/topic-xyzzy")
        assert r.exit_code == 0, r.output
        assert os.stat(settings.path()).st_mode & 0o777 == 0o600  # it holds credentials
        assert "secret-part" not in r.output and "xyzzy" not in r.output  # a webhook URL is a credential
        assert "notify = https://hooks.slack.com/..., https://ntfy.sh/..." in r.output
        os.chmod(settings.path(), 0o644)  # loosened by hand (or written by an older version): a set tightens it
        assert cli("config", "set", "bucket", "s3://b/runs").exit_code == 0
        assert os.stat(settings.path()).st_mode & 0o777 == 0o600
        assert "s3://b/runs" in cli("config", "set", "bucket", "s3://b/runs").output  # other keys echo whole
    finally:
        os.umask(old)


# ---------------------------------------------------------------- bad input: one line, exit 2


@pytest.mark.parametrize("args, message", [
    (["nope", "1"], "unknown key 'nope'"),
    (["max-cost", "nan"], "finite number"),
    (["max-cost", "-1"], "greater than 0"),
    (["max-cost", "abc"], "not a number"),
    (["idle-minutes", "0"], "greater than 0"),
    (["idle-minutes", "1.5"], "not a whole number"),
    (["gpus", "H100:"], "expected TYPE:COUNT"),
    (["gpus", "H100:8,H100:8"], "listed twice"),
    (["bucket", "gs://x/y"], "use s3://"),
    (["bucket", "hf://org/repo"], "read-only"),
    (["bucket", "s3://a", "s3://b"], "takes one value"),
    (["infra", "lambda aws"], "expected one name"),
    (["tracker", "no-such-tracker"], "not a tracker the trainer knows"),
    (["notify", "https://ntfy.sh/two words"], "no spaces"),
    (["notify", "ops"], "expected an https://"),
])
def test_bad_key_or_value_is_one_line_and_writes_nothing(args, message):
    one_line_error(cli("config", "set", *args), message)
    assert not settings.path().exists()


@pytest.mark.parametrize("text, message", [
    ('bucket = "s3://b\n', "not valid TOML"),
    ("max_cost = 3\n", "unknown key 'max_cost'"),
    ('max-cost = "lots"\n', "expected a number"),
    ("idle-minutes = 0\n", "greater than 0"),
    ('notify = "one"\n', "expected a list"),
    ('bucket = "gs://x/y"\n', "use s3://"),
])
def test_a_corrupt_file_is_one_line_naming_it(text, message):
    p = write_config(text)
    for args in (["config", "show"], [*LOCAL_RUN, "--bucket", "file:///tmp/b"]):
        line = one_line_error(cli(*args), str(p), message)
        assert "fix" in line  # and how to fix it
    # the way out of a typo'd key
    if "unknown key" in message:
        assert cli("config", "unset", "max_cost").exit_code == 0
        assert cli("config", "show").exit_code == 0


# ---------------------------------------------------------------- launch: flag > file > built-in


@pytest.fixture
def planned(monkeypatch):
    """What launch hands to plan(): the call is recorded, then stopped."""
    calls = []

    def fake_plan(recipe, gpus, **kw):
        calls.append({"gpus": gpus, **kw})
        raise UserError("stopped by the test")

    monkeypatch.setattr("gpt2cloud.launch.plan.plan", fake_plan)
    return calls


def test_a_flag_wins_over_the_file(planned):
    for key, value in (("bucket", "s3://from/config"), ("infra", "aws"), ("gpus", "A100:8"), ("max-cost", "5"),
                       ("idle-minutes", "3")):
        assert cli("config", "set", key, value).exit_code == 0
    r = cli("launch", "gpt2-124m", "--data", "s3://d/shards", "--bucket", "s3://from/flag", "--infra", "lambda",
            "--gpus", "H100:8", "--max-cost", "7", "--idle-minutes", "11", "--dry-run")
    one_line_error(r, "stopped by the test")
    got = {k: planned[0][k] for k in ("bucket", "infra", "gpus", "max_cost", "idle_minutes")}
    assert got == {"bucket": "s3://from/flag", "infra": "lambda", "gpus": "H100:8", "max_cost": 7.0,
                   "idle_minutes": 11}


def test_the_file_wins_over_the_built_in_default(planned):
    cli("launch", "gpt2-124m", "--data", "s3://d/shards", "--bucket", "s3://b/r", "--dry-run")
    assert {k: planned[0][k] for k in ("infra", "gpus", "max_cost", "idle_minutes")} == {
        "infra": "any", "gpus": None, "max_cost": None, "idle_minutes": 10}  # built in: the launch decides gpus
    for key, value in (("bucket", "s3://from/config"), ("infra", "aws"), ("gpus", "A100:8"), ("max-cost", "5"),
                       ("idle-minutes", "3")):
        assert cli("config", "set", key, value).exit_code == 0
    cli("launch", "gpt2-124m", "--data", "s3://d/shards", "--dry-run")
    got = {k: planned[1][k] for k in ("bucket", "infra", "gpus", "max_cost", "idle_minutes")}
    assert got == {"bucket": "s3://from/config", "infra": "aws", "gpus": "A100:8", "max_cost": 5.0,
                   "idle_minutes": 3}


def test_no_bucket_anywhere_is_one_line_naming_both_ways():
    one_line_error(cli(*LOCAL_RUN), "--bucket", "gpt2cloud config set bucket")


def test_an_error_in_a_value_from_the_file_says_where_it_came_from():
    assert cli("config", "set", "bucket", "file:///tmp/b").exit_code == 0  # fine for --infra local only
    r = cli("launch", "gpt2-tiny", "--infra", "lambda", "--gpus", "H100:8", "--data", "s3://d/shards", "--dry-run")
    one_line_error(r, "cannot reach a file:// path", f"--bucket came from {settings.path()}")


def test_dry_run_shows_where_each_value_came_from():
    assert cli("config", "set", "bucket", "file:///tmp/config-bucket").exit_code == 0
    assert cli("config", "set", "max-cost", "5").exit_code == 0
    assert cli("config", "set", "notify", "https://hooks.slack.com/services/T/B/secret-part").exit_code == 0
    r = cli(*LOCAL_RUN, "--gpus", "CPU:2")
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load(r.stdout)  # still the task's YAML: the provenance is comments
    assert cfg["run"] and "resources" in cfg
    rows = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith("#   ")}
    config_file = f"config file {settings.path()}"
    assert "file:///tmp/config-bucket" in rows["bucket"] and config_file in rows["bucket"]
    assert "5" in rows["max-cost"] and config_file in rows["max-cost"]
    assert "https://hooks.slack.com/..." in rows["notify"] and config_file in rows["notify"]
    assert "secret-part" not in r.output  # a webhook URL is a credential: the dry run shows its host only
    assert "local" in rows["infra"] and "flag --infra" in rows["infra"]
    assert "CPU:2" in rows["gpus"] and "flag --gpus" in rows["gpus"]
    assert "10" in rows["idle-minutes"] and "built-in default" in rows["idle-minutes"]
    assert "built-in default" in rows["tracker"]


def test_defaults_for_other_commands():
    assert settings.defaults() == {"bucket": None, "infra": "any", "gpus": None, "max-cost": None,
                                   "idle-minutes": 10, "notify": [], "tracker": []}
    settings.set_value("notify", ["https://ntfy.sh/a-topic", "https://hooks.slack.com/services/T/B/x"])
    assert settings.defaults()["notify"] == ["https://ntfy.sh/a-topic", "https://hooks.slack.com/services/T/B/x"]
    chosen = settings.resolve(notify=["https://example.com/c"])
    assert chosen["notify"] == settings.Setting(["https://example.com/c"], settings.FLAG)
    assert settings.resolve(notify=[])["notify"] == settings.Setting(["https://ntfy.sh/a-topic", "https://hooks.slack.com/services/T/B/x"], settings.CONFIG)


# ---------------------------------------------------------------- shell completion


def test_recipe_completion_offers_bundled_names_and_yaml_files(tmp_path, monkeypatch):
    assert {"gpt2-1558m", "gpt2-1558m-fast"} <= set(completion.recipes("gpt2-15"))
    assert "gpt2-124m" not in completion.recipes("gpt2-15")
    (tmp_path / "mine.yaml").write_text("x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.yml").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert completion.recipes("m") == ["mine.yaml"]
    assert completion.recipes("sub/") == ["sub/deep.yml"]
    assert completion.recipes("/no/such/dir/x") == []  # never raises


def test_run_completion_offers_registry_names(isolated_home, monkeypatch):
    runs = settings.home.runs_dir()
    runs.mkdir(parents=True)
    for name in ("gpt2-tiny-a.json", "gpt2-124m-b.json", ".gpt2-tiny-a.lock", ".gpt2-tiny-a.json.tmp-1", "x.txt"):
        (runs / name).write_text("{}")
    assert completion.runs("") == ["gpt2-124m-b", "gpt2-tiny-a"]
    assert completion.runs("gpt2-t") == ["gpt2-tiny-a"]
    monkeypatch.setenv("GPT2CLOUD_HOME", str(runs / "gpt2-tiny-a.json"))  # a home that is a file
    assert completion.runs("") == []


def test_completion_through_the_shell_protocol():
    runs = settings.home.runs_dir()
    runs.mkdir(parents=True)
    (runs / "gpt2-tiny-a.json").write_text("{}")
    for words, expected in (("gpt2cloud status gpt", "gpt2-tiny-a"), ("gpt2cloud logs ", "gpt2-tiny-a"),
                            ("gpt2cloud launch gpt2-ti", "gpt2-tiny"), ("gpt2cloud config set max", "max-cost")):
        r = cli(env={"_GPT2CLOUD_COMPLETE": "complete_bash", "COMP_WORDS": words,
                     "COMP_CWORD": str(len(words.split(" ")) - 1)})
        assert r.exit_code == 0 and r.stdout.split() == [expected], (words, r.output)


def test_show_completion_prints_the_bash_script(monkeypatch):
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")  # read when the command is built
    r = cli("--show-completion", "bash")
    assert r.exit_code == 0, r.output
    assert "_GPT2CLOUD_COMPLETE=complete_bash" in r.stdout and "complete -o default" in r.stdout
