#!/usr/bin/env bash
# FlashAttention-4 (the `fa4` extra) onto a GPU machine that has no network and takes 64 MiB per call.
# Its compiler wheel, nvidia-cutlass-dsl-libs-cu12, is 92 MB (225 MB unpacked): more than one call carries.
# So the eight wheels go as one archive (the compiler's files xz-compressed: 73 MB) in three parts, one call
# each, gathered in /tmp of the same warm machine (a carried folder is gone by the next call; /tmp stays
# while the machine is held).
#
#   here:    bash benchmarks/fa4_wheels.sh pack              # .fa4a/ .fa4b/ .fa4c/ (git-ignored)
#   GPU, three calls in a row, carrying .fa4a, then .fa4b, then .fa4c:
#            bash benchmarks/fa4_wheels.sh gather .fa4a      # (and .fa4b, then .fa4c)
#   GPU, after the third:
#            bash benchmarks/fa4_wheels.sh install /tmp/site # then PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:...
# The `cutlass` package is found through a .pth file, which a `pip install --target` folder does not read:
# hence the second PYTHONPATH entry.
set -euo pipefail
VERSION=${FA4_VERSION:-4.0.0b36}
CUTLASS=${CUTLASS_DSL_VERSION:-4.8.1}
case "${1:?usage: fa4_wheels.sh pack | gather DIR | install TARGET}" in
pack)
    work=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 -d "$work/wheels" "flash-attn-4==$VERSION" "nvidia-cutlass-dsl==$CUTLASS" \
        "nvidia-cutlass-dsl-libs-base==$CUTLASS" "nvidia-cutlass-dsl-libs-core==$CUTLASS" \
        "nvidia-cutlass-dsl-libs-cu12==$CUTLASS" quack-kernels "apache-tvm-ffi<0.2" torch-c-dlpack-ext einops
    mkdir -p "$work/bundle" "$work/libs"
    (cd "$work/libs" && python3 -m zipfile -e "$work"/wheels/nvidia_cutlass_dsl_libs_cu12-*.whl .)
    tar cf - -C "$work/libs" . | xz -T2 -7 > "$work/bundle/libs-cu12.tar.xz"
    cp "$work"/wheels/*.whl "$work/bundle/" && rm "$work"/bundle/nvidia_cutlass_dsl_libs_cu12-*.whl
    tar cf "$work/bundle.tar" -C "$work/bundle" .
    (cd "$work" && split -n 3 -d bundle.tar part.)
    for i in 0 1 2; do
        d=.fa4$(echo abc | cut -c$((i + 1)))
        grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude
        rm -rf "$d" && mkdir "$d" && mv "$work/part.0$i" "$d/"
    done
    md5sum < "$work/bundle.tar" | cut -d' ' -f1 | tee .fa4a/bundle.md5
    rm -rf "$work" ;;
gather)
    mkdir -p /tmp/fa4p
    cp "${2:?gather DIR}"/part.* /tmp/fa4p/
    if ls "$2"/*.md5 >/dev/null 2>&1; then cp "$2"/*.md5 /tmp/fa4p/; fi  # (.fa4a only)
    ls -l /tmp/fa4p ;;
install)
    target=${2:?install TARGET}
    cd /tmp/fa4p && cat part.00 part.01 part.02 > bundle.tar
    if [ -f bundle.md5 ] && [ "$(md5sum < bundle.tar | cut -d' ' -f1)" != "$(cat bundle.md5)" ]; then
        echo "the three parts do not make the packed archive: gather .fa4a, .fa4b and .fa4c again" >&2; exit 1
    fi
    rm -rf bundle && mkdir bundle && tar xf bundle.tar -C bundle
    for w in bundle/*.whl; do python3 -m zipfile -e "$w" "$target"; done  # one tree: pip --target will not merge
    tar xJf bundle/libs-cu12.tar.xz -C "$target"
    PYTHONPATH=$target:$target/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-} \
        python3 -c "import flash_attn.cute.interface; print('flash-attn-4 imports')" ;;
*)
    echo "usage: fa4_wheels.sh pack | gather DIR | install TARGET" >&2; exit 2 ;;
esac
