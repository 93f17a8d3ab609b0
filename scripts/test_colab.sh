#!/usr/bin/env bash
# make test-colab: run the collection the way Colab runs it.
#  1. an environment of its own (.venv-colab, or $COLAB_VENV) with Colab's torch, transformers and
#     peft and the lower bounds of the other dependencies (requirements-colab.txt);
#  2. llmlab built as a wheel and installed from it, with the extras the notebooks name;
#  3. the unit tests and strict nbval on every notebook, run from a copy of the repository that
#     has no llmlab/ folder, so every import of llmlab comes from the installed wheel.
# Not part of `make test`: the first run downloads torch's CUDA build (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${COLAB_VENV:-.venv-colab}
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

test -x "$venv/bin/python" || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --quiet)
"${pip[@]}" install --upgrade pip
# The libraries at Colab's versions (requirements-colab.txt); everything else at the project's pins.
pinned=$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' requirements-colab.txt | paste -sd'|')
grep -vE "^($pinned)==|^-e " requirements.txt > "$work/tools.txt"
"${pip[@]}" install -r requirements-colab.txt -r "$work/tools.txt"

"${pip[@]}" wheel --no-deps --wheel-dir "$work/dist" .
wheel=$(ls "$work"/dist/llmlab-*.whl)
"${pip[@]}" install --force-reinstall --no-deps "$wheel"
extras=$("$venv/bin/python" -c 'import tomllib; print(",".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]))')
"${pip[@]}" install "llmlab[$extras] @ file://$wheel" -c requirements-colab.txt

mkdir "$work/repo"
git ls-files -z | grep -zv '^llmlab/' | xargs -0 cp --parents -t "$work/repo"
cd "$work/repo"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import llmlab
assert "site-packages" in llmlab.__file__, llmlab.__file__
print("llmlab from the wheel;", ", ".join(f"{d} {md.version(d)}" for d in
      ("torch", "transformers", "peft", "numpy", "matplotlib", "safetensors", "tqdm", "regex",
       "tokenizers")))
PY
export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
"$venv/bin/python" -m pytest tests notebooks -n "${WORKERS:-2}" --dist loadfile -p no:cacheprovider \
    --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 300
