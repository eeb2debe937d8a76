"""lm-evaluation-harness on an exported model: the real `lm_eval` CLI and `evaluate.py --lm-eval-tasks`,
offline, on local tasks (a multiple_choice and a generate_until task over JSONL written here); the scores
are checked against the model's own log-likelihoods and greedy generations in the requested mode."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ssa_megatron.convert.export import save_hf_directory
from ssa_megatron.convert.presets import tiny_config
from ssa_megatron.hf.modeling_ssa import SSAForCausalLM
from tests.hf_export_helpers import MODEL_VOCAB, train_tokenizer

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["red", "blue", "green", "cat", "dog", "bird", "runs", "sits", "flies", "the", "a", "big", "small"]
MAX_GEN = 6


def _tasks(root: Path) -> Path:
    """Two local tasks: contexts of 10-25 words, longer than block_size x block_count tokens, so the
    attention mode changes the scores."""
    rng = random.Random(0)
    tasks = root / "tasks"
    tasks.mkdir()

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    mc = []
    for label in (0, 1, 2, 0):
        mc.append({"context": words(10, 25), "choices": [words(3, 3) for _ in "abc"], "label": label})
    gen = [{"question": words(10, 25), "answer": rng.choice(WORDS)} for _ in range(2)]
    (tasks / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (tasks / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (tasks / "ssa_tiny_mc.yaml").write_text(
        "task: ssa_tiny_mc\n" + common.format(path=tasks / "mc.jsonl")
        + 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )  # fmt: skip
    (tasks / "ssa_tiny_gen.yaml").write_text(
        "task: ssa_tiny_gen\n" + common.format(path=tasks / "gen.jsonl")
        + 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        f'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )  # fmt: skip
    return tasks


def _offline_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(root / "hf_home"),
        HF_DATASETS_CACHE=str(root / "datasets"), TOKENIZERS_PARALLELISM="false",
    )  # fmt: skip
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]  # a transformers overlay must reach the child too
    return env


def _exported(root: Path) -> tuple[SSAForCausalLM, Path]:
    torch.manual_seed(0)
    model = SSAForCausalLM(tiny_config(vocab_size=MODEL_VOCAB, max_position_embeddings=256)).eval()
    tok = train_tokenizer(root)
    out = save_hf_directory(model, root / "export", tokenizer_path=tok, include_kernels=False)
    return model, out


def _loglikelihood(model: SSAForCausalLM, tok, context: str, continuation: str, mode: str) -> float:
    """What the harness computes: the continuation's summed log-probability given the context, the pair
    tokenized as a whole and the context's tokens split off."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1], use_cache=False, attention_mode=mode).logits.float(), -1)
    return float(logp[0, n_ctx - 1 :].gather(-1, ids[0, n_ctx:, None]).sum())


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One export and its tasks; the `lm_eval` CLI and evaluate.py on them, started together (each
    process mostly one core), each in a directory and HF cache of its own."""
    root = tmp_path_factory.mktemp("lmeval")
    model, export = _exported(root)
    tasks = _tasks(root)
    model_args = f"pretrained={export},trust_remote_code=True,attention_mode=full"
    cli = Path(sys.executable).with_name("lm_eval")
    commands = {
        "lm_eval": [str(cli), "--model", "hf", "--model_args", model_args,
                    "--tasks", "ssa_tiny_mc,ssa_tiny_gen", "--include_path", str(tasks), "--device", "cpu",
                    "--batch_size", "1", "--output_path", str(root / "lm_eval" / "out"), "--log_samples"],
        "evaluate": [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--checkpoint", str(export),
                     "--out", str(root / "evaluate" / "eval"), "--lm-eval-tasks", "ssa_tiny_mc",
                     "--lm-eval-include", str(tasks), "--lm-eval-modes", "sparse", "--device", "cpu"],
    }  # fmt: skip
    procs = {}
    for name, cmd in commands.items():
        cwd = root / name
        cwd.mkdir()
        with open(cwd / "stdout", "w") as out, open(cwd / "stderr", "w") as err:
            procs[name] = subprocess.Popen(cmd, cwd=cwd, env=_offline_env(cwd), stdout=out, stderr=err)
    yield {"model": model, "export": export, "tasks": tasks, "root": root, "procs": procs}
    for proc in procs.values():
        proc.kill()
        proc.wait()


def _finished(runs: dict, name: str) -> subprocess.CompletedProcess:
    """The run `name` of the fixture, waited for; its output as text."""
    proc, cwd = runs["procs"][name], runs["root"] / name
    proc.wait(timeout=600)
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, (cwd / "stdout").read_text(), (cwd / "stderr").read_text()
    )


def test_lm_eval_cli_scores_an_exported_model_in_the_requested_mode(runs: dict) -> None:
    from transformers import AutoTokenizer

    model, export = runs["model"], runs["export"]
    proc = _finished(runs, "lm_eval")
    assert proc.returncode == 0, proc.stderr[-4000:]
    tok = AutoTokenizer.from_pretrained(export)
    differs = False
    for sample in _samples(runs["root"] / "lm_eval" / "out", "ssa_tiny_mc"):
        doc = sample["doc"]
        for choice, resp in zip(doc["choices"], sample["resps"]):
            got = float(resp[0][0])
            want = _loglikelihood(model, tok, doc["context"], " " + choice, "full")
            assert got == pytest.approx(want, rel=1e-4, abs=1e-3), (doc, choice)
            differs |= abs(_loglikelihood(model, tok, doc["context"], " " + choice, "sparse") - got) > 1e-2
        scores = [float(r[0][0]) for r in sample["resps"]]
        assert sample["acc"] == float(scores.index(max(scores)) == doc["label"])
    assert differs, "attention_mode=full did not reach the model: its scores equal sparse mode's"
    for sample in _samples(runs["root"] / "lm_eval" / "out", "ssa_tiny_gen"):
        ids = tok(sample["doc"]["question"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=MAX_GEN, do_sample=False, attention_mode="full")
        text = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
        assert sample["resps"][0][0] == text


def test_evaluate_cli_runs_lm_eval_tasks_on_an_export(runs: dict) -> None:
    from transformers import AutoTokenizer

    model, export, tasks = runs["model"], runs["export"], runs["tasks"]
    proc = _finished(runs, "evaluate")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((runs["root"] / "evaluate" / "eval" / "lm_eval.json").read_text())
    assert list(results) == ["sparse"]
    tok = AutoTokenizer.from_pretrained(export)
    docs = [json.loads(line) for line in (tasks / "mc.jsonl").read_text().splitlines()]
    hits = []
    for doc in docs:
        scores = [_loglikelihood(model, tok, doc["context"], " " + c, "sparse") for c in doc["choices"]]
        hits.append(float(scores.index(max(scores)) == doc["label"]))
    assert results["sparse"]["ssa_tiny_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    assert "sparse ssa_tiny_mc: acc,none" in proc.stdout
