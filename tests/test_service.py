"""The Service every door calls, in process over the demo: SQL with parameters, the catalog,
sample, search, embed, refresh, health, and one error taxonomy."""
from __future__ import annotations

import threading

import numpy as np
import pyarrow.flight as flight
import pytest
from click.testing import CliRunner

from conftest import ServerProcess, service_error
from flight.cli import main
from flight.flightsql.server import FLIGHT_ERRORS, flight_error
from flightdeck.auth import TOKENS_PER_USER, Authenticator, Credentials, Key, Principal, User
from flightdeck.errors import KINDS, ServiceError
from flightdeck.limits import QueryLimits
from flightdeck.runtime_config import RuntimeConfig

ANYONE = Principal("anonymous")
INCIDENT = "orders failing after scaling to three replicas: too many database connections"
POOLER = "connection-pooler-transaction-mode.md"


@pytest.fixture
def service(deck):
    return deck.service


def test_a_planned_statement_binds_parameters_and_runs_again(service):
    planned = service.plan(ANYONE, "SELECT status, count(*) AS n FROM orders WHERE status = $1 GROUP BY status",
                           ["completed"])
    assert planned.schema.names == ["status", "n"]
    for _ in range(2):
        assert service.execute(planned).read_all().to_pylist() == [{"status": "completed", "n": 28858}]
    assert [f.name for f in service.parameter_schema(ANYONE, "SELECT * FROM orders WHERE status = ?")] == ["$1"]


@pytest.mark.parametrize("call, kind, words", [
    (lambda s: s.plan(ANYONE, "SELECT 1 +"), "invalid", "Expected"),
    (lambda s: s.plan(ANYONE, "SELEC 1"), "invalid", "syntax error"),
    (lambda s: s.plan(ANYONE, "SELECT ? AS v", [2 ** 70]), "invalid", "$1 is outside the 64-bit integer range"),
    (lambda s: s.plan(ANYONE, "SELECT ? AS v", ["\ud800"]), "invalid", "$1 is not valid Unicode text"),
    (lambda s: s.plan(ANYONE, "SELECT repeat('a', 100000000) AS a"), "limit_exceeded", "at most 16,777,216"),
    (lambda s: s.plan(ANYONE, "DELETE FROM orders"), "refused", "read"),
    (lambda s: s.plan(ANYONE, "SELECT * FROM nowhere"), "invalid", "nowhere"),
    (lambda s: s.query(ANYONE, "SELECT embed(order_id) FROM orders"), "invalid", "embed() takes text"),
    (lambda s: s.schema(ANYONE, "nope"), "not_found", "unknown dataset 'nope'"),
    (lambda s: s.sample(ANYONE, "orders", 0), "invalid", "sample size"),
    (lambda s: s.sample(ANYONE, "orders", 3, "sideways"), "invalid", "sample kind"),
    (lambda s: s.search(ANYONE, "guides", "pool", mode="fuzzy"), "invalid", "search mode"),
    (lambda s: s.search(ANYONE, "orders", "pool"), "invalid", "searchable column"),
    (lambda s: s.search(ANYONE, "nope", "pool"), "not_found", "unknown dataset"),
    (lambda s: s.embed(ANYONE, "nope", ["x"]), "not_found", "unknown embedding model 'nope'"),
    (lambda s: s.refresh(ANYONE, "orders"), "invalid", "not accelerated"),
])
def test_failures_come_back_as_one_taxonomy(service, call, kind, words):
    error = service_error(lambda: call(service))
    assert error.kind == kind and words in error.message, error
    assert "Traceback" not in error.message


def test_a_cancelled_query_stops(service):
    planned = service.plan(ANYONE, "SELECT value FROM generate_series(1, 2000000)")
    stopped = threading.Event()
    stopped.set()
    assert service_error(lambda: service.execute(planned, stopped)).kind == "cancelled"
    running = threading.Event()
    reader = service.execute(planned, running)
    reader.read_next_batch()
    running.set()
    assert service_error(reader.read_all).kind == "cancelled"


def test_datasets_schema_and_samples(service, deck):
    datasets = {d["name"]: d for d in service.datasets(ANYONE)}
    assert {"public.orders", "crm.customers", "public.logs", "public.metrics", "public.guides"} <= set(datasets)
    assert datasets["public.guides"]["searchable_columns"] == ["content"]
    assert datasets["public.guides"]["acceleration"] == "duckdb (memory)"
    assert datasets["public.orders"]["searchable_columns"] == []
    assert service.schema(ANYONE, "orders") == deck.catalog.datasets["public.orders"].arrow_schema
    assert service.dataset(ANYONE, "orders") == datasets["public.orders"]
    assert service_error(lambda: service.dataset(ANYONE, "nope")).kind == "not_found"
    assert "email" in service.schema(ANYONE, "crm.customers").names or len(service.schema(ANYONE, "crm.customers"))
    first = service.sample(ANYONE, "orders", 5).read_all()
    assert first.num_rows == 5 and first.schema == service.schema(ANYONE, "orders")
    assert service.sample(ANYONE, "orders", 7, "random").read_all().num_rows == 7
    distinct = service.sample(ANYONE, "metrics", 4, "distinct").read_all()
    assert distinct.num_rows == 4 and len(set(map(str, distinct.to_pylist()))) == 4
    entries = service.tables(ANYONE)
    assert ("public", "orders", "TABLE") in {(e.schema_name, e.table_name, e.table_type) for e in entries}
    assert ("runtime", "datasets", "SYSTEM TABLE") in {(e.schema_name, e.table_name, e.table_type) for e in entries}
    assert {"public", "crm", "runtime"} <= set(service.schema_names(ANYONE))


