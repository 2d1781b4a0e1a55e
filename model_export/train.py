"""Training: truncated BPTT over a token stream, state carried across batches.

Writes into the run directory: `best.pt` (state_dict of the best validation
perplexity), `config.json`, `vocab.txt`, `last.pt` (everything needed to resume),
`history.json` and `curve.png`.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model_export.corpora import load_splits, text_tokens
from model_export.evaluate import evaluate_stream, fresh_start_accuracy, torch_stepper
from model_export.model import RNNLM, ModelConfig
from model_export.train_config import TrainConfig
from service.contract.tokenizer import SPECIALS
from service.contract.vocab import Vocabulary


def build_vocab(tokens: list[str], max_size: int, min_count: int) -> Vocabulary:
    """Most frequent tokens (count >= min_count) after the specials, ties broken by token."""
    counts = Counter(tokens)
    for special in SPECIALS:
        counts.pop(special, None)
    ranked = sorted((t for t, n in counts.items() if n >= min_count), key=lambda t: (-counts[t], t))
    return Vocabulary(list(SPECIALS) + ranked[: max_size - len(SPECIALS)])


def batchify(ids: list[int], batch_size: int) -> torch.Tensor:
    """Cut a stream into `batch_size` parallel rows: (B, N)."""
    n = len(ids) // batch_size
    return torch.tensor(ids[: n * batch_size], dtype=torch.long).view(batch_size, n)


def detach(state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(s.detach() for s in state)


@torch.inference_mode()
def stream_loss(model: RNNLM, data: torch.Tensor, bptt: int) -> float:
    """Mean cross-entropy per token over a batchified stream."""
    model.eval()
    state = model.init_state(data.size(0))
    total, count = 0.0, 0
    for i in range(0, data.size(1) - 1, bptt):
        x, y = data[:, i : i + bptt], data[:, i + 1 : i + 1 + bptt]
        x = x[:, : y.size(1)]
        logits, state = model(x, state)
        total += nn.functional.cross_entropy(
            logits.flatten(0, 1), y.flatten(), reduction="sum"
        ).item()
        count += y.numel()
    return total / max(count, 1)


def with_fresh_rows(
    model: RNNLM,
    ids: torch.Tensor,
    sentence_starts: torch.Tensor,
    cfg: TrainConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    state: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The batch with `cfg.fresh_rows` more rows, each a window of the training stream that
    starts at a random `</s>` from a zero state: what the service meets at the start of
    every text, which carried-state training otherwise shows the model once an epoch.
    Rows (B + F, T); the state (L, B + F, H), fresh rows last."""
    picks = sentence_starts[torch.randint(len(sentence_starts), (cfg.fresh_rows,))]
    offsets = picks[:, None] + torch.arange(cfg.bptt + 1)  # (F, T + 1)
    windows = ids[offsets]
    zero = model.init_state(cfg.fresh_rows)
    return (
        torch.cat([x, windows[:, :-1]]),
        torch.cat([y, windows[:, 1:]]),
        tuple(torch.cat([s, z], dim=1) for s, z in zip(state, zero)),
    )


def held_out_accuracy(model: RNNLM, vocab: Vocabulary, tokens: list[str]) -> dict[str, float]:
    """Next-word top-k and perplexity of `tokens` through the serving graph, and top-3 of
    sentence openings from a fresh state, exactly as `nextword evaluate --checkpoint`
    measures a held-out text. Leaves the model in eval mode."""
    step, zero = torch_stepper(model, vocab)
    result = evaluate_stream(step, zero, vocab, tokens, desc="held-out text")
    result.update(fresh_start_accuracy(step, zero, vocab, tokens))
    return result


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )


def save_best(out: Path, model: RNNLM) -> None:
    """best.pt: a plain state_dict (never a pickled module); config.json and vocab.txt sit beside it."""
    torch.save(model.state_dict(), out / "best.pt.tmp")
    (out / "best.pt.tmp").replace(out / "best.pt")


