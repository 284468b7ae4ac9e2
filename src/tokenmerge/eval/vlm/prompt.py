"""The chat prompt of ``tiny-llava``: image tokens at the start of the first user turn, then the
question and an instruction to answer in one word; the answer is the assistant turn.

`encode` builds one (multi-turn) conversation as token ids and marks the answer tokens, which
training uses; `TinyLlavaInputs` builds left-padded batches for generation and reads the answers
back, which the benchmark uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["IMAGE_TOKEN", "INSTRUCTION", "N_IMAGE_TOKENS", "TinyLlavaInputs", "encode"]

# A special token of SmolLM2's tokenizer that chat text never contains (it marked empty Jupyter
# outputs in pretraining), reused as the image placeholder so the embedding table keeps its size.
IMAGE_TOKEN = "<empty_output>"
N_IMAGE_TOKENS = 256  # DINOv2-S at 224 px: a 16x16 patch grid (CLS dropped)
INSTRUCTION = "Answer with one word."


def encode(
    tokenizer: Any,
    turns: Sequence[tuple[str, str | None]],
    n_image_tokens: int = N_IMAGE_TOKENS,
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation about one image, and which positions are answer tokens.

    `turns`: ``(question, answer)`` pairs; the image tokens open the first user turn. A last
    answer of None leaves the conversation open at the assistant turn (for generation). The
    answer mask covers each answer and its closing ``<|im_end|>`` (what training predicts).
    """
    messages: list[dict[str, str]] = []
    for k, (question, answer) in enumerate(turns):
        image = f"{IMAGE_TOKEN}\n" if k == 0 else ""
        messages.append({"role": "user", "content": f"{image}{question} {INSTRUCTION}"})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        elif k != len(turns) - 1:
            raise ValueError("only the last turn may lack an answer")
    open_turn = turns[-1][1] is None
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)
    # Character spans of the answers (with their <|im_end|>), found after each assistant header.
    head, end = "<|im_start|>assistant\n", "<|im_end|>"
    spans, pos = [], 0
    for _ in range(len(turns) - open_turn):
        start = text.index(head, pos) + len(head)
        pos = text.index(end, start) + len(end)
        spans.append((start, pos))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids: list[int] = []
    mask: list[bool] = []
    for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        n = n_image_tokens if tid == image_id else 1
        ids += [tid] * n
        mask += [any(s <= a and b <= e for s, e in spans) and b > a] * n
    if ids.count(image_id) != n_image_tokens:
        raise ValueError(f"the prompt must hold the image placeholder once, got {text!r}")
    return ids, mask


@dataclass
class TinyLlavaInputs:
    """What ``tiny-llava`` needs besides the model: the tokenizer and the image preprocessing.

    >>> batch = inputs.batch(images, ["What colour is the square?"] * len(images))
    >>> out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    >>> inputs.answers(out, batch)
    """

    tokenizer: Any
    preprocess: Callable[[Sequence[Any]], torch.Tensor]  # images -> [B, 3, 224, 224]
    n_image_tokens: int = N_IMAGE_TOKENS

    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))

    def batch(self, images: Sequence[Any], questions: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (left padding, for batched generation) and
        ``pixel_values`` for one question per image."""
        return self.clips([[im] for im in images], questions)

    def clips(
        self, clips: Sequence[Sequence[Any]], questions: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """The same for one question per video clip: a clip's frames are images given back to
        back (``len(frames) x 256`` placeholders with nothing between them), which the VLM
        adapter reduces as one clip; ``pixel_values`` holds every frame, clip after clip."""
        if len(clips) != len(questions):
            raise ValueError(f"{len(clips)} images or clips but {len(questions)} questions")
        if any(len(c) == 0 for c in clips):
            raise ValueError("every clip needs at least one frame")
        rows = [
            encode(self.tokenizer, [(q, None)], self.n_image_tokens * len(c))[0]
            for c, q in zip(clips, questions, strict=True)
        ]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            attention[i, width - len(row) :] = 1
        return {
            "input_ids": ids,
            "attention_mask": attention,
            "pixel_values": self.preprocess([f for c in clips for f in c]),
        }

    def answers(self, generated: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[str]:
        """The first word of each generated reply, lower-cased, punctuation stripped."""
        new = generated[:, batch["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [first_word(t) for t in texts]


def first_word(text: str) -> str:
    """``" Red."`` -> ``"red"``: how a reply is compared with the one-word answer."""
    words = text.strip().split()
    return words[0].strip(".,;:!?\"'").lower() if words else ""
