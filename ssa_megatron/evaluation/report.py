"""Evaluation results -> ``results.json``, ``report.md`` and PNG plots (matplotlib, Agg back end)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
from matplotlib import ticker


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# The stages reported as one table of their result rows: results key, title (formatted with the
# stage's results) and the columns as (header, row key).
_KEYED_SECTIONS = (
    (
        "budget_sweep",
        "## Budget sweep (block_size {block_size}, full-attention ppl {ppl_full:.4f})",
        (
            ("block_count", "block_count"),
            ("receptive field", "receptive_field"),
            ("ppl sparse", "ppl_sparse"),
            ("sparsity", "sparsity"),
            ("KL(sparse, full)", "kl_sparse_full"),
        ),
    ),
    (
        "extrapolation",
        "## Extrapolation (train length {train_length}, RoPE scaling {rope_scaling})",
        tuple((c, c) for c in ("factor", "length", "mode", "ppl", "windows")),
    ),
    (
        "passkey",
        "## Passkey retrieval ({trials} keys per cell)",
        tuple((c, c) for c in ("length", "depth", "mode", "accuracy")),
    ),
)


def to_markdown(results: dict[str, Any]) -> str:
    """Human-readable tables of every stage present in ``results``."""
    ck = results.get("checkpoint")
    parts = ["# SSA evaluation" + (f": {_label(results)}" if ck else ""), ""]
    if ck:
        parts += [
            f"Checkpoint: `{ck.get('path')}` (run `{ck.get('run')}`, iteration {ck.get('iteration')})",
            "",
        ]
    settings = results.get("settings", {})
    if settings:
        parts += [_table(["setting", "value"], [[k, json.dumps(v)] for k, v in settings.items()]), ""]
    ppl = results.get("perplexity")
    if ppl:
        parts += ["## Perplexity and attention (validation windows)", ""]
        rows = []
        for mode, res in ppl.items():
            att = res.get("attention", {}).get("mean", {})
            rows.append(
                [
                    mode,
                    res["block_count"],
                    res["length"],
                    res["tokens"],
                    res["ppl"],
                    att.get("sparsity", "-"),
                    att.get("entropy", "-"),
                    att.get("kl_sparse_full", "-"),
                ]
            )
        parts += [
            _table(
                ["run", "block_count", "length", "tokens", "ppl", "sparsity", "entropy", "KL(sparse, full)"],
                rows,
            ),
            "",
        ]
        layer_rows = []
        for mode, res in ppl.items():
            for row in res.get("attention", {}).get("per_layer", []):
                layer_rows.append(
                    [mode, row["layer"], row["sparsity"], row["entropy"], row["kl_sparse_full"]]
                )
        if layer_rows:
            parts += [
                "### Per layer",
                "",
                _table(["run", "layer", "sparsity", "entropy", "KL(sparse, full)"], layer_rows),
                "",
            ]
    for key, title, columns in _KEYED_SECTIONS:
        section = results.get(key)
        if section:
            header, keys = zip(*columns)
            parts += [
                title.format(**section),
                "",
                _table(list(header), [[r[k] for k in keys] for r in section["rows"]]),
                "",
            ]
            # Lengths the stage could not run (extrapolation beyond memory or the data).
            parts += [f"- skipped {s['length']}: {s['reason']}" for s in section.get("skipped", [])]
    return "\n".join(parts) + "\n"


def _label(results: dict[str, Any]) -> str:
    """``run @ iteration`` of the evaluated checkpoint, or "" when the results do not name one."""
    ck = results.get("checkpoint")
    if not ck:
        return ""
    it = ck.get("iteration")
    return f"{ck.get('run')} @ {it if it is not None else '?'}"


def _titled(title: str, label: str) -> str:
    return f"{title}\n{label}" if label else title


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _log_axis_at(ax: Any, values: list[int]) -> None:
    """Log-scaled x axis labelled at exactly the measured points (budgets and lengths are powers of
    two; matplotlib's default minor labels overlap there)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(values)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{int(x)}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def plot_budget_sweep(sweep: dict[str, Any], path: Path, label: str = "") -> Path:
    rf = [r["receptive_field"] for r in sweep["rows"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(rf, [r["ppl_sparse"] for r in sweep["rows"]], "o-", label="sparse")
    ax1.axhline(sweep["ppl_full"], color="gray", linestyle="--", label="full attention")
    ax1.set(
        xlabel="receptive field (tokens)", ylabel="perplexity", title=_titled("Perplexity vs budget", label)
    )
    ax1.legend()
    ax2.plot(rf, [r["sparsity"] for r in sweep["rows"]], "o-")
    ax2.set(
        xlabel="receptive field (tokens)",
        ylabel="attention sparsity",
        ylim=(0, 1.02),
        title=_titled("Full-attention mass inside selected blocks", label),
    )
    for ax in (ax1, ax2):
        _log_axis_at(ax, rf)
    return _save(fig, path)


def plot_layer_sparsity(ppl: dict[str, Any], path: Path, label: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, res in ppl.items():
        layers = res.get("attention", {}).get("per_layer", [])
        ax.plot(
            [r["layer"] for r in layers], [r["sparsity"] for r in layers], "o-", label=f"{mode} inference"
        )
    ax.set(
        xlabel="layer",
        ylabel="attention sparsity",
        ylim=(0, 1.02),
        title=_titled("Attention sparsity per layer", label),
    )
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.legend()
    return _save(fig, path)


def plot_extrapolation(ext: dict[str, Any], path: Path, label: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in sorted({r["mode"] for r in ext["rows"]}):
        rows = [r for r in ext["rows"] if r["mode"] == mode]
        ax.plot([r["length"] for r in rows], [r["ppl"] for r in rows], "o-", label=mode)
    ax.set(
        xlabel="sequence length",
        ylabel="perplexity",
        title=_titled(f"Extrapolation (RoPE scaling: {ext['rope_scaling']})", label),
    )
    _log_axis_at(ax, [r["length"] for r in ext["rows"]])
    ax.legend()
    return _save(fig, path)


def plot_passkey(pk: dict[str, Any], path: Path, label: str = "") -> Path:
    modes = sorted({r["mode"] for r in pk["rows"]})
    lengths = sorted({r["length"] for r in pk["rows"]})
    depths = sorted({r["depth"] for r in pk["rows"]})
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        acc = {(r["length"], r["depth"]): r["accuracy"] for r in pk["rows"] if r["mode"] == mode}
        grid = [[acc[(n, d)] for n in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set(
            xticks=range(len(lengths)),
            xticklabels=lengths,
            yticks=range(len(depths)),
            yticklabels=depths,
            xlabel="length",
            ylabel="depth",
            title=_titled(f"passkey accuracy ({mode})", label),
        )
        fig.colorbar(im, ax=ax)
    return _save(fig, path)


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write every artifact; returns ``{name: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(to_markdown(results), encoding="utf-8")
    label = _label(results)
    if results.get("budget_sweep"):
        paths["budget_sweep_png"] = plot_budget_sweep(
            results["budget_sweep"], out / "budget_sweep.png", label
        )
    if results.get("perplexity") and any("attention" in r for r in results["perplexity"].values()):
        paths["layer_sparsity_png"] = plot_layer_sparsity(
            results["perplexity"], out / "layer_sparsity.png", label
        )
    if results.get("extrapolation", {}).get("rows"):
        paths["extrapolation_png"] = plot_extrapolation(
            results["extrapolation"], out / "extrapolation.png", label
        )
    if results.get("passkey"):
        paths["passkey_png"] = plot_passkey(results["passkey"], out / "passkey.png", label)
    return {k: str(v) for k, v in paths.items()}
