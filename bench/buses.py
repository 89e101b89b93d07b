"""Message-bus ingest: messages/s from publish to queryable, per bus.

    python -m bench.buses [--messages 20000] [--mqtt-messages 5000] [--rounds 3] [--backlog 50000]

One flightdeck server (its own process) follows three append-only datasets with
``refresh_mode: changes``: a Kafka topic on a Tansu broker started here, a NATS JetStream
stream and an MQTT topic filter on the machine's Mosquitto. Each round publishes the messages
to one bus as fast as its Python client can (Kafka and NATS in batches, MQTT at QoS 1) and polls
``count(*)`` over Flight SQL until all are queryable. Reports per bus the publish rate (the
baseline: what the bus's own client sustains), the ingest rate (published and queryable) and
their ratio. Kafka and NATS also hold a backlog of ``--backlog`` messages published before the
server starts: the snapshot that reads it (its duration from `runtime.datasets`) gives the rate
flightdeck ingests at when the publisher is not the limit. Writes bench/results/buses.json and
buses.png. MQTT runs fewer messages: Mosquitto
queues at most ``max_queued_messages`` (1000 by default) beyond what is in flight, and drops the
rest when a subscriber falls behind.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import adbc_driver_flightsql.dbapi as flightsql
import yaml

from bench.common import RESULTS, busy_note, flightdeck_server, progress, wait_until_accelerated
from federation.connectors.mqtt import MqttConnector
from tests.buses import JetStream, KafkaBroker, Mosquitto, events

BUSES = ("kafka", "nats", "mqtt")
COLUMNS = {"id": "int", "user.name": "string", "user.address.city": "string", "amount": "float"}
TIMEOUT_SECONDS = 300


def config(folder: Path, broker: KafkaBroker, stream: str, topic: str) -> Path:
    acceleration = {"engine": "duckdb", "refresh_mode": "changes"}
    datasets = [
        {"from": f"kafka:{topic}_backlog", "name": "kafka_backlog", "params": {"bootstrap_servers": broker.servers,
                                                                               "columns": COLUMNS}},
        {"from": f"nats:{stream}_backlog", "name": "nats_backlog", "params": {"columns": COLUMNS}},
        {"from": f"kafka:{topic}", "name": "kafka_events", "params": {"bootstrap_servers": broker.servers,
                                                                      "columns": COLUMNS}},
        {"from": f"nats:{stream}", "name": "nats_events", "params": {"columns": COLUMNS}},
        {"from": f"mqtt:{topic}/#", "name": "mqtt_events",
         "params": {"columns": COLUMNS, "client_id": f"flightdeck-bench-{topic}"}},  # ended by cleanup()
    ]
    path = folder / "flightdeck.yaml"
    path.write_text(yaml.safe_dump({"runtime": {"data_dir": str(folder / "data")},
                                    "datasets": [{**d, "acceleration": acceleration} for d in datasets]}))
    return path


def ingest(cursor, table: str, publish: Callable[[], None], expected: int) -> dict:
    """Publish, then wait until ``expected`` rows are queryable; the two durations."""
    started = time.perf_counter()
    publish()
    published = time.perf_counter() - started
    while True:
        cursor.execute(f"SELECT count(*) FROM {table}")
        count = cursor.fetchone()[0]
        if count >= expected:
            break
        if time.perf_counter() - started > TIMEOUT_SECONDS:
            raise RuntimeError(f"{table}: {count:,} of {expected:,} rows after {TIMEOUT_SECONDS} s")
        time.sleep(0.01)
    queryable = time.perf_counter() - started
    return {"publish_seconds": round(published, 4), "queryable_seconds": round(queryable, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000, help="per round, Kafka and NATS")
    parser.add_argument("--mqtt-messages", type=int, default=5_000, help="per round, MQTT")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backlog", type=int, default=50_000, help="Kafka and NATS, read at startup")
    args = parser.parse_args()
    note = busy_note()
    if note:
        progress(note)
    name = f"fdbench{uuid.uuid4().hex[:8]}"
    broker, streams, mosquitto = KafkaBroker(), JetStream(), Mosquitto()
    broker.create_topic(name, partitions=2)
    streams.create_stream(name, [f"{name}.>"])
    progress(f"publishing a backlog of {args.backlog:,} messages to Kafka and NATS")
    broker.create_topic(f"{name}_backlog", partitions=2)
    broker.publish(f"{name}_backlog", events(0, args.backlog))
    streams.create_stream(f"{name}_backlog", [f"{name}_backlog.>"])
    streams.publish(f"{name}_backlog.orders", events(0, args.backlog))
    totals = {"kafka": 0, "nats": 0, "mqtt": 0}
    measured: dict[str, list[dict]] = {bus: [] for bus in BUSES}
    backlog: dict[str, dict] = {}
    try:
        with tempfile.TemporaryDirectory() as folder:
            server = flightdeck_server(config(Path(folder), broker, name, name))
            try:
                backlog = {row["name"]: row for row in wait_until_accelerated(server.url)
                           if row["name"].endswith("_backlog")}
                with flightsql.connect(server.url, autocommit=True) as conn, conn.cursor() as cursor:
                    for round_number in range(1, args.rounds + 1):
                        for bus in BUSES:
                            count = args.mqtt_messages if bus == "mqtt" else args.messages
                            payloads = events(totals[bus], count)
                            publish = {"kafka": lambda: broker.publish(name, payloads),
                                       "nats": lambda: streams.publish(f"{name}.orders", payloads),
                                       "mqtt": lambda: mosquitto.publish(f"{name}/orders", payloads)}[bus]
                            totals[bus] += count
                            result = ingest(cursor, f"{bus}_events", publish, totals[bus])
                            result["messages"] = count
                            measured[bus].append(result)
                            progress(f"round {round_number}, {bus}: {count:,} messages queryable in "
                                     f"{result['queryable_seconds']:.2f} s (published in "
                                     f"{result['publish_seconds']:.2f} s)")
            finally:
                server.stop()
    finally:
        mosquitto.close()
        MqttConnector({"client_id": f"flightdeck-bench-{name}"}, Path(".")).cleanup(f"{name}/#")
        streams.delete_stream(name)
        streams.delete_stream(f"{name}_backlog")
        broker.stop()
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "busy": note},
              "rounds": args.rounds, "buses": {}}
    for bus, rounds in measured.items():
        best = min(rounds, key=lambda r: r["queryable_seconds"])
        publish_rate = best["messages"] / best["publish_seconds"]
        ingest_rate = best["messages"] / best["queryable_seconds"]
        report["buses"][bus] = {"messages": best["messages"], "publish_per_s": round(publish_rate),
                                "ingest_per_s": round(ingest_rate),
                                "ingest_vs_publish": round(ingest_rate / publish_rate, 3), "rounds": rounds}
        snapshot = backlog.get(f"public.{bus}_backlog")
        if snapshot is not None:
            seconds = (snapshot["last_refresh_end"] - snapshot["last_refresh_start"]).total_seconds()
            report["buses"][bus].update(backlog_messages=snapshot["rows"], backlog_seconds=round(seconds, 3),
                                        backlog_per_s=round(snapshot["rows"] / seconds))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "buses.json").write_text(json.dumps(report, indent=2))
    plot(report, RESULTS / "buses.png")
    print(json.dumps({bus: {k: v for k, v in r.items() if k != "rounds"} for bus, r in report["buses"].items()},
                     indent=2))


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buses = list(report["buses"])
    figure, axes = plt.subplots(figsize=(7, 4))
    width = 0.27
    series = [("publish_per_s", "published (the bus client's rate)"),
              ("ingest_per_s", "published and queryable in flightdeck"),
              ("backlog_per_s", "a backlog read at startup (snapshot)")]
    for offset, (key, label) in zip((-width, 0.0, width), series):
        axes.bar([index + offset for index in range(len(buses))],
                 [report["buses"][b].get(key, 0) for b in buses], width, label=label)
    axes.set_xticks(list(range(len(buses))), buses)
    axes.set_yscale("log")  # a Kafka producer's buffered rate dwarfs the rest
    axes.set_ylabel("messages/s (best of rounds, log scale)")
    axes.set_title("Bus ingest: publish to queryable")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
