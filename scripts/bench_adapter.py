"""One adapted layer, forward + backward: PEFT's LoRA, naive LoRAN and this package's LoRAN, time and memory. (make bench; the code and its full usage are in loran/bench/adapter.py)."""
from loran.bench.adapter import main

if __name__ == "__main__":
    main()
