"""The CORE harness on a small task bundle built from real text, scored by hand-made models whose answers are
known: one that always prefers the right continuation (CORE 1.0) and one that always prefers a wrong one."""

from __future__ import annotations

import csv
import functools
import http.server
import json
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanochat.core_eval import (
    centered_accuracy,
    crop_left,
    ensure_eval_bundle,
    evaluate_core,
    load_bundle,
    render_prompts,
    scoring_spans,
)
from nanochat.dataloader import DataLoader
from nanochat.dataset import list_parquet_files
from nanochat.offline_corpus import kjv_documents
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from scripts.base_eval import resolve_checkpoint, run_evals

N_ITEMS = 16
TASKS = [  # label, type, few-shot, random baseline (%)
    ("kjv_multiple_choice", "multiple_choice", 3, 25.0),
    ("kjv_schema", "schema", 2, 50.0),
    ("kjv_language_modeling", "language_modeling", 1, 0.0),
]


def verse_halves() -> list[tuple[str, str]]:
    verses = [v for doc in list(kjv_documents())[:3] for v in doc.text.split("\n")[2:]]
    out = []
    for v in verses:
        words = v.split()
        if len(words) >= 10:
            out.append((" ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2:])))
    return out


def build_bundle(root: Path) -> Path:
    """A bundle in the eval_bundle layout: core.yaml, eval_data/*.jsonl, eval_meta_data.csv."""
    halves = verse_halves()
    (root / "eval_data").mkdir(parents=True)
    mc, schema, lm = [], [], []
    for i in range(N_ITEMS):
        first, second = halves[i]
        gold = i % 4
        others = [halves[(i + k) % len(halves)][1] for k in (5, 9, 13)]
        mc.append({"query": first, "choices": others[:gold] + [second] + others[gold:], "gold": gold})
        other_first = halves[(i + 7) % len(halves)][0]
        schema.append({"context_options": [first, other_first] if i % 2 == 0 else [other_first, first],
                       "continuation": second, "gold": i % 2})
        words = (first + " " + second).split()
        lm.append({"context": " ".join(words[:-3]), "continuation": " ".join(words[-3:])})
    for (label, *_), items in zip(TASKS, (mc, schema, lm), strict=True):
        (root / "eval_data" / f"{label}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    yaml_lines = ["icl_tasks:"]
    for label, kind, shots, _ in TASKS:
        yaml_lines += [f"- label: {label}", f"  dataset_uri: {label}.jsonl", f"  num_fewshot: [{shots}]",
                       f"  icl_task_type: {kind}", "  continuation_delimiter: ' '"]
    (root / "core.yaml").write_text("\n".join(yaml_lines) + "\n")
    with (root / "eval_meta_data.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline"])
        for label, kind, shots, base in TASKS:
            w.writerow([label, "test", kind, shots, N_ITEMS, base])
    return root


class TrieScorer(torch.nn.Module):
    """Knows a set of token sequences: after any prefix of one of them it puts a large logit on the tokens that
    continue it, elsewhere it predicts uniformly. model(idx) -> logits [B, T, V], the GPT call convention."""

    def __init__(self, sequences: list[list[int]], vocab: int):
        super().__init__()
        self.vocab, self.root = vocab, {}
        for seq in sequences:
            node = self.root
            for t in seq:
                node = node.setdefault(t, {})

    def forward(self, idx: torch.Tensor, targets=None, loss_reduction="mean"):
        logits = torch.zeros(*idx.shape, self.vocab)
        for b, row in enumerate(idx.tolist()):
            node = self.root
            for t, token in enumerate(row):
                node = node.get(token) if node is not None else None
                if node is None:
                    break
                for nxt in node:
                    logits[b, t, nxt] = 20.0
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, self.vocab), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)


def scorer_for(bundle: Path, tok, pick) -> TrieScorer:
    """`pick(task, item, prompts)` chooses the one prompt per example that the scorer will prefer."""
    seqs = []
    for task, items in load_bundle(bundle):
        for i, item in enumerate(items):
            seqs.append(tok.encode(pick(task, item, render_prompts(task, items, i)), prepend="<|bos|>"))
    return TrieScorer(seqs, tok.get_vocab_size())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("core") / "eval_bundle")


