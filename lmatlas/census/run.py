"""``run_census``: every detector on every head, with its null battery, z-scores and labels.

For each detector and each head ``(layer, head)``:

* ``score``: the mean of the detector's per-example scores over its battery, in ``[0, 1]``;
* ``null``: the same on the null battery (same shape; shuffled or random tokens);
* ``z``: Welch's statistic ``(score - null) / sqrt(var / n + null_var / n_null)``
  over the per-example scores (the denominator is floored at ``1e-6``);
* a label when ``score >= threshold`` and ``z >= min_z`` (``min_z = None``: no z
  requirement). Thresholds default to the detector's documented values and can be
  overridden per call; a head may carry several labels.

>>> census = run_census(model)                                  # doctest: +SKIP
>>> census.labels["L5.H3"]                                     # doctest: +SKIP
['induction']
>>> census["induction"].score[5, 3], census["induction"].z[5, 3]  # doctest: +SKIP

Detectors that use the same kind of battery share one forward (see
:func:`lmatlas.census.measure.shared`); a detector's ``seconds`` therefore includes
the forwards it was first to need. When every registered detector runs
(``detectors=None``), one that cannot apply to the model (it raises an
:class:`~lmatlas.errors.LmatlasError`, e.g. a context too short for its battery) is
skipped and its reason kept in ``Census.skipped``; detectors named explicitly raise.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch

from lmatlas.census import measure
from lmatlas.census.registry import Battery, Detector, all_detectors, get_detector
from lmatlas.errors import LmatlasError
from lmatlas.model.sites import head_name
from lmatlas.progress import progress_task

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

Z_FLOOR = 1e-6
_DIGITS = 6
_DEFAULT: Any = object()  # "use the detector's own min_z" (None already means "no z requirement")


def _round(values: torch.Tensor) -> list:
    return torch.round(values.double(), decimals=_DIGITS).tolist()


@dataclass
class DetectorResult:
    """One detector over every head. Tensors are ``[layer, head]`` float32.

    Attributes:
        score, null: mean per-example score on the battery / the null battery.
        score_std, null_std: their standard deviations across examples.
        z: Welch z-score of ``score`` against ``null``.
        subscores: ``name -> {"score": [layer, head], "null": [layer, head]}`` sub-scores.
        battery, null_battery: ``{"name", "shape", "seed", "kind"}`` of the batteries run.
        seconds: wall time of this detector inside the census.
    """

    name: str
    description: str
    score: torch.Tensor
    null: torch.Tensor
    score_std: torch.Tensor
    null_std: torch.Tensor
    z: torch.Tensor
    n: int
    n_null: int
    seed: int
    threshold: float
    min_z: float | None
    battery: dict[str, Any]
    null_battery: dict[str, Any]
    subscores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def labelled(self) -> torch.Tensor:
        """``[layer, head]`` bool: the heads that get this label."""
        passed = self.score >= self.threshold
        if self.min_z is not None:
            passed &= self.z >= self.min_z
        return passed

    def rows(self) -> list[dict[str, Any]]:
        """One dict per head, highest score first: head, layer, index, score, null, z, labelled, subscores."""
        n_layers, n_heads = self.score.shape
        labelled = self.labelled
        rows = []
        for layer in range(n_layers):
            for head in range(n_heads):
                row = {
                    "head": head_name(layer, head),
                    "layer": layer,
                    "index": head,
                    "score": round(float(self.score[layer, head]), _DIGITS),
                    "null": round(float(self.null[layer, head]), _DIGITS),
                    "z": round(float(self.z[layer, head]), 3),
                    "labelled": bool(labelled[layer, head]),
                }
                for name, parts in self.subscores.items():
                    row[name] = round(float(parts["score"][layer, head]), _DIGITS)
                rows.append(row)
        return sorted(rows, key=lambda r: (-r["score"], r["layer"], r["index"]))

    def heads(self) -> list[str]:
        """The labelled heads, highest score first (``["L5.H3", ...]``)."""
        return [row["head"] for row in self.rows() if row["labelled"]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "threshold": self.threshold,
            "min_z": self.min_z,
            "seed": self.seed,
            "n": self.n,
            "n_null": self.n_null,
            "battery": self.battery,
            "null_battery": self.null_battery,
            "seconds": round(self.seconds, 3),
            "labelled": self.heads(),
            "score": _round(self.score),
            "null": _round(self.null),
            "z": torch.round(self.z.double(), decimals=3).tolist(),
            "score_std": _round(self.score_std),
            "null_std": _round(self.null_std),
            "subscores": {name: {k: _round(v) for k, v in parts.items()} for name, parts in self.subscores.items()},
        }


@dataclass
class Census:
    """The result of :func:`run_census`: one :class:`DetectorResult` per detector, plus provenance."""

    n_layers: int
    n_heads: int
    seed: int
    results: dict[str, DetectorResult]
    provenance: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> DetectorResult:
        try:
            return self.results[name]
        except KeyError:
            raise LmatlasError(
                f"This census did not run {name!r}. It ran: {', '.join(self.results) or 'nothing'}."
            ) from None

    @property
    def labels(self) -> dict[str, list[str]]:
        """``"L3.H1" -> [labels]`` for every head (an empty list for none), labels in detector order."""
        labelled = {name: result.labelled for name, result in self.results.items()}
        return {
            head_name(layer, head): [name for name, mask in labelled.items() if mask[layer, head]]
            for layer in range(self.n_layers)
            for head in range(self.n_heads)
        }

    def labels_of(self, layer: int, head: int) -> list[str]:
        return self.labels[head_name(layer, head)]

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (floats rounded to 6 decimals, z-scores to 3)."""
        return {
            "provenance": self.provenance,
            "seed": self.seed,
            "layers": self.n_layers,
            "heads": self.n_heads,
            "detectors": {name: result.to_dict() for name, result in self.results.items()},
            "skipped": self.skipped,
            "labels": self.labels,
        }


