"""MkDocs hooks: pages generated from the code and the committed records, so they cannot drift.

* ``cli.md`` — every command of the CLI with its options (from the Typer app);
* ``errors.md`` and ``errors/<Class>.md`` — one page per error class: symptom, cause, fix (``lmatlas.errors.*.help``);
* ``benchmarks.md`` — every ``bench/results/*.json`` record, its conditions and its figures;
* ``guide/combinations.md`` is not a file: the generation page includes the table of
  ``lmatlas.infer.compose.COMBINATIONS`` where it says ``{{ combinations }}``;
* the inference page's ``{{ kv_policies }}``: every KV policy of the registry
  (``lmatlas.infer.policies.KV_POLICIES``), its value, its options and whether the playground offers it.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
CONDITIONS = (
    "command",
    "commit",
    "torch_threads",
    "threads",
    "load_average_before",
    "load_average_after",
    "load_before",
    "load_after",
    "uptime_before",
    "uptime_after",
    "load_avg_before",
    "load_avg_after",
    "load_average_1min",
    "machine",
    "load_note",
    "note",
)


def cli_page() -> str:
    import typer

    from lmatlas.cli import app

    group = typer.main.get_command(app)
    lines = [
        "# Command line",
        "",
        "Every command of `lmatlas`, generated from the command line itself "
        "(`lmatlas COMMAND --help` prints the same). Bad input exits with status 2 and one line; "
        "`--json` prints a JSON error object instead.",
        "",
    ]
    for name in sorted(group.commands):
        lines += _command_section(f"lmatlas {name}", group.commands[name])
    return "\n".join(lines)


def _command_section(path: str, command) -> list[str]:
    """A command's heading, first help paragraph and option table; a group's subcommands follow, one level down."""
    import click

    lines = [f"{'###' if path.count(' ') > 1 else '##'} `{path}`", ""]
    lines += [inspect.cleandoc(command.help or "").split("\n\n")[0], ""]
    params = [p for p in command.params if p.name != "help"]
    if params:
        lines += ["| option | help | default |", "| --- | --- | --- |"]
        for param in params:
            if isinstance(param, click.Argument):
                label = f"`{param.metavar or param.name.upper()}`"
            else:
                label = " ".join(f"`{opt}`" for opt in param.opts)
            default = "" if param.default in (None, (), [], False) or param.required else f"`{param.default}`"
            text = (getattr(param, "help", None) or "").replace("|", "\\|")
            lines.append(f"| {label} | {text} | {default} |")
        lines.append("")
    for sub in sorted(getattr(command, "commands", {}) or {}):
        lines += _command_section(f"{path} {sub}", command.commands[sub])
    return lines


def _error_classes() -> list[type]:
    import lmatlas.errors as errors

    return [obj for obj in vars(errors).values() if isinstance(obj, type) and issubclass(obj, errors.LmatlasError)]


def errors_page() -> str:
    """The index: every error class with its one-line meaning, linking to its own page."""
    lines = [
        "# Errors",
        "",
        "Every error lmatlas raises on bad input derives from `LmatlasError` and says what was "
        "wrong and what to do: one line and exit status 2 on the command line, a JSON object "
        '`{"error": {"type", "message"}}` under `--json`, a 4xx answer from the explorer. '
        "Each class has a page: what you see, why, and the fix.",
        "",
        "| error | what it means |",
        "| --- | --- |",
    ]
    lines += [f"| [{cls.__name__}](errors/{cls.__name__}.md) | {inspect.getdoc(cls)} |" for cls in _error_classes()]
    return "\n".join(lines) + "\n"


def error_page(cls: type) -> str:
    """One error class: symptom, cause, fix (from its ``help``)."""
    parents = ", ".join(base.__name__ for base in cls.__bases__)
    return "\n".join(
        [
            f"# {cls.__name__}",
            "",
            f"*{inspect.getdoc(cls)}* (subclass of {parents})",
            "",
            "## Symptom",
            "",
            cls.help.symptom,
            "",
            "## Cause",
            "",
            cls.help.cause,
            "",
            "## Fix",
            "",
            cls.help.fix,
            "",
            "[All errors](../errors.md)",
            "",
        ]
    )


def _leaves(value, prefix: str = "", limit: int = 60) -> list[tuple[str, str]]:
    """Scalar leaves of a record as ``(path, value)``; long lists summarised by their length."""
    if isinstance(value, dict):
        out = []
        for key, item in value.items():
            out += _leaves(item, f"{prefix}.{key}" if prefix else str(key), limit)
        return out
    if isinstance(value, list):
        if len(value) > 8 or any(isinstance(item, (dict, list)) for item in value):
            if all(isinstance(item, dict) for item in value) and len(value) <= 12:
                out = []
                for i, item in enumerate(value):
                    out += _leaves(item, f"{prefix}[{i}]", limit)
                return out
            return [(prefix, f"{len(value)} entries")]
        return [(prefix, ", ".join(str(item) for item in value))]
    if isinstance(value, float):
        return [(prefix, f"{value:.4g}")]
    return [(prefix, str(value))]


def _harness():
    """bench/harness.py (it imports torch only to measure, not to read records)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "bench" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _verdict(record) -> str:
    """Whether the record was taken quiet (1-minute load <= CPUs + 0.5 throughout) and what it does not state."""
    state = _harness().record_conditions(record)
    cpus = state.get("cpus", 2)
    if state["max_load"] is None:
        load = "**load not recorded**"
    elif state["quiet"]:
        load = f"quiet: the 1-minute load stayed at or below {state['max_load']:.2f} on {cpus} CPUs"
    else:
        load = f"**under load**: the 1-minute load reached {state['max_load']:.2f} on {cpus} CPUs"
    missing = state["missing"]
    stated = (
        "; at its top level it does not state " + ", ".join(missing) + " (the guide quotes a figure only where the "
        "record, or the section it comes from, states them)"
        if missing
        else ""
    )
    return load + stated + "."


