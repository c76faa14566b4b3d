"""The CORE benchmark harness (DCLM's CORE: 22 in-context-learning tasks, centred accuracy).

A task bundle is a directory (the layout of DCLM's / nanochat's `eval_bundle`):

    core.yaml            icl_tasks: a list of {label, dataset_uri, num_fewshot: [k], icl_task_type,
                         continuation_delimiter}; icl_task_type is one of the three kinds below
    eval_data/*.jsonl    one example per line, at dataset_uri
    eval_meta_data.csv   columns "Eval Task" (= label) and "Random baseline" (accuracy of guessing, in %)

Three kinds of task, all scored by the model's own token losses (no sampling):
- multiple_choice {"query", "choices": [...], "gold"}: query + delimiter + each choice; the choice whose
  tokens (after the part all options share) have the lowest mean loss is the answer.
- schema {"context_options": [...], "continuation", "gold"}: each context + delimiter + the one continuation;
  the context under which the continuation's tokens have the lowest mean loss is the answer.
- language_modeling {"context", "continuation"}: right only if greedy (argmax) prediction reproduces every
  token of the continuation.
Each prompt starts with BOS and `num_fewshot` solved examples drawn from the same task (never the example
itself), separated by blank lines. Task accuracy a becomes centred accuracy (a - b) / (1 - b) with b the
random baseline, so guessing scores 0 and perfection 1; CORE is the mean centred accuracy over tasks.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
FEWSHOT_SEED = 1234        # few-shot examples for example i are drawn with Random(FEWSHOT_SEED + i)
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


@dataclass(frozen=True)
class Task:
    label: str
    task_type: str
    dataset_uri: str
    num_fewshot: int
    delimiter: str
    random_baseline: float   # in [0, 1)


# ----------------------------------------------------------------------------- bundle

def load_bundle(bundle_dir: Path) -> list[tuple[Task, list[dict]]]:
    """The tasks of core.yaml with their examples. Errors name the file and what was expected."""
    import yaml

    bundle_dir = Path(bundle_dir)
    config_path, meta_path = bundle_dir / "core.yaml", bundle_dir / "eval_meta_data.csv"
    for p in (config_path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: not a CORE task bundle")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    with meta_path.open(newline="", encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in csv.DictReader(f)}
    tasks = []
    for n, entry in enumerate(config.get("icl_tasks") or []):
        where = f"{config_path}: icl_tasks[{n}]"
        try:
            label, task_type = entry["label"], entry["icl_task_type"]
            fewshot = entry.get("num_fewshot", [0])
            fewshot = int(fewshot[0] if isinstance(fewshot, list) else fewshot)
            task = Task(label, task_type, entry["dataset_uri"], fewshot, entry.get("continuation_delimiter", " "),
                        baselines[label])
        except KeyError as e:
            raise ValueError(f"{where}: missing {e} (or no row for it in {meta_path.name})") from e
        if task_type not in TASK_TYPES:
            raise ValueError(f"{where}: icl_task_type {task_type!r}, expected one of {TASK_TYPES}")
        data_path = bundle_dir / "eval_data" / task.dataset_uri
        items = []
        for lineno, line in enumerate(data_path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{data_path}:{lineno}: not JSON ({e})") from e
        tasks.append((task, items))
    if not tasks:
        raise ValueError(f"{config_path}: no icl_tasks")
    return tasks


def ensure_eval_bundle(base_dir: Path, url: str = EVAL_BUNDLE_URL) -> Path:
    """base_dir/eval_bundle, downloaded and unpacked on first use (atomically: a partial one never counts)."""
    import requests

    target = Path(base_dir) / "eval_bundle"
    if (target / "core.yaml").is_file():
        return target
    Path(base_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base_dir) as tmp:
        archive = Path(tmp) / "eval_bundle.zip"
        print(f"downloading the CORE task bundle from {url}")
        with requests.get(url, stream=True, timeout=60) as r:
            r.raise_for_status()
            with archive.open("wb") as f:
                for chunk in r.iter_content(1 << 16):
                    f.write(chunk)
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(Path(tmp) / "unpacked")
        except zipfile.BadZipFile as e:
            raise ValueError(f"{url}: not a zip archive ({e})") from e
        found = next((p.parent for p in (Path(tmp) / "unpacked").rglob("core.yaml")), None)
        if found is None:
            raise ValueError(f"{url}: the archive holds no core.yaml")
        shutil.move(str(found), str(target))
    return target


# ----------------------------------------------------------------------------- prompts

def fewshot_examples(items: list[dict], index: int, k: int) -> list[dict]:
    if k == 0:
        return []
    others = [i for i in range(len(items)) if i != index]
    picks = random.Random(FEWSHOT_SEED + index).sample(others, min(k, len(others)))
    return [items[i] for i in picks]


def render_prompts(task: Task, items: list[dict], index: int) -> list[str]:
    """The full texts to score for example `index`: one per option (one in all for language modelling)."""
    item, d = items[index], task.delimiter
    shots = fewshot_examples(items, index, task.num_fewshot)
    if task.task_type == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [f"{head}{ctx}{d}{item['continuation']}" for ctx in item["context_options"]]
    head = "".join(f"{s['context']}{d}{s['continuation']}\n\n" for s in shots)
    return [f"{head}{item['context']}{d}{item['continuation']}", f"{head}{item['context']}"]


def common_prefix_len(seqs: list[list[int]]) -> int:
    n = min(map(len, seqs))
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def common_suffix_len(seqs: list[list[int]]) -> int:
    return common_prefix_len([s[::-1] for s in seqs])


def scoring_spans(task_type: str, token_lists: list[list[int]]) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """The sequences to run and, per sequence, the [start, end) token span whose prediction is scored."""
    if task_type == "multiple_choice":
        p = common_prefix_len(token_lists) if len(token_lists) > 1 else len(token_lists[0]) - 1
        p = min(p, min(map(len, token_lists)) - 1)   # options that are prefixes of others still score a token
        return token_lists, [(p, len(s)) for s in token_lists]
    if task_type == "schema":
        q = common_suffix_len(token_lists)
        q = min(q, min(map(len, token_lists)) - 1)
        return token_lists, [(len(s) - q, len(s)) for s in token_lists]
    full, context = token_lists
    start = common_prefix_len([full, context])
    return [full], [(start, len(full))]


def crop_left(seqs: list[list[int]], spans: list[tuple[int, int]], max_len: int | None):
    """Keep the last max_len tokens of each sequence (the scored part is at the end), moving the spans."""
    if max_len is None:
        return seqs, spans
    out_seqs, out_spans = [], []
    for s, (a, b) in zip(seqs, spans, strict=True):
        cut = max(0, len(s) - max_len)
        out_seqs.append(s[cut:])
        out_spans.append((max(a - cut, 1), b - cut))
    return out_seqs, out_spans


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def evaluate_example(model, tokenizer, task: Task, items: list[dict], index: int, device="cpu",
                     max_seq_len: int | None = None) -> bool:
    """Is the model right on example `index`? (model(idx) -> logits [B, T, V])"""
    prompts = render_prompts(task, items, index)
    token_lists = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    seqs, spans = scoring_spans(task.task_type, token_lists)
    seqs, spans = crop_left(seqs, spans, max_seq_len)
    width = max(map(len, seqs))
    pad = tokenizer.get_bos_token_id()
    idx = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)
    logits = model(idx).float()
    # the token at position t is predicted by the logits at t-1
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), idx[:, 1:], reduction="none")   # [n, width-1]
    if task.task_type == "language_modeling":
        a, b = spans[0]
        predicted = logits[0, a - 1:b - 1].argmax(-1)
        return bool(predicted.eq(idx[0, a:b]).all())
    mean_losses = [losses[i, a - 1:b - 1].mean().item() for i, (a, b) in enumerate(spans)]
    choice = min(range(len(mean_losses)), key=mean_losses.__getitem__)
    return choice == items[index]["gold"]


def evaluate_task(model, tokenizer, task: Task, items: list[dict], device="cpu", max_items: int | None = None,
                  max_seq_len: int | None = None) -> float:
    """Accuracy on the task (examples split across ranks under torch.distributed)."""
    n = len(items) if max_items is None else min(max_items, len(items))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(rank, n, world):
        correct[0] += evaluate_example(model, tokenizer, task, items, i, device, max_seq_len)
        correct[1] += 1
    if world > 1:
        dist.all_reduce(correct)
    return (correct[0] / correct[1]).item()


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    return (accuracy - random_baseline) / (1.0 - random_baseline)


def evaluate_core(model, tokenizer, bundle_dir: Path, device="cpu", max_per_task: int | None = None,
                  max_seq_len: int | None = None, log=print) -> dict:
    """{"core": mean centred accuracy, "tasks": {label: {"accuracy", "centered", "examples"}}}."""
    results = {}
    for task, items in load_bundle(bundle_dir):
        acc = evaluate_task(model, tokenizer, task, items, device, max_per_task, max_seq_len)
        n = len(items) if max_per_task is None else min(max_per_task, len(items))
        results[task.label] = {"accuracy": acc, "centered": centered_accuracy(acc, task.random_baseline),
                               "examples": n}
        if log:
            log(f"{task.label:40s} {task.task_type:18s} {n:5d} ex  acc {acc:.4f}  "
                f"centred {results[task.label]['centered']:+.4f}")
    core = sum(r["centered"] for r in results.values()) / len(results)
    return {"core": core, "tasks": results}
