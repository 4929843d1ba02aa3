"""A real Prometheus server (the Debian `prometheus` binary) scraping a running stack with
the repository's rule files, for tests that need the query engine itself."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from cli.localstack.stack import free_port, terminate_group

REPO = Path(__file__).resolve().parents[2]
JOB_OF = {
    "ingestion": "stylerec-ingestion",
    "scoring": "stylerec-scoring",
    "style-worker": "stylerec-style-worker",
    "gateway": "stylerec-gateway",
}


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
            return json.loads(resp.read().decode())

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; raises AssertionError with Prometheus' own message on a bad expression."""
        try:
            body = self.api("/api/v1/query", query=expr)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expr!r}: {exc.read().decode()}") from exc
        assert body["status"] == "success", body
        return list(body["data"]["result"])


@contextmanager
def prometheus_for(targets: dict[str, list[int]], workdir: Path, interval_s: int = 1) -> Iterator[Prometheus]:
    """Start Prometheus scraping 127.0.0.1:<port> per job, with deploy/prometheus/rules loaded."""
    exe = shutil.which("prometheus")
    assert exe, "prometheus not found: run `make setup` (scripts/setup.sh installs the Debian package prometheus)"
    port = free_port()
    config = {
        "global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"},
        "rule_files": [str(p) for p in sorted((REPO / "deploy/prometheus/rules").glob("*.yml"))],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}]}
            for job, ports in targets.items()
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        prom = Prometheus(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (workdir / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.3)
        yield prom
    finally:
        terminate_group(proc.pid, 10)
        log.close()
