"""tiny-llava: the synthetic scenes, the prompt, and the zoo VLM built on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenmerge.eval.vlm import scenes as sc
from tokenmerge.eval.vlm.prompt import IMAGE_TOKEN, N_IMAGE_TOKENS, encode, first_word

# ---------------------------------------------------------------------------------------------
# Scenes (no model)
# ---------------------------------------------------------------------------------------------


def test_scenes_are_deterministic_and_splits_differ() -> None:
    a, b = sc.make_scene(7, "train"), sc.make_scene(7, "train")
    assert a.qas == b.qas and a.shapes == b.shapes
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.image.size == (224, 224) and a.image.mode == "RGB"
    other = sc.make_scene(7, "test")
    assert not np.array_equal(np.asarray(a.image), np.asarray(other.image))
    assert sc.make_scene(7, "train", seed=1).shapes != a.shapes
    with pytest.raises(ValueError, match="split"):
        sc.make_scene(0, "val")


def test_held_out_backgrounds_are_other_textiles() -> None:
    train = {im.tobytes()[:4096] for im in sc._textiles("train")}
    test = {im.tobytes()[:4096] for im in sc._textiles("test")}
    assert len(train) == 300 and len(test) == 100 and not train & test


def test_answers_agree_with_the_rendering() -> None:
    sets = sc.answer_sets()
    kinds = set()
    for scene in sc.make_scenes(40, "test"):
        pixels = np.asarray(scene.image)
        by_shape = {s.shape: s for s in scene.shapes}
        by_colour = {s.colour: s for s in scene.shapes}
        for s in scene.shapes:  # each shape is filled with its colour at its box centre
            x, y = s.centre
            assert tuple(pixels[y, x]) == sc.COLOURS[s.colour]
        for qa in scene.qas:
            kinds.add(qa.kind)
            assert qa.answer in sets[qa.kind], qa
            words = qa.question.rstrip("?").split()
            if qa.kind == "count":
                assert qa.answer == str(len(scene.shapes))
            elif qa.kind == "colour":  # "What colour is the square?"
                assert sum(s.shape == words[-1] for s in scene.shapes) == 1
                assert by_shape[words[-1]].colour == qa.answer
            elif qa.kind == "shape":  # "What shape is the red object?"
                assert sum(s.colour == words[-2] for s in scene.shapes) == 1
                assert by_colour[words[-2]].shape == qa.answer
            elif qa.kind == "position":  # "Is the circle left or right of the star?"
                (ax, ay), (bx, by) = by_shape[words[2]].centre, by_shape[words[-1]].centre
                expect = {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}
                assert expect[qa.answer] and qa.answer in words
            else:
                assert qa.answer == scene.item and scene.item_box is not None
    assert kinds == set(sc.KINDS)


def test_answer_sets_and_chance() -> None:
    sets, chance = sc.answer_sets(), sc.chance()
    assert set(sets) == set(chance) == set(sc.KINDS)
    assert sets["count"] == ("1", "2", "3", "4", "5") and len(sets["class"]) == 10
    assert chance == pytest.approx(
        {"colour": 1 / 6, "shape": 1 / 4, "count": 1 / 5, "position": 1 / 2, "class": 1 / 10}
    )
    asked = sc.questions(sc.make_scenes(12, "test"))
    assert {q.kind for _, q in asked} <= set(sc.KINDS)
    assert sum(q.kind == "count" for _, q in asked) == 12  # one question per type per scene


def test_first_word() -> None:
    assert first_word(" Red.\nThe") == "red" and first_word("t-shirt!") == "t-shirt"
    assert first_word("") == ""


# ---------------------------------------------------------------------------------------------
# The zoo model (real weights)
# ---------------------------------------------------------------------------------------------

real = pytest.mark.real


@pytest.fixture(scope="module")
def vlm():
    import tokenmerge as tm

    torch.set_num_threads(2)
    return tm.zoo.load("tiny-llava")


@real
def test_prompt_puts_256_image_tokens_first_and_marks_answers(vlm) -> None:
    tok = vlm[1].tokenizer
    ids, mask = encode(tok, [("What colour is the star?", "red"), ("How many?", "3")])
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(image_id) == N_IMAGE_TOKENS
    first = ids.index(image_id)
    assert tok.decode(ids[:first]).endswith("<|im_start|>user\n")
    answers = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(answers) == "red<|im_end|>3<|im_end|>"
    with pytest.raises(ValueError, match="last turn"):
        encode(tok, [("a?", None), ("b?", "x")])


@real
def test_zoo_model_is_a_stock_llava_with_256_image_tokens(vlm) -> None:
    from transformers import LlavaForConditionalGeneration

    from tokenmerge.eval.zoo import vlm as zvlm
    from tokenmerge.eval.zoo.sources import sha256_file

    model, inputs = vlm
    assert type(model) is LlavaForConditionalGeneration and not model.training
    assert model.config.image_token_id == inputs.image_token_id
    assert inputs.tokenizer.convert_ids_to_tokens(inputs.image_token_id) == IMAGE_TOKEN
    assert model.lm_head.weight.shape[0] == len(inputs.tokenizer)  # no rows added
    assert model.dtype == torch.float32
    assert sha256_file(zvlm.PROJECTOR_FILE) == zvlm.PROJECTOR_SHA256  # the loader checked it
    batch = inputs.batch([sc.make_scene(0, "test").image], ["How many shapes are there?"])
    assert batch["pixel_values"].shape == (1, 3, 224, 224)
    assert int((batch["input_ids"] == inputs.image_token_id).sum()) == N_IMAGE_TOKENS
    with torch.no_grad():
        feats = zvlm.image_features(model, batch["pixel_values"])
    assert feats.shape == (1, N_IMAGE_TOKENS, 384)


@real
def test_training_forward_equals_the_stock_forward(vlm) -> None:
    """What training computed (projector -> embeddings -> LM) is what Llava runs at inference."""
    from tokenmerge.eval.zoo.vlm import forward_from_features, image_features

    model, inputs = vlm
    scenes = sc.make_scenes(2, "test")
    questions = ["How many shapes are there?", "What clothing item is in the picture?"]
    batch = inputs.batch([s.image for s in scenes], questions)  # left padded: unequal lengths
    assert not bool(batch["attention_mask"].all())
    with torch.no_grad():
        stock = model(**batch).logits
        feats = image_features(model, batch["pixel_values"])
        ours = forward_from_features(model, batch["input_ids"], batch["attention_mask"], feats)
        last = batch["attention_mask"].bool() & False
        last[:, -1] = True
        at_last = forward_from_features(
            model, batch["input_ids"], batch["attention_mask"], feats, last
        )
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    # the LM head on a subset of rows rounds differently (GEMM blocking), hence the looser bound
    torch.testing.assert_close(at_last, stock[:, -1], rtol=0, atol=2e-4)


@real
def test_clips_of_frames_are_reduced_as_clips(vlm) -> None:
    """Frames given back to back are one clip to the adapter: frame_subsample keeps whole
    frames of each clip (clips of 2 and 3 frames in one batch), and budget 0 is exact."""
    import tokenmerge as tm
    from tokenmerge.adapters.hf_decoder import runtime_of
    from tokenmerge.eval.vlm.clips import make_clip

    model, inputs = vlm
    clips = [make_clip(0, "test", frames=2).frames, make_clip(1, "test", frames=3).frames]
    batch = inputs.clips(clips, ["What changed in the video?", "How many shapes appeared?"])
    image = batch["input_ids"] == inputs.image_token_id
    assert image.sum(1).tolist() == [2 * N_IMAGE_TOKENS, 3 * N_IMAGE_TOKENS]
    assert batch["pixel_values"].shape == (5, 3, 224, 224)
    with torch.no_grad():
        ref = model(**batch).logits[:, -1]
        with tm.patched(model, tm.get_method("frame_subsample", ratio=0.0)):
            assert torch.equal(model(**batch).logits[:, -1], ref)
        with tm.patched(model, tm.get_method("frame_subsample", ratio=0.5)):
            model(**batch)
            kept = runtime_of(model).last.valid.sum(1)
    text = batch["attention_mask"].sum(1) - image.sum(1)
    # 2 frames -> 1 kept; 3 frames -> round(1.5) = 2 kept, each with all of its tokens
    assert (kept - text).tolist() == [N_IMAGE_TOKENS, 2 * N_IMAGE_TOKENS]
    with pytest.raises(ValueError, match="questions"):
        inputs.clips(clips, ["one question"])


@real
def test_video_projector_answers_clip_questions_from_their_answer_sets() -> None:
    """tiny-llava-video (its projector checked against the pinned sha256) answers every type
    of clip question with a word of that type's answer set, on held-out 8-frame clips; the
    image projector answers them with shape names (what training on clips fixed)."""
    import tokenmerge as tm
    from tokenmerge.eval.vlm.clips import answer_sets, make_clip
    from tokenmerge.eval.zoo import vlm as zvlm
    from tokenmerge.eval.zoo.sources import sha256_file

    model, inputs = tm.zoo.load("tiny-llava-video")
    assert sha256_file(zvlm.VIDEO_PROJECTOR_FILE) == zvlm.VIDEO_PROJECTOR_SHA256
    sets = answer_sets()
    asked = {}
    for i in range(12):
        for q in make_clip(i, "test", frames=8).qas:
            asked.setdefault(q.kind, (make_clip(i, "test", frames=8).frames, q))
        if len(asked) == len(sets):
            break
    kinds = sorted(asked)
    batch = inputs.clips([asked[k][0] for k in kinds], [asked[k][1].question for k in kinds])
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    for kind, word in zip(kinds, inputs.answers(out, batch), strict=True):
        assert word in sets[kind], (kind, word)
