"""Loading a model directory's processor, also where its video half cannot load.

Why the fallback: in transformers 5.x the processors of Qwen2-VL, Qwen2.5-VL, Qwen3-VL and
others build a video processor even for image-only use, and that needs torchvision (and a
``video_preprocessor_config.json``). pcr_fast only ever passes images, so when the full
processor cannot be built it loads the same processor class without its video processor
(:func:`images_only_processor_class`) and says so in the log.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

logger = logging.getLogger(__name__)

_VIDEO_ATTRIBUTES = ("video_processor",)


def images_only_processor_class(cls: type) -> type:
    """``cls`` (a ``ProcessorMixin`` subclass) without its video processor: same name, same
    image/text behaviour, saved and loaded like ``cls`` (``save_pretrained``/``from_pretrained``)."""
    if not any(a in _VIDEO_ATTRIBUTES for a in cls.get_attributes()):
        return cls

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        for name in _VIDEO_ATTRIBUTES:
            kwargs.pop(name, None)
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})


def _processor_class_name(model_dir: str) -> Optional[str]:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    value = json.load(f).get("processor_class")
            except (OSError, ValueError):
                continue
            if isinstance(value, str):
                return value
    try:
        from transformers import AutoConfig
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        model_type = AutoConfig.from_pretrained(model_dir, local_files_only=True).model_type
        return PROCESSOR_MAPPING_NAMES.get(model_type)
    except Exception:   # no config, or a model type transformers does not map
        return None


def load_processor(model_dir: str) -> Any:
    """The processor saved in ``model_dir`` (``AutoProcessor``), or the same class without its
    video processor when only that part cannot load. Raises ValueError saying what is missing."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except Exception as err:   # transformers raises OSError/ImportError/ValueError/KeyError here
        first = err
        name = _processor_class_name(model_dir)
        import transformers

        cls = getattr(transformers, name, None) if name else None
        if cls is None or images_only_processor_class(cls) is cls:
            raise ValueError(f"{model_dir}: cannot load its processor ({type(first).__name__}: {first}); "
                             "save it next to the model with processor.save_pretrained(DIR)") from None
        try:
            processor = images_only_processor_class(cls).from_pretrained(model_dir, local_files_only=True)
        except Exception as err2:
            raise ValueError(f"{model_dir}: cannot load its processor ({type(first).__name__}: {first}; without "
                             f"its video processor: {type(err2).__name__}: {err2})") from None
        logger.warning("%s: loaded %s without its video processor (%s: %s); pcr_fast uses images only",
                       model_dir, name, type(first).__name__, str(first).splitlines()[0][:120])
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ValueError(f"{model_dir}: its processor ({type(processor).__name__}) has no image processor and "
                         "tokenizer: pcr_fast needs a vision-language processor (e.g. LlavaProcessor, "
                         "Qwen2VLProcessor)")
    return processor
