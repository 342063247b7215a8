"""loran/pipeline/generation.py: generation runs the model in eval mode (no adapter dropout in the outputs) and
restores the mode it found."""
import torch

from loran.pipeline.generation import generate


PROMPTS = ["Article: the markets fell today\nTopic:", "Article: a new film opened\nTopic:",
           "Article: the election was close\nTopic:", "Article: the match ended in a draw\nTopic:"]


def test_generation_in_train_mode_equals_eval_mode_and_restores_train_mode(noisy_model):
    """Planted: `model.eval()` removed from generation.generate -> fails."""
    model, tokenizer = noisy_model
    torch.manual_seed(0)
    from_train = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2, progress=False)
    assert model.training
    model.eval()
    from_eval = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2, progress=False)
    assert not model.training
    assert from_train == from_eval
    # The check can tell: the same prompts with the dropout active give other outputs.
    model.train()
    with torch.no_grad():
        ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
        torch.manual_seed(1)
        noisy = model(ids).logits
        model.eval()
        clean = model(ids).logits
    assert not torch.allclose(noisy, clean, atol=1e-3)
