"""flightdeck.yaml validation and the `flightdeck` command line."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from flight.cli import main
from flightdeck.config import ConfigError, load_config, parse_config

from conftest import REPO, ServerProcess, write_config


def _errors(raw: dict, environ: dict | None = None) -> str:
    with pytest.raises(ConfigError) as raised:
        parse_config(raw, REPO, environ or {})
    return str(raised.value)


def test_unknown_connector_suggests_the_right_one():
    message = _errors({"datasets": [{"from": "file:a.csv", "name": "a"},
                                    {"from": "postgress:public.orders", "name": "orders"}]})
    assert message == "datasets[1].from: unknown connector 'postgress' (did you mean 'postgres'?)"


@pytest.mark.parametrize("raw,expected", [
    ({"datasets": [{"from": "file:a.csv"}]}, "datasets[0].name: required key is missing"),
    ({"datasets": [{"from": "file:a.csv", "name": "Orders"}]}, "datasets[0].name: expected a lowercase name"),
    ({"datasets": [{"from": "file:a.csv", "name": "a", "acelleration": {}}]}, "datasets[0].acelleration: unknown key"),
    ({"datasets": [{"from": "nocolon", "name": "a"}]}, "datasets[0].from: expected '<connector>:<location>'"),
    ({"runtime": {"flight": {"port": 99999}}}, "runtime.flight.port: Input should be less than or equal to 65535"),
    ({"runtime": {"flight": {"host": "0.0.0.0", "port": 50051}}}, "binds beyond loopback: set runtime.auth"),
    ({"datasets": [{"from": "file:a.csv", "name": "a"}, {"from": "file:b.csv", "name": "public.a"}]},
     "datasets[1].name: 'public.a' is already used by datasets[0]"),
    ([1, 2], "the configuration must be a mapping"),
])
def test_precise_errors(raw, expected):
    assert expected in _errors(raw)


def test_env_substitution_and_missing_variables():
    raw = {"runtime": {"auth": {"api_keys": ["${env:FD_KEY}"]}},
           "datasets": [{"from": "duckdb:t", "name": "t", "params": {"duckdb_open": "${env:FD_DB}"}}]}
    loaded = parse_config(raw, REPO, {"FD_KEY": "secret-key-123", "FD_DB": "x.duckdb"})
    assert loaded.config.runtime.auth.api_keys == ["secret-key-123"]
    assert loaded.config.datasets[0].params == {"duckdb_open": "x.duckdb"}
    assert loaded.redact("failed with secret-key-123") == "failed with ***"
    message = _errors(raw, {"FD_KEY": "k"})
    assert message == "datasets[0].params.duckdb_open: environment variable FD_DB is not set"


def test_values_are_never_echoed_in_errors():
    message = _errors({"runtime": {"flight": {"port": "hunter2-secret"}}})
    assert "hunter2" not in message and message.startswith("runtime.flight.port:")


def test_yaml_syntax_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("datasets:\n  - from: file:a.csv\n    name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line 4, column 1: not valid YAML"):
        load_config(path)


def test_validate_command(tmp_path):
    (tmp_path / "a.csv").write_text("x\n1\n")
    good = write_config(tmp_path / "good.yaml", {"datasets": [{"from": "file:a.csv", "name": "a"}]})
    result = CliRunner().invoke(main, ["validate", "-c", str(good)])
    assert result.exit_code == 0 and "valid (1 datasets)" in result.output
    bad = write_config(tmp_path / "bad.yaml", {"datasets": [{"from": "postgress:x", "name": "a"}]})
    result = CliRunner().invoke(main, ["validate", "-c", str(bad)])
    assert result.exit_code == 1
    assert "unknown connector 'postgress' (did you mean 'postgres'?)" in result.output
    assert "Traceback" not in result.output
    missing = write_config(tmp_path / "missing.yaml", {"datasets": [{"from": "file:nope.csv", "name": "n"}]})
    result = CliRunner().invoke(main, ["validate", "-c", str(missing)])
    assert result.exit_code == 0 and "nope.csv does not exist" in result.output


def test_datasets_command(demo_config):
    result = CliRunner().invoke(main, ["datasets", "-c", str(demo_config)])
    assert result.exit_code == 0, result.output
    for name in ("public.orders", "crm.customers", "public.logs", "public.metrics", "public.guides"):
        assert name in result.output
    assert "30,000" in result.output


def test_sql_command_against_the_server(server):
    runner = CliRunner()
    result = runner.invoke(main, ["sql", "--url", server.url, "-e",
                                  "SELECT status, count(*) AS n FROM orders GROUP BY status ORDER BY status",
                                  "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ['"status","n"', '"completed",28858', '"failed",576', '"pending",566']
    result = runner.invoke(main, ["sql", "--url", server.url, "-e", "DROP TABLE orders"])
    assert result.exit_code == 1
    assert "DROP statements are not allowed" in result.output and "gRPC" not in result.output


def test_sql_repl_runs_statements(server):
    process = subprocess.run(
        [sys.executable, "-m", "flight.cli", "sql", "--url", server.url, "--format", "json"],
        input="SELECT count(*) AS n\n  FROM orders;\nSELECT nope;\n", capture_output=True, text=True,
        cwd=REPO, timeout=60)
    assert process.returncode == 0, process.stderr
    assert '{"n": 30000}' in process.stdout
    assert "error:" in process.stderr


def test_run_stops_cleanly_on_ctrl_c(demo_config):
    server = ServerProcess(["run", "-c", str(demo_config), "--flight-port", "0"])
    time.sleep(0.5)
    code, err = server.stop()  # SIGINT
    assert code == 0, err
    assert "flightdeck stopped" in err and "Traceback" not in err


STUCK_STOP = """
import threading
import flight.cli as cli

