"""A real ``PreTrainedTokenizerFast`` built offline (tokenizers library) from the task words.

Word-level: every word of the tasks and of the attack's target response is one token.
Special tokens sit at the ids of :mod:`pcr_fast.testing.vocab` (the tiny models' one
vocabulary), so a tiny model of any family reads this tokenizer's ids directly.
"""
from __future__ import annotations

from typing import Iterable

from ..testing.vocab import FIRST_WORD_ID, SPECIAL_TOKENS, VOCAB_SIZE


def build_tokenizer(words: Iterable[str]):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` plus the special tokens.

    Raises ValueError if a word contains whitespace or if there are too many words for the
    fixed vocabulary of the tiny models (``VOCAB_SIZE``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    uniq = sorted({w for w in words})
    for w in uniq:
        if not w or any(ch.isspace() for ch in w) or w in SPECIAL_TOKENS:
            raise ValueError(f"words must be non-empty, whitespace-free, non-special tokens; got {w!r}")
    free = [i for i in range(FIRST_WORD_ID, VOCAB_SIZE) if i not in SPECIAL_TOKENS.values()]
    if len(uniq) > len(free):
        raise ValueError(f"words: at most {len(free)} distinct words fit the vocabulary, got {len(uniq)}")
    vocab = dict(SPECIAL_TOKENS)
    vocab.update({w: i for w, i in zip(uniq, free)})
    # fill unused ids so the vocab is dense (the model's embedding has VOCAB_SIZE rows)
    used = set(vocab.values())
    for i in range(VOCAB_SIZE):
        if i not in used:
            vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>", "<vision_start>", "<vision_end>",
                                                           "<boi>", "<eoi>"]})
    return fast
