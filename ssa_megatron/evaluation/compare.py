"""Evaluation results (``results.json`` of tools/evaluate.py) of several runs -> one table, overlaid plots.

Every row and every curve is labelled ``<run> @ <iteration>``: the run's name and the training
iteration of the checkpoint it was measured on, so a table never mixes up what it compares.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .report import _log_axis_at, _save, _table, plt, ticker


def describe_checkpoint(path: str | Path, run_name: str | None = None) -> dict[str, Any]:
    """Name, path and training iteration of what was evaluated (a Megatron checkpoint directory,
    one of its ``iter_*`` directories, or an exported HF directory)."""
    p = Path(path)
    iteration = None
    target = p
    latest = p / "latest"
    if latest.is_file():
        target = p / latest.read_text().strip()
    complete = target / "complete.json"
    if complete.is_file():
        iteration = json.loads(complete.read_text()).get("iteration")
    elif (p / "config.json").is_file():
        iteration = json.loads((p / "config.json").read_text()).get("training_iteration")
    name = run_name or (p.name if p.name else str(p))
    return {"run": name, "path": str(p), "resolved": str(target), "iteration": iteration}


def run_label(results: dict[str, Any]) -> str:
    ck = results.get("checkpoint") or {}
    it = ck.get("iteration")
    return f"{ck.get('run', '?')} @ {it if it is not None else '?'}"


def load_results(dirs: list[str | Path]) -> list[dict[str, Any]]:
    """``results.json`` of each directory (or the file itself); refuses one without a checkpoint record."""
    loaded = []
    for d in dirs:
        path = Path(d)
        path = path / "results.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; pass directories written by tools/evaluate.py")
        try:
            res = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is not valid JSON ({err.msg}); re-run tools/evaluate.py for it"
            ) from None
        if not isinstance(res, dict) or "perplexity" not in res:
            raise ValueError(
                f"{path} holds no perplexity results; is it a results.json of tools/evaluate.py?"
            )
        res.setdefault("checkpoint", {"run": path.parent.name, "iteration": None})
        res["_source"] = str(path)
        loaded.append(res)
    labels = [run_label(r) for r in loaded]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(
            f"two results carry the same label {dupes[0]!r}; evaluate them with distinct --run-name"
        )
    return loaded


def _attn(res: dict[str, Any], mode: str, key: str) -> float | None:
    return res["perplexity"].get(mode, {}).get("attention", {}).get("mean", {}).get(key)


def _mode_of(run: str) -> str:
    """``ssa/seed1234`` -> ``ssa``: runs of one attention mode and several seeds are grouped."""
    return run.split("/")[0]


def comparison(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The cross-run table: one row per run, plus the mean and spread per attention mode over seeds."""
    rows = []
    for res in results:
        ck = res["checkpoint"]
        ppl = res["perplexity"]
        row: dict[str, Any] = {
            "label": run_label(res),
            "run": ck.get("run"),
            "iteration": ck.get("iteration"),
            "checkpoint": ck.get("path"),
            "block_count": ppl.get("sparse", {}).get("block_count"),
            "ppl_sparse": ppl.get("sparse", {}).get("ppl"),
            "ppl_full": ppl.get("full", {}).get("ppl"),
            "sparsity_sparse": _attn(res, "sparse", "sparsity"),
            "sparsity_full": _attn(res, "full", "sparsity"),
            "entropy_full": _attn(res, "full", "entropy"),
            "kl_sparse_full": _attn(res, "full", "kl_sparse_full"),
        }
        sweep = res.get("budget_sweep") or {}
        row["sweep"] = {str(r["block_count"]): r["ppl_sparse"] for r in sweep.get("rows", [])}
        pk = res.get("passkey") or {}
        for mode in ("sparse", "full"):
            acc = [r["accuracy"] for r in pk.get("rows", []) if r["mode"] == mode]
            row[f"passkey_{mode}"] = sum(acc) / len(acc) if acc else None
        rows.append(row)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[_mode_of(str(row["run"]))].append(row)
    summary = {}
    keys = ["ppl_sparse", "ppl_full", "sparsity_sparse", "sparsity_full", "entropy_full", "passkey_sparse"]
    for mode, members in groups.items():
        entry: dict[str, Any] = {"runs": [m["label"] for m in members]}
        for key in keys:
            vals = [m[key] for m in members if m[key] is not None]
            entry[key] = statistics.fmean(vals) if vals else None
            entry[f"{key}_spread"] = (max(vals) - min(vals)) if len(vals) > 1 else None
        counts = sorted({c for m in members for c in m["sweep"]}, key=int)
        entry["sweep"] = {
            c: statistics.fmean([m["sweep"][c] for m in members if c in m["sweep"]]) for c in counts
        }
        summary[mode] = entry
    return {"runs": rows, "by_mode": summary}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def to_markdown(table: dict[str, Any], title: str = "") -> str:
    parts = [f"# Cross-run comparison{': ' + title if title else ''}", ""]
    rows = table["runs"]
    parts += [
        "Each row is one run's latest checkpoint (`run @ iteration`). Perplexity on the packed "
        "validation rows; sparsity = full-attention mass inside the selected blocks (Definition 1); "
        "entropy of the full-attention distribution; passkey = mean accuracy over lengths and depths.",
        "",
    ]
    parts.append(
        _table(
            [
                "run @ iteration",
                "block_count",
                "ppl sparse",
                "ppl full",
                "sparsity (sparse inf.)",
                "sparsity (full inf.)",
                "entropy (full inf.)",
                "passkey sparse",
                "passkey full",
            ],
            [
                [
                    r["label"],
                    r["block_count"],
                    _fmt(r["ppl_sparse"]),
                    _fmt(r["ppl_full"]),
                    _fmt(r["sparsity_sparse"]),
                    _fmt(r["sparsity_full"]),
                    _fmt(r["entropy_full"]),
                    _fmt(r["passkey_sparse"], 2),
                    _fmt(r["passkey_full"], 2),
                ]
                for r in rows
            ],
        )
    )
    counts = sorted({c for r in rows for c in r["sweep"]}, key=int)
    if counts:
        parts += ["", "## Sparse perplexity vs block count (block-count sweep)", ""]
        parts.append(
            _table(
                ["run @ iteration", *[f"k={c}" for c in counts]],
                [[r["label"], *[_fmt(r["sweep"].get(c)) for c in counts]] for r in rows],
            )
        )
    by_mode = table["by_mode"]
    if any(len(v["runs"]) > 1 for v in by_mode.values()):
        parts += ["", "## Per attention mode, mean over seeds (spread = max - min)", ""]
        parts.append(
            _table(
                ["mode", "runs", "ppl sparse", "ppl full", "sparsity (sparse inf.)", "entropy (full inf.)"],
                [
                    [
                        m,
                        len(v["runs"]),
                        f"{_fmt(v['ppl_sparse'])} ± {_fmt(v['ppl_sparse_spread'])}",
                        f"{_fmt(v['ppl_full'])} ± {_fmt(v['ppl_full_spread'])}",
                        f"{_fmt(v['sparsity_sparse'])} ± {_fmt(v['sparsity_sparse_spread'])}",
                        f"{_fmt(v['entropy_full'])} ± {_fmt(v['entropy_full_spread'])}",
                    ]
                    for m, v in by_mode.items()
                ],
            )
        )
    return "\n".join(parts) + "\n"