def plot_history(history: list[dict], path: Path) -> None:
    """Training and validation loss/perplexity against tokens seen."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    train = [h for h in history if h["kind"] == "train"]
    valid = [h for h in history if h["kind"] == "valid"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((ax1, "loss", "loss (nats/token)"), (ax2, "ppl", "perplexity")):
        ax.plot([h["tokens"] for h in train], [h[key] for h in train], label="train", alpha=0.7)
        ax.plot([h["tokens"] for h in valid], [h[key] for h in valid], "o-", label="validation")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(label)
        ax.legend()
    ax2.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) a model; returns the best validation metrics."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    print("train config:", json.dumps(asdict(cfg), indent=2))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    streams = load_splits(cfg.corpora, cfg.nltk_data)
    if len(streams["valid"]) < 20 * 16:
        # Too few documents for a split by document (a single small file): hold out
        # the tail of the training stream instead, so validation is never empty.
        cut = len(streams["train"]) * 19 // 20
        streams["valid"] = streams["train"][cut:]
        streams["train"] = streams["train"][:cut]
        print(
            f"validation split too small; holding out the last {len(streams['valid'])} training tokens"
        )
    vocab = build_vocab(streams["train"], cfg.vocab_size, cfg.min_count)
    eval_tokens = text_tokens(Path(cfg.eval_text)) if cfg.eval_text else []
    if cfg.eval_text_tokens:
        eval_tokens = eval_tokens[: cfg.eval_text_tokens + 1]
    vocab.save(out / "vocab.txt")
    train_ids = torch.tensor(vocab.encode_tokens(streams["train"]), dtype=torch.long)
    train_data = batchify(train_ids.tolist(), cfg.batch_size)
    # Where a sentence starts (the token after each `</s>`, with room for a window): the
    # fresh rows' windows begin at the `</s>` itself, as the service begins every text.
    sentence_starts = (train_ids[: -cfg.bptt - 1] == vocab.eos_id).nonzero().flatten()
    valid_data = batchify(vocab.encode_tokens(streams["valid"]), 16)
    mcfg = ModelConfig(
        len(vocab), cfg.cell, cfg.embedding_size, cfg.hidden_size, cfg.layers, cfg.dropout
    )
    (out / "config.json").write_text(
        json.dumps({"model": mcfg.to_dict(), "train": asdict(cfg)}, indent=2)
    )

    model = RNNLM(mcfg)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1 or "embedding" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    steps_per_epoch = (train_data.size(1) - 1 + cfg.bptt - 1) // cfg.bptt
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    print(
        f"{sum(p.numel() for p in model.parameters()):,} parameters; vocabulary {len(vocab):,}; "
        f"{train_data.numel():,} training tokens; {steps_per_epoch} steps/epoch; {total_steps} steps"
    )

    step, best_val, history = 0, float("inf"), []
    state = model.init_state(cfg.batch_size)
    last = out / "last.pt"
    if last.exists():
        ckpt = torch.load(last, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best_val, history = ckpt["step"], ckpt["best_val"], ckpt["history"]
        state = tuple(ckpt["state"])
        torch.set_rng_state(ckpt["torch_rng"])
        print(f"resumed from {last} at step {step}")

    def checkpoint() -> None:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "best_val": best_val,
                "history": history,
                "state": state,
                "torch_rng": torch.get_rng_state(),
            },
            out / "last.pt.tmp",
        )
        (out / "last.pt.tmp").replace(last)
        (out / "history.json").write_text(json.dumps(history, indent=1))

    def validate() -> None:
        nonlocal best_val
        val = stream_loss(model, valid_data, cfg.bptt)
        entry = {
            "kind": "valid",
            "step": step,
            "tokens": step * cfg.batch_size * cfg.bptt,
            "loss": val,
            "ppl": math.exp(val),
        }
        message = f"step {step}: validation loss {val:.4f}, perplexity {math.exp(val):.2f}"
        if eval_tokens:
            text = held_out_accuracy(model, vocab, eval_tokens)
            entry["text"] = text
            message += (
                f"; {Path(cfg.eval_text or '').name} top-3 {text['top3']:.4f}, "
                f"from a fresh state at a sentence start {text['fresh_start_top3']:.4f}"
            )
        history.append(entry)
        tqdm.write(message)
        if val < best_val:
            best_val = val
            save_best(out, model)
        plot_history(history, out / "curve.png")
        model.train()

    log_every = max(1, min(50, total_steps // 20))
    model.train()
    bar = tqdm(
        total=total_steps, initial=step, desc=f"train {cfg.cell}", unit="step", dynamic_ncols=True
    )
    running, t0 = None, time.time()
    try:
        while step < total_steps:
            i = (step % steps_per_epoch) * cfg.bptt
            if i == 0 and step > 0:
                state = model.init_state(cfg.batch_size)
            x, y = train_data[:, i : i + cfg.bptt], train_data[:, i + 1 : i + 1 + cfg.bptt]
            x = x[:, : y.size(1)]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, cfg)
            if cfg.fresh_rows and len(sentence_starts) and x.size(1) == cfg.bptt:
                x, y, run_state = with_fresh_rows(
                    model, train_ids, sentence_starts, cfg, x, y, detach(state)
                )
                logits, new_state = model(x, run_state)
                state = tuple(s[:, : cfg.batch_size] for s in new_state)  # carried rows only
            else:
                logits, state = model(x, detach(state))
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            state = detach(state)
            step += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(
                refresh=False,
                loss=f"{running:.3f}",
                ppl=f"{math.exp(running):.1f}",
                tok_s=f"{(bar.n - bar.initial) * x.numel() / (time.time() - t0):.0f}",
            )
            if step % log_every == 0:
                history.append(
                    {
                        "kind": "train",
                        "step": step,
                        "tokens": step * cfg.batch_size * cfg.bptt,
                        "loss": running,
                        "ppl": math.exp(running),
                    }
                )
            end_of_epoch = step % steps_per_epoch == 0
            if (
                end_of_epoch
                or (cfg.eval_interval and step % cfg.eval_interval == 0)
                or step == total_steps
            ):
                validate()
            if step % cfg.checkpoint_interval == 0 or step == total_steps:
                checkpoint()
    finally:
        bar.close()
    if not (out / "best.pt").exists():
        validate()
        checkpoint()
    result = {"valid_loss": best_val, "valid_ppl": math.exp(best_val), "steps": step}
    print(json.dumps(result))
    return result
