"""Gateway settings (env prefix STYLEREC_).

The gateway sits on the storefront's request path, so most knobs here are
time budgets: every downstream call gets its own timeout, and all of them are
further capped by whatever is left of the caller's deadline.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from libs.common.kafka import IMPRESSIONS
from libs.common.settings import ServiceSettings

ARM_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class ExperimentArm(BaseModel):
    """One arm of STYLEREC_EXPERIMENT_ARMS: what changes for the users hashed into it.

    ``style`` false sends every user down the CF/POPULAR path (the style path off);
    ``style_lambda`` (unset = the gateway's STYLEREC_STYLE_LAMBDA) changes the blend weight;
    ``weight`` is the arm's share of users relative to the other arms.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=32, pattern=ARM_NAME_RE.pattern)
    style: bool = True
    style_lambda: float | None = Field(None, ge=0, le=1)
    weight: int = Field(1, ge=1, le=1000)


class GatewaySettings(ServiceSettings):
    service_name: str = "gateway"
    grpc_port: int = Field(50054, ge=0, le=65535, description="gRPC port of the gateway.")
    metrics_port: int = Field(9104, ge=0, le=65535, description="Metrics port of the gateway.")
    scoring_addr: str = Field("127.0.0.1:50052", description="host:port of the scoring service ('' = none).")
    style_worker_addr: str = Field("127.0.0.1:50053", description="host:port of the style worker.")
    default_k: int = Field(10, ge=1, le=200, description="k when the caller sends 0.")
    max_k: int = Field(200, ge=1, le=1000, description="Largest k a caller may ask for.")
    # Requests are an id, k and filters (at most 1000 excluded ids of 256 characters), so 512 KiB
    # is ample; answers are up to max_k items or one image chunk.
    grpc_max_receive_bytes: int = Field(
        512 * 1024, ge=1024, le=256 * 1024 * 1024, description="Largest gRPC request the gateway accepts."
    )
    grpc_max_send_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="Largest gRPC message the gateway sends (must hold one image_chunk_bytes chunk).",
    )

    # --- time budgets -----------------------------------------------------------------------
    default_deadline_s: float = Field(1.0, gt=0, le=30, description="Budget of a request whose caller set no deadline.")
    deadline_reserve_s: float = Field(
        0.02, ge=0, le=1, description="Kept back from the caller's deadline to assemble and send the answer."
    )
    redis_timeout_s: float = Field(0.25, gt=0, le=10, description="Socket timeout of one Redis call.")
    redis_retries: int = Field(1, ge=0, le=5, description="Retries of a failed Redis call (connection errors).")
    mongo_timeout_s: float = Field(0.5, gt=0, le=30, description="Timeout of one MongoDB call (catalog miss).")
    scoring_timeout_s: float = Field(0.3, gt=0, le=30, description="Timeout of one scoring TopN/SimilarItems call.")
    breaker_open_s: float = Field(
        1.0, ge=0, le=60, description="After a dependency fails, skip it for this long instead of waiting again."
    )

    # --- the paper's decision ------------------------------------------------------------------
    # Defaults come from `stylerec experiment style-lambda` (docs/gateway.md, out/experiment/): λ=0.3 and
    # threshold 0.3 over 5 synthetic populations, with style similarity centred on the catalog's style
    # centroid (libs/common/style_math.py). Centred, scoring's confidence separates style-driven users
    # (AUC 0.63, was 0.51 uncentred), so the threshold now gates: about half the users take the style path.
    style_lambda: float = Field(
        0.3,
        ge=0,
        le=1,
        description="λ: final = (1-λ)·normalized CF + λ·style affinity (catalog-centred cosine mapped to 0..1).",
    )
    style_confidence_threshold: float = Field(
        0.3, ge=0, le=1, description="Profiles at or above this confidence get STYLE_PERSONALIZED."
    )
    style_neighbour_pool: int = Field(
        30, ge=0, le=2000, description="Items closest in style to the profile added to the pool on the style path."
    )
    candidate_pool: int = Field(100, ge=1, le=2000, description="CF candidates considered before filtering.")
    style_popular_pool: int = Field(
        50, ge=0, le=2000, description="Popular items added to the pool on the style path (style can lift them)."
    )

    # --- catalog cache ---------------------------------------------------------------------------
    item_cache_ttl_s: int = Field(3600, ge=1, description="TTL of item metadata cached in Redis.")
    item_updates_group: str = Field(
        "gateway-item-cache", min_length=1, description="Consumer group that invalidates item_meta on item-updates."
    )
    # Each replica evicts an item from its in-process copy as soon as item-updates says it changed
    # (services/gateway/invalidation.py); the lifetime only bounds an update this replica missed.
    item_near_cache_s: float = Field(
        300.0,
        ge=0,
        le=3600,
        description="In-process item-metadata cache lifetime (0 = off); item-updates evict changed items at once.",
    )
    popular_near_cache_s: float = Field(
        2.0, ge=0, le=300, description="In-process popularity-list cache lifetime (0 = off)."
    )
    answer_cache_s: float = Field(
        30.0,
        ge=0,
        le=600,
        description=(
            "Longest life of a kept GetRecommendations answer (0 = off): the user's changes (scoring's pub/sub) and "
            "item-updates drop it at once, a moved popularity list or embedding index on its next hit; answers built "
            "from unversioned inputs live at most STYLEREC_POPULAR_NEAR_CACHE_S."
        ),
    )
    answer_pending_recheck_s: float = Field(
        10.0,
        ge=0,
        le=300,
        description=(
            "How long a kept answer showing a PENDING stylized image is served before its states are asked again "
            "when the style worker has not announced the image (its message restyles it at once); 0 = never keep "
            "such answers."
        ),
    )
    answer_cache_entries: int = Field(
        50_000, ge=0, le=10_000_000, description="Kept GetRecommendations answers at most (0 = off)."
    )
    parse_memo_entries: int = Field(
        4096,
        ge=0,
        le=1_000_000,
        description="Parsed style profiles / recs lists kept per kind, keyed by the raw Redis reply (0 = off).",
    )

    # --- stylized images -------------------------------------------------------------------------
    stylize_top_n: int = Field(
        4, ge=0, le=50, description="How many of the answer's items with a photo (best first) get a stylized image."
    )
    stylize_pending_ttl_s: int = Field(
        300, ge=1, description="Dedup window of an enqueued stylize job (SET NX TTL); retried after it."
    )
    stylize_rate_per_user: int = Field(20, ge=0, description="New stylize jobs one user may cause per window.")
    stylize_rate_window_s: int = Field(60, ge=1, description="Window of the per-user stylize rate limit.")
    stylize_strength: float = Field(1.0, gt=0, le=1, description="Style strength sent with stylize jobs.")
    stylized_near_cache_s: float = Field(
        30.0, ge=0, le=3600, description="How long this replica reuses a READY stylized reference without Redis."
    )
    stylized_pending_recheck_s: float = Field(
        1.0, ge=0, le=60, description="How long this replica reports PENDING without asking Redis again."
    )
    image_chunk_bytes: int = Field(64 * 1024, ge=1024, le=4 * 1024 * 1024, description="GetStylizedImage chunk.")

    embedding_cache_s: float = Field(
        30.0, ge=0, le=3600, description="In-process item style-embedding cache lifetime (0 = off)."
    )
    style_centroid_near_cache_s: float = Field(
        30.0, ge=0, le=3600, description="How long this replica reuses the catalog style centroid before re-reading it."
    )

    # --- similar items ---------------------------------------------------------------------------
    embedding_index_refresh_s: float = Field(
        30.0,
        gt=0,
        description=(
            "How often the in-process item style-embedding index checks the embeddings version in Redis;"
            " it rescans (SCAN + MGET) only when the version moved."
        ),
    )
    embedding_index_full_scan_s: float = Field(
        600.0,
        gt=0,
        description=(
            "Longest time between two full rescans of the embedding index even when the embeddings"
            " version did not move (a writer that forgot to increment it is seen within this)."
        ),
    )

    # --- online experiments (docs/experiments.md) --------------------------------------------
    experiment_name: str = Field(
        "",
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]*$",
        description="Name of the running online experiment ('' = none; answers then carry no arm).",
    )
    experiment_salt: str = Field(
        "",
        max_length=128,
        description="Key of the user→arm hash ('' = the experiment name); a new salt reshuffles users.",
    )
    # NoDecode: parsed by _arms_json below, so an empty variable (compose's default) means "none".
    experiment_arms: Annotated[tuple[ExperimentArm, ...], NoDecode] = Field(
        (),
        description='JSON list of arms, e.g. [{"name":"cf","style":false},{"name":"style"}] (none = no experiment).',
    )
    impressions_enabled: bool = Field(True, description="Publish an impression for every GetRecommendations answer.")
    impressions_topic: str = Field(IMPRESSIONS, min_length=1, description="Topic impressions are published to.")
    impressions_queue: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Impressions buffered for the broker; beyond it new ones are dropped and counted, never waited on.",
    )
    impressions_linger_ms: int = Field(
        250,
        ge=0,
        le=5000,
        description="The impression publisher sends one record per partition at most this often, each holding "
        "every answer since the last send: a record costs kafka-python's threads GIL time whatever its size "
        "(docs/gateway.md). Impressions reach the broker up to this much later.",
    )

    @field_validator("experiment_arms", mode="before")
    @classmethod
    def _arms_json(cls, v: Any) -> Any:
        if isinstance(v, str):
            if not v.strip():
                return ()
            try:
                return json.loads(v)
            except json.JSONDecodeError as exc:
                raise ValueError(f"experiment_arms must be a JSON list of arms: {exc}") from exc
        return v

    @model_validator(mode="after")
    def _experiment_complete(self) -> GatewaySettings:
        if self.experiment_arms and not self.experiment_name:
            raise ValueError("experiment_arms are set but experiment_name is empty: name the experiment")
        if self.experiment_name and len(self.experiment_arms) < 2:
            raise ValueError(
                f"experiment {self.experiment_name!r} needs at least two experiment_arms "
                '(e.g. [{"name":"cf","style":false},{"name":"style"}])'
            )
        names = [a.name for a in self.experiment_arms]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment_arms names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _chunk_fits_send_cap(self) -> GatewaySettings:
        if self.image_chunk_bytes + 1024 > self.grpc_max_send_bytes:
            raise ValueError(
                f"image_chunk_bytes ({self.image_chunk_bytes}) plus 1 KiB framing must fit grpc_max_send_bytes "
                f"({self.grpc_max_send_bytes})"
            )
        return self

    @model_validator(mode="after")
    def _default_k_within_max(self) -> GatewaySettings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must not exceed max_k ({self.max_k})")
        return self
