"""The table of bad inputs: whatever a user types, eph answers with one paragraph and
exit 2, names what was typed and where (the flag, or the file, line and key), starts
nothing, and touches no file that existed before.

Each case runs the real command line in-process (``harness.cli.main``), from a
directory that holds an earlier run, an observation, a plain file and scenario
files, and compares a snapshot of that directory (names, sizes, modes, mtimes and
the bytes of every file) before and after. End-to-end subprocess cases at the end
show the same for a real ``eph`` process: no traceback ever reaches the terminal.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.cli import main

from .conftest import ROOT, eph, require, require_tools

GOOD = """name = "good"
duration = "2s"
[target]
endpoints = ["127.0.0.1:0"]
[listener]
[load]
users = 2
rate = 10.0
"""

# a scenario with one bad line appended under a section: (section header, line)
SECTIONS = {
    "load": ("[load]", "users = 0", "load.users"),
    "http": ("[load.http]", 'method = "get me"', "load.http.method"),
    "tls": ("[load.tls]", 'insecure = "yes"', "load.tls.insecure"),
    "kernel": ("[kernel]", "tcp_tw_reuse = 7", "kernel.tcp_tw_reuse"),
    "lab": ("[lab]", 'topology = "mesh"', "lab.topology"),
    "nat": ('[lab]\ntopology = "nat"\n[lab.nat]', "ports = [5000, 10]", "lab.nat"),
    "listener": ("[listener]", 'close = "never"', "listener.close"),
    "collector": ("[collector]", 'interval = "0s"', "collector.interval"),
}


def _scenario(section: str, line: str) -> str:
    base = GOOD.replace("[listener]\n", "").replace("[load]\nusers = 2\nrate = 10.0\n", "")
    return f"{base}{section}\n{line}\n"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory with what a user has lying around, and the cwd there."""
    run = tmp_path / "RUN"
    run.mkdir(mode=0o750)
    (run / "scenario.json").write_text('{"name": "earlier"}\n')
    (run / "summary.json").write_text('{"connections": {"attempted": 1232}}\n')
    (run / "connections.parquet").write_bytes(os.urandom(4096))
    (run / "report.html").write_text("<html>the earlier run</html>\n")
    obs = tmp_path / "OBS"
    obs.mkdir()
    (obs / "observe.json").write_text("{}\n")
    (obs / "host.arrows").write_bytes(os.urandom(512))
    (tmp_path / "FILE").write_text("not a directory\n")
    (tmp_path / "good.toml").write_text(GOOD)
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    for name, (section, line, _key) in SECTIONS.items():
        (tmp_path / f"bad-{name}.toml").write_text(_scenario(section, line))
    tls = GOOD + "[load.tls]\n"
    (tmp_path / "missing-ca.toml").write_text(tls + 'ca_file = "missing-ca.pem"\n')
    (tmp_path / "junk-ca.toml").write_text(tls + 'ca_file = "junk.pem"\n')
    (tmp_path / "missing-cert.toml").write_text(
        tls + 'cert_file = "nope-cert.pem"\nkey_file = "junk.pem"\n'
    )
    (tmp_path / "missing-key.toml").write_text(
        tls + 'cert_file = "junk.pem"\nkey_file = "nope-key.pem"\n'
    )
    (tmp_path / "missing-exec.toml").write_text(GOOD + '[lab]\nexec = "eph-no-such-client -n 5"\n')
    (tmp_path / "zero.toml").write_text(GOOD.replace('duration = "2s"', 'duration = "0s"'))
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every entry under ``root``: mode, size, mtime and (for files) a hash of the bytes."""
    seen = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        seen[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return seen


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    says: tuple[str, ...]  # fragments the one paragraph must hold: what was typed, where

    def __str__(self) -> str:
        return " ".join(self.args)[:60]


def case(args: str | list[str], *says: str) -> Case:
    return Case(tuple(args.split() if isinstance(args, str) else args), says)


REFUSED = ("already holds", "--force", "nothing is deleted")
CASES = [
    # --out: a run or an observation is never written over; a file or /proc is no directory
    case("run good.toml --out RUN", "RUN", "already holds a run", *REFUSED),
    case("lab good.toml --out RUN", "RUN", "already holds a run", *REFUSED),
    case("sweep good.toml --vary load.users=1,2 --out RUN", "RUN", *REFUSED),
    case("observe --out RUN --duration 2s", "RUN", "already holds a run", *REFUSED),
    case("observe --out OBS --duration 2s", "OBS", "already holds an observation", *REFUSED),
    case("collect --out RUN --duration 2s", "RUN", *REFUSED),
    case("lab good.toml --exec true --out RUN", "RUN", *REFUSED),
    case("run good.toml --out FILE", "FILE", "--out names a file, not a directory"),
    case("observe --out FILE", "FILE", "--out names a file, not a directory"),
    case("lab good.toml --out FILE", "FILE", "--out names a file"),
    case("sweep good.toml --vary load.users=1,2 --out FILE", "FILE", "--out names a file"),
    case("collect --out FILE", "FILE", "--out names a file"),
    case("run good.toml --out /proc/eph-nowhere", "/proc/eph-nowhere", "cannot create it"),
    case("observe --out /proc/eph-nowhere", "/proc/eph-nowhere", "cannot create it"),
    # files a scenario names: checked by validate and before any run, lab or sweep
    case("validate missing-ca.toml", "missing-ca.toml, line 10", "load.tls.ca_file", "no such"),
    case("run missing-ca.toml", "missing-ca.toml, line 10", "load.tls.ca_file", "no such file"),
    case("lab missing-ca.toml", "missing-ca.toml, line 10", "load.tls.ca_file"),
    case("sweep missing-ca.toml --vary load.users=1,2", "missing-ca.toml", "load.tls.ca_file"),
    case("validate junk-ca.toml", "junk-ca.toml, line 10", "load.tls.ca_file", "cannot load"),
    case("run missing-cert.toml", "missing-cert.toml, line 10", "load.tls.cert_file", "no such"),
    case("run missing-key.toml", "missing-key.toml, line 11", "load.tls.key_file", "no such"),
    case(
        "run good.toml --set load.tls.ca_file=/nonexistent/ca.pem",
        "--set load.tls.ca_file=/nonexistent/ca.pem",
        "no such file",
    ),
    case("validate missing-exec.toml", "missing-exec.toml, line 10", "lab.exec", "not found"),
    case("lab missing-exec.toml", "missing-exec.toml, line 10", "eph-no-such-client"),
    case(["lab", "good.toml", "--exec", "eph-no-such-client -x"], "--exec", "eph-no-such-client"),
    case(["lab", "good.toml", "--exec", "./no/such/client"], "--exec", "no such file"),
    case(["lab", "good.toml", "--exec", ""], "--exec ''", "the command is empty"),
    case(["lab", "good.toml", "--exec", "   "], "--exec '   '", "the command is empty"),
    case(["lab", "good.toml", "--exec", "curl 'open"], "--exec", "does not parse"),
    # --set and --vary: the flag as typed, the key and the value, never a line of the file
    case("validate good.toml --set load.users=abc", "--set load.users=abc", "'abc'"),
    case("run good.toml --set load.users=abc", "--set load.users=abc", "load.users", "'abc'"),
    case("lab good.toml --set kernel.tcp_tw_reuse=9", "--set kernel.tcp_tw_reuse=9", "9"),
    case("run good.toml --set load.usres=3", "--set", "load.usres", "did you mean 'load.users'"),
    case("run good.toml --set load.users", "--set", "'load.users'", "key.path=value"),
    case("sweep good.toml --vary load.users=abc,2", "--vary load.users=abc", "'abc'"),
    case("sweep good.toml --vary load.users", "--vary", "key.path=v1,v2"),
    case(
        "sweep good.toml --vary load.users=2 --set load.rate=fast",
        "--set load.rate=fast",
        "'fast'",
    ),
    # every section of a scenario file: the file, the line and the key
    *(
        case(f"validate bad-{name}.toml", f"bad-{name}.toml, line", f"key '{key}'")
        for name, (_s, _l, key) in SECTIONS.items()
    ),
    case("run bad-load.toml", "bad-load.toml, line 6", "key 'load.users'"),
    case("validate zero.toml", "zero.toml", "duration must be above 0"),
    case("validate no-such.toml", "no-such.toml", "no such file"),
    # zero where zero makes no sense
    case("observe --interval 0s --duration 2s", "--interval", "'0s'", "not above zero"),
    case("observe --duration 0s", "--duration", "not above zero"),
    case("collect --out NEW --interval 0ms", "--interval", "not above zero"),
    case("worker --max-time 0s", "--max-time", "not above zero"),
    case("run good.toml --master --wait-workers 0s", "--wait-workers", "not above zero"),
    case("observe --interval soon", "--interval", "'soon'"),
    # each verb's flags name themselves
    case("observe --prometheus 127.0.0.1:99999", "--prometheus", "127.0.0.1:99999", "99999"),
    case("observe --trace", "--trace", "--out"),
    case("run good.toml --target 127.0.0.1:99999", "--target", "127.0.0.1:99999"),
    case("run good.toml --target nowhere", "--target", "'nowhere'"),
    case("run good.toml --web 127.0.0.1:0", "--web", "127.0.0.1:0"),
    case("listen --endpoint 127.0.0.1:70000", "--endpoint", "70000"),
    case("collect --target 10.0.0.1 --once", "--target", "'10.0.0.1'"),
    case("lab good.toml --trace", "--trace", "--exec"),
    case("lab good.toml --exec true --no-report", "--no-report", "--exec"),
    case("plan --rate -5", "--rate", "-5"),
    case("plan --rate 10 --port-range 5000-10", "--port-range", "5000-10"),
    case("plan --rate 10 --lifetime forever", "--lifetime", "'forever'"),
    case("plan --nat --nat-ports 0 --rate 10", "--nat-ports"),
    case("report NEW-MISSING", "NEW-MISSING"),
    case("report OBS RUN", "--compare"),
    case("report --compare RUN RUN --out OBS", "--out", "'OBS' is a directory"),
    case("report FILE", "FILE", "is a file, not a run directory"),
    case("plan --from FILE", "FILE", "is a file, not a run directory"),
    case("report --collect-from NEW-MISSING RUN", "--collect-from", "NEW-MISSING"),
    case("preflight no-such.toml", "no-such.toml", "no such file"),
    case("schema scenario", "'scenario'", "summary"),
    case("run", "SCENARIO"),
]


@pytest.mark.parametrize("bad", CASES, ids=str)
def test_bad_input_is_one_paragraph_exit_2_and_touches_nothing(
    bad: Case, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(home)
    with pytest.raises(SystemExit) as caught:
        main(list(bad.args))
    out, err = capsys.readouterr()
    assert caught.value.code == 2, f"exit {caught.value.code}: {out}{err}"
    paragraph = err.strip()
    assert paragraph.startswith("error: "), err
    assert "\n\n" not in paragraph and "Traceback" not in err, err
    assert paragraph.count("\n") <= 1, f"more than one paragraph:\n{err}"
    for fragment in bad.says:
        assert fragment in paragraph, f"{fragment!r} not in:\n{err}"
    assert snapshot(home) == before, "a file that existed before was touched, or one was made"


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args",
    [
        ["observe", "--out", "RUN", "--duration", "2s"],
        ["run", "good.toml", "--out", "RUN"],
        ["run", "good.toml", "--set", "load.users=abc"],
        ["validate", "missing-ca.toml"],
        ["lab", "good.toml", "--exec", ""],
        ["observe", "--prometheus", "127.0.0.1:99999"],
    ],
    ids=" ".join,
)
def test_a_real_eph_process_says_it_in_one_paragraph(args: list[str], home: Path) -> None:
    before = snapshot(home)
    result = eph(args, cwd=home)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") <= 1, result.stderr
    assert snapshot(home) == before


def test_the_suggested_fresh_name_is_free_and_force_keeps_the_old_run(home: Path) -> None:
    """The refusal names a directory that does not exist; --force moves the old one to
    the name it said, byte for byte, and leaves an empty directory to write into."""
    from harness.errors import RunDirError
    from harness.rundir import claim_out

    (home / "RUN-2").mkdir()
    with pytest.raises(RunDirError) as caught:
        claim_out(home / "RUN")
    said = str(caught.value)
    assert "RUN-3" in said and not (home / "RUN-3").exists()
    before = {k: v for k, v in snapshot(home).items() if k.startswith("RUN/")}
    time.sleep(1.1)  # the user reads, then types --force: the name said must still hold
    assert claim_out(home / "RUN", force=True) == home / "RUN"
    assert list((home / "RUN").iterdir()) == []
    aside = [p for p in home.iterdir() if p.name.startswith("RUN.replaced-")]
    assert len(aside) == 1 and aside[0].name in said
    moved = {
        k.replace(aside[0].name, "RUN", 1): v
        for k, v in snapshot(home).items()
        if k.startswith(aside[0].name + "/")
    }
    assert moved == before


def test_an_empty_existing_directory_is_taken(home: Path) -> None:
    from harness.rundir import claim_out

    (home / "EMPTY").mkdir()
    assert claim_out(home / "EMPTY") == home / "EMPTY"


def test_a_read_only_directory_is_refused_naming_it(home: Path) -> None:
    """Root may write anywhere but on a read-only filesystem: a read-only tmpfs over a
    directory, in a mount namespace of its own that goes when the command exits."""
    require(None if os.geteuid() == 0 else "a private read-only mount needs root")
    require_tools("unshare", "mount")
    locked = home / "locked"
    locked.mkdir()
    script = (
        f"mount -t tmpfs -o ro none {locked} && exec {sys.executable} -m harness"
        f" observe --out {locked / 'run'} --duration 1s"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=home,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert str(locked / "run") in result.stderr and "cannot create it" in result.stderr
    assert "Read-only file system" in result.stderr


# ------------------------------------------------------------- with a real run

FIRST = """name = "first"
duration = "2s"
[target]
endpoints = ["127.0.0.1:0"]
[listener]
tls = true
[load]
users = 3
rate = 30.0
tls = true
"""


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real run under umask 000, into parents --out had to make (a TLS listener,
    so that a private key is among its files)."""
    home = tmp_path_factory.mktemp("first")
    (home / "first.toml").write_text(FIRST)
    run = home / "made" / "for" / "first"
    result = subprocess.run(
        [sys.executable, "-m", "harness", "run", "first.toml", "--out", str(run)],
        cwd=home,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=lambda: os.umask(0),
    )
    assert result.returncode == 0, result.stderr
    return run


