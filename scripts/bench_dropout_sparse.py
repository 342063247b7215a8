"""Why LoRAN's update is not folded into W0 when dropout is active: the exact sparse rewrite, timed on this CPU. (make bench; the code and its full usage are in loran/bench/dropout_sparse.py)."""
from loran.bench.dropout_sparse import main

if __name__ == "__main__":
    main()
