#!/usr/bin/env bash
# Prepare the lent GPU machine: its image has torch, transformers, accelerate and
# safetensors but no diffusers, which travels as a wheel in .whl/ (fetch it here with `pip download --no-deps -d .whl diffusers==0.42.1`, carry .whl with the run).
set -euo pipefail
python3 -m pip install -q --no-deps .whl/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
python3 -c "import dori, diffusers, torch; print('dori ready:', torch.__version__, torch.cuda.get_device_name(0))"
