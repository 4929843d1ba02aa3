"""Filling a running stack the way a shop would: catalog items and events through ingestion,
then one training run from the archive that the serving scoring replica hot-loads.

The demo (cli/demo/run.py) and the load test's seeding (cli/load/commands.py) both use these.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

from stylerec.v1 import common_pb2, ingestion_pb2, ingestion_pb2_grpc
from tqdm import tqdm

from cli.localstack.stack import REPO, Stack, free_port

CHUNK = 2000


def ingest(stack: Stack, events: list[common_pb2.Event], label: str) -> tuple[int, int, int]:
    """IngestEvents in batches of ``CHUNK``: (accepted, duplicates, rejected)."""
    accepted = duplicates = rejected = 0
    with stack.channel("ingestion") as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        for start in tqdm(range(0, len(events), CHUNK), desc=f"ingest {label}", unit="batch"):
            resp = stub.IngestEvents(
                ingestion_pb2.IngestEventsRequest(events=events[start : start + CHUNK]), timeout=60
            )
            accepted += resp.accepted
            duplicates += resp.duplicates
            rejected += len(resp.rejected)
    return accepted, duplicates, rejected


def upsert(stack: Stack, items: list[common_pb2.Item], label: str, chunk: int) -> tuple[int, int]:
    """UpsertItems in batches of ``chunk``, printing the first rejections of each: (upserted, rejected)."""
    upserted = rejected = 0
    with stack.channel("ingestion") as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        for start in tqdm(range(0, len(items), chunk), desc=f"catalog {label}", unit="batch"):
            resp = stub.UpsertItems(ingestion_pb2.UpsertItemsRequest(items=items[start : start + chunk]), timeout=60)
            upserted += resp.upserted
            rejected += len(resp.rejected)
            for r in resp.rejected[:3]:
                print(f"  rejected item {r.item_id}: {r.reason}")
    return upserted, rejected


def wait_for(what: str, check: Callable[[], bool], timeout_s: float) -> float:
    """Poll ``check`` every 0.5 s until it is true; the seconds it took. RuntimeError after ``timeout_s``."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.5)
    return time.monotonic() - t0


def train_model(stack: Stack, n_events: int, timeout_s: float = 240) -> str:
    """Train once from the archive (``services.scoring --role trainer --once``); wait until serving loads it.

    The stack's scoring replica serves popularity until a model exists. The trainer
    trains the configured algorithm on the MongoDB archive, registers it and publishes
    it on ``model-updates``; the serving replica hot-swaps it and rewrites its users' recs.
    """
    from pymongo import MongoClient
    from stylerec.v1 import scoring_pb2, scoring_pb2_grpc

    mongo: MongoClient = MongoClient(stack.mongo_uri)
    try:
        events = mongo["stylerec"]["events"]
        wait_for("the archiver to store every event", lambda: events.estimated_document_count() >= n_events, 180)
    finally:
        mongo.close()
    env = stack.service_env("scoring", free_port(), free_port())
    with open(stack.dir / "scoring-trainer.log", "ab") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "services.scoring", "--role", "trainer", "--once"],
            cwd=str(REPO),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
            check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}); see {stack.dir / 'scoring-trainer.log'}")
    with stack.channel("scoring") as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)

        def loaded() -> bool:
            info = stub.ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=10)
            return info.algorithm != "popularity" and bool(info.model_version)

        wait_for("the serving replica to load the trained model", loaded, 60)
        return str(stub.ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=10).model_version)
