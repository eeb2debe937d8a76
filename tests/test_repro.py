"""The reproduction recipe: tools/build_corpus.py on a documentation tree, and examples/repro/run_repro.py
end to end at a toy size (corpus -> three concurrent training runs -> evaluate -> compare_runs)."""

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_helpers import CPU_FP32, flags, load_tool

ROOT = Path(__file__).resolve().parents[1]

_SUBJECTS = [
    "The parser",
    "This option",
    "The daemon",
    "Each archive",
    "The manual",
    "A new user",
    "The server",
]
_VERBS = ["reads", "writes", "checks", "skips", "keeps", "sorts", "copies"]
_OBJECTS = ["the input file", "every record", "the whole table", "its own settings", "the log", "each entry"]


def _prose(seed: int, sentences: int = 6) -> str:
    """A paragraph of plain English sentences, different for every seed (so none is de-duplicated)."""
    out = []
    for i in range(sentences):
        k = seed * sentences + i
        out.append(
            f"{_SUBJECTS[k % 7]} {_VERBS[(k // 7) % 7]} {_OBJECTS[(k // 49) % 6]} when it is asked to, and "
            f"it will report the number {k} to the user at the end of the run."
        )
    return " ".join(out)


def _doc_tree(root: Path) -> Path:
    """A small /usr/share-like tree: text, gzipped README, HTML, a man page, and kernel docs to skip."""
    doc = root / "doc"
    for pkg in range(6):
        (doc / f"pkg{pkg}").mkdir(parents=True)
        (doc / f"pkg{pkg}" / "guide.txt").write_text("\n\n".join(_prose(pkg * 40 + j) for j in range(20)))
        (doc / f"pkg{pkg}" / "README.gz").write_bytes(gzip.compress(_prose(pkg * 40 + 30).encode()))
        (doc / f"pkg{pkg}" / "changelog").write_text("The zebra " + _prose(900))  # changelogs are skipped
    (doc / "pkg0" / "index.html").write_text(
        f"<html><body><p>{_prose(500)}</p><p>{_prose(501)}</p></body></html>"
    )
    (doc / "linux-doc-6.1").mkdir()
    (doc / "linux-doc-6.1" / "kernel.txt").write_text("The kernel scheduler " + _prose(700))
    # An info manual in four parts; its reading order (top, -1, -2, -10) is not the names' order.
    info = root / "info"
    info.mkdir()
    for part in ("", "-1", "-2", "-10"):
        seed = 600 + (int(part[1:]) if part else 0)
        text = f"{_prose(seed)}\n\n{_prose(seed + 20)}"
        (info / f"manual.info{part}.gz").write_bytes(gzip.compress(text.encode()))
    man = root / "man" / "man1"
    man.mkdir(parents=True)
    (man / "tool.1").write_text(
        f".TH TOOL 1\n.SH DESCRIPTION\n\\fBThe tool\\fR {_prose(800)}\n.PP\n{_prose(801)}\n"
    )
    return root


def _roots(tree: Path) -> str:
    """The tree's documentation roots, as --debian-roots takes them."""
    return ",".join(str(tree / d) for d in ("doc", "info", "man"))


