"""SmolLM2-135M: one optimizer step of LoRAN against LoRA on the same base, and generation after merging. (make bench; the code and its full usage are in loran/bench/train_step.py)."""
from loran.bench.train_step import main

if __name__ == "__main__":
    main()
