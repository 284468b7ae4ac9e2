"""Train the projector of ``tiny-llava`` (DINOv2-S -> MLP -> SmolLM2-135M-Instruct) on CPU.

Only the projector learns; the encoder and the LLM stay frozen. The encoder's features are
computed once (float16 in RAM, cached on disk), then every step projects them, scatters them into
the text embeddings of a multi-turn conversation about the image (several questions per image,
so the 256 image tokens are paid once for all of them), runs the frozen LLM under bf16 autocast
and takes the cross-entropy on the answer tokens only. At the end the projector is saved as
float32 safetensors, reloaded into the stock ``LlavaForConditionalGeneration`` (float32), and
scored on held-out scenes by greedy generation, the way the benchmark queries it.

The committed projector was trained in four stages, first two on 2 shared CPU cores (1406 s +
897 s):

    .venv/bin/python scripts/train_tiny_llava.py --out /tmp/stage1.safetensors
    .venv/bin/python scripts/train_tiny_llava.py --init /tmp/stage1.safetensors --steps 90 \
        --lr 3e-3

then continued twice from the saved weights with 2 threads on an otherwise idle machine, for
120 steps (599 s) and then 360 steps (1782 s, 5.0 s per step; loss per answer token 0.79 ->
0.52):

    .venv/bin/python scripts/train_tiny_llava.py --init <stage 2 file> --steps 120 --lr 5e-3 \
        --threads 2 --out <stage 3 file>
    .venv/bin/python scripts/train_tiny_llava.py --init <stage 3 file> --steps 360 --lr 6e-3 \
        --threads 2 --eval-scenes 40

In all 720 steps, about 78 CPU minutes (the issue asked for about 40). Held-out accuracy (158
questions on 40 scenes): colour 37.1% (chance 16.7%), shape 54.3% (25%), count 55.0% (20%),
position 55.0% (50%), class 7.1% (10%). Colour, shape and count are 2.2-2.75x chance; relative
position and the clothing class are not learnt, so the benchmark's figures for those two types
measure agreement with the unreduced model only. ``--init`` continues from these weights.

Update ``PROJECTOR_SHA256`` in ``src/tokenmerge/eval/zoo/vlm.py`` with the printed sha256.

``tiny-llava-video``'s projector continued from the committed image projector on 100 synthetic
training clips of 8 frames (2048 visual tokens each, one clip and all its questions per step),
80 steps with 2 threads, the machine shared with a test run for most of it (2944 s; 21-43 s
per step; loss per answer token 2.96 -> 0.83):

    .venv/bin/python scripts/train_tiny_llava.py --init <committed image projector> \
        --clips 100 --frames 8 --steps 80 --lr 3e-3 --threads 2 --eval-scenes 0 \
        --eval-clips 10 --out src/tokenmerge/eval/zoo/assets/tiny_llava_video_projector.safetensors

Held-out (31 questions on 10 clips): change 50% (chance 33%), start colour 37.5% (16.7%),
end colour 37.5% (16.7%), motion 1 of 2, appeared 1 of 3 (chance 33%). Update
``VIDEO_PROJECTOR_SHA256`` with the printed sha256.
"""

from __future__ import annotations

import argparse
import collections
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tokenmerge.eval.vlm.prompt import encode
from tokenmerge.eval.vlm.scenes import KINDS, Scene, chance, make_scenes, questions
from tokenmerge.eval.zoo.sources import sha256_file
from tokenmerge.eval.zoo.vlm import (
    PROJECTOR_FILE,
    VISION_FEATURE_LAYER,
    build_tiny_llava,
    forward_from_features,
    image_features,
    load_projector,
)


def log(start: float, msg: str) -> None:
    print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)


@torch.no_grad()
def encode_images(model, inputs, scenes: list[Scene], cache: Path) -> torch.Tensor:
    """Frozen encoder features ``[N, 256, 384]`` in float16 of the model's feature layer.
    Both candidate layers (-1, -2) are computed in one pass and cached in `cache`."""
    if not cache.is_file():
        out: dict[int, list[torch.Tensor]] = {-1: [], -2: []}
        for i in range(0, len(scenes), 16):
            pixels = inputs.preprocess([s.image for s in scenes[i : i + 16]])
            hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
            for layer, chunks in out.items():
                chunks.append(hidden[layer][:, 1:].half())
        torch.save({k: torch.cat(v) for k, v in out.items()}, cache)
    return torch.load(cache)[model.config.vision_feature_layer]


@torch.no_grad()
def encode_clips(model, inputs, clips: list, cache: Path) -> torch.Tensor:
    """Frozen encoder features of every frame, ``[N, F * 256, 384]`` float16 (a clip's frames
    back to back, as the benchmark gives them), cached in `cache`."""
    if not cache.is_file():
        layer = model.config.vision_feature_layer
        rows = []
        for c in clips:
            pixels = inputs.preprocess(list(c.frames))
            hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
            rows.append(hidden[layer][:, 1:].half().reshape(1, -1, hidden[layer].shape[-1]))
        torch.save(torch.cat(rows), cache)
    return torch.load(cache)