def _battery_info(battery: Battery) -> dict[str, Any]:
    return {
        "name": battery.name,
        "shape": list(battery.input_ids.shape),
        "seed": battery.seed,
        "kind": battery.meta.get("kind"),
    }


def _resolve(detectors: Iterable[str | Detector] | None) -> list[Detector]:
    if detectors is None:
        return [detector for _, detector in sorted(all_detectors().items())]
    chosen = [get_detector(d) if isinstance(d, str) else d for d in detectors]
    if not chosen:
        raise LmatlasError(f"No detectors given. Known types: {', '.join(sorted(all_detectors()))}.")
    return chosen


def _per_detector(value: float | Mapping[str, float | None] | None, names: list[str], what: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise LmatlasError(
                f"{what} given for {', '.join(unknown)}, which this census does not run. It runs: {', '.join(names)}."
            )
        return dict(value)
    return {name: value for name in names}


def _check_threshold(name: str, threshold: float) -> float:
    if not 0.0 <= float(threshold) <= 1.0:
        raise LmatlasError(f"The threshold of {name!r} must lie in [0, 1] (scores do), got {threshold}.")
    return float(threshold)


def provenance(model: "Model", seed: int) -> dict[str, Any]:
    """Where a census came from: model source, file and hash, dtype, device, versions, seed, time."""
    import transformers

    import lmatlas

    return {
        "model": model.provenance.source,
        "family": model.family,
        "file": model.provenance.file,
        "file_sha256": model.provenance.sha256,
        "revision": model.provenance.revision,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "lmatlas_version": lmatlas.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "seed": seed,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _stats(scores: torch.Tensor, name: str, battery: Battery, n_layers: int, n_heads: int) -> torch.Tensor:
    scores = torch.as_tensor(scores).detach().float().cpu()
    if tuple(scores.shape) != (battery.n_examples, n_layers, n_heads):
        raise LmatlasError(
            f"Detector {name!r} returned scores of shape {tuple(scores.shape)} on {battery.name!r}; "
            f"expected [n_examples, layer, head] = {(battery.n_examples, n_layers, n_heads)}."
        )
    return scores


def welch_z(scores: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """``[layer, head]`` Welch z of ``[n, layer, head]`` scores against ``[n_null, layer, head]`` null scores."""
    var = scores.var(0, unbiased=True) if scores.shape[0] > 1 else torch.zeros(scores.shape[1:])
    null_var = null.var(0, unbiased=True) if null.shape[0] > 1 else torch.zeros(null.shape[1:])
    spread = (var / scores.shape[0] + null_var / null.shape[0]).sqrt().clamp_min(Z_FLOOR)
    return (scores.mean(0) - null.mean(0)) / spread


def run_detector(
    model: "Model", detector: Detector, seed: int = 0, threshold: float | None = None, min_z: float | None = _DEFAULT
) -> DetectorResult:
    """One detector: battery and null battery, per-example scores, means, z-scores and sub-scores."""
    started = time.perf_counter()
    lay = model.layout
    battery = detector.battery(model, seed)
    null_battery = detector.battery(model, seed, null=True)
    scores = _stats(detector.score(model, battery), detector.name, battery, lay.n_layers, lay.n_heads)
    null = _stats(detector.score(model, null_battery), detector.name, null_battery, lay.n_layers, lay.n_heads)
    subscores = {}
    real_parts, null_parts = detector.subscores(model, battery), detector.subscores(model, null_battery)
    for part, values in real_parts.items():
        subscores[part] = {
            "score": _stats(values, detector.name, battery, lay.n_layers, lay.n_heads).mean(0),
            "null": _stats(null_parts[part], detector.name, null_battery, lay.n_layers, lay.n_heads).mean(0),
        }
    return DetectorResult(
        name=detector.name,
        description=detector.description,
        score=scores.mean(0),
        null=null.mean(0),
        score_std=scores.std(0) if len(scores) > 1 else torch.zeros_like(scores[0]),
        null_std=null.std(0) if len(null) > 1 else torch.zeros_like(null[0]),
        z=welch_z(scores, null),
        n=len(scores),
        n_null=len(null),
        seed=int(seed),
        threshold=_check_threshold(detector.name, detector.threshold if threshold is None else threshold),
        min_z=detector.min_z if min_z is _DEFAULT else min_z,
        battery=_battery_info(battery),
        null_battery=_battery_info(null_battery),
        subscores=subscores,
        seconds=time.perf_counter() - started,
    )


def run_census(
    model: "Model",
    detectors: Iterable[str | Detector] | None = None,
    seed: int = 0,
    thresholds: Mapping[str, float] | None = None,
    min_z: float | Mapping[str, float | None] | None = None,
    progress: bool | Callable[[str], None] | None = True,
) -> Census:
    """Run head detectors over every head of ``model``.

    Args:
        model: an lmatlas :class:`~lmatlas.model.handle.Model`.
        detectors: names or instances (default: every registered detector, by name).
        seed: the battery seed (every battery and null battery derives from it).
        thresholds: ``name -> minimum score`` overriding the detectors' defaults.
        min_z: one minimum z-score for every detector, or ``name -> minimum`` (``None`` in
            the mapping: no z requirement for that detector); default: the detectors' own.
        progress: ``True`` (default: a bar on a terminal, a line per detector otherwise, on
            stderr; see :mod:`lmatlas.progress`), ``False``, or a callable called with a
            one-line message before each detector.

    Raises:
        LmatlasError: an unknown detector name, an override for a detector not run, a
            threshold outside ``[0, 1]``.
    """
    chosen = _resolve(detectors)
    names = [d.name for d in chosen]
    thresholds = {
        name: _check_threshold(name, value) for name, value in _per_detector(thresholds, names, "A threshold").items()
    }
    min_zs = _per_detector(min_z, names, "A min_z")
    results: dict[str, DetectorResult] = {}
    skipped: dict[str, str] = {}
    shown = bool(progress) and not callable(progress)
    with measure.shared(), progress_task("Head census", total=len(chosen), enabled=shown) as task:
        for index, detector in enumerate(chosen):
            if callable(progress):
                progress(f"[{index + 1}/{len(chosen)}] {detector.name}")
            task.update(index, description=f"Head census: {detector.name}")
            try:
                results[detector.name] = run_detector(
                    model, detector, seed, thresholds.get(detector.name), min_zs.get(detector.name, _DEFAULT)
                )
            except LmatlasError as error:
                if detectors is not None:
                    raise
                skipped[detector.name] = str(error)
        task.update(len(chosen), description="Head census: done")
    return Census(
        model.layout.n_layers, model.layout.n_heads, int(seed), results, provenance(model, int(seed)), skipped
    )