class StuckDoor:
    def shutdown(self):
        threading.Event().wait()

cli.STOP_PATIENCE_SECONDS = 1.0
serving = object.__new__(cli.Serving)
serving._stop, serving.doors, serving.stack = threading.Event(), [StuckDoor()], None
serving.shutdown()
serving.serve()
"""


def test_a_stop_that_hangs_shows_every_thread_and_ends_the_process():
    stopped = subprocess.run([sys.executable, "-c", STUCK_STOP], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
    assert stopped.returncode != 0
    assert "Timeout" in stopped.stderr and "in shutdown" in stopped.stderr and "in close" in stopped.stderr


STARTED_FROZEN = """
import gc, sys
from pathlib import Path
import flight.cli as cli
from flightdeck.config import parse_config

closed = {"flight": {"enabled": False, "port": 0}, "http": {"enabled": False, "port": 0}}
loaded = parse_config({"datasets": [], "runtime": closed}, Path("."), {})
cli.Serving(loaded).close()  # as the tests make them: freed by the collector afterwards
unfrozen = gc.get_freeze_count()
cli.Serving(loaded, freeze_startup=True)
print(unfrozen, gc.get_freeze_count())
"""


def test_a_server_process_keeps_what_exists_at_its_start_out_of_the_collectors_full_scans():
    started = subprocess.run([sys.executable, "-c", STARTED_FROZEN], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    unfrozen, frozen = map(int, started.stdout.split())
    assert unfrozen == 0 and frozen > 10_000  # the modules loaded by then, at least


TELLS_ITS_FREEZE = """
import sys
import flight.cli as cli

freeze = cli.freeze_startup_objects

def told():
    print("FROZEN", file=sys.stderr, flush=True)
    freeze()

cli.freeze_startup_objects = told
cli.main(sys.argv[1:])
"""


@pytest.mark.parametrize("command", ["run", "mcp"])
def test_run_and_mcp_start_their_stack_frozen(demo_config, command):
    args = [sys.executable, "-c", TELLS_ITS_FREEZE, command, "-c", str(demo_config)]
    if command == "run":
        args += ["--flight-port", "0", "--http-port", "0"]
    process = subprocess.Popen(args, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    if command == "run":
        assert process.stdout.readline().startswith("READY ")
        process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)  # mcp over stdio ends with its input
    assert err.count("FROZEN") == 1, err


def test_run_refuses_an_invalid_config(tmp_path):
    bad = write_config(tmp_path / "bad.yaml", {"datasets": [{"from": "file:a.csv"}]})
    result = CliRunner().invoke(main, ["run", "-c", str(bad)])
    assert result.exit_code == 1
    assert "datasets[0].name: required key is missing" in result.output
