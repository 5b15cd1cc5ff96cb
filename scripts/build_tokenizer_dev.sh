#!/usr/bin/env bash
# Fast rebuild of fastlm._tokenizer alone (development; setup.py builds it for installs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
inc=$($PY -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])")
ext=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
g++ -O3 -march=${FASTLM_MARCH:-native} -fopenmp -std=c++17 -shared -fPIC -fvisibility=hidden \
  -Icsrc -I"$inc" $($PY -c "import sysconfig; print('-I' + sysconfig.get_paths()['include'])") \
  csrc/tokenizer/*.cpp -o "fastlm/_tokenizer$ext"