def benchmarks_page() -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated from the committed records in `bench/results/` (each written by the "
        "benchmark of the same name under `bench/`). The conditions each record states come first: a timing "
        "taken under load says so here.",
        "",
    ]
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        record = json.loads(path.read_text())
        lines += [f"## {path.stem}", "", f"Record: `bench/results/{path.name}`.", "", _verdict(record), ""]
        conditions = {key: record[key] for key in CONDITIONS if isinstance(record, dict) and key in record}
        if conditions:
            lines += ["| condition | value |", "| --- | --- |"]
            lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in conditions.items()]
            lines.append("")
        leaves = [(k, v) for k, v in _leaves(record) if k.split(".")[0] not in CONDITIONS]
        lines += ["| figure | value |", "| --- | --- |"]
        lines += [f"| `{k}` | {v.replace('|', '/')[:120]} |" for k, v in leaves[:80]]
        if len(leaves) > 80:
            lines.append(f"| ... | {len(leaves) - 80} more figures in the record |")
        lines.append("")
    return "\n".join(lines)


def combinations_table() -> str:
    from lmatlas.infer.compose import COMBINATIONS

    rows = ["| edit | KV policy | strategy | what happens |", "| --- | --- | --- | --- |"]
    rows += [f"| {edit} | {kv} | {strategy} | {outcome} |" for edit, kv, strategy, outcome in COMBINATIONS]
    return "\n".join(rows)


#: API reference pages: one per package, a section per module (from the modules' docstrings).
PACKAGES = ("model", "decode", "census", "edit", "causal", "atlas", "infer", "errors")