def test_top_rows_and_distinct_values_quote_their_identifiers(service):
    top = service.execute(service.plan_top(ANYONE, "orders", "amount", 3)).read_all().column("amount").to_pylist()
    assert top == sorted(top, reverse=True) and len(top) == 3
    assert top[0] == service.query(ANYONE, "SELECT max(amount) AS m FROM orders").read_all().column("m")[0].as_py()
    lowest = service.execute(service.plan_top(ANYONE, "orders", "amount", 2, descending=False)).read_all()
    assert lowest.column("amount").to_pylist() == sorted(lowest.column("amount").to_pylist())
    values = service.execute(service.plan_distinct_values(ANYONE, "orders", ["status", "replica"], 5)).read_all()
    by_column: dict[str, list] = {}
    for row in values.to_pylist():
        by_column.setdefault(row["column_name"], []).append(row["value"])
    assert list(by_column) == ["status", "replica"]
    assert by_column["status"] == ["completed", "failed", "pending"]
    for bad in ('amount" FROM orders; --', "nope"):
        assert "unknown column" in service_error(lambda: service.plan_top(ANYONE, "orders", bad)).message
        assert service_error(lambda: service.plan_distinct_values(ANYONE, "orders", [bad])).kind == "invalid"


def test_a_plan_says_which_accelerated_copies_it_reads_and_how_fresh(service, deck):
    stamp = deck.accelerator.refresher("guides").status.data_as_of
    for planned in (service.plan(ANYONE, "SELECT count(*) FROM guides g JOIN orders o ON true"),
                    service.plan(ANYONE, "SELECT path FROM hybrid_search(guides, $1, 2)", ["pool"]),
                    service.plan_search(ANYONE, "guides", INCIDENT, 2),
                    service.plan_sample(ANYONE, "guides", 2)):
        assert planned.accelerated == ("public.guides",)
        freshness = service.freshness(planned.accelerated)
        assert freshness.datasets == {"public.guides": stamp} and freshness.oldest == stamp
    federated = service.plan(ANYONE, "SELECT count(*) FROM orders")
    assert federated.accelerated == () and service.freshness(federated.accelerated) is None


@pytest.mark.parametrize("mode", ["vector", "text", "hybrid"])
def test_search_finds_the_pooler_guide_first(service, mode):
    rows = service.search(ANYONE, "guides", INCIDENT, 3, mode).read_all().to_pylist()
    assert [r["path"] for r in rows][0] == POOLER and len(rows) == 3
    assert rows[0]["score"] >= rows[1]["score"] >= rows[2]["score"]


def test_search_applies_where_before_ranking(service):
    rows = service.search(ANYONE, "guides", INCIDENT, 2, "hybrid", where=f"path <> '{POOLER}'").read_all()
    assert rows.num_rows == 2 and POOLER not in rows.column("path").to_pylist()
    quoted = service.search(ANYONE, "guides", "it's the pool's fault", 1, "text").read_all()
    assert quoted.num_rows == 1  # the text is bound, never spliced into the SQL


def test_embed_matches_sql(service):
    texts = ["too many connections", "certificate expired"]
    vectors, tokens = service.embed(ANYONE, None, texts)
    assert len(vectors) == 2 and vectors.type.list_size == 384 and len(tokens) == 2 and min(tokens) > 0
    in_sql = service.query(ANYONE, "SELECT embed($1) AS v", [texts[0]]).read_all().column("v")[0].values
    a, b = np.asarray(vectors[0].values), np.asarray(in_sql)
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.9999
    assert service.embedding_models(ANYONE) == ["minilm"]


def test_refresh_health_ready_status(service):
    status = service.refresh(ANYONE, "guides")
    assert status["rows"] == 6 and not status["last_error"]
    assert service.health()["status"] == "ok"
    assert service.ready() is True
    report = service.status()
    assert report["ready"] and {d["name"] for d in report["datasets"]} >= {"public.guides"}
    assert report["sources"] and report["version"]


