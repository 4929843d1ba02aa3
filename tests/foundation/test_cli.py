"""The `stylerec` CLI as a person uses it: up → status → ingest → recommend → down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cli.localstack.stack import pid_alive

STYLEREC = [sys.executable, "-m", "cli.main"]


def run(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STYLEREC, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_malformed_file_exits_2_with_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,type,timestamp\nu1,i1,TELEPORT,2026-01-01\n")
    env = {**os.environ, "STYLEREC_STACK_DIR": str(tmp_path / "no-stack")}
    res = run(["ingest", "events", str(bad)], env)
    assert res.returncode == 2
    assert f"{bad}:2: unknown type 'TELEPORT'" in res.stderr
    assert "Traceback" not in res.stderr
    res = run(["ingest", "events", str(tmp_path / "missing.csv")], env)
    assert res.returncode == 2 and "no such file" in res.stderr


def test_recommend_without_stack_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "STYLEREC_STACK_DIR": str(tmp_path / "no-stack")}
    res = run(["recommend", "alice"], env)
    assert res.returncode == 2 and "stylerec up" in res.stderr


def test_up_status_ingest_recommend_down(tmp_path: Path) -> None:
    env = {**os.environ, "STYLEREC_STACK_DIR": str(tmp_path / "stack")}
    pids: list[int] = []
    try:
        res = run(["up"], env)
        assert res.returncode == 0, res.stdout + res.stderr
        res = run(["status", "--json"], env)
        assert res.returncode == 0, res.stdout
        status = json.loads(res.stdout)
        assert status["all_healthy"] is True
        comps = status["components"]
        assert set(comps) == {"kafka", "redis", "mongo", "ingestion", "scoring", "style-worker", "gateway"}
        pids = [c["pid"] for c in comps.values()]
        assert all(c["healthy"] and c["address"].startswith("127.0.0.1:") for c in comps.values())

        events = tmp_path / "events.jsonl"
        now = int(time.time())
        lines = [
            {"user_id": "alice", "item_id": "mug", "type": "PURCHASE", "timestamp": now, "event_id": "cli-1"},
            {"user_id": "alice", "item_id": "lamp", "type": "VIEW", "timestamp": now, "event_id": "cli-2"},
            {"user_id": "bob", "item_id": "lamp", "type": "PURCHASE", "timestamp": now, "event_id": "cli-3"},
            {"user_id": "bob", "item_id": "rug", "type": "PURCHASE", "timestamp": now, "event_id": "cli-4"},
        ]
        events.write_text("".join(json.dumps(x) + "\n" for x in lines))
        res = run(["ingest", "events", str(events), "--json"], env)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["accepted"] == 4

        deadline = time.monotonic() + 60
        while True:
            res = run(["recommend", "alice", "--json"], env)
            assert res.returncode == 0, res.stderr
            answer = json.loads(res.stdout)
            if answer.get("strategy") == "CF" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert answer["strategy"] == "CF"
        assert [i["item_id"] for i in answer["items"]] == ["rug"]
        res = run(["recommend", "stranger", "--json"], env)
        assert json.loads(res.stdout)["strategy"] == "POPULAR"
    finally:
        res = run(["down"], env)
    assert res.returncode == 0
    time.sleep(0.5)
    assert pids and not [p for p in pids if pid_alive(p)], "processes left behind after `stylerec down`"
    res = run(["status", "--json"], env)
    assert res.returncode == 1 and json.loads(res.stdout)["all_healthy"] is False
