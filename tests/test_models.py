"""Model loading (embedded SmolLM2: GGUF conversion, NF4/int8), the tiny test model, and batched generation."""
import functools
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from loran.pipeline import base_models as models
from loran import LoranConfig
from loran.pipeline.generation import generate
from loran.pipeline.training import wrap_model

LOAD_GGUF = models.load_smollm2_gguf  # the real loader, before any test patches it
PROMPT = "The capital of France is Paris. The capital of Germany is"


@functools.cache
def gguf_model():
    """The GGUF-loaded SmolLM2, loaded at most once per session (~15-30 s)."""
    return LOAD_GGUF()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The converted checkpoint: the default cache if built, else converted once into a session temp folder."""
    default = models.default_cache_dir() / models.SMOLLM2_DIRNAME
    if default.is_dir():
        return default
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_smollm2_gguf", gguf_model)  # the equality test reuses this one GGUF load
        return models.smollm2_checkpoint(str(tmp_path_factory.mktemp("loran-cache")))


@pytest.fixture(scope="session")
def smollm2_float(smollm2_dir):
    """Float32 SmolLM2 and tokenizer, loaded from the converted checkpoint."""
    model, tokenizer = models.load_causal_lm("smollm2-135m", cache_dir=str(smollm2_dir.parent))
    return model.eval(), tokenizer


def logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    """Last-layer logits of one text, shape (1, tokens, vocab)."""
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_converted_checkpoint_matches_gguf(smollm2_float):
    model, tokenizer = smollm2_float
    reference, _ = gguf_model()
    torch.testing.assert_close(logits(model, tokenizer), logits(reference.eval(), tokenizer))
    assert not hasattr(model.config, "quantization_config")
    assert model.model.layers[0].self_attn.v_proj.weight.shape == (192, 576)  # GQA: 3 kv heads of 64
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_checkpoint_conversion_is_atomic_and_reused(tmp_path, monkeypatch, smollm2_dir):
    tiny = models.tiny_causal_lm(cache_dir=str(smollm2_dir.parent))

    def broken_save(*args, **kwargs):
        raise KeyboardInterrupt  # an interrupted conversion

    monkeypatch.setattr(models, "load_smollm2_gguf", lambda: tiny)
    monkeypatch.setattr(tiny[0], "save_pretrained", broken_save)
    with pytest.raises(KeyboardInterrupt):
        models.smollm2_checkpoint(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct.lock"]  # no partial folder

    monkeypatch.undo()
    monkeypatch.setattr(models, "load_smollm2_gguf", lambda: tiny)
    path = models.smollm2_checkpoint(str(tmp_path))
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    monkeypatch.setattr(models, "load_smollm2_gguf", lambda: pytest.fail("converted twice"))
    assert models.smollm2_checkpoint(str(tmp_path)) == path


@pytest.mark.parametrize("field, kwargs", [("quantization", {"quantization": "fp4"}), ("dtype", {"dtype": "fp8"})])
def test_load_rejects_unknown_choices(field, kwargs):
    with pytest.raises(ValueError, match=f"{field}=.* is not one of"):
        models.load_causal_lm("smollm2-135m", **kwargs)


def test_load_local_folder(tmp_path, smollm2_dir):
    tiny, tokenizer = models.tiny_causal_lm(cache_dir=str(smollm2_dir.parent))
    tiny.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tokenizer = models.load_causal_lm(str(tmp_path), dtype="bfloat16", gradient_checkpointing=True)
    assert model.dtype == torch.bfloat16 and model.is_activation_checkpointing
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("checkpointing", [True, False])
def test_kbit_preparation_keeps_the_loaders_gradient_checkpointing(smollm2_dir, checkpointing):
    """model.load.gradient_checkpointing is the one switch: PEFT's k-bit preparation (wrap_model) does not change it."""
    nf4, _ = models.load_causal_lm("smollm2-135m", quantization="nf4", gradient_checkpointing=checkpointing,
                                   cache_dir=str(smollm2_dir.parent))
    wrapped = wrap_model(nf4, LoranConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    assert wrapped.get_base_model().is_activation_checkpointing is checkpointing


def test_nf4_load(smollm2_dir, smollm2_float):
    model, tokenizer = smollm2_float
    nf4, _ = models.load_causal_lm("smollm2-135m", quantization="nf4", cache_dir=str(smollm2_dir.parent))
    quantized = {n: m for n, m in nf4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 30 * 7  # q, k, v, o, gate, up, down in each of 30 layers; lm_head stays float
    assert not isinstance(nf4.lm_head, bnb.nn.Linear4bit)
    for module in quantized.values():
        module.support_avx512bf16_for_cpu = False  # keep the fp32 path: no in-place bf16 repacking (see loran.pipeline.base_models.keep_4bit_weights_packed)
    got = logits(nf4.eval(), tokenizer)

    # Exact: the float model holding the dequantized NF4 weights computes the same logits.
    dequantized = {n + ".weight": bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state) for n, m in quantized.items()}
    state = {k: dequantized.get(k, v) for k, v in model.state_dict().items()}
    twin, _ = models.load_causal_lm("smollm2-135m", cache_dir=str(smollm2_dir.parent))
    twin.load_state_dict(state)
    torch.testing.assert_close(got, logits(twin.eval(), tokenizer), rtol=1e-4, atol=1e-3)

    # Close to float: measured relative logit error 0.37 and top-1 agreement 5/6 on this prompt (4-bit on a 135M model).
    ref = logits(model, tokenizer)
    assert ((got - ref).norm() / ref.norm()).item() < 0.5
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.75


def test_int8_load(smollm2_dir, smollm2_float):
    model, tokenizer = smollm2_float
    int8, _ = models.load_causal_lm("smollm2-135m", quantization="int8", cache_dir=str(smollm2_dir.parent))
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in int8.modules()) == 30 * 7
    got, ref = logits(int8.eval(), tokenizer), logits(model, tokenizer)
    assert ((got - ref).norm() / ref.norm()).item() < 0.3  # measured 0.16
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_tiny_model(smollm2_dir):
    state = torch.random.get_rng_state()
    model, tokenizer = models.tiny_causal_lm(seed=1, cache_dir=str(smollm2_dir.parent))
    assert torch.equal(torch.random.get_rng_state(), state)  # seeding leaves the caller's RNG alone
    assert len(tokenizer) == model.config.vocab_size == 49152
    assert model.model.layers[0].self_attn.v_proj.weight.shape == (32, 64)  # non-square, as SmolLM2's GQA
    same, _ = models.tiny_causal_lm(seed=1, cache_dir=str(smollm2_dir.parent))
    other, _ = models.tiny_causal_lm(seed=2, cache_dir=str(smollm2_dir.parent))
    w = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w, same.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(w, other.model.layers[0].mlp.up_proj.weight)


def test_batched_generation_equals_one_by_one(smollm2_dir):
    # initializer_range=0.2: a 0.02 init makes the tiny model repeat the last token whatever the context.
    model, tokenizer = models.tiny_causal_lm(seed=0, initializer_range=0.2, cache_dir=str(smollm2_dir.parent))
    model.train()
    prompts = [
        "Hi",
        "The quick brown fox jumps over the lazy dog, and then it",
        "Summarize: the markets fell on Monday.",
        "x",
        "Once upon a time there was",
    ]
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3, progress=False)
    single = [generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single
    assert len(set(batched)) == len(prompts) and all(batched)  # outputs depend on the prompt
    assert model.training  # the caller's mode is restored
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    assert generate(model, tokenizer, ids, max_new_tokens=8, batch_size=2, progress=False) == batched


def test_default_device_map_puts_each_rank_on_its_own_gpu(monkeypatch):
    from loran.pipeline import base_models as models

    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    assert models.default_device_map() is None
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert models.default_device_map() == {"": 3}
