"""The one vocabulary of the tiny models: special-token ids shared by every tiny model
builder (:mod:`pcr_fast.testing.tiny`) and the evaluation harness's word tokenizer
(:mod:`pcr_fast.eval.tokenizer`), so a model built here reads that tokenizer's ids directly.
"""
from __future__ import annotations

VOCAB_SIZE = 128

SPECIAL_TOKENS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<nl>": 3, "<image>": 120, "<vision_start>": 121,
                  "<vision_end>": 122, "<boi>": 123, "<eoi>": 124, "<video>": 125, "<unk>": 126}

PAD_ID, BOS_ID, EOS_ID, NEWLINE_ID = 0, 1, 2, 3
IMAGE_ID, VISION_START_ID, VISION_END_ID, BOI_ID, EOI_ID, VIDEO_ID, UNK_ID = 120, 121, 122, 123, 124, 125, 126

#: ids from here up (below the special block) are free for words
FIRST_WORD_ID = 4
#: the tiny models' random text is drawn from [TEXT_LOW, TEXT_HIGH)
TEXT_LOW, TEXT_HIGH = 4, 96