def _styles(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One colour per attention mode, one line style per seed within it, so runs of a mode read as a group."""
    colours: dict[str, str] = {}
    seen: dict[str, int] = defaultdict(int)
    styles = {}
    for res in results:
        mode = _mode_of(str(res["checkpoint"].get("run")))
        colours.setdefault(mode, f"C{len(colours)}")
        styles[run_label(res)] = {"color": colours[mode], "linestyle": ("-", "--", ":", "-.")[seen[mode] % 4]}
        seen[mode] += 1
    return styles


def _integer_ticks(ax: Any) -> None:
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))


def plot_overlays(results: list[dict[str, Any]], out: Path, title: str = "") -> dict[str, str]:
    """Overlaid plots across runs: budget sweep, per-layer sparsity and entropy, passkey accuracy."""
    files: dict[str, str] = {}
    suffix = f" ({title})" if title else ""
    style = _styles(results)
    sweeps = [(run_label(r), r["budget_sweep"]) for r in results if r.get("budget_sweep")]
    if sweeps:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
        rf_all: list[int] = []
        for label, sw in sweeps:
            rf = [r["receptive_field"] for r in sw["rows"]]
            rf_all += rf
            ax1.plot(rf, [r["ppl_sparse"] for r in sw["rows"]], marker="o", label=label, **style[label])
            ax1.axhline(sw["ppl_full"], color=style[label]["color"], linestyle=":", linewidth=1)
            ax2.plot(rf, [r["sparsity"] for r in sw["rows"]], marker="o", label=label, **style[label])
        ax1.set(
            xlabel="receptive field (tokens)",
            ylabel="sparse perplexity (dotted: full)",
            title="Perplexity vs block budget" + suffix,
        )
        ax2.set(
            xlabel="receptive field (tokens)",
            ylabel="attention sparsity",
            ylim=(0, 1.02),
            title="Full-attention mass in selected blocks" + suffix,
        )
        for ax in (ax1, ax2):
            _log_axis_at(ax, rf_all)
        ax1.legend(fontsize=7)
        files["budget_sweep_png"] = str(_save(fig, out / "budget_sweep.png"))
    layered = [(run_label(r), r["perplexity"]) for r in results]
    for key, ylabel in (("sparsity", "attention sparsity"), ("entropy", "attention entropy (nats)")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
        drawn = False
        for ax, mode in zip(axes, ("sparse", "full")):
            for label, ppl in layered:
                layers = ppl.get(mode, {}).get("attention", {}).get("per_layer", [])
                if layers:
                    ax.plot(
                        [r["layer"] for r in layers],
                        [r[key] for r in layers],
                        marker="o",
                        label=label,
                        **style[label],
                    )
                    drawn = True
            ax.set(xlabel="layer", ylabel=ylabel, title=f"{ylabel} per layer, {mode} inference{suffix}")
            _integer_ticks(ax)
        if not drawn:
            plt.close(fig)
            continue
        axes[0].legend(fontsize=7)
        files[f"layer_{key}_png"] = str(_save(fig, out / f"layer_{key}.png"))
    pks = [(run_label(r), r["passkey"]) for r in results if r.get("passkey")]
    if pks:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
        lengths_all: list[int] = []
        for ax, mode in zip(axes, ("sparse", "full")):
            for label, pk in pks:
                by_len: dict[int, list[float]] = defaultdict(list)
                for r in pk["rows"]:
                    if r["mode"] == mode:
                        by_len[int(r["length"])].append(r["accuracy"])
                lengths = sorted(by_len)
                lengths_all += lengths
                means = [statistics.fmean(by_len[n]) for n in lengths]
                ax.plot(lengths, means, marker="o", label=label, **style[label])
            ax.set(
                xlabel="prompt length (tokens)",
                ylabel="passkey accuracy (mean over depths)",
                ylim=(-0.02, 1.02),
                title=f"Passkey retrieval, {mode} inference{suffix}",
            )
            if lengths_all:
                _log_axis_at(ax, lengths_all)
        axes[0].legend(fontsize=7)
        files["passkey_png"] = str(_save(fig, out / "passkey.png"))
    return files


def write_comparison(dirs: list[str | Path], out_dir: str | Path, title: str = "") -> dict[str, str]:
    """Load the results of ``dirs``, write ``comparison.md``, ``comparison.json`` and the overlaid PNGs."""
    results = load_results(dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison(results)
    table["title"] = title
    table["sources"] = [r["_source"] for r in results]
    files = {"markdown": str(out / "comparison.md"), "json": str(out / "comparison.json")}
    files.update(plot_overlays(results, out, title))
    table["files"] = files
    Path(files["json"]).write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    Path(files["markdown"]).write_text(to_markdown(table, title), encoding="utf-8")
    return files
