#!/usr/bin/env bash
# A folder of wheels for installing mssr-megatron on a cluster without internet access. Run it on a connected machine
# from the repository root; copy the folder to the cluster; install there with no index:
#
#   tools/make_wheelhouse.sh --extras sglang,te,dali --python-version 3.12 --dest wheelhouse   # connected machine
#   pip install --no-index --find-links wheelhouse 'mssr-megatron[sglang,te,dali]'            # cluster
#
# The folder holds the project's own wheel and the closure of its runtime requirements (requirements.txt) plus the
# chosen extras of pyproject.toml (sglang | vllm, te, dali: one engine per environment, see pyproject.toml).
# Options:
#   --extras LIST          comma-separated extras of pyproject.toml (default: none, the runtime requirements only)
#   --requirements FILE    download the requirements in FILE instead of requirements.txt + extras (a subset, e.g.
#                          to refresh a few packages)
#   --python-version X.Y   the cluster's Python (default: this interpreter's)
#   --platform TAG         a wheel platform the cluster accepts, repeatable (default when --python-version differs
#                          from this interpreter: manylinux_2_34/_2_28/_2_17/2014 x86_64, i.e. glibc >= 2.34, which
#                          the sglang wheel needs; else this machine's); cross-platform downloads take wheels only
#   --dest DIR             output folder (default wheelhouse)
#   --dry-run              print the commands, run nothing
# Environment: PYTHON (default python3, 3.11+: reads pyproject.toml with tomllib); PIP_* variables reach pip as usual
# (e.g. PIP_INDEX_URL for a mirror).
# Transformer Engine's torch extension (transformer_engine_torch) is a source package: a cross-platform download
# cannot fetch it; make the wheelhouse on a machine with the cluster's Python and platform, where it is downloaded
# as source and compiled on the cluster (add --no-build-isolation there; nvcc and the installed torch are needed).
set -euo pipefail

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }

PYTHON=${PYTHON:-python3}
extras="" requirements="" python_version="" dest="wheelhouse" dry_run=0
platforms=()
while [ $# -gt 0 ]; do
    case "$1" in
        --extras) extras=${2:?--extras needs a value}; shift 2 ;;
        --requirements) requirements=${2:?--requirements needs a file}; shift 2 ;;
        --python-version) python_version=${2:?--python-version needs X.Y}; shift 2 ;;
        --platform) platforms+=("${2:?--platform needs a tag}"); shift 2 ;;
        --dest) dest=${2:?--dest needs a folder}; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "make_wheelhouse.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[ -f pyproject.toml ] && [ -f requirements.txt ] || {
    echo "make_wheelhouse.sh: run it from the mssr-megatron repository root" >&2; exit 2; }

# The requirement lines to download: requirements.txt plus each extra's list from pyproject.toml (an unknown extra
# is an error, not an empty list).
req_file=$(mktemp "${TMPDIR:-/tmp}/mssr-wheelhouse-XXXXXX.txt")
trap 'rm -f "$req_file"' EXIT
if [ -n "$requirements" ]; then
    cp "$requirements" "$req_file"
else
    "$PYTHON" - "$extras" > "$req_file" <<'EOF'
import sys, tomllib

extras = [e for e in sys.argv[1].split(",") if e]
known = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
unknown = [e for e in extras if e not in known]
if unknown:
    sys.exit(f"make_wheelhouse.sh: unknown extra(s) {unknown}; pyproject.toml has {sorted(known)}")
if "sglang" in extras and "vllm" in extras:
    sys.exit("make_wheelhouse.sh: sglang and vllm pin different torch/flashinfer builds: one engine per wheelhouse")
lines = [l.split("#")[0].strip() for l in open("requirements.txt")]
print("\n".join([l for l in lines if l] + [r for e in extras for r in known[e]]))
EOF
fi

target=()
here=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ -n "$python_version" ] && [ "$python_version" != "$here" ] && [ ${#platforms[@]} -eq 0 ]; then
    platforms=(manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
fi
if [ -n "$python_version" ] || [ ${#platforms[@]} -gt 0 ]; then
    target+=(--only-binary=:all: --implementation cp --python-version "${python_version:-$here}")
    for p in ${platforms[@]+"${platforms[@]}"}; do target+=(--platform "$p"); done
fi

# The project wheel is built from a clean copy of the sources (an in-tree build would leave build/ behind, and a stale
# build/ can carry deleted modules into the wheel).
src=$(mktemp -d "${TMPDIR:-/tmp}/mssr-wheelhouse-src-XXXXXX")
trap 'rm -f "$req_file"; rm -rf "$src"' EXIT
case "$dest" in /*) ;; *) dest=$PWD/$dest ;; esac  # pip wheel runs on the copy: an absolute folder
build=("$PYTHON" -m pip wheel --no-deps --wheel-dir "$dest" "$src")
copy=(tar -c --exclude=__pycache__ pyproject.toml README.md requirements.txt mssr_megatron megatron_patches)
download=("$PYTHON" -m pip download --dest "$dest" ${target[@]+"${target[@]}"} -r "$req_file")
if [ "$dry_run" = 1 ]; then
    echo "# requirements ($req_file):"
    sed 's/^/#   /' "$req_file"
    echo "${copy[*]} | tar -x -C $src"
    echo "${build[*]}"
    echo "${download[*]}"
    exit 0
fi
mkdir -p "$dest"
"${copy[@]}" | tar -x -C "$src"
"${build[@]}"
"${download[@]}"
echo "wheelhouse ready: $dest ($(ls "$dest" | wc -l) files). On the cluster:"
echo "  pip install --no-index --find-links $dest 'mssr-megatron${extras:+[$extras]}'"
