#!/usr/bin/env bash
# Sets up .venv (pip, no GPU needed) and trains the built-in default: a small frozen ViT with MoSA
# adapters on scikit-learn's digits, streamed as webdataset shards written on the fly, with
# DeepSpeed ZeRO-2 on 2 ranks (CPU ranks when there is no GPU, one rank per GPU otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -e .
port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
gpus=$(.venv/bin/python -c 'import torch; print(torch.cuda.device_count() or 2)')
set -x
exec .venv/bin/deepspeed --num_gpus "$gpus" --master_port "$port" launchers/train.py \
    --config launchers/configs/digits_default.yaml "$@"