def test_authentication():
    open_door = Authenticator([], {})
    assert open_door.authenticate(Credentials()).name == "anonymous"
    keyed = Authenticator([Key("api-key", "k1", True), Key("loop-agent", "k3", False)], {"ana": User("pw", False)})
    assert keyed.authenticate(Credentials(bearer="k1")).name == "api-key"
    agent = keyed.authenticate(Credentials(bearer="k3"))
    assert agent.name == "loop-agent" and not agent.may_refresh
    login = keyed.authenticate(Credentials(username="ana", password="pw"))
    assert login.name == "ana" and login.token and not login.may_refresh
    again = keyed.authenticate(Credentials(bearer=login.token))
    assert again.name == "ana" and not again.may_refresh
    for wrong in (Credentials(), Credentials(bearer="k2"), Credentials(username="ana", password="no")):
        with pytest.raises(ServiceError) as raised:
            keyed.authenticate(wrong)
        assert raised.value.kind == "unauthenticated"


def test_a_refresh_on_demand_counts_against_the_keys_rate(service):
    once_a_second = Principal("refresher", limits=QueryLimits(requests_per_second=1))
    assert service_error(lambda: service.refresh(once_a_second, "orders")).kind == "invalid"  # not accelerated
    refused = service_error(lambda: service.refresh(once_a_second, "orders"))
    assert refused.kind == "limit_exceeded" and "requests_per_second" in refused.message


def test_a_user_logging_in_on_every_call_keeps_a_bounded_number_of_tokens():
    keyed = Authenticator([], {"ana": User("pw", False), "bo": User("pw", False)})
    bo = keyed.authenticate(Credentials(username="bo", password="pw")).token
    tokens = [keyed.authenticate(Credentials(username="ana", password="pw")).token
              for _ in range(TOKENS_PER_USER + 50)]
    assert len(keyed._tokens) == TOKENS_PER_USER + 1  # ana's latest, and bo's one
    assert keyed.authenticate(Credentials(bearer=tokens[-1])).name == "ana"
    assert keyed.authenticate(Credentials(bearer=bo)).name == "bo"
    with pytest.raises(ServiceError, match="invalid or expired bearer token"):
        keyed.authenticate(Credentials(bearer=tokens[0]))


def test_every_kind_has_one_flight_error():
    assert set(FLIGHT_ERRORS) == set(KINDS)
    assert isinstance(flight_error(ServiceError("refused", "no")), flight.FlightUnauthorizedError)
    assert isinstance(flight_error(ServiceError("unavailable", "down")), flight.FlightUnavailableError)
    assert isinstance(flight_error(ServiceError("cancelled", "stop")), flight.FlightCancelledError)
    assert isinstance(flight_error(ServiceError("timed_out", "slow")), flight.FlightTimedOutError)
    assert isinstance(flight_error(KeyError("x")), flight.FlightInternalError)
    with pytest.raises(ValueError):
        ServiceError("oops", "not a kind")


def test_runtime_http_and_command_line_overrides():
    runtime = RuntimeConfig()
    assert (runtime.http.host, runtime.http.port, runtime.http.enabled) == ("127.0.0.1", 8090, True)
    changed = runtime.with_overrides(flight_port=0, http_port=9000)
    assert (changed.flight.port, changed.http.port) == (0, 9000)
    with pytest.raises(ValueError, match="beyond loopback"):
        runtime.with_overrides(host="0.0.0.0")


@pytest.mark.parametrize("args, words", [
    (["--http-port", "70000"], "70000"),
    (["--http-port", "web"], "web"),
    (["--host", "0.0.0.0"], "beyond loopback"),
])
def test_run_refuses_bad_options(demo_config, args, words):
    result = CliRunner().invoke(main, ["run", "-c", str(demo_config), "--flight-port", "0", *args])
    assert result.exit_code != 0 and words in result.output


def test_run_serves_http_on_its_port_and_stops_cleanly(demo_config):
    process = ServerProcess(["run", "-c", str(demo_config), "--flight-port", "0", "--http-port", "0"])
    with flight.FlightClient(process.url) as client:
        assert [a.type for a in client.list_actions()][:1] == ["CreatePreparedStatement"]
    code, err = process.stop()
    assert code == 0 and "flightdeck stopped" in err and f"HTTP on {process.http_url}" in err


def test_bound_values_are_held_to_16_mib_for_every_door(service):
    error = service_error(lambda: service.plan(ANYONE, "SELECT length($1) AS n", ["x" * (16 * 2**20 + 1)]))
    assert error.kind == "limit_exceeded" and "16,777,216" in error.message
    assert service.query(ANYONE, "SELECT length($1) AS n", ["x" * 2**20]).read_all().to_pylist() == [{"n": 2**20}]


def test_question_mark_placeholders_are_numbered_where_they_stand(service):
    """``?::int`` is one word to the tokenizer, and ``?1`` ran on into ``$11``."""
    rows = service.query(ANYONE, "SELECT ?::int + 1 AS a, CAST(? AS VARCHAR) AS b", ["41", 7]).read_all().to_pylist()
    assert rows == [{"a": 42, "b": "7"}]
    error = service_error(lambda: service.plan(ANYONE, "SELECT ?1 AS a", [1]))
    assert error.kind == "invalid" and "write $1" in error.message