def _build(out: Path, tree: Path, *extra: str) -> subprocess.CompletedProcess:
    roots = _roots(tree)
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "build_corpus.py"),
            "--output",
            str(out),
            "--sources",
            "debian",
            "--debian-roots",
            roots,
            "--seq-len",
            "64",
            "--vocab-size",
            "300",
            "--min-megabytes",
            "0.01",
            "--valid-fraction",
            "0.2",
            "--workers",
            "1",
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One documentation tree and one build of it. The recipe test builds the same tree again in its
    data stage, in another process and directory: that second build is the reproducibility check."""
    root = tmp_path_factory.mktemp("corpus")
    tree = _doc_tree(root / "share")
    return tree, root / "a", _build(root / "a", tree)


def _digest(out: Path) -> str:
    return hashlib.sha256((out / "corpus.jsonl").read_bytes()).hexdigest()


def test_build_corpus_skips_kernel_docs_and_finished_builds(
    built: tuple[Path, Path, subprocess.CompletedProcess],
) -> None:
    tree, out, first = built
    assert first.returncode == 0, first.stderr[-3000:]
    corpus = (out / "corpus.jsonl").read_text()
    digest = hashlib.sha256(corpus.encode()).hexdigest()
    assert f"sha256 {digest}" in first.stdout
    docs = [json.loads(line) for line in corpus.splitlines()]
    sources = {d["source"] for d in docs}
    assert {"doc/pkg0", "man/tool"} <= sources and not any("linux-doc" in s for s in sources)
    text = "\n".join(d["text"] for d in docs)
    assert "kernel scheduler" not in text and "zebra" not in text  # kernel docs, changelog
    assert "number 3000 " in text and "number 4800 " in text and "\\fB" not in text  # HTML, man page
    manifest = json.loads((out / "corpus_manifest.json").read_text())
    splits = manifest["shards"]["splits"]
    assert manifest["complete"] and splits["train"]["tokens"] > 0 and splits["val"]["documents"] > 0
    assert set(manifest["context_shares"]) == {"128", "256", "1024", "4096"}
    assert "share of tokens at document position >= N: 128:" in first.stdout
    # A second call on a finished directory does nothing.
    again = _build(out, tree)
    assert again.returncode == 0 and "already built" in again.stdout


def _numbers(text: str) -> list[int]:
    """The first sentence number of each paragraph of a document (see _prose): its reading order."""
    return [int(p.split("the number ")[1].split()[0]) // 6 for p in text.split("\n\n")]


def test_document_units_file_and_docstring(
    built: tuple[Path, Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    tree, out, _ = built
    docs = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    manuals = [d for d in docs if d["source"] == "info/manual"]
    # One document per manual, parts in reading order.
    assert len(manuals) == 1 and _numbers(manuals[0]["text"]) == [600, 620, 601, 621, 602, 622, 610, 630]
    first = _build(tmp_path / "d", tree, "--document-unit", "docstring")
    assert first.returncode == 0, first.stderr[-3000:]
    by_part = [json.loads(line) for line in (tmp_path / "d" / "corpus.jsonl").read_text().splitlines()]
    parts = sorted(_numbers(d["text"])[0] for d in by_part if d["source"] == "info/manual")
    assert parts == [600, 601, 602, 610]
    # Whole manuals hold more of the text at long document positions.
    shares = {u: json.loads((o / "corpus_manifest.json").read_text())["context_shares"]
              for u, o in (("file", out), ("docstring", tmp_path / "d"))}  # fmt: skip
    assert shares["file"]["256"] > shares["docstring"]["256"]

    # Python sources: one document per module (its docstrings in order), or one per docstring.
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text(f'"""{_prose(1)}"""\n\n\ndef f():\n    """{_prose(2)}"""\n')
    (package / "b.py").write_text(f'"""{_prose(3)}"""\n')
    build_corpus = load_tool("build_corpus")
    roots = [("pkg", package)]
    by_file = list(build_corpus._python_documents("file", roots))
    assert [(o, _numbers(t)) for o, t in by_file] == [("python/pkg", [1, 2]), ("python/pkg", [3])]
    by_docstring = list(build_corpus._python_documents("docstring", roots))
    assert [_numbers(t) for _o, t in by_docstring] == [[1], [2], [3]]


def test_build_corpus_refuses_bad_inputs(tmp_path: Path) -> None:
    tree = tmp_path / "share"
    (tree / "doc").mkdir(parents=True)
    proc = _build(tmp_path / "o", tree, "--sources", "wiki")
    assert proc.returncode == 2 and "--sources wiki: choose from python,debian" in proc.stderr
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    proc = _build(taken, tree)
    assert proc.returncode == 2 and "holds no corpus_manifest.json" in proc.stderr
    assert "Traceback" not in proc.stderr and [p.name for p in taken.iterdir()] == ["notes.txt"]
    proc = _build(tmp_path / "empty", tree, "--min-megabytes", "1")
    assert proc.returncode == 1 and "bytes of English prose found" in proc.stderr


def _repro(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "repro" / "run_repro.py"), "--out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


TOY = flags(
    {
        "model.num_layers": "2",
        "model.hidden_size": "32",
        "model.ffn_hidden_size": "64",
        "model.num_attention_heads": "4",
        "model.num_query_groups": "2",
        "model.kv_channels": "16",
        "model.block_count": "2",
        "data.seq_length": "64",
        "train.train_iters": "2",
        "train.micro_batch_size": "2",
        "train.global_batch_size": "2",
        **CPU_FP32,
        "optim.warmup_iters": "1",
        "eval.iters": "1",
        "data.num_workers": "0",
    }
)


def test_repro_recipe_end_to_end_on_cpu(
    built: tuple[Path, Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    """The user's path at toy size: corpus, two modes trained concurrently, evaluated, compared."""
    tree, first_build, _ = built
    roots = _roots(tree)
    proc = _repro(
        tmp_path / "r",
        "--modes",
        "full,ssa",
        "--seeds",
        "7",
        "--device",
        "cpu",
        "--corpus-args",
        f"--sources debian --debian-roots {roots} --vocab-size 300 --min-megabytes 0.01 "
        "--valid-fraction 0.2 --workers 1",
        "--eval-args",
        "--block-counts 1,2,4 --passkey-lengths 160 --passkey-trials 1 --extrapolation-factors 1 "
        "--max-windows 1",
        *TOY,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The same tree gives the same bytes, built in another process into another directory.
    assert _digest(tmp_path / "r" / "data") == _digest(first_build)
    out = tmp_path / "r" / "S" / "compare"
    table = json.loads((out / "comparison.json").read_text())
    assert [r["label"] for r in table["runs"]] == ["full/seed7 @ 2", "ssa/seed7 @ 2"]
    assert all(r["ppl_sparse"] > 1 and r["ppl_full"] > 1 and len(r["sweep"]) == 3 for r in table["runs"])
    assert all(r["passkey_sparse"] is not None for r in table["runs"])
    # The table names the text it was measured on.
    copied = json.loads((out / "corpus_manifest.json").read_text())
    assert copied["sha256"] == _digest(first_build) and copied["params"]["document_unit"] == "file"
    md = (out / "comparison.md").read_text()
    assert "| ssa/seed7 @ 2 |" in md
    for name in ("budget_sweep.png", "layer_sparsity.png", "layer_entropy.png", "passkey.png"):
        assert (out / name).stat().st_size > 5000, name
    # The runs differ only in attention_mode: their saved configs say so.
    configs = {}
    for mode in ("full", "ssa"):
        ckpt = tmp_path / "r" / "S" / "seed7" / mode
        text = (ckpt / (ckpt / "latest").read_text().strip() / "config.yaml").read_text()
        configs[mode] = [ln for ln in text.splitlines() if "attention_mode" not in ln and str(ckpt) not in ln]
    assert configs["full"] == configs["ssa"]
    # Run again: nothing is retrained (every run is at train_iters).
    again = _repro(tmp_path / "r", "--modes", "full,ssa", "--seeds", "7", "--stages", "train", *TOY)
    assert again.returncode == 0 and again.stdout.count("already at iteration 2") == 2, again.stdout[-2000:]


def test_repro_refuses_bad_inputs(tmp_path: Path) -> None:
    proc = _repro(tmp_path / "r", "--modes", "full,dense")
    assert proc.returncode == 2 and "choose modes from full,sparse,ssa" in proc.stderr
    proc = _repro(tmp_path / "r", "--seeds", "one")
    assert proc.returncode == 2 and "--seeds 'one'" in proc.stderr
    proc = _repro(tmp_path / "r", "--stages", "train", "--model.num_layers", "0")
    assert proc.returncode == 2 and "num_layers" in proc.stderr and "Traceback" not in proc.stderr
    proc = _repro(tmp_path / "r", "--stages", "train")
    assert proc.returncode == 2 and "holds no train/ split" in proc.stderr
    assert not (tmp_path / "r" / "S").exists()
