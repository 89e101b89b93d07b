"""A real Spark standalone cluster on loopback for the tests: one master, two workers (one core,
1 GiB each) and a Spark Connect server, all from the `pyspark` package (Java 17 runs them).

Every process listens on 127.0.0.1 on a free port; the web UIs get free ports too (the driver's
is kept: its REST API is how a test sees which executors ran the tasks). ``stop()`` ends the
whole process group of each one.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

WORKERS = 2
START_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spark_home() -> Path:
    import pyspark
    return Path(pyspark.__file__).parent


class SparkCluster:
    """Start with ``start()``; ``remote`` is the Spark Connect address (sc://127.0.0.1:PORT)."""

    def __init__(self, work_dir: Path):
        self.work_dir = work_dir
        self.home = spark_home()
        self.master_port, self.master_ui = free_port(), free_port()
        self.connect_port, self.driver_ui = free_port(), free_port()
        self.processes: list[subprocess.Popen] = []
        self.env = {**os.environ, "SPARK_HOME": str(self.home), "SPARK_LOCAL_IP": "127.0.0.1",
                    "SPARK_LOG_DIR": str(work_dir / "logs"), "SPARK_WORKER_DIR": str(work_dir / "work"),
                    "SPARK_NO_DAEMONIZE": "1",
                    # no REST submission gateway on the master: nothing but the tests submit here
                    "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false"}
        self.env.pop("PYSPARK_PYTHON", None)

    @property
    def master(self) -> str:
        return f"spark://127.0.0.1:{self.master_port}"

    @property
    def remote(self) -> str:
        return f"sc://127.0.0.1:{self.connect_port}"

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.work_dir / f"{name}.log", "wb")
        self.processes.append(subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True))

    def start(self, sql_on_start: list[str] | None = None) -> "SparkCluster":
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        spark_class = str(self.home / "bin" / "spark-class")
        self._spawn("master", [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(self.master_port), "--webui-port", str(self.master_ui)])
        self._wait(lambda: self.master_state().get("status") == "ALIVE", "the master")
        for number in range(WORKERS):
            self._spawn(f"worker{number}", [
                spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                "--cores", "1", "--memory", "1g", "--webui-port", str(free_port()),
                "--work-dir", str(self.work_dir / f"work{number}"), self.master])
        self._wait(lambda: len([w for w in self.master_state().get("workers", [])
                                if w.get("state") == "ALIVE"]) == WORKERS, "two workers")
        self._spawn("connect", [
            str(self.home / "bin" / "spark-submit"), "--class",
            "org.apache.spark.sql.connect.service.SparkConnectServer", "--master", self.master,
            "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
            "--conf", f"spark.connect.grpc.binding.port={self.connect_port}",
            "--conf", f"spark.ui.port={self.driver_ui}", "--conf", "spark.ui.bindAddress=127.0.0.1",
            "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
            "--conf", "spark.sql.catalogImplementation=in-memory",
            "--conf", f"spark.sql.warehouse.dir={self.work_dir / 'warehouse'}",
            "--conf", "spark.sql.session.timeZone=UTC",
            "--conf", "spark.executor.memory=768m", "--conf", "spark.cores.max=2",
            "--conf", "spark.sql.shuffle.partitions=4",
            "spark-internal"])
        self._wait(self._connect_listening, "the Spark Connect server")
        return self

    def _connect_listening(self) -> bool:
        with socket.socket() as probe:
            probe.settimeout(1)
            return probe.connect_ex(("127.0.0.1", self.connect_port)) == 0

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            dead = [p for p in self.processes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a Spark process exited while waiting for {what}: {self.log_tail()}")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{what} did not start within {START_TIMEOUT:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        tails = []
        for log in sorted(self.work_dir.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(tails)

    def _get(self, url: str) -> Any:
        with urllib.request.urlopen(url, timeout=60) as response:
            return json.loads(response.read())

    def master_state(self) -> dict:
        """The master's own view (workers, applications, cores in use)."""
        return self._get(f"http://127.0.0.1:{self.master_ui}/json/")

    def application(self, path: str = "") -> Any:
        """The Connect server's application through its driver's REST API (jobs, executors, stages)."""
        base = f"http://127.0.0.1:{self.driver_ui}/api/v1/applications"
        app_id = self._get(base)[0]["id"]
        return self._get(f"{base}/{app_id}{path}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for process in reversed(self.processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()
