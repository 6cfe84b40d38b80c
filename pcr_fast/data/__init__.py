"""Dataset files → checked samples → processor batches (what ``pcr-fast train`` and
``pcr-fast scan`` read).

    data = load_samples("train.json", image_root="images/")        # every row checked, file:line errors
    processor = load_processor(model_dir)
    collate = ConversationCollator(processor)                        # labels on every answer, sample_ids
    batch = collate(data.samples[:8])

Formats (detected from the content): LLaVA conversation JSON and TRL messages JSONL
(:mod:`pcr_fast.data.formats`).
"""
from .collate import ConversationCollator, ConversationDataset, check_pixels
from .formats import load_samples
from .processor import images_only_processor_class, load_processor
from .records import BadRow, DataError, LoadedData, Sample

__all__ = ["BadRow", "ConversationCollator", "ConversationDataset", "DataError", "LoadedData", "Sample",
           "check_pixels", "images_only_processor_class", "load_processor", "load_samples"]
