"""The JSON shapes of the explorer's API (they make the OpenAPI schema at ``/openapi.json``).

Numbers that an atlas may lack (a stage not built, a NaN z-score) are ``null``.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field


class StageRow(BaseModel):
    stage: str
    units: int


class DetectorInfo(BaseModel):
    name: str
    description: str
    threshold: Optional[float]
    min_z: Optional[float]
    labelled: int = Field(description="heads of this atlas carrying the label")


class AtlasInfo(BaseModel):
    path: str
    model: dict[str, Any] = Field(description="the model card stored in the atlas")
    stages: list[StageRow]
    detectors: list[DetectorInfo]
    available: dict[str, bool] = Field(description="optional parts: model, diff, head_windows, neuron_contexts, ...")
    limits: dict[str, int]


class HeadCell(BaseModel):
    layer: int
    head: int
    name: str
    kv_group: Optional[int]
    type: Optional[str] = Field(description="the label with the largest z-score (the grid's colour), or null")
    labels: list[str]
    importance: Optional[float]
    copying: Optional[float]
    suppression: Optional[float]
    scores: dict[str, Optional[float]]
    z: dict[str, Optional[float]]


class HeadGrid(BaseModel):
    layers: int
    heads: int
    types: list[str] = Field(description="every detector scored in this atlas")
    metrics: list[str] = Field(description="metric names the scatter can plot")
    cells: list[HeadCell] = Field(description="one per head, layer-major")


class LayerRow(BaseModel):
    layer: int
    lens_entropy: Optional[float]
    lens_final_prob: Optional[float]
    lens_kl_to_final: Optional[float]
    lens_top1_agreement: Optional[float]
    mlp_delta_loss: Optional[float]
    labelled_heads: int
    max_head_importance: Optional[float]


class NeuronRow(BaseModel):
    neuron: int
    name: str
    promoted: list[str]
    top_logit: Optional[float]
    suppressed: list[str]
    mean: Optional[float]
    max: Optional[float]
    frac_active: Optional[float]


class NeuronPage(BaseModel):
    layer: int
    total: int
    sort: str
    offset: int
    neurons: list[NeuronRow]


class DetectorScore(BaseModel):
    detector: str
    description: str
    score: Optional[float]
    baseline: Optional[float]
    z: Optional[float]
    label: bool
    threshold: Optional[float]
    min_z: Optional[float]


class OVPair(BaseModel):
    source: str
    output: str
    logit: Optional[float]


class HeadOV(BaseModel):
    copying: Optional[float]
    suppression: Optional[float]
    pairs: list[OVPair]


class Importance(BaseModel):
    delta_loss: Optional[float]
    rank: Optional[int] = Field(description="1 = the most important head of the model")
    of: int


class Explanation(BaseModel):
    sentence: str = Field(description="the label's sentence: its rule and held-out scores (lmatlas explain)")
    labelled: bool = Field(description="false: no rule beat its null ('unlabelled'), scores still shown")
    labels: list[dict[str, Any]] = Field(description="one row per side (input, output, attention) of the labels table")


class HeadDetail(BaseModel):
    name: str
    layer: int
    head: int
    kv_group: Optional[int]
    labels: list[str]
    scores: list[DetectorScore]
    ov: Optional[HeadOV]
    importance: Optional[Importance]
    explanation: Optional[Explanation] = None


class HeadWindow(BaseModel):
    rank: int
    window_id: int
    query_pos: int
    start: int
    write_norm: Optional[float]
    tokens: list[str] = Field(description="tokens start..query_pos; the query is the last")
    attention: list[Optional[float]] = Field(description="attention from the query to each token")
    after: list[str] = Field(description="a few tokens after the query (not attended)")


class HeadWindows(BaseModel):
    name: str
    available: bool = Field(description="false when the atlas lacks the head_windows stage")
    windows: list[HeadWindow]


class TokenValue(BaseModel):
    token: str
    value: Optional[float]


class NeuronStats(BaseModel):
    mean: Optional[float]
    max: Optional[float]
    frac_active: Optional[float] = Field(description="activation density: fraction of corpus positions > 0")


class Histogram(BaseModel):
    lo: Optional[float]
    hi: Optional[float]
    counts: list[int]


class NeuronContext(BaseModel):
    rank: int
    activation: Optional[float]
    tokens: list[str]
    values: list[Optional[float]] = Field(description="the neuron's activation on each token (to ~1% of its peak)")
    peak: int = Field(description="index in tokens of the top-activating token")


class NeuronDetail(BaseModel):
    name: str
    layer: int
    neuron: int
    promoted: list[TokenValue]
    suppressed: list[TokenValue]
    exciting: list[TokenValue]
    stats: Optional[NeuronStats]
    histogram: Optional[Histogram]
    contexts: list[NeuronContext]
    context_texts: list[str] = Field(description="top contexts as text (the activating token in «»)")
    explanation: Optional[Explanation] = None


class SearchResults(BaseModel):
    query: str
    results: list[dict[str, Any]] = Field(description="heads and neurons writing the token, best first")
    labels: list[dict[str, Any]] = Field(default=[], description="labelled units whose label text matches the query")


class Prompt(BaseModel):
    prompt: str = Field(
        min_length=1,
        max_length=40_000,
        json_schema_extra={"pattern": r"\S"},
        description="text to run through the model (capped in tokens: see /api/live)",
    )


class LensPrompt(Prompt):
    k: int = Field(default=3, ge=1, le=10, description="top tokens per cell")


class LiveAttention(BaseModel):
    name: str
    tokens: list[str]
    n: int
    encoding: str = Field(description="how `data` holds the [n, n] pattern")
    data: str


class LiveActivations(BaseModel):
    name: str
    tokens: list[str]
    activations: list[Optional[float]]


class LensCell(BaseModel):
    tokens: list[str]
    probs: list[Optional[float]]
    final_prob: Optional[float]
    entropy: Optional[float]


class LensGrid(BaseModel):
    tokens: list[str]
    final_tokens: list[str]
    layers: list[str]
    cells: list[list[LensCell]] = Field(description="[layer][position]")


class LiveStatus(BaseModel):
    model: Optional[str]
    chat_template: bool = Field(description="whether the model's tokenizer has a chat template (edit playground)")
    admitted: int
    capacity: int
    prompt_tokens: int
    lens_tokens: int
    strategies: list[str] = Field(description="decoding strategies the edit playground offers (the registry's names)")
    kv_budget: bool = Field(
        description="whether the playground can offer a head-wise KV cache (the atlas has census scores to choose from)"
    )
    kv_policies: list[str] = Field(
        default_factory=list, description="KV policies the edit playground offers (the registry's names)"
    )
    kv_inputs: dict[str, list[str]] = Field(
        default_factory=dict,
        description="the request fields each offered KV policy needs (e.g. hybrid: kv_budget and kv_snap)",
    )


class DiffReport(BaseModel):
    a: str
    b: str
    heads_compared: int
    label_flips: list[dict[str, Any]]
    most_changed_heads: list[dict[str, Any]]
    neurons_compared: int
    top_token_unchanged: Optional[float]
    most_changed_neurons: list[dict[str, Any]]
    importance_changes: list[dict[str, Any]]