def reference_page(package: str) -> str:
    import importlib
    import pkgutil

    module = importlib.import_module(f"lmatlas.{package}")
    lines = [f"# lmatlas.{package}", ""]
    if not hasattr(module, "__path__"):
        return "\n".join(lines + [f"::: lmatlas.{package}", ""])
    names = sorted(
        info.name for info in pkgutil.walk_packages(module.__path__, f"lmatlas.{package}.") if not info.ispkg or True
    )
    for name in [f"lmatlas.{package}"] + names:
        lines += [
            f"::: {name}",
            "    options:",
            "      show_submodules: false",
            "      members: false" if name.endswith("__init__") else "",
            "",
        ]
    return "\n".join(lines)


GENERATED = {
    "cli.md": cli_page,
    "errors.md": errors_page,
    "benchmarks.md": benchmarks_page,
    **{f"reference/{package}.md": (lambda package=package: reference_page(package)) for package in PACKAGES},
}


def on_files(files, config):
    for name, make in GENERATED.items():
        files.append(File.generated(config, name, content=make()))
    for cls in _error_classes():  # one page per error class, reached from the errors index
        files.append(File.generated(config, f"errors/{cls.__name__}.md", content=error_page(cls)))
    return files


def map_stages_table() -> str:
    """The atlas build's stages from ``bench/results/map.json``: seconds, forwards, tokens, peak memory."""
    record = json.loads((ROOT / "bench" / "results" / "map.json").read_text())
    seconds, work = record["seconds_by_stage"], record.get("work_by_stage", {})
    peaks = record.get("peak_rss_mb_by_stage", {})
    layout = record.get("executor", {"kind": "local", "workers": 1, "threads": record.get("torch_threads")})
    forked = layout["kind"] == "fork"
    label = "worker seconds" if forked else "seconds"
    rows = [f"| stage | {label} | forwards | tokens | peak RSS (MB) |", "| --- | ---: | ---: | ---: | ---: |"]
    for stage, value in sorted(seconds.items(), key=lambda item: -item[1]):
        done = work.get(stage, {})
        rows.append(
            f"| {stage} | {value:.1f} | {done.get('forwards', '')} | {done.get('tokens', '')} | "
            f"{peaks.get(stage, '')} |"
        )
    conditions = record.get("conditions", {})
    before, after = conditions.get("load_before", [None])[0], conditions.get("load_after", [None])[0]
    rows.append("")
    how = (
        f"{layout['workers']} worker processes with {layout['threads']} thread each (a stage's worker seconds are "
        "its units' times summed over the workers, which run at once)"
        if forked
        else f"{record.get('torch_threads')} threads in one process"
    )
    rows.append(
        f"Whole build {record['build_s']:.1f} s (model load {record['load_s']:.2f} s apart), "
        f"{how}, 1-minute load {before} before and {after} after on "
        f"{conditions.get('cpu_count')} CPUs, commit `{str(conditions.get('commit'))[:10]}`; "
        f"`{conditions.get('command')}`."
    )
    return "\n".join(rows)


def kv_policies_table() -> str:
    from lmatlas.infer.policies import INPUT_OPTIONS, KV_POLICIES
    from lmatlas.web.editing import KV_FIELDS

    rows = [
        "| `--kv` | value | command line | playground | what it does |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind in KV_POLICIES.values():
        value = f"`{kind.value.split(':')[1]}`" if kind.value else "none"
        needs = [f"`{INPUT_OPTIONS[i]}`" for i in kind.inputs]
        line = " ".join([f"`--kv {kind.name}`", *needs])
        fields = ", ".join([f'`"kv": "{kind.name}"`', *(f"`{KV_FIELDS[i]}`" for i in kind.inputs)])
        playground = f"no: {kind.playground}" if kind.playground else fields
        rows.append(f"| `{kind.name}` | {value} | {line} | {playground} | {kind.summary} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "{{ kv_policies }}" in markdown:
        markdown = markdown.replace("{{ kv_policies }}", kv_policies_table())
    if "{{ combinations }}" in markdown:
        markdown = markdown.replace("{{ combinations }}", combinations_table())
    if "{{ map_stages }}" in markdown:
        markdown = markdown.replace("{{ map_stages }}", map_stages_table())
    return markdown
