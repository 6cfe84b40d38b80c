"""Backdoor attack/defense evaluation harness: does PCR defend? (DESIGN §6)

Public pieces: data (:func:`load_digits_images`), tokenizer (:func:`build_tokenizer`),
triggers (:data:`ATTACKS`, :func:`get_trigger`, trigger classes), poisoning
(:func:`choose_poisoned`), metrics, the tiny models, :func:`run_experiment` and the
defaults the experiments chose (:data:`DEMO_PCR_CONFIG`; evidence in
benchmarks/EVAL_NOTES.md).
"""
from .data import DigitImages, load_digits_images, make_samples, train_test_split
from .defaults import DEMO_PCR_CONFIG
from .metrics import attack_success_rate, contains_target, corpus_bleu, exact_match, false_trigger_rate
from .models import HARNESS_FAMILIES, ModelSpec, build_model
from .poison import DEFAULT_TARGET, choose_poisoned, poison_count
from .runner import DEFENSES, RESULT_KEYS, evaluate, run_experiment
from .tokenizer import build_tokenizer
from .triggers import ATTACKS, SIG, BadNets, Blended, SampleNoise, WaNet, get_trigger

__all__ = ["DEMO_PCR_CONFIG", "DigitImages", "load_digits_images", "make_samples",
           "train_test_split", "attack_success_rate", "contains_target", "corpus_bleu", "exact_match", "false_trigger_rate",
           "HARNESS_FAMILIES", "ModelSpec",
           "build_model", "DEFAULT_TARGET", "choose_poisoned", "poison_count", "DEFENSES", "RESULT_KEYS",
           "evaluate", "run_experiment", "build_tokenizer", "ATTACKS", "SIG", "BadNets", "Blended",
           "SampleNoise", "WaNet", "get_trigger"]