@torch.no_grad()
def check_forward(model, inputs, scene: Scene) -> float:
    """Max |logit difference| between the training forward and the stock Llava forward."""
    b = inputs.batch([scene.image], [scene.qas[0].question])
    stock = model(**b).logits
    feats = image_features(model, b["pixel_values"])
    ours = forward_from_features(model, b["input_ids"], b["attention_mask"], feats)
    return (stock - ours).abs().max().item()


def make_batch(tokenizer, scenes: list, rng: np.random.Generator, n_image: int = 256):
    """Right-padded conversations, each asking all of its scene's (or clip's) questions in
    random order; ``n_image`` placeholders open each (a clip: 256 per frame)."""
    rows = []
    for s in scenes:
        qas = [s.qas[i] for i in rng.permutation(len(s.qas))]
        rows.append(encode(tokenizer, [(q.question, q.answer) for q in qas], n_image))
    # Lengths rounded up to 64: few distinct shapes, so oneDNN's bf16 kernels are set up once.
    width = -(-max(len(ids) for ids, _ in rows) // 64) * 64
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)
    for i, (row, mask) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        target[i, : len(row)] = torch.tensor(mask)
    return ids, attention, target


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def evaluate_clips(model, inputs, clips: list, batch: int = 4) -> dict[str, tuple[int, int]]:
    """(correct, total) per clip question type, greedy, as the video benchmark asks."""
    asked = [(c, q) for c in clips for q in c.qas]
    score: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for i in range(0, len(asked), batch):
        chunk = asked[i : i + batch]
        b = inputs.clips([c.frames for c, _ in chunk], [q.question for _, q in chunk])
        out = model.generate(**b, max_new_tokens=4, do_sample=False)
        for (_, q), got in zip(chunk, inputs.answers(out, b), strict=True):
            score[q.kind][0] += got == q.answer
            score[q.kind][1] += 1
    return {k: (v[0], v[1]) for k, v in score.items()}