def test_a_model_preferring_the_right_answers_scores_one(bundle: Path, tiny_tokenizer: Path) -> None:
    tok = get_tokenizer(tiny_tokenizer)

    def right(task, item, prompts):
        return prompts[0] if task.task_type == "language_modeling" else prompts[item["gold"]]

    scorer = scorer_for(bundle, tok, right)
    result = evaluate_core(scorer, tok, bundle, log=None)
    assert result["core"] == 1.0
    assert {k: v["accuracy"] for k, v in result["tasks"].items()} == {label: 1.0 for label, *_ in TASKS}
    assert all(v["examples"] == N_ITEMS for v in result["tasks"].values())
    lines = []
    few = evaluate_core(scorer, tok, bundle, max_per_task=4, log=lines.append)
    assert all(v["examples"] == 4 for v in few["tasks"].values()) and few["core"] == 1.0
    assert len(lines) == 3 and "kjv_schema" in lines[1]


def test_a_model_preferring_wrong_answers_scores_below_chance(bundle: Path, tiny_tokenizer: Path) -> None:
    tok = get_tokenizer(tiny_tokenizer)

    def wrong(task, item, prompts):
        if task.task_type == "language_modeling":
            return prompts[1] + " and the LORD said"           # a continuation that is not the right one
        return prompts[(item["gold"] + 1) % len(prompts)]

    result = evaluate_core(scorer_for(bundle, tok, wrong), tok, bundle, log=None)
    accs = {k: v["accuracy"] for k, v in result["tasks"].items()}
    assert accs == {label: 0.0 for label, *_ in TASKS}
    # centred: guessing is 0, so always-wrong is -b/(1-b): -1/3 for 4 choices, -1 for 2, 0 for exact match
    assert result["core"] == pytest.approx((-1 / 3 - 1 + 0) / 3)


def test_prompts_fewshot_and_spans(bundle: Path, tiny_tokenizer: Path) -> None:
    tok = get_tokenizer(tiny_tokenizer)
    tasks = dict((t.label, (t, items)) for t, items in load_bundle(bundle))
    task, items = tasks["kjv_multiple_choice"]
    prompts = render_prompts(task, items, 3)
    assert len(prompts) == 4 and all(p.count("\n\n") == 3 for p in prompts)   # 3 solved examples first
    assert all(p.endswith(f"{items[3]['query']} {c}") for p, c in zip(prompts, items[3]["choices"], strict=True))
    assert items[3]["query"] not in prompts[0].split("\n\n")[0]              # never its own example
    assert render_prompts(task, items, 3) == prompts                          # deterministic
    seqs, spans = scoring_spans("multiple_choice", tok.encode(prompts, prepend="<|bos|>"))
    for s, (a, b), choice in zip(seqs, spans, items[3]["choices"], strict=True):
        assert b == len(s) and choice.split()[-1] in tok.decode(s[a:b])
        assert all(s[:a] == seqs[0][:a] for s in seqs)
    seqs, spans = scoring_spans("schema", [[1, 5, 6, 9, 9], [1, 7, 9, 9]])
    assert spans == [(3, 5), (2, 4)]
    seqs, spans = scoring_spans("language_modeling", [[1, 2, 3, 4, 5], [1, 2, 3]])
    assert seqs == [[1, 2, 3, 4, 5]] and spans == [(3, 5)]
    assert crop_left([[1, 2, 3, 4, 5, 6]], [(4, 6)], 4) == ([[3, 4, 5, 6]], [(2, 4)])
    assert centered_accuracy(0.25, 0.25) == 0.0 and centered_accuracy(1.0, 0.5) == 1.0


def test_bundle_errors_name_the_file(tmp_path: Path, bundle: Path) -> None:
    with pytest.raises(FileNotFoundError, match="core.yaml is missing"):
        load_bundle(tmp_path)
    broken = tmp_path / "b"
    broken.mkdir()
    for name in ("core.yaml", "eval_meta_data.csv"):
        (broken / name).write_text((bundle / name).read_text())
    (broken / "eval_data").mkdir()
    for f in (bundle / "eval_data").iterdir():
        (broken / "eval_data" / f.name).write_text(f.read_text())
    (broken / "eval_data" / "kjv_schema.jsonl").write_text('{"context_options": [\n')
    with pytest.raises(ValueError, match=r"kjv_schema.jsonl:1: not JSON"):
        load_bundle(broken)
    (broken / "core.yaml").write_text("icl_tasks:\n- label: kjv_schema\n  dataset_uri: x.jsonl\n  icl_task_type: poll\n")
    with pytest.raises(ValueError, match=r"icl_tasks\[0\]: icl_task_type 'poll'"):
        load_bundle(broken)


