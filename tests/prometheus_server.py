"""Debian's `prometheus` as a child process on loopback, scraping given targets, asked through its HTTP API."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.subprocess_server import free_port


class Prometheus:
    """Starts `prometheus` on 127.0.0.1 scraping `targets` (address -> extra labels) as job `job` every second;
    `stop()` ends it by its pid."""

    def __init__(self, workdir: Path, job: str, targets: dict[str, dict[str, str]], timeout_s: float = 60) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus not found: install Debian's `prometheus` package (.ci/run does; README 'Set up')"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": job,
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "static_configs": [{"targets": [t], "labels": labels} for t, labels in targets.items()],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",  # loopback only
                    "--storage.tsdb.retention.time=1h",
                ],
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"prometheus exited with {self.proc.returncode}:\n{self.log()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready after {timeout_s} s:\n{self.log()}"
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector `promql` gives now (a scalar comes back as one sample without labels)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:  # a query Prometheus refuses: say which and why
            raise AssertionError(f"{promql}: {exc.read().decode()}") from None
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def values(self, promql: str, label: str = "") -> dict[str, float]:
        """{value of `label` (or "" for one unlabelled sample): value} of the query's result now."""
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(promql)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