@torch.no_grad()
def evaluate(model, inputs, scenes: list[Scene], batch: int = 16) -> dict[str, tuple[int, int]]:
    """(correct, total) per question type: greedy generation, first word of the reply."""
    asked = questions(scenes, seed=0)
    score: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for i in range(0, len(asked), batch):
        chunk = asked[i : i + batch]
        b = inputs.batch([scenes[j].image for j, _ in chunk], [q.question for _, q in chunk])
        out = model.generate(**b, max_new_tokens=4, do_sample=False)
        for (_, q), got in zip(chunk, inputs.answers(out, b), strict=True):
            score[q.kind][0] += got == q.answer
            score[q.kind][1] += 1
    return {k: (score[k][0], score[k][1]) for k in KINDS if k in score}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=4, help="images per step")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--train-scenes", type=int, default=1200)
    p.add_argument("--eval-scenes", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layer", type=int, default=VISION_FEATURE_LAYER, help="vision feature layer")
    p.add_argument("--no-bf16", action="store_true", help="run the LLM in float32")
    p.add_argument("--cache", type=Path, default=Path("/tmp/tiny_llava_features.pt"))
    p.add_argument("--out", type=Path, default=PROJECTOR_FILE)
    p.add_argument("--init", type=Path, help="start from this projector file (continue training)")
    p.add_argument(
        "--clips", type=int, default=0, help="train on this many synthetic clips (0: images)"
    )
    p.add_argument("--frames", type=int, default=8, help="frames per training clip")
    p.add_argument("--clip-batch", type=int, default=1, help="clips per step")
    p.add_argument(
        "--image-every", type=int, default=0, help="with --clips: every Kth step is images"
    )
    p.add_argument("--eval-clips", type=int, default=0, help="held-out clips to score")
    args = p.parse_args()

    start = time.time()
    # One thread by default: on 2 shared cores another busy process makes 2 threads spin at
    # their barriers (measured 4x slower per step), while 1 thread degrades gracefully.
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed if args.init is None else [args.seed, 1])
    # the projector starts from a seeded random init
    model, inputs = build_tiny_llava(None, vision_feature_layer=args.layer)
    tok = inputs.tokenizer
    log(start, f"model built; vision_feature_layer={args.layer}")

    scenes = make_scenes(args.train_scenes, "train", seed=args.seed)
    diff = check_forward(model, inputs, scenes[0])
    log(start, f"training forward vs stock Llava forward: max |logit diff| {diff:.2e}")
    cache = args.cache.with_name(f"{args.cache.stem}_{args.train_scenes}_{args.seed}.pt")
    feats = encode_images(model, inputs, scenes, cache)
    log(start, f"features {tuple(feats.shape)} for {len(scenes)} scenes")

    # DINOv2's pre-layernorm features carry a large offset shared by all tokens (|mean| up to 8.6
    # per dimension) and per-dimension spreads from 0.2 to 7.6: train on standardised features
    # and fold the standardisation into linear_1 afterwards (exact; the stock class has no norm).
    clips, clip_feats = [], None
    if args.clips:
        from tokenmerge.eval.vlm.clips import make_clip

        clips = [make_clip(i, "train", args.seed, args.frames) for i in range(args.clips)]
        name = f"{args.cache.stem}_clips_{args.clips}_{args.frames}_{args.seed}.pt"
        clip_feats = encode_clips(model, inputs, clips, args.cache.with_name(name))
        log(start, f"clip features {tuple(clip_feats.shape)} for {len(clips)} clips")
    sample = feats[:300].float().reshape(-1, feats.shape[-1])
    mean, std = sample.mean(0), sample.std(0)
    projector = model.model.multi_modal_projector
    if args.init is not None:  # continue from a saved (folded) projector: unfold it
        projector.load_state_dict(load_projector(args.init, sha256=None))
        with torch.no_grad():
            projector.linear_1.bias += projector.linear_1.weight @ mean
            projector.linear_1.weight *= std
    projector.train().requires_grad_(True)  # everything else stays frozen, in eval mode
    opt = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    order: list[int] = []
    losses: list[float] = []
    clip_order: list[int] = []
    for step in range(args.steps):
        on_clips = bool(clips) and not (args.image_every and step % args.image_every == 0)
        if on_clips:
            if len(clip_order) < args.clip_batch:
                clip_order += [int(i) for i in rng.permutation(len(clips))]
            idx, clip_order = clip_order[: args.clip_batch], clip_order[args.clip_batch :]
            n_image = 256 * args.frames
            ids, attention, target = make_batch(tok, [clips[i] for i in idx], rng, n_image)
            source = clip_feats
        else:
            if len(order) < args.batch:
                order += [int(i) for i in rng.permutation(len(scenes))]
            idx, order = order[: args.batch], order[args.batch :]
            ids, attention, target = make_batch(tok, [scenes[i] for i in idx], rng)
            source = feats
        # Position t predicts token t+1: the logits are needed where the next token is an answer.
        positions = torch.zeros_like(target)
        positions[:, :-1] = target[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            x = (source[idx].float() - mean) / std
            logits = forward_from_features(model, ids, attention, x, positions)
        loss = F.cross_entropy(logits.float(), ids[:, 1:][target[:, 1:]])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(projector.parameters(), 5.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 19 or step == args.steps - 1:
            log(
                start,
                f"step {step + 1}/{args.steps} loss {np.mean(losses[-20:]):.4f} "
                f"grad norm {norm:.2f}",
            )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    with torch.no_grad():  # W (x - mean) / std + b  ==  (W / std) x + (b - (W / std) mean)
        projector.linear_1.weight /= std
        projector.linear_1.bias -= projector.linear_1.weight @ mean
    # float32: the folded bias cancels a large offset, so keep its precision.
    weights = {k: v.detach().float().contiguous() for k, v in projector.state_dict().items()}
    save_file(
        weights,
        str(args.out),
        metadata={
            "recipe": " ".join(
                f"{k}={v}" for k, v in sorted(vars(args).items()) if k not in ("cache", "out")
            )
        },
    )
    log(start, f"wrote {args.out} sha256 {sha256_file(args.out)}")

    # Score what was saved in the stock float32 model, as the zoo loads it.
    projector.load_state_dict(load_projector(args.out, sha256=None))
    model.eval().requires_grad_(False)
    if args.eval_clips:
        from tokenmerge.eval.vlm.clips import chance as clip_chance
        from tokenmerge.eval.vlm.clips import make_clip

        held_clips = [make_clip(i, "test", args.seed, args.frames) for i in range(args.eval_clips)]
        base = clip_chance()
        for kind, (ok, n) in evaluate_clips(model, inputs, held_clips).items():
            print(f"{kind:12s} {ok / n:6.1%} of {n:3d}  (chance {base[kind]:.1%})")
        log(start, f"held-out: {len(held_clips)} clips of {args.frames} frames")
    if not args.eval_scenes:
        return
    held = make_scenes(args.eval_scenes, "test", seed=args.seed)
    result = evaluate(model, inputs, held)
    base = chance()
    for kind, (ok, n) in result.items():
        print(f"{kind:9s} {ok / n:6.1%} of {n:3d}  (chance {base[kind]:.1%})")
    total = sum(n for _, n in result.values())
    log(start, f"held-out: {total} questions on {len(held)} scenes; done")


if __name__ == "__main__":
    main()
