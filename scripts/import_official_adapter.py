"""Convert an official PEFT-LoRAN ("MLORA") adapter folder into a LoRAN adapter of this package.

    python scripts/import_official_adapter.py path/to/official_adapter path/to/loran_adapter
"""
import argparse
import sys

from loran.official import OfficialAdapterError, import_official_adapter


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder with adapter_config.json and adapter_model.bin (official format)")
    parser.add_argument("dst", help="output folder (loadable with loran.load_loran)")
    args = parser.parse_args()
    try:
        config = import_official_adapter(args.src, args.dst)
    except OfficialAdapterError as err:
        print(f"cannot convert {args.src}: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}: r={config.r} alpha={config.lora_alpha} activation={config.activation} "
          f"{config.activation_kwargs} targets={sorted(config.target_modules)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
