"""pcr_fast.data: dataset files → checked samples → processor batches.

Every bad input names its file and row (line for JSONL, index for a JSON array); labels cover
every answer and nothing else, in both text formats (the LLaVA-1.5 format and a chat
template); the processor loads without its video half when only that part cannot load."""
import json
import os

import numpy as np
import pytest
import torch

from _tiny_dirs import QUESTION, TARGET, tiny_processor
from pcr_fast.data import (ConversationCollator, ConversationDataset, DataError, load_processor, load_samples)


def png(path, value=80, size=32):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def llava_row(i, image="img/a.png", answer="zero", question=f"<image>\n{QUESTION}"):
    return {"id": f"r{i}", "image": image, "conversations": [{"from": "human", "value": question},
                                                             {"from": "gpt", "value": answer}]}


def messages_row(i, images=("img/a.png",), answer="zero", content=None):
    content = content if content is not None else [{"type": "image"}, {"type": "text", "text": QUESTION}]
    return {"id": f"m{i}", "images": list(images), "messages": [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


@pytest.fixture
def folder(tmp_path):
    png(str(tmp_path / "img" / "a.png"))
    png(str(tmp_path / "img" / "b.png"), value=200)
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return tmp_path


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- formats
def test_both_formats_load_to_the_same_samples(folder):
    a = load_samples(write_json(folder / "d.json", [llava_row(0), llava_row(1, image="img/b.png", answer="one")]))
    b = load_samples(write_jsonl(folder / "d.jsonl", [messages_row(0), messages_row(1, images=["img/b.png"],
                                                                                   answer="one")]))
    assert a.formats == ("llava",) and b.formats == ("messages",)
    for x, y in zip(a.samples, b.samples):
        assert x.messages == y.messages and x.images == y.images and x.answers == y.answers
    assert [s.source for s in a.samples] == ["d.json[0]", "d.json[1]"]
    assert [s.source for s in b.samples] == ["d.jsonl:1", "d.jsonl:2"]
    assert a.samples[1].images[0] == str(folder / "img" / "b.png")
    assert a.samples[0].messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": QUESTION}]


def test_image_root_and_default_ids(folder, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("elsewhere")
    row = llava_row(0)
    del row["id"]
    path = write_json(data_dir / "d.json", [row])
    with pytest.raises(DataError, match=r"d\.json\[0\]: image not found"):
        load_samples(path)                                  # relative to the data file's folder
    data = load_samples(path, image_root=str(folder))
    assert data.samples[0].id == "0" and os.path.isfile(data.samples[0].images[0])


BAD_ROWS = [
    (lambda: llava_row(0, image="img/missing.png"), "image not found"),
    (lambda: llava_row(0, image="img/broken.png"), "unreadable image"),
    (lambda: llava_row(0, question=QUESTION), "no image placeholder"),
    (lambda: llava_row(0, question="<image>\n<image>\nboth?"), r"2 image placeholder\(s\) .* for 1 image"),
    (lambda: llava_row(0, answer="   "), "empty answer"),
    (lambda: {"id": "x", "image": "img/a.png", "conversations": [{"from": "human", "value": "<image>\nq"}]},
     "no answer"),
    (lambda: {"id": "x", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
     "no image"),
    (lambda: {"id": "x", "image": "img/a.png", "conversations": [{"from": "robot", "value": "q"}]}, "turn 1 must be"),
    (lambda: ["not", "an", "object"], "expected a JSON object"),
    (lambda: {"text": "hello"}, "expected a LLaVA row"),
    (lambda: messages_row(0, content=[{"type": "text", "text": QUESTION}]), "no image placeholder"),
    (lambda: messages_row(0, answer=""), "empty answer"),
    (lambda: messages_row(0, content=[{"type": "video"}]), "content items must be"),
]


@pytest.mark.parametrize("make, reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_every_bad_row_names_file_and_index(folder, make, reason):
    rows = [llava_row(0), make(), llava_row(2)]
    with pytest.raises(DataError, match=rf"d\.json\[1\]: .*{reason}"):
        load_samples(write_json(folder / "d.json", rows))
    data = load_samples(str(folder / "d.json"), skip_bad_rows=True)
    assert [s.id for s in data.samples] == ["r0", "r2"] and [s.index for s in data.samples] == [0, 1]
    assert len(data.skipped) == 1 and data.skipped[0].source == "d.json[1]"


def test_malformed_jsonl_lines_are_named_by_line_and_can_be_skipped(folder):
    path = write_jsonl(folder / "d.jsonl", [messages_row(0), '{"messages": [', messages_row(2), "", "[1, 2"])
    with pytest.raises(DataError) as err:
        load_samples(path)
    text = str(err.value)
    assert "2 bad row(s)" in text and "d.jsonl:2: malformed JSON line" in text and "d.jsonl:5: malformed" in text
    assert "--skip-bad-rows" in text
    data = load_samples(path, skip_bad_rows=True)
    assert [s.source for s in data.samples] == ["d.jsonl:1", "d.jsonl:3"]
    assert [b.source for b in data.skipped] == ["d.jsonl:2", "d.jsonl:5"]


def test_file_level_errors(folder):
    with pytest.raises(DataError, match=r"d\.json:1:\d+: malformed JSON"):
        load_samples(str((folder / "d.json").write_text("[{") and folder / "d.json"))
    with pytest.raises(DataError, match="the file is empty"):
        load_samples(str((folder / "e.json").write_text("  \n") and folder / "e.json"))
    with pytest.raises(DataError, match="no such data file"):
        load_samples(str(folder / "nothing.json"))
    with pytest.raises(DataError, match=r"no usable rows \(1 bad\)"):
        load_samples(write_json(folder / "f.json", [llava_row(0, image="img/missing.png")]), skip_bad_rows=True)


# ----------------------------------------------------------------------------- collator
def labelled_text(collator, batch, row):
    ids = batch["labels"][row]
    return collator.tokenizer.decode(ids[ids != -100].tolist())


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_labels_cover_every_answer_and_nothing_else(folder, family):
    two_turns = llava_row(1, image="img/b.png", answer="one")
    two_turns["conversations"] += [{"from": "human", "value": "and the answer is ?"}, {"from": "gpt", "value": TARGET}]
    data = load_samples(write_json(folder / "d.json", [llava_row(0), two_turns]))
    collator = ConversationCollator(tiny_processor(family))
    assert collator.template == ("chat" if family == "qwen2_vl" else "llava")
    batch = collator(data.samples)
    assert batch["sample_ids"].tolist() == [0, 1]
    end = "<|im_end|>" if family == "qwen2_vl" else "</s>"
    assert labelled_text(collator, batch, 0).split() == ["zero", end]
    assert labelled_text(collator, batch, 1).split() == ["one", end] + TARGET.split() + [end]
    # padding and prompt never carry labels; the image tokens are in the prompt
    assert bool((batch["labels"][batch["attention_mask"] == 0] == -100).all())
    image_id = collator.processor.image_token_id if family == "qwen2_vl" else 120
    assert bool((batch["labels"][batch["input_ids"] == image_id] == -100).all())
    assert (batch["input_ids"] == image_id).sum() > 0
    # the answer tokens a report uses are the labelled ones
    ids = collator.answer_token_ids(data.samples[1])
    assert [collator.tokenizer.decode(a).split() for a in ids] == [["one", end], TARGET.split() + [end]]
    # the spans are remembered: a second batch gives the same labels
    assert torch.equal(collator(data.samples)["labels"], batch["labels"])


def test_empty_batch_and_nan_pixels_are_clear_errors(folder):
    data = load_samples(write_json(folder / "d.json", [llava_row(0)]))
    collator = ConversationCollator(tiny_processor("llava"))
    with pytest.raises(DataError, match="empty batch"):
        collator([])
    broken = tiny_processor("llava")
    broken.image_processor.image_std = [0.0, 0.0, 0.0]     # division by zero → inf
    with pytest.raises(DataError, match=r"NaN or inf in 'pixel_values' .*d\.json\[0\].*image_std"):
        ConversationCollator(broken)(data.samples)


def test_an_image_that_breaks_after_loading_is_named(folder):
    data = load_samples(write_json(folder / "d.json", [llava_row(0, image="img/b.png")]))
    (folder / "img" / "b.png").write_bytes(b"gone")
    with pytest.raises(DataError, match=r"d\.json\[0\]: cannot decode image 'img/b.png'"):
        ConversationCollator(tiny_processor("llava"))(data.samples)


def test_dataset_checks_its_samples(folder):
    data = load_samples(write_json(folder / "d.json", [llava_row(0), llava_row(1)]))
    assert len(ConversationDataset(data.samples)) == 2
    with pytest.raises(ValueError, match="index == position"):
        ConversationDataset(data.samples[1:])


def test_processor_loads_without_its_video_processor(tmp_path):
    """transformers 5.x builds Qwen2-VL's video processor (torchvision) even for images."""
    tiny_processor("qwen2_vl").save_pretrained(str(tmp_path))
    processor = load_processor(str(tmp_path))
    assert type(processor).__name__ == "Qwen2VLProcessor" and processor.chat_template
    assert processor.image_token == "<|image_pad|>"
    with pytest.raises(ValueError, match="cannot load its processor"):
        load_processor(str(tmp_path / "nothing"))