def test_bundle_is_downloaded_once_over_http(bundle: Path, tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "eval_bundle.zip", "w") as z:
        for f in bundle.rglob("*"):
            z.write(f, Path("eval_bundle") / f.relative_to(bundle))
    (served / "junk.zip").write_bytes(b"not a zip")
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            hits.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        base = tmp_path / "base"
        got = ensure_eval_bundle(base, f"{url}/eval_bundle.zip")
        assert got == base / "eval_bundle" and [t.label for t, _ in load_bundle(got)] == [t[0] for t in TASKS]
        assert ensure_eval_bundle(base, f"{url}/eval_bundle.zip") == got and len(hits) == 1   # cached
        with pytest.raises(ValueError, match="junk.zip: not a zip archive"):
            ensure_eval_bundle(tmp_path / "other", f"{url}/junk.zip")
        assert not (tmp_path / "other" / "eval_bundle").exists()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_base_eval_runs_core_and_bpb(bundle: Path, tiny_tokenizer: Path, text_shards: Path) -> None:
    tok, token_bytes = get_tokenizer(tiny_tokenizer), get_token_bytes(tiny_tokenizer)
    val_files = list_parquet_files(text_shards)[-1:]

    def right(task, item, prompts):
        return prompts[0] if task.task_type == "language_modeling" else prompts[item["gold"]]

    results = run_evals(scorer_for(bundle, tok, right), tok, token_bytes, ["core"], bundle_dir=bundle, seq_len=1024)
    assert results["core"] == 1.0 and set(results["core_tasks"]) == {label for label, *_ in TASKS}
    assert "val_bpb" not in results
    # a scorer that knows no sequence is uniform: ln V nats for every counted target of the first 4 batches
    results = run_evals(TrieScorer([], tok.get_vocab_size()), tok, token_bytes, ["bpb"], val_files=val_files,
                        seq_len=64, batch_size=2, bpb_tokens=4 * 2 * 64)
    targets = torch.cat([y.flatten() for _, (_, y) in zip(range(4), DataLoader(tok, 2, 64, files=val_files), strict=False)])
    expected = 12 * int((token_bytes[targets] > 0).sum()) / int(token_bytes[targets].sum())   # log2(4096) = 12
    assert results["val_bpb"] == pytest.approx(expected) and "core" not in results


def test_checkpoint_argument_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    run = tmp_path / "base_checkpoints" / "baseline"
    run.mkdir(parents=True)
    (run / "final_model.safetensors").write_bytes(b"")
    assert resolve_checkpoint(str(run / "final_model.pt")) == run / "final_model.safetensors"
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("final_model.pt") == run / "final_model.safetensors"   # the seed's command
    with pytest.raises(FileNotFoundError, match="checkpoints are safetensors, not .pt"):
        resolve_checkpoint("other_model.pt")


def test_base_eval_command_on_a_saved_model(bundle: Path, tiny_tokenizer: Path, text_shards: Path,
                                            tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from nanochat import checkpoint
    from nanochat.core_eval import evaluate_core
    from nanochat.gpt import GPT, config_from_depth
    from nanochat.loss_eval import evaluate_bpb
    from scripts import base_eval

    tok = get_tokenizer(tiny_tokenizer)
    torch.manual_seed(0)
    config = config_from_depth(2, vocab_size=tok.get_vocab_size(), sequence_len=64)
    model = GPT(config)
    model.init_weights()
    path = checkpoint.save_model(tmp_path / "final_model.safetensors", model.state_dict(), config.to_dict())
    common = ["--tokenizer", str(tiny_tokenizer), "--data-dir", str(text_shards), "--bundle", str(bundle),
              "--device", "cpu"]
    out = tmp_path / "results.json"
    assert base_eval.main(["--checkpoint", str(tmp_path / "final_model.pt"), *common, "--max-per-task", "3",
                           "--bpb-tokens", "512", "--batch-size", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["checkpoint"] == str(path)
    # the numbers are those of the saved model, evaluated directly
    model.eval()
    val = DataLoader(tok, 2, 64, files=list_parquet_files(text_shards)[-1:])
    assert results["val_bpb"] == pytest.approx(evaluate_bpb(model, val, 4, get_token_bytes(tiny_tokenizer)), rel=1e-5)
    direct = evaluate_core(model, tok, bundle, max_per_task=3, max_seq_len=64, log=None)
    assert results["core"] == pytest.approx(direct["core"])
    assert "CORE" in capsys.readouterr().out
    # a tokenizer that does not fit the model is refused, by name
    other = GPT(config_from_depth(2, vocab_size=1024, sequence_len=64))
    other.init_weights()
    checkpoint.save_model(tmp_path / "other.safetensors", other.state_dict(),
                          config_from_depth(2, vocab_size=1024, sequence_len=64).to_dict())
    assert base_eval.main(["--checkpoint", str(tmp_path / "other.safetensors"), *common]) == 2
    assert "has a 1024-token vocabulary, the tokenizer" in capsys.readouterr().err