@pytest.mark.e2e
def test_nothing_eph_makes_is_group_or_world_writable_under_umask_0(first_run: Path) -> None:
    made = first_run.parent.parent
    writable = [
        f"{oct(p.lstat().st_mode & 0o777)} {p}"
        for p in [made, first_run.parent, *made.rglob("*")]
        if not p.is_symlink() and p.lstat().st_mode & 0o022
    ]
    assert writable == []
    assert first_run.stat().st_mode & 0o777 == 0o750
    keys = list(first_run.rglob("*.key"))
    assert keys and all(k.stat().st_mode & 0o777 == 0o600 for k in keys), keys


@pytest.mark.e2e
def test_force_keeps_the_old_run_and_the_new_one_runs_its_own_scenario(
    first_run: Path, tmp_path: Path
) -> None:
    """The bug: a second run into the same --out ran the first run's scenario.json
    (30/s) although its header said 60/s, and wrote over its records."""
    before = snapshot(first_run)
    second = tmp_path / "second.toml"
    second.write_text(FIRST.replace("users = 3", "users = 7").replace("30.0", "60.0"))
    refused = eph(["run", str(second), "--out", str(first_run)], cwd=tmp_path)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    assert snapshot(first_run) == before
    result = eph(["run", str(second), "--out", str(first_run), "--force"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    aside = [p for p in first_run.parent.iterdir() if p.name.startswith("first.replaced-")]
    assert len(aside) == 1 and aside[0].name in result.stderr
    assert snapshot(aside[0]) == before  # byte for byte, modes and times too
    import json

    ran = json.loads((first_run / "scenario.json").read_text())
    assert (ran["load"]["users"], ran["load"]["rate"]) == (7, 60.0)
    summary = json.loads((first_run / "summary.json").read_text())
    old = json.loads((aside[0] / "summary.json").read_text())
    # eph paces exactly: the new run made about twice the old one's connections in the
    # same 2 s; 1.5x is the midpoint between running the old rate and the new one
    assert summary["connections"]["attempted"] > 1.5 * old["connections"]["attempted"]
    aside[0].rename(tmp_path / "kept")  # leave the module's run as it was for the others
    shutil.rmtree(first_run)
    (tmp_path / "kept").rename(first_run)


@pytest.mark.e2e
def test_a_truncated_summary_is_rebuilt_from_state_json(first_run: Path, tmp_path: Path) -> None:
    import json

    copy = tmp_path / "copy"
    _copytree(first_run, copy)
    truth = json.loads((copy / "summary.json").read_text())
    records = snapshot(copy)
    (copy / "summary.json").write_text((copy / "summary.json").read_text()[:300])
    result = eph(["report", str(copy)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "come from state.json" in result.stderr
    assert "no record was changed" in result.stderr
    again = json.loads((copy / "summary.json").read_text())
    for key in ("started_at", "stop_reason", "interrupted", "duration_s"):
        assert again[key] == truth[key], key
    assert again["connections"] == truth["connections"]
    for name in ("connections.parquet", "scenario.json", "state.json"):
        assert snapshot(copy)[name] == records[name]


def _copytree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=shutil.copy2)


@pytest.mark.e2e
def test_a_child_that_cannot_start_says_why_on_the_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bug: a missing CA took 35 s and ended "Locust exited (code 0) before
    starting", its reason only in locust.log. The CLI now finds a missing file first,
    so this calls the run with that check turned off, to reach Locust with it."""
    import time

    import trustme

    import harness.run.lifecycle
    from harness.errors import RunError
    from harness.scenario import parse_scenario

    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    scenario = parse_scenario(GOOD + f'[load.tls]\nca_file = "{ca}"\n', source="good.toml")
    ca.unlink()  # gone between the check and the load
    monkeypatch.setattr(harness.run.lifecycle, "client_context", lambda tls: None)
    began = time.monotonic()
    with pytest.raises(RunError) as caught:
        harness.run.lifecycle.run_scenario(scenario, out=tmp_path / "run")
    said = str(caught.value)
    assert "the load could not start" in said and "load.tls.ca_file" in said, said
    assert "no such file" in said and str(ca) in said
    # said once Locust's first session failed: well under the 30 s start timeout that
    # used to pass first (a Locust start here takes 1-3 s)
    assert time.monotonic() - began < harness.run.lifecycle.START_TIMEOUT
    assert (tmp_path / "run" / "logs" / "locust.error").exists()


@pytest.mark.e2e
def test_an_argument_locust_refuses_is_said_on_the_terminal(home: Path) -> None:
    result = eph(["run", "good.toml", "--no-such-flag"], cwd=home)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Locust could not start"), result.stderr
    assert "unrecognized arguments: --no-such-flag" in last


@pytest.mark.parametrize(("interval", "duration"), [(0.0, 2.0), (1.0, 0.0), (-1.0, 2.0)])
def test_an_observation_that_would_never_end_is_refused(interval: float, duration: float) -> None:
    """Below the CLI too: 0 s between samples never reached the end (19,046 samples)."""
    from harness.observe.session import Observation, Settings

    settings = Settings(port_range=(40000, 40099), reserved="", tw_reuse=1, timestamps=1,
                        reuse_delay_ms=None, conntrack_max=None)  # fmt: skip
    observation = Observation(duration_s=duration, interval_s=interval, settings=settings)
    with pytest.raises(ValueError, match="above zero"):
        observation.run()
    assert observation.samples == 0
