#!/bin/sh
# The wheel works outside the clone: build it, install it with the locked dependencies into a venv
# that has never seen the repository, and run loka from another directory (`make test-wheel`).
# The dependencies' venv is kept in build/wheel-venv and rebuilt when the lock changes; loka itself is
# reinstalled from the new wheel on every run.
set -eu
PYTHON=${PYTHON:-.venv/bin/python}
LOCK=${LOCK:-requirements.lock}
ROOT=$(pwd)
OUT=$ROOT/build/wheel-test
VENV=$ROOT/build/wheel-venv
rm -rf "$OUT"
mkdir -p "$OUT/dist" "$OUT/work"

"$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$OUT/dist" .
WHEEL=$(ls "$OUT"/dist/loka-*.whl)
echo "built $(basename "$WHEEL")"

LOCK_SUM=$(sha256sum "$LOCK" | cut -d' ' -f1)
if [ "$(cat "$VENV/.lock-sha256" 2>/dev/null || true)" != "$LOCK_SUM" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$(grep -E '^pip==' "$LOCK")"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$LOCK"
    echo "$LOCK_SUM" > "$VENV/.lock-sha256"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$WHEEL"

# from a folder outside the clone, with a fresh cache root
cd "$OUT/work"
export LOKA_HOME="$OUT/home"
unset PYTHONPATH || true
LOKA="$VENV/bin/loka"
where=$("$VENV/bin/python" -c "import loka, pathlib; print(pathlib.Path(loka.__file__).parent)")
case "$where" in
    "$ROOT"/src/*) echo "FAIL: loka was imported from the clone ($where)"; exit 1 ;;
esac
echo "loka imported from $where"

"$LOKA" models | grep -q "tiny-llama" || { echo "FAIL: loka models"; exit 1; }
echo "ok: loka models"

"$LOKA" edit --model tiny-llama --prompt "{} lives in the city of" --subject "Alice Marlow" --target "Q" \
    --save edit.loka --json > edit.json
"$VENV/bin/python" - <<'PY'
import json
d = json.load(open("edit.json"))
b, a = d["before"][0]["p_target_new"], d["after"][0]["p_target_new"]
assert a > b, d
print(f"ok: loka edit (P(new) {b:.3g} -> {a:.3g}, artifact {d['artifact']['id']})")
PY
"$LOKA" inspect edit.loka >/dev/null
echo "ok: loka inspect"

"$LOKA" kg stats --graph curated --json > kg.json
"$VENV/bin/python" -c "import json; d = json.load(open('kg.json')); assert d['triples'] > 1000, d; print('ok: loka kg stats,', d['triples'], 'triples')"

"$LOKA" data tofu --out tofu >/dev/null
test -s tofu/forget01.json || { echo "FAIL: loka data tofu"; exit 1; }
echo "ok: loka data tofu (the TOFU splits shipped with the wheel)"
echo "wheel check passed"
