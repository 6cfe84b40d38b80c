"""What ``pcr-fast train`` and ``pcr-fast scan`` share: checks of ``--out``, ``--model`` and
``--data`` (each a usage error naming the flag, before anything heavy is loaded) and model
loading."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from .options import writable_dir

logger = logging.getLogger(__name__)

LORA_TARGETS = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj)"   # the LM only, never the lm_head
_WRITE_CHECK = ".pcr_fast_write_check"


def existing_dir(path: str) -> str:
    """A flag type: a folder that exists."""
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"no such folder: {path!r}")
    return path


def existing_file(path: str) -> str:
    """A flag type: a file that exists."""
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"no such file: {path!r}")
    return path


def prepare_out(parser: argparse.ArgumentParser, path: str, *, overwrite: bool, resume: bool = False,
                resumable: bool = False) -> str:
    """Create ``--out``, check that it is writable, and refuse a non-empty one unless the user
    said ``--overwrite`` (or ``--resume``). Nothing in it is deleted here."""
    if overwrite and resume:
        parser.error("--resume and --overwrite contradict each other: resume continues the run in --out, "
                     "overwrite starts a new one")
    existed = os.path.isdir(path)
    try:
        writable_dir(path)
    except argparse.ArgumentTypeError as err:
        parser.error(f"--out: {err}")
    entries = [e for e in os.listdir(path) if not e.startswith(_WRITE_CHECK)] if existed else []
    if entries and not (overwrite or resume):
        shown = ", ".join(sorted(entries)[:5]) + (" …" if len(entries) > 5 else "")
        parser.error(f"--out {path!r} is not empty ({shown}): pass --overwrite to replace its results"
                     + (" or --resume to continue its run" if resumable else ""))
    return path


@dataclass
class ModelDir:
    """A checked ``--model`` folder: its family, and (for a LoRA adapter folder) the base model."""

    path: str
    model_type: str
    base_path: str              # where the full model's weights are (== path unless an adapter folder)
    adapter: Optional[str]      # an adapter folder to apply on top, if any


def supported_families() -> List[str]:
    from ..testing import TINY_FAMILIES

    return list(TINY_FAMILIES)


def check_model_dir(parser: argparse.ArgumentParser, path: str, *, allow_adapter: bool) -> ModelDir:
    """``--model``: a ``save_pretrained`` folder of a supported family (or, with
    ``allow_adapter``, a peft adapter folder whose base model is a local folder)."""
    if not os.path.isdir(path):
        parser.error(f"--model: no such folder: {path!r}")
    path = os.path.abspath(path)   # a LoRA adapter saved from it then names its base model absolutely
    adapter = None
    base = path
    if not os.path.isfile(os.path.join(path, "config.json")):
        adapter_cfg = os.path.join(path, "adapter_config.json")
        if not os.path.isfile(adapter_cfg):
            parser.error(f"--model {path!r} has no config.json: pass a folder saved with model.save_pretrained(DIR) "
                         "and processor.save_pretrained(DIR)")
        if not allow_adapter:
            parser.error(f"--model {path!r} is a LoRA adapter: pass its base model folder as --model")
        with open(adapter_cfg, encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path") or ""
        if not os.path.isfile(os.path.join(base, "config.json")):
            parser.error(f"--model {path!r} is a LoRA adapter whose base model {base!r} is not a local model "
                         "folder: pass the base model as --model and this folder as --adapter")
        adapter = path
    with open(os.path.join(base, "config.json"), encoding="utf-8") as f:
        try:
            model_type = json.load(f).get("model_type")
        except ValueError as err:
            parser.error(f"--model: {base}/config.json is not valid JSON ({err})")
    families = supported_families()
    if model_type not in families:
        parser.error(f"--model: model type {model_type!r} is not supported; supported families: {', '.join(families)}")
    return ModelDir(path=path, model_type=model_type, base_path=base, adapter=adapter)


def load_processor_or_exit(parser: argparse.ArgumentParser, model: ModelDir) -> Any:
    from ..data import load_processor

    for folder in dict.fromkeys([model.path, model.base_path]):
        try:
            return load_processor(folder)
        except ValueError as err:
            last = err
    parser.error(f"--model: {last}")


def load_data_or_exit(parser: argparse.ArgumentParser, args) -> Any:
    from ..data import DataError, load_samples

    try:
        return load_samples(args.data, image_root=args.image_root, skip_bad_rows=getattr(args, "skip_bad_rows", False),
                            progress=sys.stderr.isatty())
    except DataError as err:
        parser.error(f"--data: {err}")


def check_first_batch_or_exit(parser: argparse.ArgumentParser, collator: Any, samples: List[Any], size: int) -> None:
    """Collate the first batch before a model is loaded: the template, processor and images."""
    from ..data import DataError

    try:
        collator(samples[:max(1, size)])
    except DataError as err:   # the message names the rows (and the processor setting at fault)
        parser.error(str(err))
    except Exception as err:   # the processor rejecting our text/images: say which and why
        parser.error(f"--model: its processor cannot prepare the first batch of --data ({type(err).__name__}: {err})")


def load_inputs_or_exit(parser: argparse.ArgumentParser, args, model: ModelDir) -> Tuple[Any, Any, Any]:
    """(data, processor, collator) of ``--data`` for ``model``, the first batch already
    collated: every input checked before a weight is read."""
    data = load_data_or_exit(parser, args)
    processor = load_processor_or_exit(parser, model)
    from ..data import ConversationCollator

    try:
        collator = ConversationCollator(processor, template=args.template)
    except ValueError as err:
        parser.error(f"--template: {err}")
    check_first_batch_or_exit(parser, collator, data.samples, args.batch_size)
    return data, processor, collator


def load_model(model: ModelDir, *, bf16: bool = False, adapter: Optional[str] = None, trainable_adapter: bool = False):
    """The model (``AutoModelForImageTextToText``) with the adapter folder(s) applied."""
    import torch
    from transformers import AutoModelForImageTextToText

    dtype = torch.bfloat16 if bf16 else torch.float32
    net = AutoModelForImageTextToText.from_pretrained(model.base_path, dtype=dtype, local_files_only=True)
    for folder in [a for a in (model.adapter, adapter) if a]:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, folder, is_trainable=trainable_adapter)
    return net


def add_lora(net, r: int):
    """LoRA adapters (rank ``r``, alpha 2r) on the language model's attention projections."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(net, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=LORA_TARGETS))


def quiet_transformers() -> None:
    """transformers' own warnings at ERROR (the CLI says what matters itself)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()   # "Loading weights" bars; the Trainer's own bar stays


def library_logging(verbose: bool) -> None:
    """pcr_fast's INFO messages (scan summaries, skipped rows) through the handler ``main()``
    configured (the root logger's)."""
    logging.getLogger("pcr_fast").setLevel(logging.DEBUG if verbose else logging.INFO)
