#!/usr/bin/env bash
# Fetch, on this machine (where pip reaches the package registry), the wheels that the lent GPU
# machine may lack, into .whl/ (git-ignored through .git/info/exclude; gpu_session.sh installs only
# those whose package `pip show` does not find there): that machine has CUDA torch,
# triton, transformers, safetensors, tensorboard, numpy, pyarrow and tqdm (Python 3.12) but no
# registry, and selfdistill also needs hydra-core, omegaconf, math-verify and deepspeed and their
# dependencies. Pure-Python packages come as py3-none-any wheels, pydantic-core as a cp312
# manylinux wheel, and the two published only as source (antlr4-python3-runtime, deepspeed) are
# built into wheels here (pure Python too). Versions are those installed here, the ones the tests
# ran with; liger-kernel (pure Python, not a dependency) is the benchmarks' comparison point. Then the device command carries .whl and gpu_session.sh installs from it:
#     bash benchmarks/gpu_wheels.sh
#     run(command="bash benchmarks/gpu_session.sh all", carry=[".whl"], timeout_s=600)
set -euo pipefail
DEST=${DEST:-.whl}
mkdir -p "$DEST"
if [ -d .git ] && ! grep -qx "/$DEST/" .git/info/exclude 2>/dev/null; then echo "/$DEST/" >> .git/info/exclude; fi
pin() { python -c "import sys; from importlib.metadata import version; print(' '.join(f'{n}=={version(n)}' for n in sys.argv[1:]))" "$@"; }
BINARY=$(pin hydra-core omegaconf math-verify latex2sympy2_extended pydantic pydantic_core annotated-types typing-inspection typing_extensions hjson)
SOURCE=$(pin antlr4-python3-runtime deepspeed)
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" $BINARY liger-kernel==0.8.5
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps -w "$DEST" $SOURCE
ls -la "$DEST"
du -sh "$DEST"
