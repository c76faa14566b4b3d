"""A Flower app that moves a d20-sized state through Flower's message path and back (for bench/sync.py).

ServerApp: waits for `sites` SuperNodes, builds the state, times from turning it into an ArrayRecord to
having every reply back as torch tensors (verified equal), and writes seconds and its own peak RSS as JSON
to `result`. ClientApp: sends the arrays straight back (no torch: the cheapest a ClientApp can be), with its
peak RSS. bf16 travels as int16 views (ArrayRecord has no bf16).
"""

from __future__ import annotations

import json
import time

from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

VOCAB, WIDTH = 65536, 1280  # nanochat d20: untied 65,536-token embedding and head, width 1280


def param_count(layers: int) -> int:
    """Parameters of d20_like_state(layers): 560,988,160 at 20 layers."""
    return 2 * VOCAB * WIDTH + layers * 12 * WIDTH * WIDTH


def d20_like_state(layers: int, dtype_name: str = "float32") -> dict:
    """Tensors with the shapes of nanochat d20 (560,988,160 parameters at 20 layers), small random values."""
    import torch

    dtype = getattr(torch, dtype_name)
    state = {"transformer.wte.weight": torch.empty(VOCAB, WIDTH, dtype=dtype)}
    for i in range(layers):
        for name in ("c_q", "c_k", "c_v", "c_proj"):
            state[f"transformer.h.{i}.attn.{name}.weight"] = torch.empty(WIDTH, WIDTH, dtype=dtype)
        state[f"transformer.h.{i}.mlp.c_fc.weight"] = torch.empty(4 * WIDTH, WIDTH, dtype=dtype)
        state[f"transformer.h.{i}.mlp.c_proj.weight"] = torch.empty(WIDTH, 4 * WIDTH, dtype=dtype)
    state["lm_head.weight"] = torch.empty(VOCAB, WIDTH, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    for tensor in state.values():
        tensor.uniform_(-0.02, 0.02, generator=generator)
    return state


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    import torch
    from flwr.app import ArrayRecord

    cfg = context.run_config
    sites, deadline = int(cfg["sites"]), time.monotonic() + float(cfg["timeout"])
    nodes: list[int] = []
    while len(nodes) < sites:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(nodes)} of {sites} SuperNodes connected")
        time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
    state = d20_like_state(int(cfg["layers"]), str(cfg["dtype"]))
    bf16 = state[next(iter(state))].dtype == torch.bfloat16
    start = time.perf_counter()
    record = ArrayRecord({k: (v.view(torch.int16) if bf16 else v) for k, v in state.items()})
    messages = [Message(RecordDict({"arrays": record}), dst_node_id=node, message_type=MessageType.TRAIN)
                for node in nodes[:sites]]
    del record
    replies = list(grid.send_and_receive(messages, timeout=float(cfg["timeout"])))
    received = []
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id}: {reply.error}")
        back = reply.content["arrays"].to_torch_state_dict()
        received.append({k: (v.view(torch.bfloat16) if bf16 else v) for k, v in back.items()})
    seconds = time.perf_counter() - start
    assert all(torch.equal(got[k], state[k]) for got in received for k in state), "state changed on the way"
    clientapp_rss = [int(r.content["rss"]["peak_rss"]) for r in replies]
    with open(str(cfg["result"]), "w") as out:
        json.dump({"seconds": seconds, "serverapp_peak_rss": peak_rss_bytes(), "clientapp_peak_rss": clientapp_rss,
                   "sites": len(replies)}, out)


@client.train()
def echo(msg: Message, context: Context) -> Message:
    content = RecordDict({"arrays": msg.content["arrays"], "rss": MetricRecord({"peak_rss": peak_rss_bytes()})})
    return Message(content, reply_to=msg)
